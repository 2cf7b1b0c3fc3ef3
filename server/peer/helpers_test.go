package peer

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"golang.org/x/net/http2"

	"github.com/kasproject/kas/protocol"
	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/k8sproxy"
	"github.com/kasproject/kas/server/proxyauth"
	"github.com/kasproject/kas/server/tunnel"
)

// The router must fit the proxy.
var _ k8sproxy.Router = (*Router)(nil)

var testSecret = []byte("0123456789abcdef0123456789abcdef")

func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// clusterRegistry is one node's view of the cluster: its own tunnels (the
// in-memory registry) plus a list of other nodes' URLs the test sets, as
// the Redis registry would report them.
type clusterRegistry struct {
	*registry.Memory
	mu      sync.Mutex
	remote  [][]string
	changed chan struct{} // closed and replaced whenever remote changes
}

func newClusterRegistry() *clusterRegistry {
	return &clusterRegistry{Memory: registry.NewMemory(), changed: make(chan struct{})}
}

func (c *clusterRegistry) setRemote(nodes ...[]string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.remote = nodes
	close(c.changed)
	c.changed = make(chan struct{})
}

func (c *clusterRegistry) FindRemote(context.Context, int64) ([][]string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.remote, nil
}

// WaitForAgent returns when the agent connects here or the remote list
// changes.
func (c *clusterRegistry) WaitForAgent(ctx context.Context, agentID int64) error {
	c.mu.Lock()
	changed := c.changed
	c.mu.Unlock()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	local := make(chan error, 1)
	go func() { local <- c.Memory.WaitForAgent(ctx, agentID) }()
	select {
	case err := <-local:
		return err
	case <-changed:
		return nil
	}
}

// agentAPI identifies agents by token "agent-<id>".
type agentAPI struct{}

func (agentAPI) GetAgentInfo(_ context.Context, token string) (*gitlab.AgentInfo, error) {
	id, err := strconv.ParseInt(strings.TrimPrefix(token, "agent-"), 10, 64)
	if err != nil {
		return nil, &gitlab.Error{Op: "get agent info", StatusCode: 401, Err: gitlab.ErrUnauthorized}
	}
	return &gitlab.AgentInfo{AgentID: id, ProjectID: 100}, nil
}

func (agentAPI) AuthorizeProxyUser(context.Context, gitlab.AuthorizeProxyUserRequest) (*gitlab.AuthorizeProxyUserResponse, error) {
	return nil, fmt.Errorf("not used in these tests")
}

func (agentAPI) GetAllowedAgentsForJob(context.Context, string) (*gitlab.AllowedAgentsForJob, error) {
	return nil, fmt.Errorf("not used in these tests")
}

// testIdentity is whom every proxied test request impersonates.
var testIdentity = protocol.Identity{Username: "gitlab:user:alice", Groups: []string{"gitlab:user"}}

// fixedAuth lets every request use agent 1 as alice.
type fixedAuth struct{}

func (fixedAuth) Authenticate(context.Context, *http.Request) (*proxyauth.Result, error) {
	id := testIdentity
	return &proxyauth.Result{AgentID: 1, Kind: proxyauth.KindPersonalAccessToken, Identity: &id}, nil
}

// node is one kas node: a tunnel endpoint for agents, the private API
// server, a router, and the Kubernetes API proxy in front of the router.
type node struct {
	reg      *clusterRegistry
	endpoint *tunnel.Endpoint
	agents   *httptest.Server // the agent endpoint
	server   *Server
	url      string // the private API URL
	router   *Router
	proxy    *httptest.Server
}

type nodeConfig struct {
	serverOpts func(*ServerOptions)
	routerOpts func(*RouterOptions)
	listener   net.Listener
}

