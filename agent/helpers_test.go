package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/http2"
	"k8s.io/client-go/rest"

	"github.com/kasproject/kas/protocol"
)

const (
	testToken        = "agent-token-s3cr3t"
	testSAToken      = "agent-service-account-token"
	testK8sVersion   = "v1.31.0-test"
	testTimeout      = 20 * time.Second
	testAgentVersion = "v0.0.0-test"
)

// kasStandIn is the kas side of the tunnel, as little of it as the agent
// needs: it authenticates the token, upgrades, and runs an HTTP/2 client
// connection over the WebSocket.
type kasStandIn struct {
	URL string // ws://127.0.0.1:port (no path: the agent appends it)

	attempts chan handshake   // every connection attempt
	sessions chan *kasSession // every tunnel established

	rejectStatus int // when set, every attempt is refused with it
	rejectReason string

	mu  sync.Mutex
	all []*kasSession
}

type handshake struct {
	at     time.Time
	path   string
	header http.Header
}

type kasSession struct {
	cc   *http2.ClientConn
	conn net.Conn
}

func newKAS(t testing.TB, configure func(*kasStandIn)) *kasStandIn {
	t.Helper()
	k := &kasStandIn{attempts: make(chan handshake, 1000), sessions: make(chan *kasSession, 100)}
	if configure != nil {
		configure(k)
	}
	upgrader := websocket.Upgrader{
		ReadBufferSize:  wsReadBufferSize,
		WriteBufferSize: wsWriteBufferSize,
		Subprotocols:    []string{protocol.Subprotocol},
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case k.attempts <- handshake{at: time.Now(), path: r.URL.Path, header: r.Header.Clone()}:
		default:
		}
		if k.rejectStatus != 0 {
			http.Error(w, k.rejectReason, k.rejectStatus)
			return
		}
		if r.Header.Get("Authorization") != "Bearer "+testToken {
			http.Error(w, "invalid agent token", http.StatusUnauthorized)
			return
		}
		ws, err := upgrader.Upgrade(w, r, nil)
		if err != nil {
			return // the upgrader answered the client
		}
		conn := protocol.NewConn(ws)
		cc, err := (&http2.Transport{MaxReadFrameSize: 1 << 20}).NewClientConn(conn)
		if err != nil {
			_ = conn.Close()
			return
		}
		s := &kasSession{cc: cc, conn: conn}
		k.mu.Lock()
		k.all = append(k.all, s)
		k.mu.Unlock()
		k.sessions <- s
	}))
	k.URL = "ws://" + srv.Listener.Addr().String()
	t.Cleanup(func() {
		k.mu.Lock()
		defer k.mu.Unlock()
		for _, s := range k.all {
			s.close()
		}
		srv.Close()
	})
	return k
}

func (s *kasSession) close() {
	_ = s.cc.Close()
	_ = s.conn.Close()
}

// roundTrip sends req through the tunnel; req's URL path is what the agent
// sees.
func (s *kasSession) roundTrip(t testing.TB, req *http.Request) *http.Response {
	t.Helper()
	resp, err := s.cc.RoundTrip(req)
	if err != nil {
		t.Fatalf("round trip %s %s through the tunnel: %v", req.Method, req.URL.Path, err)
	}
	t.Cleanup(func() { _ = resp.Body.Close() })
	return resp
}

func newRequest(t testing.TB, method, path string, body io.Reader, header http.Header) *http.Request {
	t.Helper()
	req, err := http.NewRequest(method, "http://agentk"+path, body)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	return req
}

// echoed is what the fake API server saw of a request.
type echoed struct {
	Method string      `json:"method"`
	Path   string      `json:"path"`
	Query  string      `json:"query"`
	Header http.Header `json:"header"`
	Body   string      `json:"body"`
}

// fakeAPIServer echoes every request as JSON, answers /version, and lets a
// test add routes of its own.
type fakeAPIServer struct {
	*httptest.Server
	requests atomic.Int64
}

func newAPIServer(t testing.TB, routes map[string]http.HandlerFunc) *fakeAPIServer {
	t.Helper()
	f := &fakeAPIServer{}
	f.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/version" {
			_, _ = w.Write([]byte(`{"major":"1","minor":"31","gitVersion":"` + testK8sVersion + `"}`))
			return
		}
		f.requests.Add(1)
		if h, ok := routes[r.URL.Path]; ok {
			h(w, r)
			return
		}
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(echoed{Method: r.Method, Path: r.URL.Path, Query: r.URL.RawQuery, Header: r.Header, Body: string(body)})
	}))
	t.Cleanup(f.Close)
	return f
}

func (f *fakeAPIServer) restConfig() *rest.Config {
	return &rest.Config{Host: f.URL, BearerToken: testSAToken}
}

// syncBuffer collects logs written from several goroutines.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// runningAgent is an Agent whose Run the test started.
type runningAgent struct {
	*Agent
	logs     *syncBuffer
	registry *prometheus.Registry
	cancel   context.CancelFunc
	done     chan struct{} // closed when Run has returned
	runErr   error         // what Run returned, once done is closed
}

// startAgent runs an agent against kasURL and api until the test ends.
func startAgent(t testing.TB, kasURL string, api *fakeAPIServer, configure func(*Options)) *runningAgent {
	t.Helper()
	logs := &syncBuffer{}
	reg := prometheus.NewRegistry()
	opts := Options{
		KASAddress:    kasURL,
		Token:         testToken,
		RESTConfig:    api.restConfig(),
		Logger:        slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Registerer:    reg,
		AgentVersion:  testAgentVersion,
		AgentCommit:   "abc123",
		PodName:       "agentk-0",
		PodNamespace:  "gitlab-agent",
		MinBackoff:    5 * time.Millisecond,
		MaxBackoff:    50 * time.Millisecond,
		ShutdownGrace: 5 * time.Second,
	}
	if configure != nil {
		configure(&opts)
	}
	a, err := New(opts)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ra := &runningAgent{Agent: a, logs: logs, registry: reg, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(ra.done)
		ra.runErr = a.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-ra.done:
		case <-time.After(testTimeout):
			t.Errorf("Run did not return after cancel")
		}
		if strings.Contains(logs.String(), testToken) {
			t.Errorf("the agent token appeared in the logs")
		}
	})
	return ra
}

// stop cancels Run and returns its result.
func (ra *runningAgent) stop(t testing.TB) error {
	t.Helper()
	ra.cancel()
	recv(t, ra.done)
	return ra.runErr
}

// recv waits for a value on ch, failing the test after testTimeout.
func recv[T any](t testing.TB, ch <-chan T) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(testTimeout):
		t.Fatalf("timed out waiting for %T", *new(T))
		panic("unreachable")
	}
}

// connect starts an agent and returns it with its first tunnel.
func connect(t testing.TB, api *fakeAPIServer, configure func(*Options)) (*runningAgent, *kasSession) {
	t.Helper()
	k := newKAS(t, nil)
	a := startAgent(t, k.URL, api, configure)
	s := recv(t, k.sessions)
	recv(t, a.Connected())
	return a, s
}

func decodeJSON[T any](t testing.TB, r io.Reader) T {
	t.Helper()
	var v T
	if err := json.NewDecoder(r).Decode(&v); err != nil {
		t.Fatalf("decode %T: %v", v, err)
	}
	return v
}
