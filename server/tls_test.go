package server_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/client-go/rest"

	"github.com/kasproject/kas/agent"
	"github.com/kasproject/kas/internal/fakekube"
	"github.com/kasproject/kas/internal/pebbletest"
	"github.com/kasproject/kas/server"
	"github.com/kasproject/kas/server/config"
)

// The demo agent and user of testdata/standalone (see its README).
const (
	standaloneFile = "../testdata/standalone/example.yaml"
	agentToken     = "glagent-demo-prod-7b3f9c2e1a5d4f60"
	aliceAuth      = "Bearer pat:1:glpat-demo-alice-4f8a2c91e7"
	kasDomain      = "kas.test"
	waitFor        = 30 * time.Second
)

// tlsWorld is a standalone kas node with TLS on its public listener, a fake
// cluster, and an agent connected over wss://.
type tlsWorld struct {
	kas    *server.Server
	public string // bound address of agent.listen
	agent  *agent.Agent
}

// baseConfig is the default configuration, standalone on the example
// files, every listener on a free loopback port.
func baseConfig(t *testing.T) *config.Config {
	t.Helper()
	cfg, err := config.Load("", nil)
	if err != nil {
		t.Fatalf("load the default configuration: %v", err)
	}
	for _, l := range []*config.Listen{&cfg.Agent.Listen.Listen, &cfg.Observability.Listen, &cfg.API.Listen.Listen, &cfg.PrivateAPI.Listen.Listen} {
		l.Address = "127.0.0.1:0"
	}
	cfg.Standalone.File = standaloneFile
	cfg.Agent.Listen.ListenGracePeriod = config.Duration(2 * time.Second)
	return cfg
}

