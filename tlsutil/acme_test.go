package tlsutil

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/kasproject/kas/internal/pebbletest"
	"github.com/kasproject/kas/internal/redistest"
	"github.com/kasproject/kas/server/config"
)

const testDomain = "kas.test"

func loopback(port int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)) }

// acmeNode is what a kas node does with ACME: the public TLS listener and
// the HTTP listener answering http-01 and redirecting to HTTPS.
type acmeNode struct {
	acme     *ACME
	tlsAddr  string
	httpAddr string // empty without http-01
}

// startACMENode opens the node's listeners on the given ports (0 for none
// over HTTP) and returns before Manage.
func startACMENode(t *testing.T, cfg config.ACME, storage certmagic.Storage, tlsPort, httpPort int) *acmeNode {
	t.Helper()
	n := &acmeNode{tlsAddr: loopback(tlsPort)}
	if httpPort != 0 {
		n.httpAddr = loopback(httpPort)
		cfg.HTTPAddress = n.httpAddr
	}
	logger, _ := newTestLogger(t)
	a, err := NewACME(cfg, ACMEOptions{Storage: storage, TLSAddress: n.tlsAddr, Logger: logger, StartTimeout: time.Minute})
	if err != nil {
		t.Fatalf("NewACME: %v", err)
	}
	t.Cleanup(a.Close)
	n.acme = a
	serveOn(t, n.tlsAddr, a.TLSConfig(), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "hello over "+r.Proto)
	}))
	if n.httpAddr != "" {
		serveOn(t, n.httpAddr, nil, a.HTTPHandler(a.RedirectHandler(strconv.Itoa(tlsPort))))
	}
	return n
}

func (n *acmeNode) manage(t *testing.T) {
	t.Helper()
	if err := n.acme.Manage(context.Background()); err != nil {
		t.Fatalf("Manage: %v", err)
	}
}

