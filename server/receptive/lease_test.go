package receptive

import (
	"context"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/kasproject/kas/internal/redistest"
)

// simNode is one node's view in a lease simulation: what it holds, and
// which of those it has connected (a node connects an agent the sync after
// it got the lease, as the manager's dial completes between syncs).
type simNode struct {
	l         *Leases
	held      map[int64]bool
	connected map[int64]bool
}

func newSimNode(t *testing.T, client redis.UniversalClient, id string, period time.Duration) *simNode {
	t.Helper()
	l, err := NewLeases(LeaseOptions{Client: client, KeyPrefix: "test", NodeID: id, PerAgent: 2, Period: period})
	if err != nil {
		t.Fatal(err)
	}
	return &simNode{l: l, held: map[int64]bool{}, connected: map[int64]bool{}}
}

func (n *simNode) sync(t *testing.T, agents []int64) {
	t.Helper()
	held, err := n.l.Sync(context.Background(), agents, func(id int64) bool { return n.held[id] }, func(id int64) bool { return n.connected[id] })
	if err != nil {
		t.Fatalf("sync %s: %v", n.l.nodeID, err)
	}
	// What it held before and still holds is connected now.
	next := map[int64]bool{}
	for id := range held {
		next[id] = n.held[id]
	}
	n.held, n.connected = held, next
}

// holders lists, per agent, the nodes holding it.
func holders(nodes []*simNode, agents []int64) map[int64][]string {
	out := map[int64][]string{}
	for _, id := range agents {
		for _, n := range nodes {
			if n.held[id] {
				out[id] = append(out[id], n.l.nodeID)
			}
		}
		slices.Sort(out[id])
	}
	return out
}

// preferred is what rendezvous hashing picks: the first two live nodes.
func preferred(live []string, agents []int64) map[int64][]string {
	out := map[int64][]string{}
	for _, id := range agents {
		for _, n := range live {
			if rank(live, n, id) < 2 {
				out[id] = append(out[id], n)
			}
		}
		slices.Sort(out[id])
	}
	return out
}

func ids(nodes []*simNode) []string {
	var out []string
	for _, n := range nodes {
		out = append(out, n.l.nodeID)
	}
	return out
}

// connectedCount is how many nodes have the agent connected.
func connectedCount(nodes []*simNode, id int64) int {
	c := 0
	for _, n := range nodes {
		if n.connected[id] {
			c++
		}
	}
	return c
}

