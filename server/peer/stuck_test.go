package peer

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"io"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kasproject/kas/registry"
)

// stallingRegistry is a node's registry whose FindLocal blocks until gate
// is closed: the node's private API accepts calls but takes none, as a node
// that is frozen (SIGSTOP), stuck or overloaded would.
type stallingRegistry struct {
	*clusterRegistry
	gate    chan struct{}
	stalled atomic.Int32
}

func (s *stallingRegistry) FindLocal(agentID int64) (registry.Tunnel, bool) {
	s.stalled.Add(1)
	<-s.gate
	return s.clusterRegistry.FindLocal(agentID)
}

// countingHandler counts the requests that reach an agent.
type countingHandler struct {
	http.Handler
	n atomic.Int32
}

func (c *countingHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	c.n.Add(1)
	c.Handler.ServeHTTP(w, r)
}

// TestForwardSkipsNodeThatDoesNotTakeTheRequest: a node that does not take
// a request within the accept timeout is skipped, the request (whatever
// its body, an upgrade too) is served by another node holding the agent,
// the stuck node never passes it on even once it wakes up, and later
// requests do not try it first.
func TestForwardSkipsNodeThatDoesNotTakeTheRequest(t *testing.T) {
	const acceptTimeout = 300 * time.Millisecond
	stalling := &stallingRegistry{gate: make(chan struct{})}
	stuck := newNode(t, nodeConfig{serverOpts: func(o *ServerOptions) {
		stalling.clusterRegistry = o.Registry.(*clusterRegistry)
		o.Registry = stalling
	}})
	stuckAgent := &countingHandler{Handler: newTestAgent("stuck")}
	stuck.connectAgent(t, 1, stuckAgent)
	healthy := newNode(t, nodeConfig{})
	healthy.connectAgent(t, 1, newTestAgent("healthy"))
	released := false
	release := func() {
		if !released {
			released = true
			close(stalling.gate)
		}
	}
	defer release()

	large := make([]byte, 1<<20)
	_, _ = rand.Read(large)
	tests := []struct {
		name string
		do   func(t *testing.T, a *node)
	}{
		{"GET", func(t *testing.T, a *node) {
			if got := getEcho(t, a.proxy.URL+"/echo/get"); got.Agent != "healthy" {
				t.Fatalf("served by agent %q, want healthy", got.Agent)
			}
		}},
		{"POST with a small body", func(t *testing.T, a *node) {
			postEcho(t, a, []byte(`{"kind":"ConfigMap"}`))
		}},
		{"POST with a large body", func(t *testing.T, a *node) {
			postEcho(t, a, large)
		}},
		{"upgrade", func(t *testing.T, a *node) {
			conn, br, resp := dialUpgrade(t, a, "/api/v1/namespaces/default/pods/web/exec?command=sh")
			if resp.StatusCode != http.StatusSwitchingProtocols {
				t.Fatalf("got %s, want 101", resp.Status)
			}
			if _, err := io.WriteString(conn, "hello"); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, 5)
			if _, err := io.ReadFull(br, got); err != nil || string(got) != "HELLO" {
				t.Fatalf("echo %q, %v", got, err)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := newNode(t, nodeConfig{routerOpts: func(o *RouterOptions) { o.AcceptTimeout = acceptTimeout }})
			// The first request tries the second node first (see forward).
			a.reg.setRemote([]string{healthy.url}, []string{stuck.url})
			stalledBefore := stalling.stalled.Load()
			start := time.Now()
			tt.do(t, a)
			if took := time.Since(start); took < acceptTimeout {
				t.Fatalf("the first request took %s, less than the accept timeout: it did not try the stuck node", took)
			}
			if stalling.stalled.Load() != stalledBefore+1 {
				t.Fatalf("the stuck node was tried %d times, want once", stalling.stalled.Load()-stalledBefore)
			}
			if n := counterValue(a.router.metrics.failTimeout); n != 1 {
				t.Errorf("timeouts counted: %v, want 1", n)
			}
			// The stuck node is skipped now: the next request goes
			// straight to the healthy one.
			start = time.Now()
			tt.do(t, a)
			if took := time.Since(start); took >= acceptTimeout {
				t.Errorf("the second request took %s: it tried the stuck node again", took)
			}
			if stalling.stalled.Load() != stalledBefore+1 {
				t.Errorf("the stuck node was tried again while its breaker is open")
			}
		})
	}

	// Woken up, the stuck node finds the calls cancelled and sends nothing
	// to its agent.
	stalled := float64(stalling.stalled.Load())
	release()
	waitFor(t, "the stuck node's calls to end", func() bool { return counterValue(stuck.server.results.canceled) == stalled })
	if n := stuckAgent.n.Load(); n != 0 {
		t.Fatalf("the stuck node's agent got %d requests after the node woke up; want none (they were served elsewhere)", n)
	}
}