// get requests https://kas.test:<port>/ from the node, trusting roots, and
// returns the serial of the certificate it presented.
func (n *acmeNode) get(t *testing.T, roots *x509.CertPool) string {
	t.Helper()
	_, port, _ := net.SplitHostPort(n.tlsAddr)
	client := testDomainClient(t, roots)
	resp, err := client.Get("https://" + net.JoinHostPort(testDomain, port) + "/")
	if err != nil {
		t.Fatalf("HTTPS request to %s: %v", testDomain, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || string(body) != "hello over HTTP/2.0" {
		t.Errorf("HTTPS request: %s %q, want 200 over HTTP/2.0", resp.Status, body)
	}
	leaf := resp.TLS.PeerCertificates[0]
	if err := leaf.VerifyHostname(testDomain); err != nil {
		t.Errorf("certificate served: %v", err)
	}
	return leaf.SerialNumber.String()
}

// testDomainClient reaches kas.test (and any name) on 127.0.0.1.
func testDomainClient(t *testing.T, roots *x509.CertPool) *http.Client {
	t.Helper()
	var d net.Dialer
	transport := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			_, port, err := net.SplitHostPort(addr)
			if err != nil {
				return nil, err
			}
			return d.DialContext(ctx, network, loopback(mustAtoi(port)))
		},
		TLSClientConfig:   &tls.Config{RootCAs: roots},
		ForceAttemptHTTP2: true,
	}
	t.Cleanup(transport.CloseIdleConnections)
	return &http.Client{
		Transport:     transport,
		Timeout:       10 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

func mustAtoi(s string) int {
	n, _ := strconv.Atoi(s)
	return n
}

func acmeConfig(pebble *pebbletest.Server, challenges ...string) config.ACME {
	return config.ACME{
		Email:      "admin@kas.test",
		Domains:    []string{testDomain},
		CA:         pebble.DirectoryURL,
		CARootFile: pebble.CAFile,
		Challenges: challenges,
	}
}

// TestACMEObtainsCertificate gets a certificate from Pebble, which really
// validates the challenge against the node's listeners, and serves it; a
// restarted node finds it in its file storage instead of ordering again.
func TestACMEObtainsCertificate(t *testing.T) {
	tests := []struct {
		challenge string
		http      bool
	}{
		{ChallengeHTTP01, true},
		{ChallengeTLSALPN01, false},
	}
	for _, tt := range tests {
		t.Run(tt.challenge, func(t *testing.T) {
			tlsPort, httpPort := pebbletest.FreePort(t), 0
			if tt.http {
				httpPort = pebbletest.FreePort(t)
			}
			pebble := pebbletest.Start(t, pebbletest.Options{HTTPPort: httpPort, TLSPort: tlsPort})
			cfg := acmeConfig(pebble, tt.challenge)
			cfg.StoragePath = t.TempDir()

			node := startACMENode(t, cfg, nil, tlsPort, httpPort)
			node.manage(t)
			roots := pebble.Roots(t)
			serial := node.get(t, roots)
			if n := pebble.Orders(); n != 1 {
				t.Errorf("Pebble got %d orders, want 1", n)
			}
			certs := node.acme.Certificates()
			if len(certs) != 1 || !slices.Contains(certs[0].Names, testDomain) || certs[0].Issuer == "" || certs[0].Error != "" ||
				!certs[0].NotAfter.After(time.Now()) || !strings.Contains(certs[0].Renewal, "renews from") || !strings.Contains(certs[0].Renewal, "obtained at") {
				t.Errorf("status of the ACME certificate: %+v", certs)
			}

			if tt.http {
				client := testDomainClient(t, roots)
				resp, err := client.Get("http://" + net.JoinHostPort(testDomain, strconv.Itoa(httpPort)) + "/-/kubernetes-agent/?a=b")
				if err != nil {
					t.Fatal(err)
				}
				_ = resp.Body.Close()
				want := "https://" + net.JoinHostPort(testDomain, strconv.Itoa(tlsPort)) + "/-/kubernetes-agent/?a=b"
				if resp.StatusCode != http.StatusPermanentRedirect || resp.Header.Get("Location") != want {
					t.Errorf("plain HTTP request: %s to %q, want 308 to %s", resp.Status, resp.Header.Get("Location"), want)
				}
			}

			// The node restarts: same storage, new process state.
			node.acme.Close()
			restartedHTTP := 0
			if tt.http {
				restartedHTTP = pebbletest.FreePort(t)
			}
			restarted := startACMENode(t, cfg, nil, pebbletest.FreePort(t), restartedHTTP)
			restarted.manage(t)
			if got := restarted.get(t, roots); got != serial {
				t.Errorf("after a restart the node serves certificate %s, want the stored %s", got, serial)
			}
			if n := pebble.Orders(); n != 1 {
				t.Errorf("after a restart Pebble got %d orders, want still 1", n)
			}
		})
	}
}

// TestACMENodesShareRedisStorage starts two nodes at once on one Redis: one
// orders the certificate while the other waits on the lock, and both serve
// it; a third node started later loads it. The CA is asked once.
func TestACMENodesShareRedisStorage(t *testing.T) {
	redisServer := redistest.Start(t)
	tlsPort, httpPort := pebbletest.FreePort(t), pebbletest.FreePort(t)
	// Pebble validates on node a's ports: whichever node ordered, a answers
	// (a challenge of b's is found through the shared storage).
	pebble := pebbletest.Start(t, pebbletest.Options{HTTPPort: httpPort, TLSPort: tlsPort})
	cfg := acmeConfig(pebble, ChallengeHTTP01, ChallengeTLSALPN01)
	storage := func() certmagic.Storage {
		logger, _ := newTestLogger(t)
		return NewRedisStorage(newRedisClient(t, redisServer), "kas-nodes", logger)
	}
	a := startACMENode(t, cfg, storage(), tlsPort, httpPort)
	b := startACMENode(t, cfg, storage(), pebbletest.FreePort(t), pebbletest.FreePort(t))

	var wg sync.WaitGroup
	for _, n := range []*acmeNode{a, b} {
		wg.Go(func() {
			if err := n.acme.Manage(context.Background()); err != nil {
				t.Errorf("Manage: %v", err)
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	roots := pebble.Roots(t)
	serialA, serialB := a.get(t, roots), b.get(t, roots)
	if serialA != serialB {
		t.Errorf("nodes serve different certificates: %s and %s", serialA, serialB)
	}
	if n := pebble.Orders(); n != 1 {
		t.Errorf("two nodes starting together made %d orders, want 1", n)
	}

	c := startACMENode(t, cfg, storage(), pebbletest.FreePort(t), pebbletest.FreePort(t))
	c.manage(t)
	if got := c.get(t, roots); got != serialA {
		t.Errorf("a third node serves %s, want the shared %s", got, serialA)
	}
	if n := pebble.Orders(); n != 1 {
		t.Errorf("after a third node started Pebble got %d orders, want 1", n)
	}
}

// TestACMEStartFailureNamesTheDomain: Pebble validates on ports where no
// node listens, so the challenge fails and Manage says for which domain.
func TestACMEStartFailureNamesTheDomain(t *testing.T) {
	pebble := pebbletest.Start(t, pebbletest.Options{HTTPPort: pebbletest.FreePort(t), TLSPort: pebbletest.FreePort(t)})
	cfg := acmeConfig(pebble, ChallengeHTTP01)
	cfg.StoragePath = t.TempDir()
	node := startACMENode(t, cfg, nil, pebbletest.FreePort(t), pebbletest.FreePort(t))
	err := node.acme.Manage(context.Background())
	if err == nil {
		t.Fatal("Manage succeeded although the CA cannot reach the node")
	}
	t.Log(err)
	for _, want := range []string{"get a certificate for " + testDomain, pebble.DirectoryURL, "tls.acme.http_address (" + node.httpAddr + ")"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}

func TestNewACMEErrors(t *testing.T) {
	caFile := t.TempDir() + "/missing-ca.pem"
	base := config.ACME{Email: "admin@kas.test", Domains: []string{testDomain}}
	tests := []struct {
		name       string
		modify     func(*config.ACME)
		tlsAddress string
		mention    string
	}{
		{"no domains", func(c *config.ACME) { c.Domains = nil }, "127.0.0.1:8150", "tls.acme.domains"},
		{"http-01 without http_address", func(c *config.ACME) { c.Challenges = []string{"http-01"} }, "127.0.0.1:8150", "http-01 needs tls.acme.http_address"},
		{"tls-alpn-01 without a TCP listener", func(c *config.ACME) { c.Challenges = []string{"tls-alpn-01"} }, "", "tls-alpn-01 is answered on the agent listener"},
		{"no challenge possible", func(*config.ACME) {}, "", "no challenge can be answered"},
		{"unknown challenge", func(c *config.ACME) { c.Challenges = []string{"dns-01"} }, "127.0.0.1:8150", `got "dns-01"`},
		{"listener on port 0", func(*config.ACME) {}, "127.0.0.1:0", "need a fixed port"},
		{"http_address without port", func(c *config.ACME) { c.HTTPAddress = "localhost"; c.Challenges = []string{"http-01"} }, "", "tls.acme.http_address"},
		{"missing CA root file", func(c *config.ACME) { c.CARootFile = caFile }, "127.0.0.1:8150", caFile},
	}
	logger, _ := newTestLogger(t)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := base
			tt.modify(&cfg)
			a, err := NewACME(cfg, ACMEOptions{TLSAddress: tt.tlsAddress, Logger: logger, Storage: &certmagic.FileStorage{Path: t.TempDir()}})
			if err == nil {
				a.Close()
				t.Fatal("no error")
			}
			if !strings.Contains(err.Error(), tt.mention) {
				t.Errorf("error %q does not mention %q", err, tt.mention)
			}
		})
	}
}

func TestACMERedirectHandler(t *testing.T) {
	logger, _ := newTestLogger(t)
	a, err := NewACME(config.ACME{Email: "admin@kas.test", Domains: []string{"kas.example.com", "kas.test"}}, ACMEOptions{
		TLSAddress: "127.0.0.1:8150", Logger: logger, Storage: &certmagic.FileStorage{Path: t.TempDir()},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	tests := []struct {
		host, port, target, want string
	}{
		{"kas.test", "8150", "/-/kubernetes-agent/?x=1", "https://kas.test:8150/-/kubernetes-agent/?x=1"},
		{"KAS.example.com:80", "443", "/k8s-proxy/api", "https://KAS.example.com/k8s-proxy/api"},
		{"evil.example", "443", "/", "https://kas.example.com/"},
		{"10.0.0.1:80", "8150", "/a%2Fb", "https://kas.example.com:8150/a%2Fb"},
	}
	for _, tt := range tests {
		req, err := http.NewRequest(http.MethodPost, "http://"+tt.host+tt.target, nil)
		if err != nil {
			t.Fatal(err)
		}
		rec := httptest.NewRecorder()
		a.RedirectHandler(tt.port).ServeHTTP(rec, req)
		if rec.Code != http.StatusPermanentRedirect || rec.Header().Get("Location") != tt.want {
			t.Errorf("%s%s with HTTPS on %s: %d to %q, want 308 to %q", tt.host, tt.target, tt.port, rec.Code, rec.Header().Get("Location"), tt.want)
		}
	}
}