func TestLeases(t *testing.T) {
	srv := redistest.Start(t)
	client := redis.NewClient(&redis.Options{Addr: srv.Addr(), MaxRetries: -1})
	t.Cleanup(func() { _ = client.Close() })
	// Short enough to wait out, long enough that a round of syncs (a few
	// milliseconds) never lets a lease lapse by accident.
	const period = 400 * time.Millisecond
	agents := make([]int64, 40)
	for i := range agents {
		agents[i] = int64(i + 1)
	}
	nodes := []*simNode{newSimNode(t, client, "node-a", period), newSimNode(t, client, "node-b", period), newSimNode(t, client, "node-c", period)}
	round := func(nodes []*simNode) {
		t.Helper()
		for _, n := range nodes {
			n.sync(t, agents)
		}
	}

	// Alone, the first node takes every agent (capacity: one live node).
	round(nodes[:1])
	if got := len(nodes[0].held); got != len(agents) {
		t.Fatalf("a single node holds %d agents, want all %d", got, len(agents))
	}

	// Two more join: within a few rounds every agent has exactly the two
	// holders rendezvous hashing prefers, and no agent ever has fewer
	// connections than it had.
	for range 6 {
		before := map[int64]int{}
		for _, id := range agents {
			before[id] = connectedCount(nodes, id)
		}
		round(nodes)
		for _, id := range agents {
			if got := connectedCount(nodes, id); got < min(before[id], 2) {
				t.Fatalf("agent %d went from %d connections to %d while nodes joined", id, before[id], got)
			}
		}
	}
	if got, want := holders(nodes, agents), preferred(ids(nodes), agents); !maps.EqualFunc(got, want, slices.Equal) {
		t.Fatalf("holders after the joins:\n%v\nwant rendezvous hashing's\n%v", got, want)
	}
	for _, n := range nodes {
		// Spread: each node holds about two thirds of the agents.
		if got := len(n.held); got < len(agents)/3 || got > len(agents) {
			t.Errorf("%s holds %d of %d agents", n.l.nodeID, got, len(agents))
		}
	}

	// node-c stops syncing (killed or frozen): within one lease period
	// its agents have two holders again, among the others.
	dead, alive := nodes[2], nodes[:2]
	stopped := time.Now()
	for time.Since(stopped) < period {
		time.Sleep(period / 4)
		round(alive)
	}
	round(alive)
	if got, want := holders(alive, agents), preferred(ids(alive), agents); !maps.EqualFunc(got, want, slices.Equal) {
		t.Fatalf("holders a lease period after node-c stopped:\n%v\nwant\n%v", got, want)
	}

	// node-c wakes up: every slot is taken by the two others, so its first
	// sync tells it it lost all its leases, and it drops them instead of
	// fighting for them. It gets its places back through free slots as
	// the others see it again and step aside.
	if len(dead.held) == 0 {
		t.Fatal("node-c held nothing before it stopped")
	}
	dead.sync(t, agents)
	if len(dead.held) != 0 {
		t.Fatalf("node-c still holds %d agents after its first sync, while two other nodes hold every one", len(dead.held))
	}
	for range 6 {
		round(nodes)
	}
	if got, want := holders(nodes, agents), preferred(ids(nodes), agents); !maps.EqualFunc(got, want, slices.Equal) {
		t.Fatalf("holders after node-c came back:\n%v\nwant\n%v", got, want)
	}

	// node-b leaves cleanly: the others take over at their next sync.
	leaving := nodes[1]
	if err := leaving.l.Release(context.Background(), slices.Collect(maps.Keys(leaving.held)), true); err != nil {
		t.Fatal(err)
	}
	rest := []*simNode{nodes[0], nodes[2]}
	round(rest)
	round(rest)
	if got, want := holders(rest, agents), preferred(ids(rest), agents); !maps.EqualFunc(got, want, slices.Equal) {
		t.Fatalf("holders right after node-b left:\n%v\nwant\n%v", got, want)
	}

	// Redis forgets the script (restart, SCRIPT FLUSH): one sync fails,
	// the next loads it again.
	if err := client.ScriptFlush(context.Background()).Err(); err != nil {
		t.Fatal(err)
	}
	_, err := rest[0].l.Sync(context.Background(), agents, func(id int64) bool { return rest[0].held[id] }, func(int64) bool { return true })
	if err == nil || !strings.Contains(err.Error(), "NOSCRIPT") {
		t.Errorf("the first sync after SCRIPT FLUSH: %v, want NOSCRIPT", err)
	}
	round(rest)
	if rest[0].l.Commands() == 0 {
		t.Error("no Redis command counted")
	}

	// Redis is gone: Sync says so, and callers keep what they hold.
	srv.Stop()
	if _, err := rest[0].l.Sync(context.Background(), agents, func(int64) bool { return true }, func(int64) bool { return true }); err == nil {
		t.Error("Sync succeeded without Redis")
	}
}

func TestRendezvousRankSpreadsAndMovesLittle(t *testing.T) {
	live := []string{"kas-a", "kas-b", "kas-c"}
	first := map[string]int{}
	for id := int64(1); id <= 3000; id++ {
		seen := map[int]bool{}
		for _, n := range live {
			r := rank(live, n, id)
			if seen[r] {
				t.Fatalf("agent %d: two nodes share rank %d", id, r)
			}
			seen[r] = true
			if r == 0 {
				first[n]++
			}
		}
	}
	for n, c := range first {
		if c < 800 || c > 1200 {
			t.Errorf("%s ranks first for %d of 3000 agents, want about 1000", n, c)
		}
	}
	// A node joining takes only the places it ranks in: an agent's first
	// two stay the first two unless the new node is among them.
	joined := append(slices.Clone(live), "kas-d")
	for id := int64(1); id <= 3000; id++ {
		for _, n := range live {
			if rank(live, n, id) < 2 && rank(joined, n, id) >= 2 && rank(joined, "kas-d", id) >= 2 {
				t.Fatalf("agent %d: %s lost its place although kas-d did not take it", id, n)
			}
		}
	}
}

func TestNewLeasesChecksOptions(t *testing.T) {
	client := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	defer client.Close()
	for _, tc := range []struct {
		opts LeaseOptions
		want string
	}{
		{LeaseOptions{KeyPrefix: "p", NodeID: "n", PerAgent: 2, Period: time.Second}, "no Redis client"},
		{LeaseOptions{Client: client, NodeID: "n", PerAgent: 2, Period: time.Second}, "key prefix and node ID"},
		{LeaseOptions{Client: client, KeyPrefix: "p", NodeID: "n", PerAgent: 0, Period: time.Second}, "at least 1"},
		{LeaseOptions{Client: client, KeyPrefix: "p", NodeID: "n", PerAgent: 2, Period: time.Millisecond}, "too short"},
	} {
		if _, err := NewLeases(tc.opts); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("NewLeases(%+v) = %v, want an error containing %q", tc.opts, err, tc.want)
		}
	}
}
