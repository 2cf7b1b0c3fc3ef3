// Package pebbletest runs a real ACME CA for tests: Pebble (Debian package
// pebble), on free loopback ports, with pebble-challtestsrv from the same
// package as its DNS server answering 127.0.0.1 for every name. Pebble
// really validates the challenges, on the ports the test names, and counts
// nothing on its own, so the directory is served through a proxy that counts
// new orders. Everything stops when the test ends.
package pebbletest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// startTimeout bounds how long Pebble may take to serve its directory.
const startTimeout = 15 * time.Second

// Options say where Pebble validates challenges: it connects to 127.0.0.1
// on HTTPPort for http-01 and on TLSPort for tls-alpn-01, whatever the name.
type Options struct {
	HTTPPort int
	TLSPort  int
}

// Server is a running Pebble.
type Server struct {
	// DirectoryURL is the ACME directory (tls.acme.ca).
	DirectoryURL string
	// CAFile is a PEM file of the CA that signed Pebble's HTTPS certificate
	// (tls.acme.ca_root_file).
	CAFile string

	managementURL string
	client        *http.Client // trusts CAFile
	orders        atomic.Int64
}

type process struct {
	cmd    *exec.Cmd
	exited chan struct{}
	err    error // Wait's result, valid once exited is closed
	log    string
}

// Start runs Pebble for the duration of t. Without pebble in PATH it skips
// t, except under CI (CI=true), where it fails t.
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	pebble, err1 := exec.LookPath("pebble")
	challtestsrv, err2 := exec.LookPath("pebble-challtestsrv")
	if err1 != nil || err2 != nil {
		const msg = "pebble and pebble-challtestsrv are not in PATH; install them (Debian: apt-get install -y pebble, or run scripts/install-test-deps.sh as root) to run the ACME tests"
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	dir := t.TempDir()
	caPEM, serverCert := writeCertificates(t, dir)
	s := &Server{CAFile: filepath.Join(dir, "ca.pem")}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	transport := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}
	t.Cleanup(transport.CloseIdleConnections)
	s.client = &http.Client{Transport: transport, Timeout: 10 * time.Second}

	// Another process may take a probed port before Pebble binds it.
	var lastErr error
	for range 3 {
		var pebbleURL string
		if pebbleURL, lastErr = s.start(t, dir, pebble, challtestsrv, opts); lastErr == nil {
			s.startProxy(t, pebbleURL, serverCert, transport)
			return s
		}
	}
	t.Fatalf("start pebble: %v", lastErr)
	return nil
}

// start runs the DNS server and Pebble on fresh ports and waits for the
// directory; it returns Pebble's own directory URL.
func (s *Server) start(t testing.TB, dir, pebble, challtestsrv string, opts Options) (string, error) {
	ports, err := freePorts(4)
	if err != nil {
		return "", err
	}
	acmeAddr, mgmtAddr, dnsAddr, dnsMgmtAddr := loopback(ports[0]), loopback(ports[1]), loopback(ports[2]), loopback(ports[3])

	dns, err := run(t, dir, "challtestsrv", challtestsrv, nil,
		"-dns01", dnsAddr, "-management", dnsMgmtAddr,
		"-http01", "", "-https01", "", "-tlsalpn01", "",
		"-defaultIPv4", "127.0.0.1", "-defaultIPv6", "")
	if err != nil {
		return "", err
	}
	configFile := filepath.Join(dir, "pebble-config.json")
	config, err := json.Marshal(map[string]any{"pebble": map[string]any{
		"listenAddress":           acmeAddr,
		"managementListenAddress": mgmtAddr,
		"certificate":             filepath.Join(dir, "pebble-cert.pem"),
		"privateKey":              filepath.Join(dir, "pebble-key.pem"),
		"httpPort":                opts.HTTPPort,
		"tlsPort":                 opts.TLSPort,
		"ocspResponderURL":        "",
	}})
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(configFile, config, 0o644); err != nil {
		return "", err
	}
	pb, err := run(t, dir, "pebble", pebble, []string{
		"PEBBLE_VA_NOSLEEP=1",      // validate at once
		"PEBBLE_WFE_NONCEREJECT=0", // no random badNonce errors
		"PEBBLE_AUTHZREUSE=0",      // every order validates its challenges
	}, "-config", configFile, "-dnsserver", dnsAddr)
	if err != nil {
		dns.stop()
		return "", err
	}
	directory := "https://" + acmeAddr + "/dir"
	deadline := time.Now().Add(startTimeout)
	for {
		for _, p := range []*process{dns, pb} {
			select {
			case <-p.exited:
				dns.stop()
				pb.stop()
				return "", fmt.Errorf("%s exited (%v) before Pebble served its directory; its log ends:\n%s", p.cmd.Path, p.err, tail(p.log))
			default:
			}
		}
		resp, err := s.client.Get(directory)
		if err == nil {
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
			err = errors.New(resp.Status)
		}
		if time.Now().After(deadline) {
			dns.stop()
			pb.stop()
			return "", fmt.Errorf("pebble did not serve %s within %s (%v); its log ends:\n%s", directory, startTimeout, err, tail(pb.log))
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Cleanup(func() {
		pb.stop()
		dns.stop()
		if t.Failed() {
			t.Logf("pebble's log:\n%s", tail(pb.log))
		}
	})
	s.managementURL = "https://" + mgmtAddr
	return directory, nil
}

// startProxy serves Pebble's API through a proxy that counts new orders.
// Pebble builds the URLs in its answers from the Host header, which the
// proxy keeps, so clients go on talking through the proxy.
func (s *Server) startProxy(t testing.TB, pebbleDirectory string, cert tls.Certificate, transport http.RoundTripper) {
	target, err := url.Parse(pebbleDirectory)
	if err != nil {
		t.Fatal(err)
	}
	target.Path = ""
	proxy := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(target)
			r.Out.Host = r.In.Host
		},
		Transport: transport,
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost && strings.HasPrefix(r.URL.Path, "/order-plz") {
			s.orders.Add(1)
		}
		proxy.ServeHTTP(w, r)
	}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	s.DirectoryURL = srv.URL + "/dir"
}

