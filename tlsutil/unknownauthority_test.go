package tlsutil

import (
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestUnknownAuthorityLoggerRealFailure(t *testing.T) {
	ca := newCA(t, "private GitLab CA")
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{ca.leaf(t)}}
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // the handshakes fail on purpose
	srv.StartTLS()
	t.Cleanup(srv.Close)
	cfg, err := ClientConfig("")
	if err != nil {
		t.Fatal(err)
	}
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}}
	defer client.CloseIdleConnections()

	logger, logs := newTestLogger(t)
	l := NewUnknownAuthorityLogger(logger, "gitlab.ca_certificate_file")
	for range 3 {
		_, err := client.Get(srv.URL)
		if !l.Log(srv.Listener.Addr().String(), err) {
			t.Fatalf("Log(%v) = false, want an unknown authority", err)
		}
	}
	out := logs.String()
	if n := strings.Count(out, "level=ERROR"); n != 1 {
		t.Errorf("three failures logged %d times, want once:\n%s", n, out)
	}
	for _, want := range []string{"gitlab.ca_certificate_file", "SSL_CERT_DIR", "private GitLab CA", srv.Listener.Addr().String()} {
		if !strings.Contains(out, want) {
			t.Errorf("log does not mention %q:\n%s", want, out)
		}
	}
}

func TestUnknownAuthorityLoggerOncePerCause(t *testing.T) {
	issuedBy := func(cn string) error {
		cert := &x509.Certificate{Issuer: pkix.Name{CommonName: cn}}
		return fmt.Errorf("connect: %w", &tls.CertificateVerificationError{Err: x509.UnknownAuthorityError{Cert: cert}})
	}
	grpcText := errors.New("rpc error: code = Unavailable desc = connection error: desc = \"transport: authentication handshake failed: tls: failed to verify certificate: x509: certificate signed by unknown authority\"")
	calls := []struct {
		host    string
		err     error
		handled bool
		logged  bool
	}{
		{"gitlab:443", issuedBy("CA one"), true, true},
		{"gitlab:443", issuedBy("CA one"), true, false},
		{"gitlab:443", issuedBy("CA two"), true, true}, // another issuer: another cause
		{"peer:8155", issuedBy("CA one"), true, true},  // another host
		{"peer:8155", grpcText, true, true},            // text only: no issuer known
		{"peer:8155", grpcText, true, false},
		{"gitlab:443", errors.New("connection refused"), false, false},
		{"gitlab:443", &tls.CertificateVerificationError{Err: x509.CertificateInvalidError{Reason: x509.Expired}}, false, false},
		{"gitlab:443", nil, false, false},
	}
	logger, logs := newTestLogger(t)
	l := NewUnknownAuthorityLogger(logger, "private_api.listen.ca_certificate_file")
	for i, c := range calls {
		before := logs.count("level=ERROR")
		if got := l.Log(c.host, c.err); got != c.handled {
			t.Errorf("call %d (%s, %v): Log = %v, want %v", i, c.host, c.err, got, c.handled)
		}
		if logged := logs.count("level=ERROR") > before; logged != c.logged {
			t.Errorf("call %d (%s, %v): logged = %v, want %v", i, c.host, c.err, logged, c.logged)
		}
	}
}

func TestUnknownAuthorityLoggerForgetsWhenFull(t *testing.T) {
	logger, logs := newTestLogger(t)
	l := NewUnknownAuthorityLogger(logger, "gitlab.ca_certificate_file")
	err := x509.UnknownAuthorityError{}
	for i := range maxRememberedCauses + 1 {
		l.Log(fmt.Sprintf("peer-%d:8155", i), err)
	}
	if len(l.seen) > maxRememberedCauses {
		t.Errorf("remembers %d causes, want at most %d", len(l.seen), maxRememberedCauses)
	}
	if n := logs.count("level=ERROR"); n != maxRememberedCauses+1 {
		t.Errorf("%d distinct hosts logged %d times", maxRememberedCauses+1, n)
	}
}
