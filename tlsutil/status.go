package tlsutil

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"slices"
	"sync"
	"time"
)

// CertificateInfo describes a certificate kas serves, for the status page:
// public facts only, never the key.
type CertificateInfo struct {
	// Source says where it comes from: a certificate_file, or ACME.
	Source    string    `json:"source"`
	Names     []string  `json:"names"`
	Issuer    string    `json:"issuer"`
	NotBefore time.Time `json:"not_before"`
	NotAfter  time.Time `json:"not_after"`
	// Renewal is the ACME renewal state ("renews from …", the last
	// attempt's outcome); empty for certificate files.
	Renewal string `json:"renewal,omitempty"`
	// Error says why there is no usable certificate, if so.
	Error string `json:"error,omitempty"`
}

// describe fills the public facts of cert's leaf.
func describe(source string, cert *tls.Certificate) CertificateInfo {
	info := CertificateInfo{Source: source}
	leaf := cert.Leaf
	if leaf == nil && len(cert.Certificate) > 0 {
		var err error
		if leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			info.Error = "parse certificate: " + err.Error()
			return info
		}
	}
	if leaf == nil {
		info.Error = "no certificate"
		return info
	}
	info.Names = slices.Clone(leaf.DNSNames)
	for _, ip := range leaf.IPAddresses {
		info.Names = append(info.Names, ip.String())
	}
	if len(info.Names) == 0 && leaf.Subject.CommonName != "" {
		info.Names = []string{leaf.Subject.CommonName}
	}
	info.Issuer = leaf.Issuer.String()
	info.NotBefore, info.NotAfter = leaf.NotBefore.UTC(), leaf.NotAfter.UTC()
	return info
}

// Info describes the certificate being served; source names the listener.
func (r *CertReloader) Info(source string) CertificateInfo {
	return describe(source+" certificate_file "+r.certFile, r.current.Load())
}

// acmeEvents remembers certmagic's last obtain/renew outcome per domain.
type acmeEvents struct {
	mu   sync.Mutex
	last map[string]string // domain → what happened, with when
}

// onEvent is certmagic's Config.OnEvent.
func (e *acmeEvents) onEvent(_ context.Context, event string, data map[string]any) error {
	name, _ := data["identifier"].(string)
	if name == "" {
		return nil
	}
	what := ""
	renewal, _ := data["renewal"].(bool)
	verb := "obtain"
	if renewal {
		verb = "renew"
	}
	now := time.Now().UTC().Format(time.RFC3339)
	switch event {
	case "cert_obtaining":
		what = fmt.Sprintf("trying to %s since %s", verb, now)
	case "cert_obtained":
		what = fmt.Sprintf("%sed at %s", verb, now)
		if verb == "obtain" {
			what = "obtained at " + now
		}
	case "cert_failed":
		what = fmt.Sprintf("%s failed at %s: %v", verb, now, data["error"])
	default:
		return nil
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.last == nil {
		e.last = map[string]string{}
	}
	e.last[name] = what
	return nil
}

func (e *acmeEvents) get(domain string) string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.last[domain]
}

// Certificates describes each domain's certificate and its renewal.
func (a *ACME) Certificates() []CertificateInfo {
	var out []CertificateInfo
	for _, d := range a.domains {
		certs := a.cache.AllMatchingCertificates(d)
		last := a.events.get(d)
		if len(certs) == 0 {
			info := CertificateInfo{Source: "ACME (" + a.ca + ")", Names: []string{d}, Error: "no certificate yet"}
			info.Renewal = last
			out = append(out, info)
			continue
		}
		c := certs[0]
		info := describe("ACME ("+a.ca+")", &c.Certificate)
		switch {
		case c.NeedsRenewal(a.magic):
			info.Renewal = "due now"
		case !info.NotAfter.IsZero():
			// certmagic renews once a third of the lifetime is left.
			life := info.NotAfter.Sub(info.NotBefore)
			info.Renewal = "renews from " + info.NotAfter.Add(-life/3).Format(time.RFC3339)
		}
		if last != "" {
			info.Renewal += "; last: " + last
		}
		out = append(out, info)
	}
	return out
}
