package tunnel

import (
	"bufio"
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"golang.org/x/net/http2"

	"github.com/kasproject/kas/protocol"
	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/gitlab"
)

// agents is a gitlab.API that knows agents by token.
type agents map[string]gitlab.AgentInfo

func (a agents) GetAgentInfo(_ context.Context, token string) (*gitlab.AgentInfo, error) {
	info, ok := a[token]
	if !ok {
		return nil, &gitlab.Error{Op: "get agent info", StatusCode: 401, Err: gitlab.ErrUnauthorized}
	}
	return &info, nil
}

func (a agents) AuthorizeProxyUser(context.Context, gitlab.AuthorizeProxyUserRequest) (*gitlab.AuthorizeProxyUserResponse, error) {
	panic("not used")
}

func (a agents) GetAllowedAgentsForJob(context.Context, string) (*gitlab.AllowedAgentsForJob, error) {
	panic("not used")
}

type fixture struct {
	endpoint *Endpoint
	registry *registry.Memory
	server   *httptest.Server
	wsURL    string
}

func newFixture(t *testing.T, mutate func(*Options)) *fixture {
	t.Helper()
	reg := registry.NewMemory()
	opts := Options{
		API: agents{
			"good-token": {AgentID: 1, ProjectID: 100, AgentName: "prod"},
			// A backend answering without an agent ID (GitLab's client
			// refuses such an answer itself).
			"agent-zero-token": {ProjectID: 100, AgentName: "nameless"},
		},
		Registry:                     reg,
		Logger:                       slog.New(slog.NewTextHandler(io.Discard, nil)),
		PingInterval:                 time.Minute,
		PingTimeout:                  10 * time.Second,
		MaxConnectionAge:             time.Hour,
		GracePeriod:                  5 * time.Second,
		ConnectionsPerTokenPerMinute: 100,
	}
	if mutate != nil {
		mutate(&opts)
	}
	e, err := NewEndpoint(opts)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(e)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = e.Shutdown(ctx)
		srv.Close()
	})
	return &fixture{endpoint: e, registry: reg, server: srv, wsURL: "ws" + strings.TrimPrefix(srv.URL, "http") + protocol.AgentPath}
}

// dial connects like agentk and serves handler over HTTP/2 until the
// connection ends. It returns the handshake response.
func (f *fixture) dial(t *testing.T, token string, subprotocol string, handler http.Handler) (*http.Response, *websocket.Conn, error) {
	t.Helper()
	h := http.Header{}
	if token != "" {
		h.Set("Authorization", "Bearer "+token)
	}
	h.Set(protocol.HeaderAgentVersion, "v1.2.3")
	h.Set(protocol.HeaderPodName, "agentk-0")
	d := websocket.Dialer{Subprotocols: []string{subprotocol}}
	ws, resp, err := d.Dial(f.wsURL, h)
	if err != nil {
		return resp, nil, err
	}
	if handler != nil {
		done := make(chan struct{})
		go func() {
			defer close(done)
			(&http2.Server{}).ServeConn(protocol.NewConn(ws), &http2.ServeConnOpts{Handler: handler})
		}()
		t.Cleanup(func() { _ = ws.Close(); <-done })
	} else {
		t.Cleanup(func() { _ = ws.Close() })
	}
	return resp, ws, nil
}

func (f *fixture) waitTunnel(t *testing.T, agentID int64) registry.Tunnel {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := f.registry.WaitForAgent(ctx, agentID); err != nil {
		t.Fatalf("agent %d never registered: %v", agentID, err)
	}
	tun, _ := f.registry.FindLocal(agentID)
	return tun
}

func (f *fixture) waitGone(t *testing.T, agentID int64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, ok := f.registry.FindLocal(agentID); !ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent %d still registered", agentID)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestEndpointRefusesBeforeUpgrade(t *testing.T) {
	f := newFixture(t, func(o *Options) { o.ConnectionsPerTokenPerMinute = 1 })
	tests := []struct {
		name        string
		token       string
		subprotocol string
		wantCode    int
		wantReason  string
	}{
		{"no token", "", protocol.Subprotocol, 401, "missing agent token"},
		{"bad token", "wrong", protocol.Subprotocol, 401, "agent token is not valid"},
		{"old protocol", "good-token", "kas-tunnel.v0", 400, "unsupported tunnel protocol \"kas-tunnel.v0\": this kas speaks kas-tunnel.v1 (kas's agentk) and ws-tunnel (GitLab's agentk)"},
		{"answer without an agent ID", "agent-zero-token", protocol.Subprotocol, 502, "GitLab contract error"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			resp, _, err := f.dial(t, tc.token, tc.subprotocol, nil)
			if err == nil {
				t.Fatal("connection was upgraded")
			}
			body, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tc.wantCode || !strings.Contains(string(body), tc.wantReason) {
				t.Fatalf("got %d %q, want %d containing %q", resp.StatusCode, body, tc.wantCode, tc.wantReason)
			}
		})
	}
	t.Run("plain GET", func(t *testing.T) {
		resp, err := http.Get(f.server.URL + protocol.AgentPath)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("got %d, want 400", resp.StatusCode)
		}
	})
	t.Run("rate limit", func(t *testing.T) {
		if _, _, err := f.dial(t, "good-token", protocol.Subprotocol, http.NotFoundHandler()); err != nil {
			t.Fatalf("first connection: %v", err)
		}
		resp, _, err := f.dial(t, "good-token", protocol.Subprotocol, nil)
		if err == nil || resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") == "" {
			t.Fatalf("second connection within the minute: err=%v resp=%v", err, resp)
		}
	})
}

