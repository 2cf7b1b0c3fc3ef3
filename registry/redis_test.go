package registry

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/redis/go-redis/v9"

	"github.com/kasproject/kas/internal/redistest"
)

const testPrefix = "kas-test"

// quiet are timings under which a node does nothing in the background within
// a test: records neither expire nor get refreshed, and cached answers stay
// until an announcement invalidates them.
func quiet(o *RedisOptions) {
	o.TTL, o.RefreshPeriod, o.GCPeriod, o.LookupCacheTTL = time.Hour, 30*time.Minute, time.Hour, time.Hour
}

// newClient connects to srv, failing fast while it is down.
func newClient(t *testing.T, srv *redistest.Server) *redis.Client {
	t.Helper()
	c := redis.NewClient(&redis.Options{
		Addr:         srv.Addr(),
		DialTimeout:  200 * time.Millisecond,
		ReadTimeout:  time.Second,
		WriteTimeout: time.Second,
	})
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// testNode is one kas node's registry, with its own client and metrics.
type testNode struct {
	*Redis
	client redis.UniversalClient
	prom   *prometheus.Registry
	url    string
}

// newNode starts a registry named name (its URL is grpc://name:8155) on srv.
func newNode(t *testing.T, srv *redistest.Server, name string, configure ...func(*RedisOptions)) *testNode {
	t.Helper()
	return newNodeWithClient(t, newClient(t, srv), name, configure...)
}

// newNodeWithClient starts a registry named name with its own client.
func newNodeWithClient(t *testing.T, client redis.UniversalClient, name string, configure ...func(*RedisOptions)) *testNode {
	t.Helper()
	n := &testNode{client: client, prom: prometheus.NewRegistry(), url: "grpc://" + name + ":8155"}
	opts := RedisOptions{
		Client:     n.client,
		KeyPrefix:  testPrefix,
		NodeURLs:   []string{n.url},
		Registerer: n.prom,
		Logger:     slog.New(slog.NewTextHandler(testWriter{t, name}, nil)),
	}
	quiet(&opts)
	for _, c := range configure {
		c(&opts)
	}
	r, err := NewRedis(opts)
	if err != nil {
		t.Fatal(err)
	}
	n.Redis = r
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = r.Close(ctx)
	})
	return n
}

// testWriter sends a node's logs to the test log.
type testWriter struct {
	t    *testing.T
	name string
}

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Logf("%s: %s", w.name, strings.TrimSpace(string(p)))
	return len(p), nil
}

// eventually polls cond until it holds, failing t after within.
func eventually(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, within)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// subscribed waits until the node's subscription is up, so its answers are cached.
func (n *testNode) subscribed(t *testing.T) {
	t.Helper()
	eventually(t, 5*time.Second, "subscription up", func() bool {
		n.cache.mu.Lock()
		defer n.cache.mu.Unlock()
		return n.cache.active
	})
}

// remote is FindRemote that fails the test on error.
func (n *testNode) remote(t *testing.T, agentID int64) [][]string {
	t.Helper()
	nodes, err := n.FindRemote(context.Background(), agentID)
	if err != nil {
		t.Fatalf("FindRemote(%d): %v", agentID, err)
	}
	slices.SortFunc(nodes, slices.Compare)
	return nodes
}

func (n *testNode) register(t *testing.T, tunnels ...*fakeTunnel) {
	t.Helper()
	for _, x := range tunnels {
		if err := n.Register(context.Background(), x); err != nil {
			t.Fatal(err)
		}
	}
}

// field reads a node's field of a hash straight from Redis ("" when absent).
func field(t *testing.T, c redis.UniversalClient, key, node string) string {
	t.Helper()
	v, err := c.HGet(context.Background(), key, node).Result()
	if err == redis.Nil {
		return ""
	}
	if err != nil {
		t.Fatalf("HGET %s %s: %v", key, node, err)
	}
	return v
}

func sameNodes(got [][]string, want ...[]string) bool {
	slices.SortFunc(want, slices.Compare)
	return slices.EqualFunc(got, want, slices.Equal)
}

