package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/kasproject/kas/internal/redistest"
)

// recoveryLimit is how soon after a Redis master is killed forwarding must
// work again: the failover itself takes two to four seconds.
const recoveryLimit = 10 * time.Second

// TestRedisFailover kills the Redis master that matters under two running
// kas nodes, in a Redis Cluster (3 masters, 3 replicas) and with Sentinel,
// and checks that the nodes follow the promotion within seconds: lookups,
// writes and the pub/sub subscription that wakes waiting requests.
func TestRedisFailover(t *testing.T) {
	t.Parallel()
	bin := buildKAS(t)
	t.Run("cluster, master of the agent's key killed", func(t *testing.T) {
		rc := redistest.StartCluster(t, 3, 1)
		testMasterKilled(t, bin, clusterOptions{redisCluster: rc}, func(t *testing.T, c *cluster) func() bool {
			master := clusterMasterFor(t, c, fmt.Sprintf("%s%d", redisTunnelsKeyPrefix, asAgent.id))
			rc.Kill(master)
			return func() bool { return rc.FailedOver(master) }
		})
	})
	t.Run("cluster, master of the events channel killed", func(t *testing.T) {
		testEventsMasterKilled(t, bin, redistest.StartCluster(t, 3, 1))
	})
	t.Run("sentinel, primary killed", func(t *testing.T) {
		s := redistest.StartSentinel(t, "kas-e2e")
		nodes := testMasterKilled(t, bin, clusterOptions{sentinel: s}, func(t *testing.T, _ *cluster) func() bool {
			primary := s.Primary()
			old := primary.Addr()
			primary.Kill()
			return func() bool { addr := s.PrimaryAddr(); return addr != "" && addr != old }
		})
		// go-redis's reports of normal Sentinel events are information,
		// not errors (they would show on the status page and hide real
		// errors behind the error log's rate limit).
		for _, n := range nodes {
			if line := n.proc.findLog("Redis client", "event", "sentinel: selected addr="); line == nil || line["level"] != "INFO" {
				t.Errorf("%s logged the Sentinel's choice of primary as %v, want at INFO", n.name, line)
			}
			eventually(t, func() bool { return n.proc.findLog("Redis client", "event", "sentinel: new master=") != nil },
				func() string { return n.name + " did not log the new primary" })
			if line := n.proc.findLog("Redis client", "event", "sentinel: new master="); line["level"] != "INFO" {
				t.Errorf("%s logged the new primary at %v, want INFO", n.name, line["level"])
			}
			if line := n.proc.findLog("Redis client error", "error", "sentinel: "); line != nil && !strings.Contains(fmt.Sprint(line["error"]), "failed") {
				t.Errorf("%s logged a normal Sentinel event as an error: %v", n.name, line)
			}
		}
	})
}

// clusterMasterFor is the address of the Redis Cluster master holding key.
func clusterMasterFor(t *testing.T, c *cluster, key string) string {
	t.Helper()
	master, err := c.inspect.(*redis.ClusterClient).MasterForKey(context.Background(), key)
	if err != nil {
		t.Fatalf("find the master of %s: %v", key, err)
	}
	return master.Options().Addr
}