func TestEndpointTunnelCarriesRequests(t *testing.T) {
	f := newFixture(t, nil)
	_, _, err := f.dial(t, "good-token", protocol.Subprotocol, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "hello from the agent: "+r.URL.Path)
	}))
	if err != nil {
		t.Fatal(err)
	}
	tun := f.waitTunnel(t, 1)
	info := tun.Info()
	if info.ProjectID != 100 || info.AgentVersion != "v1.2.3" || info.PodName != "agentk-0" {
		t.Fatalf("tunnel info %+v: want project 100, version v1.2.3, pod agentk-0", info)
	}
	req, _ := http.NewRequest(http.MethodGet, "http://agent/api/v1/namespaces", nil)
	resp, err := tun.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "hello from the agent: /api/v1/namespaces" {
		t.Fatalf("got %q", body)
	}
}

func TestEndpointUpgrade(t *testing.T) {
	f := newFixture(t, nil)
	// The agent side of an upgrade: answer 200 + HeaderUpgradeStatus and echo.
	_, _, err := f.dial(t, "good-token", protocol.Subprotocol, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get(protocol.HeaderUpgrade) != "SPDY/3.1" || r.Header.Get("Connection") != "" {
			http.Error(w, "bad upgrade request", http.StatusBadRequest)
			return
		}
		w.Header().Set(protocol.HeaderUpgradeStatus, "101")
		w.Header().Set("X-Stream-Protocol-Version", "v4.channel.k8s.io")
		w.WriteHeader(http.StatusOK)
		_ = http.NewResponseController(w).Flush()
		buf := make([]byte, 1024)
		for {
			n, err := r.Body.Read(buf)
			if n > 0 {
				_, _ = w.Write(buf[:n])
				_ = http.NewResponseController(w).Flush()
			}
			if err != nil {
				return
			}
		}
	}))
	if err != nil {
		t.Fatal(err)
	}
	tun := f.waitTunnel(t, 1)
	req, _ := http.NewRequest(http.MethodPost, "http://agent/api/v1/namespaces/default/pods/p/exec", nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "SPDY/3.1")
	resp, err := tun.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("Upgrade") != "SPDY/3.1" ||
		resp.Header.Get("X-Stream-Protocol-Version") != "v4.channel.k8s.io" {
		t.Fatalf("got %d %v", resp.StatusCode, resp.Header)
	}
	rwc, ok := resp.Body.(io.ReadWriteCloser)
	if !ok {
		t.Fatal("upgraded body is not an io.ReadWriteCloser")
	}
	defer rwc.Close()
	br := bufio.NewReader(rwc)
	for _, msg := range []string{"ls\n", "exit\n"} {
		if _, err := io.WriteString(rwc, msg); err != nil {
			t.Fatal(err)
		}
		got, err := br.ReadString('\n')
		if err != nil || got != msg {
			t.Fatalf("echo: got %q, %v; want %q", got, err, msg)
		}
	}
}

func TestEndpointClosesUnresponsiveTunnel(t *testing.T) {
	f := newFixture(t, func(o *Options) {
		o.PingInterval = 100 * time.Millisecond
		o.PingTimeout = 100 * time.Millisecond
	})
	// Upgrade, then never speak HTTP/2: PINGs go unanswered.
	if _, _, err := f.dial(t, "good-token", protocol.Subprotocol, nil); err != nil {
		t.Fatal(err)
	}
	f.waitTunnel(t, 1)
	f.waitGone(t, 1)
}