func TestRedisRegistrationVisibleToOtherNodes(t *testing.T) {
	srv := redistest.Start(t)
	a, b := newNode(t, srv, "a"), newNode(t, srv, "b")
	a.register(t, tun(1, 1), tun(1, 2), tun(2, 3))
	b.register(t, tun(1, 1))

	eventually(t, 5*time.Second, "b sees a's tunnels for agent 1", func() bool { return sameNodes(b.remote(t, 1), []string{a.url}) })
	eventually(t, 5*time.Second, "a sees b's tunnel for agent 1", func() bool { return sameNodes(a.remote(t, 1), []string{b.url}) })
	eventually(t, 5*time.Second, "b sees a's tunnel for agent 2", func() bool { return sameNodes(b.remote(t, 2), []string{a.url}) })
	if got := a.remote(t, 2); len(got) != 0 {
		t.Errorf("a.FindRemote(2) = %v, want nothing: only a holds agent 2, and a node never names itself", got)
	}
	if got := b.remote(t, 3); len(got) != 0 {
		t.Errorf("b.FindRemote(3) = %v, want nothing for an agent no node holds", got)
	}

	type conn struct {
		agent, id int64
		url       string
	}
	tests := []struct {
		name string
		ids  []int64
		want []conn
	}{
		{"all agents", nil, []conn{{1, 1, a.url}, {1, 2, a.url}, {1, 1, b.url}, {2, 3, a.url}}},
		{"one agent on two nodes", []int64{1}, []conn{{1, 1, a.url}, {1, 2, a.url}, {1, 1, b.url}}},
		{"an agent on the other node and an unknown one", []int64{9, 2}, []conn{{2, 3, a.url}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			for _, n := range []*testNode{a, b} {
				infos, err := n.Tunnels(context.Background(), tc.ids...)
				if err != nil {
					t.Fatal(err)
				}
				var got []conn
				for _, info := range infos {
					if len(info.NodeURLs) != 1 {
						t.Fatalf("tunnel %+v: want exactly its node's URL", info)
					}
					got = append(got, conn{info.AgentID, info.ConnectionID, info.NodeURLs[0]})
				}
				if !slices.Equal(got, tc.want) {
					t.Errorf("%s.Tunnels(%v) = %v, want %v", n.url, tc.ids, got, tc.want)
				}
			}
		})
	}

	nodes, err := a.Nodes(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var urls []string
	for _, n := range nodes {
		urls = append(urls, n.URLs...)
	}
	slices.Sort(urls)
	if !slices.Equal(urls, []string{a.url, b.url}) {
		t.Errorf("Nodes() = %+v, want a and b", nodes)
	}
	if got := value(a.metrics.publishedAgents); got != 2 {
		t.Errorf("a's published agents gauge = %v, want 2", got)
	}
}

func TestRedisUnregisterAndCloseRemoveRecords(t *testing.T) {
	srv := redistest.Start(t)
	a, b := newNode(t, srv, "a"), newNode(t, srv, "b")
	b.subscribed(t)
	gone, stays := tun(2, 3), tun(2, 4)
	a.register(t, tun(1, 1), gone, stays)
	eventually(t, 5*time.Second, "b sees agent 2 on a", func() bool { return sameNodes(b.remote(t, 2), []string{a.url}) })

	// b's answers are cached for an hour: only a's announcements update them.
	if err := a.Unregister(context.Background(), gone); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "a's record for agent 2 lists only the remaining tunnel", func() bool {
		infos, err := b.Tunnels(context.Background(), 2)
		return err == nil && len(infos) == 1 && infos[0].ConnectionID == 4
	})
	if !sameNodes(b.remote(t, 2), []string{a.url}) {
		t.Fatal("agent 2 vanished from b although a still holds one tunnel")
	}
	if err := a.Unregister(context.Background(), stays); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "b forgets agent 2 once a has no tunnel for it", func() bool { return len(b.remote(t, 2)) == 0 })
	if v := field(t, b.client, a.keys.tunnels(2), a.NodeID()); v != "" {
		t.Errorf("a's field for agent 2 is still in Redis: %s", v)
	}

	// Graceful shutdown: a removes everything it wrote, at once.
	if err := a.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if v := field(t, b.client, a.keys.tunnels(1), a.NodeID()); v != "" {
		t.Errorf("a's field for agent 1 is still in Redis after Close: %s", v)
	}
	if v := field(t, b.client, a.keys.nodes, a.NodeID()); v != "" {
		t.Errorf("a's node record is still in Redis after Close: %s", v)
	}
	eventually(t, 5*time.Second, "b forgets agent 1 after a closed", func() bool { return len(b.remote(t, 1)) == 0 })
	if err := a.Register(context.Background(), tun(5, 5)); err == nil {
		t.Error("Register after Close succeeded")
	}
	if err := a.Close(context.Background()); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestRedisRefreshKeepsRecordsAlive(t *testing.T) {
	srv := redistest.Start(t)
	const ttl = 600 * time.Millisecond
	a := newNode(t, srv, "a", func(o *RedisOptions) { o.TTL, o.RefreshPeriod = ttl, 150*time.Millisecond })
	b := newNode(t, srv, "b", func(o *RedisOptions) { o.LookupCacheTTL = time.Millisecond })
	a.register(t, tun(1, 1))
	eventually(t, 5*time.Second, "b sees a's tunnel", func() bool { return sameNodes(b.remote(t, 1), []string{a.url}) })

	for end := time.Now().Add(4 * ttl); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if !sameNodes(b.remote(t, 1), []string{a.url}) {
			t.Fatal("a's record expired although a refreshes it")
		}
	}
	eventually(t, 5*time.Second, "a's nodes gauge counts both nodes", func() bool { return value(a.metrics.nodes) == 2 })
	pttl, err := b.client.PTTL(context.Background(), a.keys.tunnels(1)).Result()
	if err != nil {
		t.Fatal(err)
	}
	if pttl <= 0 || pttl > ttl {
		t.Errorf("agent key expires in %s, want within the TTL %s", pttl, ttl)
	}
}