func newNode(t testing.TB, cfg nodeConfig) *node {
	t.Helper()
	n := &node{reg: newClusterRegistry()}
	var err error
	n.endpoint, err = tunnel.NewEndpoint(tunnel.Options{
		API:              agentAPI{},
		Registry:         n.reg,
		Logger:           discardLogger(),
		PingInterval:     time.Minute,
		PingTimeout:      10 * time.Second,
		MaxConnectionAge: time.Hour,
		GracePeriod:      5 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	n.agents = httptest.NewServer(n.endpoint)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = n.endpoint.Shutdown(ctx)
		n.agents.Close()
	})

	so := ServerOptions{Registry: n.reg, Secret: testSecret, Logger: discardLogger()}
	if cfg.serverOpts != nil {
		cfg.serverOpts(&so)
	}
	n.server, err = NewServer(so)
	if err != nil {
		t.Fatal(err)
	}
	l := cfg.listener
	if l == nil {
		if l, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
	}
	scheme := "grpc"
	if so.TLS != nil {
		scheme = "grpcs"
	}
	n.url = scheme + "://" + l.Addr().String()
	served := make(chan error, 1)
	go func() { served <- n.server.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = n.server.Shutdown(ctx)
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})

	ro := RouterOptions{Registry: n.reg, Secret: testSecret, Logger: discardLogger()}
	if cfg.routerOpts != nil {
		cfg.routerOpts(&ro)
	}
	n.router, err = NewRouter(ro)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = n.router.Close() })

	n.proxy = httptest.NewServer(k8sproxy.NewHandler(k8sproxy.Options{
		Auth:             fixedAuth{},
		Router:           n.router,
		Logger:           discardLogger(),
		AgentWaitTimeout: 5 * time.Second,
	}))
	t.Cleanup(n.proxy.Close)
	return n
}