func TestEndpointMaxConnectionAgeIsGraceful(t *testing.T) {
	f := newFixture(t, func(o *Options) { o.MaxConnectionAge = 300 * time.Millisecond })
	release := make(chan struct{})
	var once sync.Once
	started := make(chan struct{})
	_, _, err := f.dial(t, "good-token", protocol.Subprotocol, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		once.Do(func() { close(started) })
		<-release
		_, _ = io.WriteString(w, "finished")
	}))
	if err != nil {
		t.Fatal(err)
	}
	tun := f.waitTunnel(t, 1)
	result := make(chan string, 1)
	go func() {
		req, _ := http.NewRequest(http.MethodGet, "http://agent/slow", nil)
		resp, err := tun.RoundTrip(req)
		if err != nil {
			result <- "error: " + err.Error()
			return
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		result <- string(b)
	}()
	<-started
	f.waitGone(t, 1) // unregistered at max age while the request is in flight
	close(release)
	if got := <-result; got != "finished" {
		t.Fatalf("in-flight request: %s", got)
	}
	select {
	case <-tun.(*Tunnel).Done():
	case <-time.After(5 * time.Second):
		t.Fatal("tunnel not closed after draining")
	}
}

func TestEndpointConnectHooks(t *testing.T) {
	type event struct {
		kind   string
		agent  gitlab.AgentInfo
		tunnel registry.Tunnel
	}
	events := make(chan event, 2)
	f := newFixture(t, func(o *Options) {
		o.OnConnect = func(agent gitlab.AgentInfo, t registry.Tunnel) { events <- event{"connect", agent, t} }
		o.OnDisconnect = func(t registry.Tunnel) { events <- event{"disconnect", gitlab.AgentInfo{}, t} }
	})
	_, ws, err := f.dial(t, "good-token", protocol.Subprotocol, http.NotFoundHandler())
	if err != nil {
		t.Fatal(err)
	}
	next := func() event {
		t.Helper()
		select {
		case ev := <-events:
			return ev
		case <-time.After(5 * time.Second):
			t.Fatal("no hook called")
			return event{}
		}
	}
	connected := next()
	if connected.kind != "connect" || connected.agent.AgentID != 1 || connected.agent.AgentName != "prod" || connected.agent.ProjectID != 100 {
		t.Fatalf("first event %s with agent %+v, want connect of agent 1 (prod, project 100)", connected.kind, connected.agent)
	}
	if registered := f.waitTunnel(t, 1); connected.tunnel != registered {
		t.Fatal("OnConnect got another tunnel than the registered one")
	}
	_ = ws.Close()
	if ev := next(); ev.kind != "disconnect" || ev.tunnel != connected.tunnel {
		t.Fatalf("second event %s, want disconnect of the connected tunnel", ev.kind)
	}
	if _, ok := f.registry.FindLocal(1); ok {
		t.Fatal("tunnel still registered when OnDisconnect ran")
	}
}

// TestEndpointConnectionIDsAreRandom: GitLab tells an agent's connections
// apart by connection_id across nodes and restarts, so it is random, not a
// per-node counter (which gave every first connection the ID 1).
func TestEndpointConnectionIDsAreRandom(t *testing.T) {
	ids := map[int64]bool{}
	for range 2 {
		f := newFixture(t, nil) // a fresh endpoint each time, as after a restart
		if _, _, err := f.dial(t, "good-token", protocol.Subprotocol, http.NotFoundHandler()); err != nil {
			t.Fatal(err)
		}
		id := f.waitTunnel(t, 1).Info().ConnectionID
		if id < 1<<32 || ids[id] {
			t.Fatalf("connection ID %d (earlier %v): want a fresh random positive int63", id, ids)
		}
		ids[id] = true
	}
}

// connServerFunc adapts a function to ConnServer.
type connServerFunc func(net.Conn)

func (f connServerFunc) ServeConn(c net.Conn) { f(c) }

func TestEndpointHandsGitLabAgentkOver(t *testing.T) {
	got := make(chan string, 1)
	f := newFixture(t, func(o *Options) {
		o.GitLabAgentk = connServerFunc(func(c net.Conn) {
			defer c.Close()
			buf := make([]byte, 5)
			_, _ = io.ReadFull(c, buf)
			got <- string(buf)
		})
	})
	// GitLab's agentk sends no token on the upgrade: it sends it with
	// every gRPC call inside, where the GitLab agentk server checks it.
	d := websocket.Dialer{Subprotocols: []string{GitLabSubprotocol}}
	ws, resp, err := d.Dial(f.wsURL, nil)
	if err != nil {
		t.Fatalf("upgrade: %v (%v)", err, resp)
	}
	defer ws.Close()
	if ws.Subprotocol() != GitLabSubprotocol {
		t.Fatalf("subprotocol %q, want %s", ws.Subprotocol(), GitLabSubprotocol)
	}
	if err := ws.WriteMessage(websocket.BinaryMessage, []byte("hello")); err != nil {
		t.Fatal(err)
	}
	select {
	case s := <-got:
		if s != "hello" {
			t.Fatalf("the GitLab agentk server read %q", s)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the connection never reached the GitLab agentk server")
	}
	if _, ok := f.registry.FindLocal(1); ok {
		t.Fatal("a tunnel was registered before any token was checked")
	}
}