func TestRedisRefreshRewritesLostRecords(t *testing.T) {
	// Redis can lose data without the node's connections dropping (a
	// FLUSHALL, a failover to a replica that lagged): the refresh writes
	// the whole local state, not just new expiry times.
	srv := redistest.Start(t)
	const refresh = 300 * time.Millisecond
	a := newNode(t, srv, "a", func(o *RedisOptions) { o.TTL, o.RefreshPeriod = 10*refresh, refresh })
	a.register(t, tun(1, 1), tun(2, 2))
	raw := newClient(t, srv)
	written := func() bool {
		return field(t, raw, a.keys.tunnels(1), a.NodeID()) != "" && field(t, raw, a.keys.tunnels(2), a.NodeID()) != "" &&
			field(t, raw, a.keys.nodes, a.NodeID()) != ""
	}
	eventually(t, 5*time.Second, "a's records are written", written)
	if err := raw.FlushAll(context.Background()).Err(); err != nil {
		t.Fatal(err)
	}
	flushed := time.Now()
	eventually(t, 5*time.Second, "a writes its records again", written)
	if took := time.Since(flushed); took > refresh+200*time.Millisecond {
		t.Errorf("records back %s after the flush, want within one refresh period (%s)", took, refresh)
	}
}

func TestRedisCrashedNodeExpiresAndIsCollected(t *testing.T) {
	srv := redistest.Start(t)
	const ttl = 500 * time.Millisecond
	timings := func(o *RedisOptions) {
		o.TTL, o.RefreshPeriod, o.GCPeriod, o.LookupCacheTTL = ttl, 100*time.Millisecond, 100*time.Millisecond, 10*time.Millisecond
	}
	a, b := newNode(t, srv, "a", timings), newNode(t, srv, "b", timings)
	// b holds agent 1 too, so b keeps its key alive: only garbage
	// collection can delete a's field there.
	a.register(t, tun(1, 1), tun(2, 2))
	b.register(t, tun(1, 3))
	eventually(t, 5*time.Second, "b sees a's tunnels", func() bool {
		return sameNodes(b.remote(t, 1), []string{a.url}) && sameNodes(b.remote(t, 2), []string{a.url})
	})

	// a crashes: it can no longer reach Redis, to refresh or to clean up.
	_ = a.client.Close()
	crashed := time.Now()
	eventually(t, ttl+5*time.Second, "a's tunnels stop being returned", func() bool {
		return len(b.remote(t, 1)) == 0 && len(b.remote(t, 2)) == 0
	})
	if since := time.Since(crashed); since < ttl/2 {
		t.Errorf("a's tunnels vanished %s after the crash, before their TTL %s could pass", since, ttl)
	}
	eventually(t, 10*time.Second, "a's field and node record are garbage-collected", func() bool {
		return field(t, b.client, a.keys.tunnels(1), a.NodeID()) == "" && field(t, b.client, a.keys.nodes, a.NodeID()) == ""
	})
	if field(t, b.client, a.keys.tunnels(1), b.NodeID()) == "" {
		t.Error("garbage collection deleted b's live field")
	}
	infos, err := b.Tunnels(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(infos) != 1 || infos[0].ConnectionID != 3 {
		t.Errorf("b.Tunnels() = %+v, want only b's own tunnel", infos)
	}
	if err := a.Close(context.Background()); err == nil {
		t.Error("Close of a node cut off from Redis reported no error")
	}
}

func TestRedisWaitForAgent(t *testing.T) {
	srv := redistest.Start(t)
	a, b := newNode(t, srv, "a"), newNode(t, srv, "b")
	b.subscribed(t)

	tests := []struct {
		name    string
		agent   int64
		connect *testNode // where the agent connects while b waits
	}{
		{"agent connects to another node", 7, a},
		{"agent connects to the waiting node", 8, b},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			done := make(chan error, 1)
			go func() { done <- b.WaitForAgent(ctx, tc.agent) }()
			eventually(t, 5*time.Second, "b waits for the agent", func() bool {
				b.mu.Lock()
				defer b.mu.Unlock()
				return b.waiters[tc.agent] != nil
			})
			// b's answers are cached for an hour, so only the
			// announcement can wake it this soon.
			start := time.Now()
			tc.connect.register(t, tun(tc.agent, 1))
			select {
			case err := <-done:
				if err != nil {
					t.Fatal(err)
				}
				t.Logf("woke %s after the registration", time.Since(start))
			case <-time.After(3 * time.Second):
				t.Fatal("WaitForAgent did not return within 3s of the agent connecting")
			}
			if err := b.WaitForAgent(ctx, tc.agent); err != nil {
				t.Fatalf("WaitForAgent for a connected agent: %v", err)
			}
		})
	}

	short, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := b.WaitForAgent(short, 99); err != context.DeadlineExceeded {
		t.Fatalf("WaitForAgent for an absent agent = %v, want the context's deadline", err)
	}
	b.mu.Lock()
	left := len(b.waiters)
	b.mu.Unlock()
	if left != 0 {
		t.Fatalf("%d wait lists left after the waiter gave up", left)
	}
}

