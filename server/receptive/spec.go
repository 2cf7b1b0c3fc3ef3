package receptive

import (
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"

	"github.com/kasproject/kas/protocol"
	"github.com/kasproject/kas/server/gitlab"
)

// spec is one receptive agent as kas dials it: checked and parsed from
// GitLab's (or the standalone file's) URL configuration. Never modified;
// it holds key material, so it is never logged, only its URL.
type spec struct {
	id int64
	// rawURL is the URL as configured, for logs.
	rawURL string
	// url is the WebSocket URL kas dials (see protocol.ReceptiveURL).
	url *url.URL
	// tls is the client TLS of a wss:// URL: the agent's CA (or the base
	// pool), the server name, and kas's client certificate for mTLS. Nil
	// for ws://.
	tls *tls.Config
	// jwtKey signs kas's JWT; nil with mTLS only.
	jwtKey ed25519.PrivateKey
	// version tells configurations apart: a changed one is redialled.
	version [sha256.Size]byte
}

// parseSpec checks a receptive agent's configuration. base is the TLS
// configuration for agents without their own CA certificate (the system
// pool and SSL_CERT_DIR). Errors never contain key material.
func parseSpec(ra gitlab.ReceptiveAgent, base *tls.Config) (*spec, error) {
	if ra.ID <= 0 {
		return nil, fmt.Errorf("agent id %d is not a GitLab agent ID", ra.ID)
	}
	wsURL, secure, err := protocol.ReceptiveURL(ra.URL)
	if err != nil {
		return nil, err
	}
	s := &spec{id: ra.ID, rawURL: ra.URL, url: wsURL}
	var errs []error
	if ra.JWT == nil && ra.MTLS == nil {
		errs = append(errs, errors.New("it has neither a JWT private key nor an mTLS client certificate, so kas cannot authenticate to it"))
	}
	if ra.JWT != nil {
		if s.jwtKey, err = protocol.ParseEd25519PrivateKey([]byte(ra.JWT.PrivateKey)); err != nil {
			errs = append(errs, fmt.Errorf("JWT private key: %w", err))
		}
	}
	if secure {
		s.tls = base.Clone()
		s.tls.ServerName = ra.TLSHost
		if s.tls.ServerName == "" {
			s.tls.ServerName = wsURL.Hostname()
		}
		// The WebSocket upgrade is HTTP/1.1.
		s.tls.NextProtos = []string{"http/1.1"}
		if ra.CACert != "" {
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM([]byte(ra.CACert)) {
				errs = append(errs, errors.New("ca_cert holds no PEM certificate"))
			}
			s.tls.RootCAs = pool
		}
		if ra.MTLS != nil {
			cert, err := tls.X509KeyPair([]byte(ra.MTLS.ClientCert), []byte(ra.MTLS.ClientKey))
			if err != nil {
				errs = append(errs, fmt.Errorf("mTLS client certificate and key: %w", err))
			}
			s.tls.Certificates = []tls.Certificate{cert}
		}
	} else if ra.MTLS != nil {
		errs = append(errs, fmt.Errorf("mTLS needs TLS, but %s is a plaintext URL: use grpcs:// or wss://", ra.URL))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	// The JSON holds every field; hashing it never exposes the keys.
	raw, _ := json.Marshal(ra)
	s.version = sha256.Sum256(raw)
	return s, nil
}
