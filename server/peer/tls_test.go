package peer

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// testPKI is a CA and a server certificate it signed for kas.internal and
// 127.0.0.1.
type testPKI struct {
	roots  *x509.CertPool
	server tls.Certificate
}

func newTestPKI(t *testing.T) testPKI {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "kas test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "kas.internal"},
		DNSNames:     []string{"kas.internal"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	return testPKI{roots: roots, server: tls.Certificate{Certificate: [][]byte{leafDER}, PrivateKey: key}}
}

func TestForwardOverTLS(t *testing.T) {
	pki := newTestPKI(t)
	b := newNode(t, nodeConfig{serverOpts: func(o *ServerOptions) {
		o.TLS = &tls.Config{Certificates: []tls.Certificate{pki.server}, MinVersion: tls.VersionTLS12}
	}})
	b.connectAgent(t, 1, newTestAgent("b"))
	if !strings.HasPrefix(b.url, "grpcs://") {
		t.Fatalf("node URL %s", b.url)
	}
	tests := []struct {
		name       string
		roots      bool
		serverName string // OWN_PRIVATE_API_HOST
		wantErr    []string
	}{
		{name: "server name from OWN_PRIVATE_API_HOST", roots: true, serverName: "kas.internal"},
		{name: "server name from the URL", roots: true},
		{name: "wrong OWN_PRIVATE_API_HOST", roots: true, serverName: "other.internal",
			wantErr: []string{"certificate is valid for kas.internal", "OWN_PRIVATE_API_HOST must be a name in the nodes' certificates"}},
		{name: "CA not trusted", serverName: "kas.internal",
			wantErr: []string{"signed by an unknown authority", "ca_certificate_file"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			reg := newClusterRegistry()
			reg.setRemote([]string{b.url})
			opts := RouterOptions{Registry: reg, Secret: testSecret, Logger: discardLogger(), ServerName: tt.serverName}
			if tt.roots {
				opts.TLS = &tls.Config{RootCAs: pki.roots, MinVersion: tls.VersionTLS12}
			}
			router, err := NewRouter(opts)
			if err != nil {
				t.Fatal(err)
			}
			defer router.Close()
			ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
			defer cancel()
			rt, err := router.Route(ctx, 1)
			if err != nil {
				t.Fatal(err)
			}
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://agent/small", nil)
			resp, err := rt.RoundTrip(req)
			if tt.wantErr == nil {
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					t.Fatalf("status %d", resp.StatusCode)
				}
				return
			}
			if err == nil {
				resp.Body.Close()
				t.Fatal("request succeeded; want a TLS error")
			}
			for _, want := range tt.wantErr {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not contain %q", err, want)
				}
			}
		})
	}
}