func TestRedisLookupCache(t *testing.T) {
	srv := redistest.Start(t)
	a, b := newNode(t, srv, "a"), newNode(t, srv, "b")
	a.subscribed(t)
	b.subscribed(t)
	ctx := context.Background()

	// b's start-up writes add commands of their own; they never remove
	// any, so a broken cache always fails, and a working one passes once b
	// is idle. Each attempt asks about an agent not asked about before.
	agent := int64(99)
	var first, second uint64
	measure := func() bool {
		agent++
		c0 := b.RedisCommands()
		if _, err := b.FindRemote(ctx, agent); err != nil {
			t.Fatal(err)
		}
		c1 := b.RedisCommands()
		if _, err := b.FindRemote(ctx, agent); err != nil {
			t.Fatal(err)
		}
		first, second = c1-c0, b.RedisCommands()-c1
		return first == 1 && second == 0
	}
	deadline := time.Now().Add(5 * time.Second)
	for !measure() {
		if time.Now().After(deadline) {
			t.Fatalf("two FindRemote calls sent %d then %d Redis commands, want 1 then 0", first, second)
		}
	}

	// b has cached "nowhere" for the agent; a's registration announces it.
	a.register(t, tun(agent, 1))
	eventually(t, 5*time.Second, "b's cached answer is invalidated", func() bool { return sameNodes(b.remote(t, agent), []string{a.url}) })
	c0 := b.RedisCommands()
	if !sameNodes(b.remote(t, agent), []string{a.url}) {
		t.Fatal("cached answer lost a's tunnel")
	}
	if n := b.RedisCommands() - c0; n != 0 {
		t.Errorf("FindRemote after the refetch sent %d Redis commands, want 0", n)
	}

	exported := gathered(t, b.prom, "kas_registry_redis_commands_total")
	if exported == 0 || exported > float64(b.RedisCommands()) {
		t.Errorf("kas_registry_redis_commands_total = %v, want RedisCommands() = %d", exported, b.RedisCommands())
	}
}

// value reads a counter or gauge.
func value(m prometheus.Metric) float64 {
	var d dto.Metric
	if err := m.Write(&d); err != nil {
		panic(err)
	}
	return d.GetCounter().GetValue() + d.GetGauge().GetValue()
}