// Orders is the number of new-order requests Pebble has received.
func (s *Server) Orders() int { return int(s.orders.Load()) }

// Roots is a pool holding the root of the certificates Pebble issues (it
// makes a new one at every start), for clients of the servers under test.
func (s *Server) Roots(t testing.TB) *x509.CertPool {
	t.Helper()
	resp, err := s.client.Get(s.managementURL + "/roots/0")
	if err != nil {
		t.Fatalf("get pebble's root: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("get pebble's root: %s %v", resp.Status, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(body) {
		t.Fatalf("pebble's root is not PEM: %q", body)
	}
	return pool
}

// run starts one binary with its output in a log file under dir.
func run(t testing.TB, dir, name, binary string, env []string, args ...string) (*process, error) {
	p := &process{log: filepath.Join(dir, name+".log"), exited: make(chan struct{})}
	out, err := os.Create(p.log)
	if err != nil {
		return nil, err
	}
	p.cmd = exec.Command(binary, args...)
	p.cmd.Stdout, p.cmd.Stderr = out, out
	p.cmd.Env = append([]string{"PATH=" + os.Getenv("PATH")}, env...)
	if err := p.cmd.Start(); err != nil {
		_ = out.Close()
		return nil, fmt.Errorf("run %s: %w", binary, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		_ = out.Close()
		close(p.exited)
	}()
	return p, nil
}

// stop ends the process and waits for it; stopping twice does nothing.
func (p *process) stop() {
	select {
	case <-p.exited:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(5 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// writeCertificates makes a CA and, signed by it, Pebble's HTTPS
// certificate for 127.0.0.1 and localhost; it writes ca.pem,
// pebble-cert.pem and pebble-key.pem to dir.
func writeCertificates(t testing.TB, dir string) ([]byte, tls.Certificate) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "pebbletest CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "pebble"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	for name, data := range map[string][]byte{"ca.pem": caPEM, "pebble-cert.pem": certPEM, "pebble-key.pem": keyPEM} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return caPEM, cert
}

// freePorts asks the kernel for n loopback ports free for both TCP and UDP
// (the DNS server binds both).
func freePorts(n int) ([]int, error) {
	var ports []int
	for len(ports) < n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		port := ln.Addr().(*net.TCPAddr).Port
		pc, err := net.ListenPacket("udp", loopback(port))
		_ = ln.Close()
		if err != nil {
			continue // taken for UDP; try another
		}
		_ = pc.Close()
		ports = append(ports, port)
	}
	return ports, nil
}

// FreePort returns a loopback TCP port free at the time of the call, for the
// challenge listeners a test must name before Pebble starts.
func FreePort(t testing.TB) int {
	t.Helper()
	ports, err := freePorts(1)
	if err != nil {
		t.Fatalf("find a free port: %v", err)
	}
	return ports[0]
}

func loopback(port int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)) }

// tail returns the last lines of a log file, for error messages.
func tail(path string) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > 40 {
		lines = lines[len(lines)-40:]
	}
	return strings.Join(lines, "\n")
}
