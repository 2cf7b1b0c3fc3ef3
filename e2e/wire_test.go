package e2e

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kasproject/kas/server/config"
	"github.com/kasproject/kas/server/gitlab"
)

// These tests speak HTTP/1.1 and HTTP/2 to kas byte by byte, because what
// they check is what a client can send or will receive on the wire, which
// Go's own client and server would normalize: request-targets with dot
// segments, and the framing of a 101 answer.

// rawHTTP1 sends request (a complete HTTP/1.1 head and body) on conn and
// returns a reader positioned at the answer.
func rawHTTP1(t *testing.T, conn net.Conn, request string) *bufio.Reader {
	t.Helper()
	_ = conn.SetDeadline(time.Now().Add(waitFor))
	if _, err := io.WriteString(conn, request); err != nil {
		t.Fatalf("send: %v", err)
	}
	return bufio.NewReader(conn)
}

// readHead reads a response head as it was sent: the status line and the
// header lines, without net/http's canonicalization or merging.
func readHead(t *testing.T, br *bufio.Reader) (status string, lines []string) {
	t.Helper()
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("read the answer's head: %v (so far %q %q)", err, status, lines)
		}
		line = strings.TrimRight(line, "\r\n")
		switch {
		case status == "":
			status = line
		case line == "":
			return status, lines
		default:
			lines = append(lines, line)
		}
	}
}

// headerLines returns the values of the header lines named name (any case).
func headerLines(lines []string, name string) []string {
	var values []string
	for _, l := range lines {
		k, v, _ := strings.Cut(l, ":")
		if strings.EqualFold(strings.TrimSpace(k), name) {
			values = append(values, strings.TrimSpace(v))
		}
	}
	return values
}

// decodeStatus decodes a Kubernetes Status body and checks its code.
func decodeStatus(t *testing.T, body []byte, code int) metav1.Status {
	t.Helper()
	var st metav1.Status
	if err := json.Unmarshal(body, &st); err != nil || st.Kind != "Status" || st.Code != int32(code) {
		t.Fatalf("answer %q is not a Status with code %d (%v)", body, code, err)
	}
	return st
}

// h2Request sends one request over a fresh HTTP/2 connection (TLS with
// ALPN h2) with exactly the given header fields, pseudo-headers included,
// and returns the answer's :status and body.
func h2Request(t *testing.T, addr string, tlsConfig *tls.Config, fields [][2]string) (int, []byte) {
	t.Helper()
	cfg := tlsConfig.Clone()
	cfg.NextProtos = []string{"h2"}
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: waitFor}, "tcp", addr, cfg)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	defer conn.Close()
	if p := conn.ConnectionState().NegotiatedProtocol; p != "h2" {
		t.Fatalf("ALPN chose %q, want h2", p)
	}
	_ = conn.SetDeadline(time.Now().Add(waitFor))
	if _, err := io.WriteString(conn, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(conn, conn)
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	var block bytes.Buffer
	enc := hpack.NewEncoder(&block)
	for _, f := range fields {
		if err := enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]}); err != nil {
			t.Fatal(err)
		}
	}
	if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block.Bytes(), EndStream: true, EndHeaders: true}); err != nil {
		t.Fatal(err)
	}
	dec := hpack.NewDecoder(4096, nil)
	status := 0
	var body []byte
	for {
		frame, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("read frame: %v (status %d, body %q)", err, status, body)
		}
		switch f := frame.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				_ = fr.WriteSettingsAck()
			}
		case *http2.HeadersFrame:
			fields, err := dec.DecodeFull(f.HeaderBlockFragment())
			if err != nil {
				t.Fatal(err)
			}
			for _, hf := range fields {
				if hf.Name == ":status" {
					_, _ = fmt.Sscan(hf.Value, &status)
				}
			}
			if f.StreamEnded() {
				return status, body
			}
		case *http2.DataFrame:
			body = append(body, f.Data()...)
			if f.StreamEnded() {
				return status, body
			}
		case *http2.RSTStreamFrame:
			t.Fatalf("stream reset: %v", f.ErrCode)
		case *http2.GoAwayFrame:
			t.Fatalf("GOAWAY: %v", f.ErrCode)
		}
	}
}