// gathered returns the value of an unlabelled counter or gauge in reg.
func gathered(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() == name {
			m := f.GetMetric()[0]
			return m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	t.Fatalf("metric %s not exported", name)
	return 0
}

func TestRedisRestart(t *testing.T) {
	srv := redistest.Start(t)
	const refresh = time.Second
	logs := &countingHandler{}
	a := newNode(t, srv, "a", func(o *RedisOptions) {
		o.TTL, o.RefreshPeriod = 5*refresh, refresh
		o.Logger = slog.New(logs)
	})
	b := newNode(t, srv, "b", func(o *RedisOptions) { o.LookupCacheTTL = 10 * time.Millisecond })
	before := tun(1, 1)
	a.register(t, before)
	raw := newClient(t, srv)
	eventually(t, 5*time.Second, "a's record is written", func() bool { return field(t, raw, a.keys.tunnels(1), a.NodeID()) != "" })

	srv.Stop()
	// While Redis is down a keeps registering and serving its own tunnels.
	during := tun(2, 2)
	a.register(t, during)
	for _, want := range []*fakeTunnel{before, during} {
		if got, ok := a.FindLocal(want.info.AgentID); !ok || got != want {
			t.Fatalf("FindLocal(%d) = %v, %t while Redis is down", want.info.AgentID, got, ok)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := a.WaitForAgent(ctx, 2); err != nil {
		t.Fatalf("WaitForAgent for a local agent while Redis is down: %v", err)
	}
	if _, err := a.FindRemote(ctx, 3); err == nil {
		t.Error("FindRemote while Redis is down reported no error")
	}
	eventually(t, 10*time.Second, "a notices Redis is down", func() bool {
		return value(a.metrics.errors.WithLabelValues("write")) > 0
	})

	srv.Restart() // empty: Redis lost every key
	restarted := time.Now()
	eventually(t, 10*time.Second, "a writes its records again", func() bool {
		return field(t, raw, a.keys.tunnels(1), a.NodeID()) != "" && field(t, raw, a.keys.tunnels(2), a.NodeID()) != "" &&
			field(t, raw, a.keys.nodes, a.NodeID()) != ""
	})
	took := time.Since(restarted)
	t.Logf("records back %s after the restart", took)
	if took > refresh+500*time.Millisecond {
		t.Errorf("a wrote its records again %s after Redis came back, want within one refresh period (%s)", took, refresh)
	}
	eventually(t, 5*time.Second, "b sees a's tunnels again", func() bool {
		return sameNodes(b.remote(t, 1), []string{a.url}) && sameNodes(b.remote(t, 2), []string{a.url})
	})

	errs := 0.0
	for _, op := range []string{"write", "lookup", "subscribe"} {
		errs += value(a.metrics.errors.WithLabelValues(op))
	}
	if logged := logs.errors(); logged == 0 || float64(logged) > 2 || float64(logged) >= errs {
		t.Errorf("logged %d of %v Redis errors over a short outage, want at most one every %s", logged, errs, errorLogInterval)
	}
}

// countingHandler counts error records.
type countingHandler struct {
	mu sync.Mutex
	n  int
}

func (h *countingHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *countingHandler) Handle(_ context.Context, r slog.Record) error {
	if r.Level >= slog.LevelError {
		h.mu.Lock()
		h.n++
		h.mu.Unlock()
	}
	return nil
}
func (h *countingHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *countingHandler) WithGroup(string) slog.Handler      { return h }
func (h *countingHandler) errors() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.n
}

func TestRedisGarbageCollection(t *testing.T) {
	srv := redistest.Start(t)
	a := newNode(t, srv, "a")
	c := a.client
	ctx := context.Background()
	now := time.Now()
	rec := func(expires time.Time) string {
		return fmt.Sprintf(`{"expires_at_ms":%d,"node_urls":["grpc://x:8155"]}`, expires.UnixMilli())
	}
	key := a.keys.tunnels(1)
	fields := []struct {
		name, value string
		kept        bool
	}{
		{"live", rec(now.Add(time.Hour)), true},
		{"expired", rec(now.Add(-time.Second)), false},
		{"not json", "garbage", false},
		{"no expiry", `{"node_urls":[]}`, false},
	}
	for _, f := range fields {
		if err := c.HSet(ctx, key, f.name, f.value).Err(); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.HSet(ctx, a.keys.nodes, "dead", rec(now.Add(-time.Second))).Err(); err != nil {
		t.Fatal(err)
	}
	if err := a.collectGarbage(ctx); err != nil {
		t.Fatal(err)
	}
	for _, f := range fields {
		if kept := field(t, c, key, f.name) != ""; kept != f.kept {
			t.Errorf("field %q kept = %t, want %t", f.name, kept, f.kept)
		}
	}
	if field(t, c, a.keys.nodes, "dead") != "" {
		t.Error("expired node record kept")
	}

	// Within the period another node (or this one) finds the lock taken.
	if err := c.HSet(ctx, key, "expired later", rec(now.Add(-time.Second))).Err(); err != nil {
		t.Fatal(err)
	}
	other := newNode(t, srv, "other")
	if err := other.collectGarbage(ctx); err != nil {
		t.Fatal(err)
	}
	if field(t, c, key, "expired later") == "" {
		t.Error("a second collection ran within the same GC period")
	}
}

func TestNewRedisOptions(t *testing.T) {
	client := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	defer client.Close()
	valid := func() RedisOptions {
		return RedisOptions{Client: client, KeyPrefix: "p", NodeURLs: []string{"grpc://10.0.0.1:8155"}}
	}
	tests := []struct {
		name   string
		modify func(*RedisOptions)
		want   string
	}{
		{"no client", func(o *RedisOptions) { o.Client = nil }, "no Redis client"},
		{"no prefix", func(o *RedisOptions) { o.KeyPrefix = "" }, "empty key prefix"},
		{"no URL", func(o *RedisOptions) { o.NodeURLs = nil }, "no private API URL"},
		{"refresh not shorter than TTL", func(o *RedisOptions) { o.TTL, o.RefreshPeriod = time.Minute, time.Minute }, "must be shorter than the TTL"},
		{"default refresh above a short TTL", func(o *RedisOptions) { o.TTL = time.Minute }, "must be shorter than the TTL"},
		{"negative GC period", func(o *RedisOptions) { o.GCPeriod = -time.Second }, "negative duration"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o := valid()
			tc.modify(&o)
			_, err := NewRedis(o)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("NewRedis: %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

func TestRedisKeys(t *testing.T) {
	tests := []struct {
		prefix, tunnels, pattern string
	}{
		{"gitlab-kas", "gitlab-kas:tunnels:42", "gitlab-kas:tunnels:*"},
		{"a*b?[c]\\", "a*b?[c]\\:tunnels:42", `a\*b\?\[c\]\\:tunnels:*`},
	}
	for _, tc := range tests {
		k := newRedisKeys(tc.prefix)
		if got := k.tunnels(42); got != tc.tunnels {
			t.Errorf("tunnels(42) with prefix %q = %q, want %q", tc.prefix, got, tc.tunnels)
		}
		if got := k.tunnelsPattern(); got != tc.pattern {
			t.Errorf("tunnelsPattern() with prefix %q = %q, want %q", tc.prefix, got, tc.pattern)
		}
	}
}

func TestRedisScanMatchesOnlyItsPrefix(t *testing.T) {
	srv := redistest.Start(t)
	c := newClient(t, srv)
	ctx := context.Background()
	for _, key := range []string{"p*:tunnels:1", "p*:tunnels:2", "pX:tunnels:3", "p*:nodes"} {
		if err := c.Set(ctx, key, "v", 0).Err(); err != nil {
			t.Fatal(err)
		}
	}
	r := &Redis{client: c, keys: newRedisKeys("p*")}
	var got []string
	err := r.scan(ctx, r.keys.tunnelsPattern(), func(_ context.Context, keys []string) error {
		got = append(got, keys...)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(got)
	if want := []string{"p*:tunnels:1", "p*:tunnels:2"}; !slices.Equal(got, want) {
		t.Fatalf("scan found %v, want %v", got, want)
	}
}

func TestErrorLogRateLimits(t *testing.T) {
	h := &countingHandler{}
	e := &errorLog{log: slog.New(h), msg: "failed", every: time.Hour}
	if e.hadErrors() {
		t.Fatal("hadErrors before any error")
	}
	for i := range 100 {
		e.report("lookup", fmt.Errorf("failure %d", i))
	}
	if h.errors() != 1 {
		t.Fatalf("logged %d of 100 errors within one interval, want 1", h.errors())
	}
	if !e.hadErrors() {
		t.Fatal("hadErrors after an error")
	}
}

func TestRedisClientLoggerRateLimits(t *testing.T) {
	h := &countingHandler{}
	var l interface {
		Printf(context.Context, string, ...any)
	} = NewRedisClientLogger(slog.New(h))
	for i := range 10 {
		l.Printf(context.Background(), "redis: connection pool: failed to dial after %d attempts", i)
	}
	if h.errors() != 1 {
		t.Fatalf("logged %d of 10 go-redis lines within one interval, want 1", h.errors())
	}
}

// TestRedisClientLoggerLevels: go-redis's reports of normal events are
// information, not errors; its failures are errors.
func TestRedisClientLoggerLevels(t *testing.T) {
	tests := []struct {
		format string
		args   []any
		want   slog.Level
	}{
		{"sentinel: selected addr=%s masterAddr=%s", []any{"127.0.0.1:26379", "127.0.0.1:6379"}, slog.LevelInfo},
		{"sentinel: new master=%q addr=%q", []any{"kas", "127.0.0.1:6380"}, slog.LevelInfo},
		{"sentinel: discovered new sentinel=%q for master=%q", []any{"abc", "kas"}, slog.LevelInfo},
		{"sentinel: ignore addr for master=%q", []any{"kas"}, slog.LevelDebug},
		{"cluster: slots %v migrated to %s, reloading cluster state", []any{[]string{"0-100"}, "127.0.0.1:7001"}, slog.LevelInfo},
		{"sentinel: GetMasterAddrByName name=%q failed: %s", []any{"kas", "dial tcp: connection refused"}, slog.LevelError},
		{"redis: connection pool: failed to dial after %d attempts: %v", []any{1, "connection refused"}, slog.LevelError},
	}
	for _, tc := range tests {
		t.Run(tc.format, func(t *testing.T) {
			var buf bytes.Buffer
			l := NewRedisClientLogger(slog.New(slog.NewJSONHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug})))
			l.Printf(context.Background(), tc.format, tc.args...)
			var line struct{ Level string }
			if err := json.Unmarshal(buf.Bytes(), &line); err != nil {
				t.Fatalf("log %q: %v", buf.String(), err)
			}
			if line.Level != tc.want.String() {
				t.Fatalf("logged at %s, want %s: %s", line.Level, tc.want, buf.String())
			}
			if want := fmt.Sprintf(tc.format, tc.args...); !strings.Contains(buf.String(), strings.ReplaceAll(want, `"`, `\"`)) {
				t.Fatalf("log %s does not carry the message %q", buf.String(), want)
			}
		})
	}
}

func TestBackoff(t *testing.T) {
	b := backoff{max: time.Second}
	var got []time.Duration
	for range 6 {
		got = append(got, b.next())
	}
	want := []time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond, 800 * time.Millisecond, time.Second, time.Second}
	if !slices.Equal(got, want) {
		t.Fatalf("backoff %v, want %v", got, want)
	}
	b.reset()
	if d := b.next(); d != minRetry {
		t.Fatalf("after reset: %s, want %s", d, minRetry)
	}
}

func TestRedisRecordRoundTrip(t *testing.T) {
	// A record written by one node decodes on another, expiry included.
	srv := redistest.Start(t)
	a := newNode(t, srv, "a")
	at := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	x := &fakeTunnel{info: TunnelInfo{AgentID: 4, ProjectID: 40, ConnectionID: 9, AgentVersion: "v1", PodName: "p", PodNamespace: "ns", ConnectedAt: at}}
	a.register(t, x)
	raw := newClient(t, srv)
	eventually(t, 5*time.Second, "record written", func() bool { return field(t, raw, a.keys.tunnels(4), a.NodeID()) != "" })
	b := newNode(t, srv, "b")
	infos, err := b.Tunnels(context.Background(), 4)
	if err != nil {
		t.Fatal(err)
	}
	want := x.info
	want.NodeURLs = []string{a.url}
	if len(infos) != 1 || !reflect.DeepEqual(infos[0], want) {
		t.Fatalf("b.Tunnels(4) = %+v, want [%+v]", infos, want)
	}
}

func TestMain(m *testing.M) {
	// go-redis logs each failed dial of the restart test; keep one line per interval.
	redis.SetLogger(NewRedisClientLogger(slog.Default()))
	os.Exit(m.Run())
}