func testLogger(t *testing.T) *slog.Logger {
	t.Helper()
	var mu sync.Mutex
	var lines []string
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		if t.Failed() {
			t.Logf("kas log:\n%s", strings.Join(lines, ""))
		}
	})
	return slog.New(slog.NewTextHandler(writerFunc(func(p []byte) (int, error) {
		mu.Lock()
		defer mu.Unlock()
		lines = append(lines, string(p))
		return len(p), nil
	}), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// startKAS runs a node until the test ends and waits until it is ready.
func startKAS(t *testing.T, cfg *config.Config) *server.Server {
	t.Helper()
	srv, err := server.New(cfg, server.Options{Logger: testLogger(t), Version: "tls-test"})
	if err != nil {
		t.Fatalf("build kas: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("kas: %v", err)
		}
	})
	select {
	case <-srv.Ready():
	case err := <-done:
		done <- err
		t.Fatalf("start kas: %v", err)
	case <-time.After(2 * time.Minute):
		t.Fatal("kas did not become ready")
	}
	return srv
}

// connectAgent runs agentk against kas at wss://addr with tlsConfig until
// the test ends, and waits for its tunnel.
func connectAgent(t *testing.T, addr string, tlsConfig *tls.Config) *agent.Agent {
	t.Helper()
	kube := fakekube.New()
	cluster := httptest.NewServer(kube)
	t.Cleanup(func() {
		kube.Release()
		cluster.CloseClientConnections()
		cluster.Close()
	})
	a, err := agent.New(agent.Options{
		KASAddress:    "wss://" + addr,
		Token:         agentToken,
		RESTConfig:    &rest.Config{Host: cluster.URL, BearerToken: "agentk-service-account-token"},
		TLS:           tlsConfig,
		Logger:        testLogger(t).With("component", "agentk"),
		MinBackoff:    10 * time.Millisecond,
		MaxBackoff:    100 * time.Millisecond,
		ShutdownGrace: time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = a.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	select {
	case <-a.Connected():
	case <-time.After(waitFor):
		t.Fatal("agentk did not connect over wss://")
	}
	return a
}

// loopbackClient reaches any name on 127.0.0.1 (kas.test has no DNS) over
// TLS trusting roots, following no redirect.
func loopbackClient(t *testing.T, roots *x509.CertPool) *http.Client {
	t.Helper()
	var d net.Dialer
	transport := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			_, port, err := net.SplitHostPort(addr)
			if err != nil {
				return nil, err
			}
			return d.DialContext(ctx, network, net.JoinHostPort("127.0.0.1", port))
		},
		TLSClientConfig:   &tls.Config{RootCAs: roots},
		ForceAttemptHTTP2: true,
	}
	t.Cleanup(transport.CloseIdleConnections)
	return &http.Client{Transport: transport, Timeout: waitFor,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
}

// proxyGet lists namespaces through kas's Kubernetes API proxy as alice.
func proxyGet(t *testing.T, client *http.Client, base string) *http.Response {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, base+"/k8s-proxy/api/v1/namespaces", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", aliceAuth)
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("request through the proxy over HTTPS: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("request through the proxy over HTTPS: %s %s", resp.Status, body)
	}
	return resp
}

// TestACMEPublicListener: kas gets its public certificate from a real ACME
// CA (Pebble, validating the challenges against kas's own listeners), an
// agent connects over wss:// and a client uses the proxy over https://.
func TestACMEPublicListener(t *testing.T) {
	tlsPort, httpPort := pebbletest.FreePort(t), pebbletest.FreePort(t)
	pebble := pebbletest.Start(t, pebbletest.Options{HTTPPort: httpPort, TLSPort: tlsPort})
	cfg := baseConfig(t)
	cfg.Agent.Listen.Address = net.JoinHostPort("127.0.0.1", strconv.Itoa(tlsPort))
	cfg.TLS.ACME = &config.ACME{
		Email:       "admin@kas.test",
		Domains:     []string{kasDomain},
		CA:          pebble.DirectoryURL,
		CARootFile:  pebble.CAFile,
		HTTPAddress: net.JoinHostPort("127.0.0.1", strconv.Itoa(httpPort)),
		StoragePath: t.TempDir(),
	}
	startKAS(t, cfg)
	roots := pebble.Roots(t)

	connectAgent(t, cfg.Agent.Listen.Address, &tls.Config{RootCAs: roots, ServerName: kasDomain})
	client := loopbackClient(t, roots)
	base := "https://" + net.JoinHostPort(kasDomain, strconv.Itoa(tlsPort))
	resp := proxyGet(t, client, base)
	if resp.ProtoMajor != 2 {
		t.Errorf("proxy request over %s, want HTTP/2", resp.Proto)
	}
	if err := resp.TLS.PeerCertificates[0].VerifyHostname(kasDomain); err != nil {
		t.Errorf("public listener's certificate: %v", err)
	}
	if n := pebble.Orders(); n != 1 {
		t.Errorf("Pebble got %d orders, want 1", n)
	}

	redirect, err := client.Get("http://" + net.JoinHostPort(kasDomain, strconv.Itoa(httpPort)) + "/-/kubernetes-agent/")
	if err != nil {
		t.Fatal(err)
	}
	_ = redirect.Body.Close()
	if want := base + "/-/kubernetes-agent/"; redirect.StatusCode != http.StatusPermanentRedirect || redirect.Header.Get("Location") != want {
		t.Errorf("tls.acme.http_address: %s to %q, want 308 to %s", redirect.Status, redirect.Header.Get("Location"), want)
	}
}

// TestACMEStartFailure: a domain the CA cannot validate stops kas at start
// with an error naming it.
func TestACMEStartFailure(t *testing.T) {
	// Pebble validates on ports where kas does not listen.
	pebble := pebbletest.Start(t, pebbletest.Options{HTTPPort: pebbletest.FreePort(t), TLSPort: pebbletest.FreePort(t)})
	cfg := baseConfig(t)
	cfg.Agent.Listen.Address = net.JoinHostPort("127.0.0.1", strconv.Itoa(pebbletest.FreePort(t)))
	cfg.TLS.ACME = &config.ACME{
		Email:       "admin@kas.test",
		Domains:     []string{kasDomain},
		CA:          pebble.DirectoryURL,
		CARootFile:  pebble.CAFile,
		Challenges:  []string{"tls-alpn-01"},
		StoragePath: t.TempDir(),
	}
	srv, err := server.New(cfg, server.Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	err = srv.Run(context.Background())
	if err == nil || !strings.Contains(err.Error(), "get a certificate for "+kasDomain) {
		t.Fatalf("Run = %v, want an error naming %s", err, kasDomain)
	}
	select {
	case <-srv.Ready():
		t.Error("kas said it was ready without a certificate")
	default:
	}
}

// TestStaticCertificateReload: the certificate files of the public listener
// are replaced and ReloadCertificates (SIGHUP) called; new handshakes get
// the new certificate and the agent's open wss:// tunnel is untouched. The
// new certificate is from a CA the agent does not trust, so a reconnecting
// agent would fail: requests through the tunnel prove it is the old one.
func TestStaticCertificateReload(t *testing.T) {
	oldCA, newCA := newTestCA(t, "old CA"), newTestCA(t, "new CA")
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	oldCA.writeLeaf(t, certFile, keyFile)
	cfg := baseConfig(t)
	cfg.Agent.Listen.CertificateFile, cfg.Agent.Listen.KeyFile = certFile, keyFile
	kas := startKAS(t, cfg)
	public := kas.Addr("agent.listen").String()

	connectAgent(t, public, &tls.Config{RootCAs: oldCA.pool()})
	oldClient := loopbackClient(t, oldCA.pool())
	proxyGet(t, oldClient, "https://"+public)

	newCA.writeLeaf(t, certFile, keyFile)
	if err := kas.ReloadCertificates(); err != nil {
		t.Fatalf("ReloadCertificates: %v", err)
	}
	if resp := proxyGet(t, loopbackClient(t, newCA.pool()), "https://"+public); resp.TLS.PeerCertificates[0].Issuer.CommonName != "new CA" {
		t.Errorf("new handshake got a certificate from %s", resp.TLS.PeerCertificates[0].Issuer)
	}
	// The agent's tunnel opened before the swap still carries requests.
	proxyGet(t, loopbackClient(t, newCA.pool()), "https://"+public)

	// A broken pair is refused and the current certificate stays.
	if err := os.WriteFile(keyFile, []byte("not a key"), 0o600); err != nil {
		t.Fatal(err)
	}
	err := kas.ReloadCertificates()
	if err == nil || !strings.Contains(err.Error(), "agent.listen") {
		t.Errorf("ReloadCertificates of a broken key: %v, want an error naming agent.listen", err)
	}
	proxyGet(t, loopbackClient(t, newCA.pool()), "https://"+public)
	_, err = loopbackClient(t, oldCA.pool()).Get("https://" + public + "/")
	var unknown x509.UnknownAuthorityError
	if !errors.As(err, &unknown) {
		t.Errorf("a new connection trusting only the old CA: %v, want an unknown authority", err)
	}
}

type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newTestCA(t *testing.T, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{cert: cert, key: key}
}

func (ca *testCA) pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.cert)
	return p
}

// writeLeaf writes a certificate for 127.0.0.1 signed by ca, replacing the
// files atomically.
func (ca *testCA) writeLeaf(t *testing.T, certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: "kas"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	for file, block := range map[string]*pem.Block{certFile: {Type: "CERTIFICATE", Bytes: der}, keyFile: {Type: "PRIVATE KEY", Bytes: keyDER}} {
		if err := os.WriteFile(file+".new", pem.EncodeToMemory(block), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(file+".new", file); err != nil {
			t.Fatal(err)
		}
	}
}