// connectAgent connects an agent with the given ID to n, serving handler
// on its side of the tunnel, and waits until n has registered the tunnel.
func (n *node) connectAgent(t testing.TB, agentID int64, handler http.Handler) {
	t.Helper()
	h := http.Header{}
	h.Set("Authorization", "Bearer agent-"+strconv.FormatInt(agentID, 10))
	d := websocket.Dialer{Subprotocols: []string{protocol.Subprotocol}}
	ws, _, err := d.Dial("ws"+strings.TrimPrefix(n.agents.URL, "http")+protocol.AgentPath, h)
	if err != nil {
		t.Fatalf("connect agent %d: %v", agentID, err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv := &http2.Server{MaxReadFrameSize: 1 << 20}
		srv.ServeConn(protocol.NewConn(ws), &http2.ServeConnOpts{Handler: handler})
	}()
	t.Cleanup(func() { _ = ws.Close(); <-done })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := n.reg.Memory.WaitForAgent(ctx, agentID); err != nil {
		t.Fatalf("agent %d never registered: %v", agentID, err)
	}
}

// testAgent is the cluster side of a tunnel: a few Kubernetes-like
// endpoints that report what reached them.
type testAgent struct {
	name     string
	release  chan struct{} // /chunks: each receive lets one more chunk out
	canceled chan struct{} // /watch: closed when the request is cancelled
	once     sync.Once
}

func newTestAgent(name string) *testAgent {
	return &testAgent{name: name, release: make(chan struct{}), canceled: make(chan struct{})}
}

// echo is what /echo answers.
type echo struct {
	Agent      string      `json:"agent"`
	Method     string      `json:"method"`
	Path       string      `json:"path"`
	RawPath    string      `json:"raw_path"`
	RawQuery   string      `json:"raw_query"`
	Header     http.Header `json:"header"`
	BodyLength int64       `json:"body_length"`
	BodySHA256 string      `json:"body_sha256"`
	Identity   string      `json:"identity"`
	// PathHex and RawHeaderHex are the path and the X-Raw header in hex, so
	// bytes that are not UTF-8 survive the JSON.
	PathHex      string `json:"path_hex"`
	RawHeaderHex string `json:"raw_header_hex"`
}

func (a *testAgent) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get(protocol.HeaderUpgrade) != "" {
		a.upgrade(w, r)
		return
	}
	q := r.URL.Query()
	switch {
	case strings.HasPrefix(r.URL.Path, "/echo"):
		sum := sha256.New()
		n, err := io.Copy(sum, r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		id, _ := protocol.DecodeIdentity(r.Header.Get(protocol.HeaderIdentity))
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Agent", a.name)
		_ = json.NewEncoder(w).Encode(echo{
			Agent: a.name, Method: r.Method, Path: r.URL.Path, RawPath: r.URL.RawPath, RawQuery: r.URL.RawQuery,
			Header: r.Header, BodyLength: n, BodySHA256: hex.EncodeToString(sum.Sum(nil)), Identity: id.Username,
			PathHex: hex.EncodeToString([]byte(r.URL.Path)), RawHeaderHex: hex.EncodeToString([]byte(r.Header.Get("X-Raw"))),
		})
	case r.URL.Path == "/small":
		w.Header().Set("Content-Length", "2")
		_, _ = w.Write([]byte("ok"))
	case r.URL.Path == "/bytes":
		size, _ := strconv.Atoi(q.Get("n"))
		if q.Get("length") == "known" {
			w.Header().Set("Content-Length", strconv.Itoa(size))
		}
		_, _ = io.Copy(w, io.LimitReader(pattern{}, int64(size)))
	case r.URL.Path == "/chunks":
		count, _ := strconv.Atoi(q.Get("n"))
		for i := range count {
			if i > 0 {
				select {
				case <-a.release:
				case <-r.Context().Done():
					return
				}
			}
			fmt.Fprintf(w, "chunk %d\n", i)
			w.(http.Flusher).Flush()
		}
	case r.URL.Path == "/watch":
		_, _ = io.WriteString(w, "event 1\n")
		w.(http.Flusher).Flush()
		<-r.Context().Done()
		a.once.Do(func() { close(a.canceled) })
	case r.URL.Path == "/trailers":
		w.Header().Set("Trailer", "X-Checksum")
		_, _ = io.WriteString(w, "body")
		w.Header().Set("X-Checksum", "abc")
	case r.URL.Path == "/abort":
		_, _ = w.Write(make([]byte, 100<<10))
		w.(http.Flusher).Flush()
		panic(http.ErrAbortHandler)
	case r.URL.Path == "/abort-before-answering":
		panic(http.ErrAbortHandler)
	default:
		http.NotFound(w, r)
	}
}

// upgrade answers an upgrade as agentk does (200 + Kas-Upgrade-Status: 101)
// and then echoes the caller's bytes in upper case until the caller stops.
func (a *testAgent) upgrade(w http.ResponseWriter, r *http.Request) {
	if strings.HasSuffix(r.URL.Path, "/refused") {
		http.Error(w, "exec not allowed", http.StatusForbidden)
		return
	}
	w.Header().Set(protocol.HeaderUpgradeStatus, "101")
	w.WriteHeader(http.StatusOK)
	w.(http.Flusher).Flush()
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Body.Read(buf)
		if n > 0 {
			if _, werr := w.Write([]byte(strings.ToUpper(string(buf[:n])))); werr != nil {
				return
			}
			w.(http.Flusher).Flush()
		}
		if err != nil {
			return
		}
	}
}

// pattern is an endless deterministic byte stream.
type pattern struct{}

func (pattern) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = byte(i*7 + i>>8)
	}
	return len(p), nil
}

func patternSHA256(n int64) string {
	sum := sha256.New()
	_, _ = io.Copy(sum, io.LimitReader(pattern{}, n))
	return hex.EncodeToString(sum.Sum(nil))
}

// twoNodes is the basic setup: node A has no tunnel and knows that B holds
// agent 1's.
func twoNodes(t testing.TB) (a, b *node, agent *testAgent) {
	t.Helper()
	a = newNode(t, nodeConfig{})
	b = newNode(t, nodeConfig{})
	agent = newTestAgent("b")
	b.connectAgent(t, 1, agent)
	a.reg.setRemote([]string{b.url})
	return a, b, agent
}

// closedURL returns a grpc:// URL nothing listens on.
func closedURL(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	return "grpc://" + addr
}

func sha256Hex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

func counterValue(c prometheus.Collector) float64 {
	ch := make(chan prometheus.Metric, 1)
	c.Collect(ch)
	var m dto.Metric
	if err := (<-ch).Write(&m); err != nil {
		panic(err)
	}
	if m.Counter != nil {
		return m.Counter.GetValue()
	}
	return m.Gauge.GetValue()
}