// testMasterKilled runs two nodes, connects an agent to the first, kills
// the Redis master that holds the agent's record (kill returns a check of
// the promotion), returns the nodes, and in between sends a request every 200 ms into the second
// node, which has never looked the agent up (so it has no last known
// location to fall back on): forwarding must work again within
// recoveryLimit, and the holder must refresh its record on the new master.
func testMasterKilled(t *testing.T, bin string, opts clusterOptions, kill func(*testing.T, *cluster) func() bool) []*node {
	const refresh = 2 * time.Second
	e := newWorld(t)
	opts.standaloneFile = e.scenarioFile
	opts.redisTTL, opts.redisRefresh, opts.redisGC = 3*refresh, refresh, refresh
	opts.agentWaitTimeout = time.Second
	c := newCluster(t, bin, opts)
	holder, entry := c.startNode(t, "kas-1", nodeOptions{}), c.startNode(t, "kas-2", nodeOptions{})
	nodes := []*node{holder, entry}
	f := newFleet(t, e)
	f.connect(t, asAgent, holder, e.kubeServer.URL, nodes)
	holderID := c.nodeID(t, holder)
	cred := pat(asAgent.id, alicePAT)

	promoted := kill(t, c)
	killed := time.Now()
	var promotedAfter, servedAfter time.Duration
	var last string
	for servedAfter == 0 && time.Since(killed) < waitFor {
		if promotedAfter == 0 && promoted() {
			promotedAfter = time.Since(killed)
		}
		code, body := tryGet(e, entry, "/version", cred)
		if code == http.StatusOK {
			servedAfter = time.Since(killed)
			break
		}
		last = fmt.Sprintf("%d %s", code, body)
		time.Sleep(200 * time.Millisecond)
	}
	if servedAfter == 0 {
		t.Fatalf("forwarding did not work again within %s of the kill; last answer: %s", waitFor, last)
	}
	for promotedAfter == 0 && time.Since(killed) < waitFor {
		if promoted() {
			promotedAfter = time.Since(killed)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("master killed: promoted after %s (as the test saw it), forwarding through %s worked again %s after the kill (meanwhile: %s)",
		promotedAfter.Round(time.Millisecond), entry.name, servedAfter.Round(time.Millisecond), last)
	if servedAfter > recoveryLimit {
		t.Errorf("forwarding worked again %s after the kill, want within %s", servedAfter, recoveryLimit)
	}
	for range 5 {
		if code, body := tryGet(e, entry, "/version", cred); code != http.StatusOK {
			t.Fatalf("after recovering, a request got %d %s", code, body)
		}
	}
	// The holder writes its record to the promoted master.
	key := fmt.Sprintf("%s%d", redisTunnelsKeyPrefix, asAgent.id)
	var written time.Time
	eventually(t, func() bool {
		if cc, ok := c.inspect.(*redis.ClusterClient); ok {
			cc.ReloadState(context.Background())
		}
		value, err := c.inspect.HGet(context.Background(), key, holderID).Result()
		var rec struct {
			ExpiresAtMS int64 `json:"expires_at_ms"`
		}
		if err != nil || json.Unmarshal([]byte(value), &rec) != nil {
			return false
		}
		written = time.UnixMilli(rec.ExpiresAtMS).Add(-opts.redisTTL)
		return written.After(killed)
	}, func() string { return fmt.Sprintf("the holder did not refresh %s after the kill", key) })
	t.Logf("the holder refreshed its record %s after the kill (refresh period %s)", written.Sub(killed).Round(time.Millisecond), refresh)
	if took := written.Sub(killed); took > recoveryLimit {
		t.Errorf("the holder refreshed its record %s after the kill, want within %s", took, recoveryLimit)
	}
	return nodes
}

// testEventsMasterKilled kills the master of the events channel's slot
// while a request waits on one node for an agent: once the node has
// subscribed again, the agent connecting to the other node wakes it.
func testEventsMasterKilled(t *testing.T, bin string, rc *redistest.Cluster) {
	e := newWorld(t)
	c := newCluster(t, bin, clusterOptions{standaloneFile: e.scenarioFile, redisCluster: rc, agentWaitTimeout: 25 * time.Second})
	holder, waiter := c.startNode(t, "kas-1", nodeOptions{}), c.startNode(t, "kas-2", nodeOptions{})
	cred := pat(asAgent.id, alicePAT)
	type answer struct {
		code int
		body string
	}
	answered := make(chan answer, 1)
	go func() {
		code, body := tryGet(e, waiter, "/version", cred)
		answered <- answer{code, body}
	}()

	master := clusterMasterFor(t, c, "gitlab-kas:tunnel_events")
	rc.Kill(master)
	killed := time.Now()
	waiter.proc.waitLog(t, "Subscribed to Redis again; writing this node's tunnel records again")
	resubscribed := time.Since(killed)
	if !rc.FailedOver(master) {
		t.Log("the node subscribed again before every Redis node saw the failover")
	}
	f := newFleet(t, e)
	waitConnected(t, f.run(t, asAgent, holder.public, e.kubeServer.URL).agent)
	connected := time.Now()
	select {
	case a := <-answered:
		if a.code != http.StatusOK {
			// What each node knew, for the failure's diagnosis.
			for _, n := range []*node{holder, waiter} {
				for _, op := range []string{"write", "subscribe", "lookup"} {
					v, _ := n.metric(fmt.Sprintf(`kas_registry_redis_errors_total{operation=%q}`, op))
					t.Logf("%s: %v Redis %s errors", n.name, v, op)
				}
				h, err := n.holders(asAgent.id)
				t.Logf("%s lists the agent's tunnels on %v (error %v)", n.name, h, err)
			}
			t.Fatalf("the waiting request got %d %s, want the agent's answer", a.code, a.body)
		}
		woken := time.Since(connected)
		t.Logf("events master killed: %s subscribed again %s after the kill; the waiting request was answered %s after the agent connected",
			waiter.name, resubscribed.Round(time.Millisecond), woken.Round(time.Millisecond))
		if resubscribed > recoveryLimit {
			t.Errorf("subscribed again %s after the kill, want within %s", resubscribed, recoveryLimit)
		}
		if woken > 5*time.Second {
			t.Errorf("the waiting request was answered %s after the agent connected, want at once", woken)
		}
	case <-time.After(waitFor):
		t.Fatal("the waiting request was not answered")
	}
}

// tryGet sends GET path through n's proxy as cred and returns the status
// and the start of the body (0 and the error when there is no answer).
func tryGet(e *env, n *node, path string, cred credential) (int, string) {
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	resp, err := get(ctx, e, n, path, cred)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
	return resp.StatusCode, strings.TrimSpace(string(body))
}
