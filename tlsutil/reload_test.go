package tlsutil

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// logBuffer collects a test's log lines.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func (b *logBuffer) count(substr string) int { return strings.Count(b.String(), substr) }

func newTestLogger(t *testing.T) (*slog.Logger, *logBuffer) {
	t.Helper()
	b := &logBuffer{}
	t.Cleanup(func() {
		if t.Failed() && b.String() != "" {
			t.Logf("log:\n%s", b)
		}
	})
	return slog.New(slog.NewTextHandler(b, &slog.HandlerOptions{Level: slog.LevelDebug})), b
}

// writePair writes cert's chain and key as PEM files, replacing them
// atomically (rename), as a certificate manager does.
func writePair(t *testing.T, certFile, keyFile string, cert tls.Certificate) {
	t.Helper()
	var chain []byte
	for _, der := range cert.Certificate {
		chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	replaceFile(t, certFile, chain)
	replaceFile(t, keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}))
}

func replaceFile(t *testing.T, path string, data []byte) {
	t.Helper()
	tmp := path + ".new"
	writeFile(t, tmp, data)
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// serveTLS serves handler over TLS with cfg on a loopback port, the way
// server.Run builds its listeners, and returns the address.
func serveTLS(t *testing.T, cfg *tls.Config, handler http.Handler) string {
	t.Helper()
	return serveOn(t, "127.0.0.1:0", cfg, handler)
}

// serveOn serves handler on addr until the test ends, over TLS when cfg is
// not nil, and returns the bound address.
func serveOn(t *testing.T, addr string, cfg *tls.Config, handler http.Handler) string {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: handler, TLSConfig: cfg, ReadHeaderTimeout: 10 * time.Second,
		ErrorLog: log.New(io.Discard, "", 0)} // handshakes cut by the test's own clients
	if cfg != nil {
		ln = tls.NewListener(ln, cfg)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(ln)
	}()
	t.Cleanup(func() {
		_ = srv.Close()
		<-done
	})
	return ln.Addr().String()
}

// handshake connects with a new TLS connection and returns what it saw.
func handshake(t *testing.T, addr string, roots *x509.CertPool, nextProtos ...string) tls.ConnectionState {
	t.Helper()
	conn, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: roots, ServerName: "127.0.0.1", NextProtos: nextProtos})
	if err != nil {
		t.Fatalf("TLS handshake with %s: %v", addr, err)
	}
	defer conn.Close()
	return conn.ConnectionState()
}

func serial(s tls.ConnectionState) string { return s.PeerCertificates[0].SerialNumber.String() }

func serialOf(t *testing.T, cert tls.Certificate) string {
	t.Helper()
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	return leaf.SerialNumber.String()
}

// keepAliveConn is an HTTP/1.1 connection that stays open between requests.
type keepAliveConn struct {
	conn *tls.Conn
	r    *bufio.Reader
}

func dialKeepAlive(t *testing.T, addr string, roots *x509.CertPool) *keepAliveConn {
	t.Helper()
	conn, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: roots, ServerName: "127.0.0.1", NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &keepAliveConn{conn: conn, r: bufio.NewReader(conn)}
}

