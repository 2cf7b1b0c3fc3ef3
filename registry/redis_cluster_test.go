package registry

import (
	"context"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/kasproject/kas/internal/redistest"
	"github.com/kasproject/kas/server/config"
)

// newClusterNode starts a registry on the Redis Cluster rc, with the client
// kas builds (NewRedisClient).
func newClusterNode(t *testing.T, rc *redistest.Cluster, name string) *testNode {
	t.Helper()
	cfg := baseRedisConfig()
	cfg.Cluster = &config.RedisCluster{Addresses: rc.Addrs()}
	client, err := NewRedisClient(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	return newNodeWithClient(t, client, name)
}

// TestRedisClusterWakesWaiters: on a Redis Cluster, a node waiting for an
// agent is woken when another registers it, also after the master of the
// events channel's slot was killed and its replica promoted.
func TestRedisClusterWakesWaiters(t *testing.T) {
	rc := redistest.StartCluster(t, 3, 1)
	a, b := newClusterNode(t, rc, "a"), newClusterNode(t, rc, "b")
	a.subscribed(t)
	b.subscribed(t)
	// wait starts waiting on b for the agent; the returned function
	// registers it on a and checks that b's wait ends at once.
	wait := func(agentID int64) func() {
		woken := make(chan error, 1)
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		go func() { woken <- b.WaitForAgent(ctx, agentID) }()
		return func() {
			t.Helper()
			defer cancel()
			registered := time.Now()
			if err := a.Register(context.Background(), tun(agentID, 1)); err != nil {
				t.Fatal(err)
			}
			if err := <-woken; err != nil {
				t.Fatalf("waiting for agent %d: %v", agentID, err)
			}
			if took := time.Since(registered); took > 5*time.Second {
				t.Errorf("agent %d: woken %s after it registered, want at once", agentID, took)
			}
		}
	}
	register := wait(1)
	time.Sleep(100 * time.Millisecond)
	register()

	// A request waiting across the failover is woken too.
	register = wait(2)
	master, err := a.client.(*redis.ClusterClient).MasterForKey(context.Background(), a.keys.events)
	if err != nil {
		t.Fatal(err)
	}
	rc.Kill(master.Options().Addr)
	rc.WaitFailover(master.Options().Addr)
	b.subscribed(t)
	register()
}