// TestUnsafePathsAreRefusedOnTheWire: dot segments and encoded slashes or
// dots, sent as-is over HTTP/1.1 and as HTTP/2 :path, get a 400 Status on
// every mount of the proxy, before kas asks GitLab anything, and nothing
// reaches the cluster.
func TestUnsafePathsAreRefusedOnTheWire(t *testing.T) {
	t.Parallel()
	secret, secretFile := writeSecret(t)
	rails := fakeRails(t, secret)
	cert := issueCertificate(t, t.TempDir(), "kas.test")
	e := newEnv(t, func(c *config.Config) {
		viaGitLab(rails, secretFile)(c)
		c.Agent.Listen.CertificateFile, c.Agent.Listen.KeyFile = cert.certFile, cert.keyFile
		c.Agent.KubernetesAPI.Listen.Address = "127.0.0.1:0" // the dedicated listener, mounted at /
	})
	pem, err := os.ReadFile(cert.caFile)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)
	tlsConfig := &tls.Config{ServerName: "kas.test", RootCAs: roots}
	dedicated := e.kas.listener(t, "agent.kubernetes_api.listen")
	authorization := pat(asAgent.id, alicePAT).authorization

	escapes := []string{
		"/../../escape",
		"/api/v1/../../../escape",
		"/..%2f..%2fescape",
		"/..%2F..%2Fescape",
		"/%2e%2e/%2e%2e/escape",
		"/.%2e/escape",
		"/api/v1/namespaces%2Fkube-system/secrets",
		"/api/v1/%252e%252e/escape",
		"/api/./v1/namespaces",
	}
	before := rails.Calls(gitlab.PathAuthorizeProxyUser)
	for _, mount := range []string{"/k8s-proxy", "/-/kubernetes-agent/k8s-proxy"} {
		for _, p := range escapes {
			t.Run("HTTP/1.1 "+mount+p, func(t *testing.T) {
				conn, err := tls.Dial("tcp", e.kas.public, tlsConfig)
				if err != nil {
					t.Fatal(err)
				}
				defer conn.Close()
				br := rawHTTP1(t, conn, fmt.Sprintf("GET %s%s HTTP/1.1\r\nHost: kas.test\r\nAuthorization: %s\r\n\r\n", mount, p, authorization))
				resp, err := http.ReadResponse(br, nil)
				if err != nil {
					t.Fatal(err)
				}
				expectStatus(t, resp, http.StatusBadRequest, metav1.StatusReasonBadRequest)
			})
		}
		t.Run("HTTP/2 "+mount, func(t *testing.T) {
			for _, p := range escapes {
				status, body := h2Request(t, e.kas.public, tlsConfig, [][2]string{
					{":method", "GET"}, {":scheme", "https"}, {":authority", "kas.test"}, {":path", mount + p},
					{"authorization", authorization},
				})
				if status != http.StatusBadRequest {
					t.Fatalf(":path %s%s: status %d %s, want 400", mount, p, status, body)
				}
				if st := decodeStatus(t, body, http.StatusBadRequest); st.Reason != metav1.StatusReasonBadRequest {
					t.Fatalf(":path %s%s: reason %s, want BadRequest", mount, p, st.Reason)
				}
			}
		})
	}
	t.Run("dedicated listener", func(t *testing.T) {
		for _, p := range escapes {
			conn, err := net.Dial("tcp", dedicated)
			if err != nil {
				t.Fatal(err)
			}
			br := rawHTTP1(t, conn, fmt.Sprintf("GET %s HTTP/1.1\r\nHost: kas\r\nAuthorization: %s\r\n\r\n", p, authorization))
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatal(err)
			}
			expectStatus(t, resp, http.StatusBadRequest, metav1.StatusReasonBadRequest)
			_ = conn.Close()
		}
	})
	if n := rails.Calls(gitlab.PathAuthorizeProxyUser) - before; n != 0 {
		t.Errorf("kas asked GitLab %d times about requests it refused anyway", n)
	}
	for _, r := range e.kube.Requests() {
		if strings.Contains(r.Path, "escape") || strings.Contains(r.Path, "secrets") {
			t.Errorf("the cluster saw %s", r.Path)
		}
	}
}