func (c *keepAliveConn) get(t *testing.T) {
	t.Helper()
	_ = c.conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.conn.Write([]byte("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")); err != nil {
		t.Fatalf("request on the open connection: %v", err)
	}
	resp, err := http.ReadResponse(c.r, nil)
	if err != nil {
		t.Fatalf("response on the open connection: %v", err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Close {
		t.Fatalf("response on the open connection: %s, close=%v", resp.Status, resp.Close)
	}
}

func TestCertReloader(t *testing.T) {
	ca := newCA(t, "reload CA")
	roots := x509.NewCertPool()
	roots.AddCert(ca.cert)
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	first, second, third := ca.leaf(t), ca.leaf(t), ca.leaf(t)
	writePair(t, certFile, keyFile, first)

	log, logs := newTestLogger(t)
	r, err := NewCertReloader(certFile, keyFile, log)
	if err != nil {
		t.Fatal(err)
	}
	addr := serveTLS(t, ServerConfig(r.GetCertificate), http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	if info := r.Info("agent.listen"); info.Error != "" || len(info.Names) == 0 || !strings.Contains(info.Issuer, "reload CA") ||
		!info.NotAfter.After(time.Now()) || !strings.Contains(info.Source, certFile) {
		t.Errorf("certificate status: %+v", info)
	}
	ctx, cancel := context.WithCancel(context.Background())
	running := make(chan struct{})
	go func() {
		defer close(running)
		r.Run(ctx, 50*time.Millisecond)
	}()
	t.Cleanup(func() {
		cancel()
		<-running
	})

	// waitForSerial waits until new handshakes see want.
	waitForSerial := func(want string) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for serial(handshake(t, addr, roots)) != want {
			if time.Now().After(deadline) {
				t.Fatalf("new handshakes do not see certificate %s after the files changed", want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}

	for _, tt := range []struct{ offer, want string }{{"h2", "h2"}, {"http/1.1", "http/1.1"}} {
		if got := handshake(t, addr, roots, tt.offer).NegotiatedProtocol; got != tt.want {
			t.Errorf("client offering %s negotiated %q, want %q", tt.offer, got, tt.want)
		}
	}
	open := dialKeepAlive(t, addr, roots)
	open.get(t)
	if got := serial(open.conn.ConnectionState()); got != serialOf(t, first) {
		t.Fatalf("first certificate served is %s, want %s", got, serialOf(t, first))
	}

	t.Run("changed files are served to new connections; open ones stay", func(t *testing.T) {
		writePair(t, certFile, keyFile, second)
		waitForSerial(serialOf(t, second))
		if n := logs.count("Reloading the TLS certificate failed"); n != 0 {
			t.Errorf("replacing the certificate, then the key, logged %d failures; want the pair loaded once both changed", n)
		}
		open.get(t)
		if got := serial(open.conn.ConnectionState()); got != serialOf(t, first) {
			t.Errorf("open connection's certificate changed to %s", got)
		}
	})

	t.Run("a broken pair keeps the previous certificate and is logged once", func(t *testing.T) {
		const failed = "Reloading the TLS certificate failed"
		before := logs.count(failed)
		writeFile(t, keyFile, []byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"))
		deadline := time.Now().Add(5 * time.Second)
		for logs.count(failed) == before {
			if time.Now().After(deadline) {
				t.Fatal("the broken key file was not noticed")
			}
			time.Sleep(10 * time.Millisecond)
		}
		time.Sleep(300 * time.Millisecond) // several more polls of unchanged files
		if n := logs.count(failed) - before; n != 1 {
			t.Errorf("the same broken files were reported %d times, want once", n)
		}
		if got := serial(handshake(t, addr, roots)); got != serialOf(t, second) {
			t.Errorf("after a failed reload the server presents %s, want the previous %s", got, serialOf(t, second))
		}
		if err := r.Reload(); err == nil || !strings.Contains(err.Error(), keyFile) {
			t.Errorf("Reload of a broken pair: error %v does not name %s", err, keyFile)
		}
		open.get(t)
	})

	t.Run("fixed files are picked up again", func(t *testing.T) {
		writePair(t, certFile, keyFile, third)
		waitForSerial(serialOf(t, third))
	})
}

// TestCertReloaderReload is the SIGHUP path: no polling, an explicit Reload.
func TestCertReloaderReload(t *testing.T) {
	ca := newCA(t, "reload CA")
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	first, second := ca.leaf(t), ca.leaf(t)
	writePair(t, certFile, keyFile, first)
	log, _ := newTestLogger(t)
	r, err := NewCertReloader(certFile, keyFile, log)
	if err != nil {
		t.Fatal(err)
	}
	current := func() string {
		c, err := r.GetCertificate(&tls.ClientHelloInfo{})
		if err != nil {
			t.Fatal(err)
		}
		return serialOf(t, *c)
	}
	writePair(t, certFile, keyFile, second)
	if current() != serialOf(t, first) {
		t.Fatal("certificate changed without Run or Reload")
	}
	if err := r.Reload(); err != nil {
		t.Fatal(err)
	}
	if current() != serialOf(t, second) {
		t.Error("Reload did not load the new files")
	}
}

func TestNewCertReloaderErrors(t *testing.T) {
	ca := newCA(t, "reload CA")
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	writePair(t, certFile, keyFile, ca.leaf(t))
	otherCert, otherKey := filepath.Join(dir, "other.crt"), filepath.Join(dir, "other.key")
	writePair(t, otherCert, otherKey, ca.leaf(t))
	missing := filepath.Join(dir, "missing.pem")

	tests := []struct {
		name              string
		certFile, keyFile string
	}{
		{"missing certificate", missing, keyFile},
		{"missing key", certFile, missing},
		{"key of another certificate", certFile, otherKey},
		{"key file given as certificate", keyFile, keyFile},
	}
	log, _ := newTestLogger(t)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := NewCertReloader(tt.certFile, tt.keyFile, log)
			if err == nil {
				t.Fatal("no error")
			}
			if !strings.Contains(err.Error(), tt.certFile) || !strings.Contains(err.Error(), tt.keyFile) {
				t.Errorf("error %q does not name both files", err)
			}
			if errors.Is(err, os.ErrNotExist) != strings.Contains(tt.name, "missing") {
				t.Errorf("error %q: errors.Is(os.ErrNotExist) = %v", err, errors.Is(err, os.ErrNotExist))
			}
		})
	}
}