// postEcho posts body through a's proxy and checks the healthy agent got it
// whole.
func postEcho(t *testing.T, a *node, body []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, a.proxy.URL+"/echo/post", bytes.NewReader(body))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var got echo
	if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
		t.Fatal(err)
	}
	if got.Agent != "healthy" || got.BodySHA256 != sha256Hex(body) {
		t.Fatalf("served by %q with body %s, want healthy with %s", got.Agent, got.BodySHA256, sha256Hex(body))
	}
}

// TestBreakerOrder: nodes whose URLs failed recently go last, a node's
// failed URLs after its others, and a URL is tried again after its pause.
func TestBreakerOrder(t *testing.T) {
	now := time.Unix(1000, 0)
	b := newBreaker()
	b.now = func() time.Time { return now }
	nodes := [][]string{{"grpc://a1", "grpc://a2"}, {"grpc://b"}, {"grpc://c"}}
	same := func(got, want [][]string) bool {
		g, _ := json.Marshal(got)
		w, _ := json.Marshal(want)
		return bytes.Equal(g, w)
	}
	if got := b.order(nodes); !same(got, nodes) {
		t.Fatalf("nothing failed: order %v, want %v", got, nodes)
	}
	if newCause, pause := b.failed("grpc://b", "frozen"); !newCause || pause != breakerBase {
		t.Fatalf("first failure: new cause %t, pause %s; want true, %s", newCause, pause, breakerBase)
	}
	b.failed("grpc://a1", "refused")
	want := [][]string{{"grpc://a2", "grpc://a1"}, {"grpc://c"}, {"grpc://b"}}
	if got := b.order(nodes); !same(got, want) {
		t.Fatalf("order %v, want %v", got, want)
	}
	// The same cause again is not news, and the pause doubles.
	if newCause, pause := b.failed("grpc://b", "frozen"); newCause || pause != 2*breakerBase {
		t.Fatalf("second failure: new cause %t, pause %s; want false, %s", newCause, pause, 2*breakerBase)
	}
	if newCause, _ := b.failed("grpc://b", "TLS"); !newCause {
		t.Fatal("a different cause is news")
	}
	for range 20 {
		b.failed("grpc://b", "TLS")
	}
	if _, pause := b.failed("grpc://b", "TLS"); pause != breakerMax {
		t.Fatalf("pause after many failures %s, want %s", pause, breakerMax)
	}
	// Past its pause, a URL is tried in its place again (the trial).
	now = now.Add(breakerBase + time.Second)
	want = [][]string{{"grpc://a1", "grpc://a2"}, {"grpc://c"}, {"grpc://b"}}
	if got := b.order(nodes); !same(got, want) {
		t.Fatalf("after a1's pause: order %v, want %v", got, want)
	}
	if n := b.succeeded("grpc://b"); n != 24 {
		t.Fatalf("succeeded reported %d failures, want 24", n)
	}
	b.succeeded("grpc://a1")
	if got := b.order(nodes); !same(got, nodes) || b.failing.Load() != 0 {
		t.Fatalf("all recovered: order %v, want %v", got, nodes)
	}
	// Failures nobody retried are forgotten eventually.
	b.failed("grpc://gone", "refused")
	now = now.Add(breakerForget + time.Second)
	b.failed("grpc://c", "refused")
	if _, ok := b.peers["grpc://gone"]; ok {
		t.Fatal("a URL that failed long ago and was never tried again is still remembered")
	}
}