// TestUpgradeFramingMatchesTheAPIServer: the 101 an HTTP/1.1 caller gets
// through kas is framed as the API server frames it (the fake cluster's
// own 101 is the reference): HTTP/1.1, one "Connection: Upgrade", the
// cluster's headers, no Kas-* header; only kas's X-Request-Id is added.
func TestUpgradeFramingMatchesTheAPIServer(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.startAgent(t, asAgent)
	const target = "/api/v1/namespaces/default/pods?watch=true"
	request := func(prefix, host, authorization string) string {
		return fmt.Sprintf("GET %s%s HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"+
			"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n%s\r\n", prefix, target, host, authorization)
	}

	direct, err := net.Dial("tcp", strings.TrimPrefix(e.kubeServer.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close()
	wantStatus, wantLines := readHead(t, rawHTTP1(t, direct, request("", "kube", "")))

	conn, err := net.Dial("tcp", e.kas.public)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	br := rawHTTP1(t, conn, request("/k8s-proxy", e.kas.public, "Authorization: "+pat(asAgent.id, alicePAT).authorization+"\r\n"))
	status, lines := readHead(t, br)
	checkUpgradeFraming(t, status, lines, wantStatus, wantLines)

	// The upgraded connection carries bytes both ways (the fake echoes).
	if _, err := io.WriteString(conn, "ping\n"); err != nil {
		t.Fatal(err)
	}
	if echo, err := br.ReadString('\n'); err != nil || echo != "ping\n" {
		t.Fatalf("echo: %q, %v", echo, err)
	}
}

// checkUpgradeFraming compares the head of a 101 that came through kas with
// the cluster's own.
func checkUpgradeFraming(t *testing.T, status string, lines []string, wantStatus string, wantLines []string) {
	t.Helper()
	if status != wantStatus || status != "HTTP/1.1 101 Switching Protocols" {
		t.Errorf("status line %q, want the cluster's %q", status, wantStatus)
	}
	if c := headerLines(lines, "Connection"); !slices.Equal(c, []string{"Upgrade"}) {
		t.Errorf("Connection lines %q, want exactly one \"Upgrade\"", c)
	}
	var got, want []string
	for _, l := range lines {
		if k, _, _ := strings.Cut(l, ":"); strings.HasPrefix(strings.ToLower(k), "kas-") {
			t.Errorf("the caller got kas's internal header %q", l)
		}
		if k, _, _ := strings.Cut(l, ":"); !strings.EqualFold(k, "X-Request-Id") {
			got = append(got, l)
		}
	}
	want = append(want, wantLines...)
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("header lines %q, want the cluster's %q (and X-Request-Id)", got, want)
	}
	if len(headerLines(lines, "X-Request-Id")) != 1 {
		t.Errorf("no X-Request-Id in %q", lines)
	}
}

// TestBrowserWebSocketWatch: the GitLab UI opens a watch as a browser
// WebSocket, which cannot set headers: the session cookie comes with it,
// the agent and the CSRF token in the query. kas accepts that and strips
// all three before the cluster sees the request.
func TestBrowserWebSocketWatch(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *config.Config) {
		c.Agent.KubernetesAPI.AllowedOrigins = []string{"https://gitlab.example.com"}
	})
	e.startAgent(t, asUser)
	conn, err := net.Dial("tcp", e.kas.public)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	const path = "/api/v1/namespaces/default/pods"
	br := rawHTTP1(t, conn, fmt.Sprintf("GET /-/kubernetes-agent/k8s-proxy%s?watch=true&gitlab-agent-id=%d&gitlab-csrf-token=%s HTTP/1.1\r\n"+
		"Host: %s\r\nOrigin: https://gitlab.example.com\r\nCookie: _gitlab_kas=%s; _gitlab_session=other\r\n"+
		"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"+
		"Sec-WebSocket-Protocol: base64.binary.k8s.io\r\n\r\n",
		path, asUser.id, aliceCSRF, e.kas.public, aliceCookie))
	status, lines := readHead(t, br)
	if status != "HTTP/1.1 101 Switching Protocols" {
		t.Fatalf("got %q %q, want the upgrade", status, lines)
	}
	got, ok := e.kube.LastRequest(path)
	if !ok {
		t.Fatal("the watch never reached the cluster")
	}
	if got.Query != "watch=true" {
		t.Errorf("the cluster saw query %q, want watch=true alone", got.Query)
	}
	for _, name := range []string{"Cookie", "X-Csrf-Token", "Gitlab-Agent-Id"} {
		if v := got.Header.Values(name); len(v) > 0 {
			t.Errorf("the cluster saw %s: %q", name, v)
		}
	}
	if u := got.Header.Get("Impersonate-User"); u != "gitlab:user:alice" {
		t.Errorf("the cluster saw Impersonate-User %q, want alice", u)
	}
	if p := got.Header.Get("Sec-Websocket-Protocol"); p != "base64.binary.k8s.io" {
		t.Errorf("the cluster saw Sec-WebSocket-Protocol %q", p)
	}
}

// TestClientAddressBehindTrustedProxies: with agent.trusted_proxies, the
// cluster sees the client the proxy named, not the proxy, nor what the
// client claimed.
func TestClientAddressBehindTrustedProxies(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *config.Config) { c.Agent.TrustedProxies = []string{"127.0.0.0/8"} })
	e.startAgent(t, asAgent)
	// The client claimed 10.9.9.9; the proxy (127.0.0.1) appended the
	// address it saw, 198.51.100.20.
	resp := e.do(t, http.MethodGet, "/api/v1/namespaces", pat(asAgent.id, alicePAT),
		http.Header{"X-Forwarded-For": {"10.9.9.9, 198.51.100.20"}}, nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d", resp.StatusCode)
	}
	got, _ := e.kube.LastRequest("/api/v1/namespaces")
	if ff := got.Header.Values("X-Forwarded-For"); !slices.Equal(ff, []string{"198.51.100.20"}) {
		t.Fatalf("the cluster saw X-Forwarded-For %q, want the client the proxy named, 198.51.100.20", ff)
	}
}

// listener returns the bound address of one of kas's listeners.
func (k *kasNode) listener(t *testing.T, name string) string {
	t.Helper()
	addr, ok := k.listeners[name]
	if !ok {
		t.Fatalf("kas has no listener %s", name)
	}
	return addr
}
