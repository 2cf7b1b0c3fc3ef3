package status

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/kasproject/kas/internal/redistest"
	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/logging"
	"github.com/kasproject/kas/server/standalone"
	"github.com/kasproject/kas/server/traffic"
	"github.com/kasproject/kas/web"
)

// tunnel is a registered connection without an agent behind it: the page
// reads only its Info.
type tunnel struct{ info registry.TunnelInfo }

func (t *tunnel) Info() registry.TunnelInfo { return t.info }
func (t *tunnel) RoundTrip(*http.Request) (*http.Response, error) {
	return nil, errors.New("no agent behind this test tunnel")
}

func register(t *testing.T, reg registry.Registry, infos ...registry.TunnelInfo) {
	t.Helper()
	for _, info := range infos {
		if err := reg.Register(context.Background(), &tunnel{info}); err != nil {
			t.Fatal(err)
		}
	}
}

func agentByID(st web.Status, id int64) *web.Agent {
	for i := range st.Agents {
		if st.Agents[i].ID == id {
			return &st.Agents[i]
		}
	}
	return nil
}

func TestGatherOneNode(t *testing.T) {
	started := time.Now().Add(-time.Hour)
	reg := registry.NewMemory()
	early, late := time.Now().Add(-30*time.Minute).UTC(), time.Now().Add(-time.Minute).UTC()
	register(t, reg,
		registry.TunnelInfo{AgentID: 1, ProjectID: 10, ConnectionID: 1, PodName: "a-0", ConnectedAt: late},
		registry.TunnelInfo{AgentID: 1, ProjectID: 10, ConnectionID: 2, PodName: "a-1", ConnectedAt: early, Receptive: true},
		registry.TunnelInfo{AgentID: 2, ProjectID: 20, ConnectionID: 3, PodName: "b-0", ConnectedAt: late, Flavor: registry.FlavorGitLab},
	)
	rec := &traffic.Recorder{}
	for i := range 10 {
		rec.Agent(1).Observe(i < 3, 100, 1000)
	}
	rec.Agent(5).Observe(true, 0, 0)
	rec.Agent(5).Fail(traffic.Failure{Time: time.Now().UTC(), Message: "agent 5 is not connected to kas"})
	seen := NewSeen()
	seen.Connect(gitlab.AgentInfo{AgentID: 9, AgentName: "gone", ProjectID: 90})
	seen.Disconnect(9)
	seen.Connect(gitlab.AgentInfo{AgentID: 2, AgentName: "second", ProjectID: 20})
	recent := logging.NewRecent(10)
	logging.New(discard{}, slog.LevelInfo, recent).Warn("Something", "agent_id", 1)

	page := New(Options{
		Version: "v9", StartedAt: started, Registry: reg, Traffic: rec, Seen: seen, Recent: recent,
		Ready: func(context.Context) error { return errors.New("listeners are not serving") },
		Standalone: func() ([]standalone.Agent, error) {
			return []standalone.Agent{{ID: 1, Name: "prod", ProjectID: 10, ProjectPath: "acme/infra"}, {ID: 3, Name: "idle", ProjectID: 10}, {ID: 5, Name: "broken", ProjectID: 10}}, nil
		},
		StandaloneFile: "/etc/kas/standalone.yaml",
	})
	st := page.Gather(context.Background())

	if st.Ready || st.NotReadyReason != "listeners are not serving" || st.Mode != "standalone" {
		t.Errorf("readiness %v %q mode %q", st.Ready, st.NotReadyReason, st.Mode)
	}
	if want := (web.Summary{Agents: 5, Connected: 2, Disconnected: 3, Failing: 2, Tunnels: 3}); st.Summary != want {
		t.Errorf("summary %+v, want %+v", st.Summary, want)
	}
	a1 := agentByID(st, 1)
	if a1 == nil || !a1.Connected || a1.Name != "prod" || a1.Project != "acme/infra" || len(a1.Connections) != 2 || !a1.ConnectedSince.Equal(early) {
		t.Fatalf("agent 1: %+v", a1)
	}
	if w := a1.Traffic.Last5m; w.Requests != 10 || w.Errors != 3 || w.BytesIn != 1000 || w.BytesOut != 10000 || len(a1.Traffic.RequestsPerMinute) != traffic.HistoryMinutes {
		t.Errorf("agent 1 traffic %+v", a1.Traffic)
	}
	if a2 := agentByID(st, 2); a2 == nil || a2.Name != "second" || a2.Connections[0].Flavor != registry.FlavorGitLab || a2.Traffic.Last60m.Requests != 0 || len(a2.Traffic.RequestsPerMinute) != traffic.HistoryMinutes {
		t.Errorf("agent 2 (named by the seen record, no traffic): %+v", a2)
	}
	if a3 := agentByID(st, 3); a3 == nil || a3.Connected || !a3.LastSeen.IsZero() || a3.Connections == nil {
		t.Errorf("agent 3 (known, never seen): %+v", a3)
	}
	if a5 := agentByID(st, 5); a5 == nil || a5.Connected || a5.Traffic.LastFailure == nil || a5.Traffic.Last5m.ErrorRate != 1 {
		t.Errorf("agent 5 (known, failing requests): %+v", a5)
	}
	if a9 := agentByID(st, 9); a9 == nil || a9.Connected || a9.Name != "gone" || a9.LastSeen.IsZero() {
		t.Errorf("agent 9 (seen, gone): %+v", a9)
	}
	if s := st.Dependencies.Standalone; s == nil || s.Agents != 3 || s.File != "/etc/kas/standalone.yaml" {
		t.Errorf("standalone dependency %+v", s)
	}
	if st.Nodes != nil || st.Dependencies.Redis != nil || st.Dependencies.GitLab != nil {
		t.Errorf("one node in standalone mode shows nodes %v, Redis %v, GitLab %v", st.Nodes, st.Dependencies.Redis, st.Dependencies.GitLab)
	}
	if len(st.RecentErrors) != 1 || st.RecentErrors[0].Attrs["agent_id"] != "1" {
		t.Errorf("recent errors %+v", st.RecentErrors)
	}
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

func TestSeen(t *testing.T) {
	s := NewSeen()
	s.Connect(gitlab.AgentInfo{AgentID: 1, AgentName: "a"})
	s.Connect(gitlab.AgentInfo{AgentID: 1, AgentName: "a"})
	s.Disconnect(1)
	time.Sleep(10 * time.Millisecond)
	if l := s.List(); len(l) != 1 || time.Since(l[0].LastSeen) > 5*time.Millisecond {
		t.Fatalf("one of two connections left: %+v, want seen now", l)
	}
	s.Disconnect(1)
	time.Sleep(10 * time.Millisecond)
	if l := s.List(); time.Since(l[0].LastSeen) < 10*time.Millisecond {
		t.Fatalf("all connections gone: %+v, want seen when the last left", l)
	}
	s.Disconnect(42) // unknown: nothing happens
	if len(s.List()) != 1 {
		t.Fatal("an unknown agent's disconnection was recorded")
	}
}

// clusterNode is one node's status parts on a shared Redis.
type clusterNode struct {
	reg     *registry.Redis
	rec     *traffic.Recorder
	seen    *Seen
	cluster *Cluster
	page    *Page
}

func newClusterNode(t *testing.T, srv *redistest.Server, url string, probe func(context.Context, string) error) *clusterNode {
	t.Helper()
	client := func() redis.UniversalClient {
		// Fail fast once the test stops Redis.
		c := redis.NewClient(&redis.Options{Addr: srv.Addr(), MaxRetries: -1, DialerRetries: 1, DialTimeout: time.Second})
		t.Cleanup(func() { _ = c.Close() })
		return c
	}
	reg, err := registry.NewRedis(registry.RedisOptions{Client: client(), KeyPrefix: "kas-test", NodeURLs: []string{url}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = reg.Close(ctx)
	})
	n := &clusterNode{reg: reg, rec: &traffic.Recorder{}, seen: NewSeen()}
	n.cluster = NewCluster(ClusterOptions{Client: client(), KeyPrefix: "kas-test", Address: srv.Addr(), Registry: reg, Probe: probe,
		Version: "v-" + url, StartedAt: time.Now().Add(-time.Hour), NodeURLs: []string{url}})
	n.page = New(Options{Version: "v", StartedAt: time.Now().Add(-time.Hour), NodeURLs: []string{url}, Registry: reg, Traffic: n.rec, Seen: n.seen, Cluster: n.cluster})
	return n
}

func TestGatherCluster(t *testing.T) {
	srv := redistest.Start(t)
	var mu sync.Mutex
	probed := map[string]bool{}
	probe := func(_ context.Context, url string) error {
		mu.Lock()
		probed[url] = true
		mu.Unlock()
		if url == "grpc://c:8155" {
			return errors.New("connection refused")
		}
		return nil
	}
	a := newClusterNode(t, srv, "grpc://a:8155", probe)
	b := newClusterNode(t, srv, "grpc://b:8155", nil)
	newClusterNode(t, srv, "grpc://c:8155", nil) // live, holds nothing, never publishes

	register(t, a.reg, registry.TunnelInfo{AgentID: 1, ConnectionID: 1, ConnectedAt: time.Now().UTC()})
	register(t, b.reg, registry.TunnelInfo{AgentID: 1, ConnectionID: 2, ConnectedAt: time.Now().UTC()},
		registry.TunnelInfo{AgentID: 2, ConnectionID: 3, ConnectedAt: time.Now().UTC()})
	b.seen.Connect(gitlab.AgentInfo{AgentID: 2, AgentName: "on-b"})
	b.seen.Connect(gitlab.AgentInfo{AgentID: 4, AgentName: "left-b"})
	b.seen.Disconnect(4)
	// Agent 1's requests arrive at both nodes, agent 2's at b only.
	for range 3 {
		a.rec.Agent(1).Observe(false, 1, 10)
	}
	b.rec.Agent(1).Observe(true, 2, 20)
	b.rec.Agent(1).Fail(traffic.Failure{Time: time.Now().UTC(), Message: "from b"})
	b.rec.Agent(2).Observe(false, 0, 0)
	for _, n := range []*clusterNode{a, b} {
		if err := n.cluster.Publish(context.Background(), n.rec, n.seen); err != nil {
			t.Fatal(err)
		}
	}
	// a's own published summary is not counted again on a's page.

	var st web.Status
	deadline := time.Now().Add(10 * time.Second)
	for {
		st = a.page.Gather(context.Background())
		if st.Summary.Tunnels == 3 && len(st.Nodes) == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a never saw the 3 tunnels on 3 nodes: %+v", st)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if len(st.Problems) != 0 {
		t.Errorf("problems: %v", st.Problems)
	}
	a1 := agentByID(st, 1)
	if a1 == nil || len(a1.Connections) != 2 || a1.Traffic.Last5m.Requests != 4 || a1.Traffic.Last5m.Errors != 1 ||
		a1.Traffic.Last5m.BytesOut != 50 || a1.Traffic.LastFailure == nil || a1.Traffic.LastFailure.Message != "from b" {
		t.Errorf("agent 1 (on a and b, traffic on both): %+v", a1)
	}
	if a2 := agentByID(st, 2); a2 == nil || a2.Name != "on-b" || a2.Traffic.Last5m.Requests != 1 {
		t.Errorf("agent 2 (named and counted by b): %+v", a2)
	}
	if a4 := agentByID(st, 4); a4 == nil || a4.Connected || a4.Name != "left-b" || a4.LastSeen.IsZero() {
		t.Errorf("agent 4 (left b): %+v", a4)
	}
	byURL := map[string]web.Node{}
	for _, n := range st.Nodes {
		byURL[n.URLs[0]] = n
	}
	if n := byURL["grpc://a:8155"]; !n.Self || n.Tunnels != 1 || !n.Reachable || st.Nodes[0].URLs[0] != "grpc://a:8155" {
		t.Errorf("node a (this one, listed first): %+v", n)
	}
	if n := byURL["grpc://b:8155"]; n.Self || n.Tunnels != 2 || !n.Reachable || n.LastHeartbeat.IsZero() || n.Version != "v-grpc://b:8155" {
		t.Errorf("node b: %+v", n)
	}
	if n := byURL["grpc://c:8155"]; n.Reachable || n.ReachError != "connection refused" || !n.LastHeartbeat.IsZero() {
		t.Errorf("node c (unreachable, never published): %+v", n)
	}
	if probed["grpc://a:8155"] {
		t.Error("a probed itself")
	}
	if r := st.Dependencies.Redis; r == nil || r.Error != "" || r.LatencyMS <= 0 || r.Address != srv.Addr() {
		t.Errorf("Redis dependency %+v", r)
	}

	// Redis goes away: the page still shows this node's own agents and says why.
	srv.Stop()
	st = a.page.Gather(context.Background())
	if r := st.Dependencies.Redis; r == nil || r.Error == "" || r.LastFailure == nil {
		t.Errorf("Redis down: dependency %+v", r)
	}
	if len(st.Problems) == 0 {
		t.Error("Redis down: no problem reported")
	}
	if a1 := agentByID(st, 1); a1 == nil || len(a1.Connections) != 1 || a1.Connections[0].NodeURLs[0] != "grpc://a:8155" {
		t.Errorf("Redis down: agent 1 %+v, want its tunnel on this node still shown", a1)
	}
	if err := a.cluster.Publish(context.Background(), a.rec, a.seen); err == nil {
		t.Error("publishing with Redis down succeeded")
	}
}

func TestGatherGitLabMode(t *testing.T) {
	started := time.Now().Add(-time.Hour)
	failure := &traffic.Failure{Time: time.Now().UTC(), Message: "get agent info: call GitLab at https://gitlab.example.com: connection refused; is gitlab.address (https://gitlab.example.com) right and is GitLab running?"}
	last := time.Now().UTC()
	page := New(Options{
		Version: "v9", StartedAt: started, GitLabAddress: "https://gitlab.example.com", Registry: registry.NewMemory(), Seen: NewSeen(),
		GitLab: func(now time.Time) gitlab.Health {
			var s traffic.Series
			s.Observe(false, 0, 0)
			s.Observe(true, 0, 0)
			m := s.Minutes(now)
			m.LastFailure = failure
			return gitlab.Health{LastCall: last, Minutes: m}
		},
	})
	st := page.Gather(context.Background())
	g := st.Dependencies.GitLab
	if st.Mode != "gitlab" || st.GitLabAddress != "https://gitlab.example.com" || g == nil || g.Address != st.GitLabAddress ||
		!g.LastCall.Equal(last) || g.Last5m.Requests != 2 || g.Last5m.ErrorRate != 0.5 || g.LastFailure != failure {
		t.Fatalf("GitLab mode: mode %q, GitLab %+v", st.Mode, g)
	}
	if st.Dependencies.Standalone != nil || len(st.Agents) != 0 || st.Agents == nil {
		t.Errorf("GitLab mode without agents: standalone %+v, agents %#v", st.Dependencies.Standalone, st.Agents)
	}
}
