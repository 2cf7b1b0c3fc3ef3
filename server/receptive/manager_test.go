package receptive

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/tunnel"
)

// recordingServer stands in for the tunnel endpoint: it serves each
// connection until its context ends, and records why it ended.
type recordingServer struct {
	mu     sync.Mutex
	live   map[int64]int // connections being served, by agent
	served []int64
	causes []error
}

func (s *recordingServer) ServeReceptive(ctx context.Context, _ *slog.Logger, c tunnel.ReceptiveConn) error {
	s.mu.Lock()
	if s.live == nil {
		s.live = map[int64]int{}
	}
	s.live[c.Agent.AgentID]++
	s.served = append(s.served, c.Agent.AgentID)
	s.mu.Unlock()
	<-ctx.Done()
	_ = c.WS.Close()
	s.mu.Lock()
	s.live[c.Agent.AgentID]--
	s.causes = append(s.causes, context.Cause(ctx))
	s.mu.Unlock()
	return nil
}

func (s *recordingServer) connections(id int64) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.live[id]
}

func (s *recordingServer) servedCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.served)
}

// listSource is a list the test changes, or fails.
type listSource struct {
	mu   sync.Mutex
	list []gitlab.ReceptiveAgent
	err  error
}

func (l *listSource) set(list []gitlab.ReceptiveAgent, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.list, l.err = list, err
}

func (l *listSource) GetReceptiveAgents(context.Context) ([]gitlab.ReceptiveAgent, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]gitlab.ReceptiveAgent(nil), l.list...), l.err
}

type lockedLogs struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedLogs) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedLogs) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func eventually(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestManagerFollowsTheList(t *testing.T) {
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	agentk := newStandIn(t, pub, nil, nil)
	seed := base64.StdEncoding.EncodeToString(priv.Seed())
	entry := gitlab.ReceptiveAgent{ID: 7, URL: "grpc://" + agentk.addr(), JWT: &gitlab.ReceptiveAgentJWT{PrivateKey: seed}}
	src := &listSource{}
	srv := &recordingServer{}
	logs := &lockedLogs{}
	reg := prometheus.NewRegistry()
	m, err := NewManager(Options{
		Source: src,
		API:    fakeAPI{},
		AgentByID: func(_ context.Context, id int64) (*gitlab.AgentInfo, error) {
			return &gitlab.AgentInfo{AgentID: id}, nil
		},
		Server:     srv,
		PollPeriod: 20 * time.Millisecond,
		MinBackoff: time.Millisecond,
		MaxBackoff: 10 * time.Millisecond,
		Logger:     slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Registerer: reg,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); m.Run(ctx) }()
	defer func() { cancel(); <-done }()

	// Listed: connected.
	src.set([]gitlab.ReceptiveAgent{entry}, nil)
	eventually(t, func() bool { return srv.connections(7) == 1 }, "a connection to agent 7")

	// The list cannot be had: kas keeps the agent, and says so once.
	src.set(nil, errors.New("GitLab is down"))
	time.Sleep(100 * time.Millisecond)
	if srv.connections(7) != 1 || srv.servedCount() != 1 {
		t.Fatalf("while the list failed: %d connections, %d served; want the one connection kept", srv.connections(7), srv.servedCount())
	}
	if n := strings.Count(logs.String(), `"level":"WARN","msg":"Get the list of receptive agents"`); n != 1 {
		t.Errorf("the failing list was logged %d times as a warning, want once", n)
	}

	// An unusable configuration: the last good one stays.
	bad := entry
	bad.JWT = &gitlab.ReceptiveAgentJWT{PrivateKey: "garbage"}
	src.set([]gitlab.ReceptiveAgent{bad}, nil)
	eventually(t, func() bool { return strings.Contains(logs.String(), "URL configuration is not usable") }, "the bad configuration logged")
	time.Sleep(50 * time.Millisecond)
	if srv.connections(7) != 1 || srv.servedCount() != 1 {
		t.Fatalf("after a bad configuration: %d connections, %d served; want the first kept", srv.connections(7), srv.servedCount())
	}

	// A changed configuration: kas connects again with it.
	changed := entry
	changed.URL = "ws://" + agentk.addr() + "/"
	src.set([]gitlab.ReceptiveAgent{changed}, nil)
	eventually(t, func() bool { return srv.servedCount() == 2 && srv.connections(7) == 1 }, "a new connection with the changed configuration")

	// Removed: disconnected, with the reason.
	src.set([]gitlab.ReceptiveAgent{}, nil)
	eventually(t, func() bool { return srv.connections(7) == 0 }, "agent 7 disconnected")
	srv.mu.Lock()
	for _, c := range srv.causes {
		if !errors.Is(c, errStopped) {
			t.Errorf("a connection closed because %v, want %v", c, errStopped)
		}
	}
	srv.mu.Unlock()
	if got := value(m.metrics.dials.WithLabelValues("connected")); got != 2 {
		t.Errorf("kas_receptive_dials_total{result=connected} = %v, want 2", got)
	}
	if got := value(m.metrics.listed); got != 0 {
		t.Errorf("kas_receptive_agents = %v, want 0", got)
	}
}

func TestManagerRetriesWithBackoffAndLogsOncePerCause(t *testing.T) {
	pub, _, _ := ed25519.GenerateKey(rand.Reader)
	_, wrong, _ := ed25519.GenerateKey(rand.Reader)
	agentk := newStandIn(t, pub, nil, nil)
	src := &listSource{list: []gitlab.ReceptiveAgent{{ID: 7, URL: "grpc://" + agentk.addr(),
		JWT: &gitlab.ReceptiveAgentJWT{PrivateKey: base64.StdEncoding.EncodeToString(wrong.Seed())}}}}
	logs := &lockedLogs{}
	m, err := NewManager(Options{
		Source: src, API: fakeAPI{}, Server: &recordingServer{},
		PollPeriod: time.Hour, MinBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond,
		Logger: slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); m.Run(ctx) }()
	eventually(t, func() bool { return value(m.metrics.dials.WithLabelValues(causeRefused)) >= 10 }, "ten refused dials")
	cancel()
	<-done
	if n := strings.Count(logs.String(), `"level":"WARN","msg":"Connect to receptive agent"`); n != 1 {
		t.Errorf("%d warnings for the same refusal, want one", n)
	}
	if !strings.Contains(logs.String(), `"hint":"check that agentk's --receptive-jwt-public-key-file`) {
		t.Error("the refusal was logged without its hint")
	}
}

// value reads a counter's or gauge's current value.
func value(c prometheus.Metric) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		return -1
	}
	if m.Counter != nil {
		return m.Counter.GetValue()
	}
	return m.Gauge.GetValue()
}

func TestIDList(t *testing.T) {
	if got := idList([]int64{3, 1, 2}); got != "1 2 3" {
		t.Errorf("idList = %q", got)
	}
	var many []int64
	for i := range 25 {
		many = append(many, int64(25-i))
	}
	if got := idList(many); !strings.HasPrefix(got, "1 2 3") || !strings.HasSuffix(got, "19 20 …and 5 more") {
		t.Errorf("idList of 25 = %q", got)
	}
}
