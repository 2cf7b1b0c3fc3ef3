package e2e

import (
	"context"
	"fmt"
	"net/http"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kasproject/kas/server/kasjwt"
)

// TestReceptiveAgentsOnSeveralNodes runs three kas processes sharing a
// redis-server and four receptive agentk: each agent is held by exactly
// agent.receptive.connections_per_agent (2) nodes, a holder killed with
// SIGKILL is replaced within one lease period while requests keep working
// through the surviving nodes, and a node joining causes no outage.
func TestReceptiveAgentsOnSeveralNodes(t *testing.T) {
	t.Parallel()
	bin := buildKAS(t)
	const leasePeriod = 2 * time.Second
	w := &receptiveWorld{env: newWorld(t), sc: newScenario()}
	serverCA := newTestCA(t, "receptive agents CA")
	agents := []testAgent{asAgent, asImpersonate, asCIJob, asUser}
	creds := map[int64]credential{
		asAgent.id:       pat(asAgent.id, alicePAT),
		asImpersonate.id: ciJob(asImpersonate.id, jobToken),
		asCIJob.id:       ciJob(asCIJob.id, jobToken),
		asUser.id:        pat(asUser.id, alicePAT),
	}
	agentks := map[int64]*agentNode{}
	for _, a := range agents {
		keys := newJWTKeys(t)
		s := receptiveSetup{serverCA: serverCA, jwt: &keys}
		opts := w.receptiveAgentOptions(t, a, s, nil, w.kubeServer.URL)
		opts.ShutdownGrace = 100 * time.Millisecond
		w.sc.setReceptive(a.id, s.entry(opts.Receptive.Listener.Addr().String(), "", ""))
		agentks[a.id] = runAgent(t, opts)
	}
	w.sc.write(t, filepath.Dir(w.scenarioFile))
	c := newCluster(t, bin, clusterOptions{
		standaloneFile:   w.scenarioFile,
		redisTTL:         3 * time.Second,
		redisRefresh:     time.Second,
		redisGC:          time.Second,
		agentWaitTimeout: 2 * time.Second,
		receptive: map[string]any{
			"enabled":      true,
			"poll_period":  "500ms",
			"lease_period": leasePeriod.String(),
		},
	})
	var nodes []*node
	for i := range 3 {
		nodes = append(nodes, c.startNode(t, fmt.Sprintf("kas-%d", i+1), nodeOptions{}))
	}

	// Each agent: exactly two holders, and every node reaches it. The
	// nodes started one after the other, so the first took every agent;
	// a lease period later the holders are those rendezvous hashing picks.
	time.Sleep(leasePeriod)
	holders := waitReceptiveHolders(t, nodes, agents, agentks, 2)
	t.Logf("holders by node: %v", holders)
	// GitLab's agent tracker lists both connections of every agent, on
	// every node.
	token, err := kasjwt.Sign(c.opts.apiSecret, "gitlab", kasjwt.AudienceKAS, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		got, err := connectedAgents(w.env, n, token, agents...)
		if err != nil {
			t.Fatal(err)
		}
		for _, a := range agents {
			if want := []string{"agentk-" + a.name, "agentk-" + a.name}; !slices.Equal(got[a.id], want) {
				t.Errorf("%s's GetConnectedAgentsByAgentIDs lists agent %d's connections as %v, want %v", n.name, a.id, got[a.id], want)
			}
		}
	}
	for _, n := range nodes {
		for _, a := range agents {
			if err := listNamespaces(t, w.env, n, creds[a.id]); err != nil {
				t.Errorf("agent %d: %v", a.id, err)
			}
		}
	}
	load := func(a *atomic.Int64) int64 { return a.Load() }

	// kill -9 the node holding the most agents; requests keep working
	// through the two others while another node takes its place.
	victim := nodes[0]
	for _, n := range nodes {
		if len(holders[n.url]) > len(holders[victim.url]) {
			victim = n
		}
	}
	survivors := slices.DeleteFunc(slices.Clone(nodes), func(n *node) bool { return n == victim })
	traffic := startTraffic(t, w.env, survivors, agents, creds)
	victim.kill(t)
	killed := time.Now()
	var takeovers []time.Duration
	for _, id := range holders[victim.url] {
		a := agentks[id]
		// The dead node's tunnel goes at once; the new holder's comes.
		eventually(t, func() bool { return a.agent.Tunnels() == 2 && heldBy(t, survivors[0], id, survivors) == 2 },
			func() string {
				return fmt.Sprintf("agent %d has %d tunnels, want 2 on the surviving nodes", id, a.agent.Tunnels())
			})
		takeovers = append(takeovers, time.Since(killed))
	}
	takeover := slices.Max(takeovers)
	t.Logf("kill -9 of %s (holding agents %v): every agent back to 2 holders after %s (lease period %s)",
		victim.name, holders[victim.url], takeover.Round(time.Millisecond), leasePeriod)
	// One lease period, plus a little for the dial and a busy machine.
	if takeover > leasePeriod+time.Second {
		t.Errorf("takeover took %s, want within the lease period (%s)", takeover, leasePeriod)
	}
	ok, failed := traffic.stop()
	t.Logf("during the takeover: %d requests through the surviving nodes succeeded, %d failed", ok, failed)
	if failed > 0 || ok == 0 {
		t.Errorf("%d of %d requests through the surviving nodes failed during the takeover; want none", failed, ok+failed)
	}
	nodes = survivors
	waitReceptiveHolders(t, nodes, agents, agentks, 2)

	// A node joins: the agents it is now preferred for move to it without
	// ever losing their connections.
	var fewest atomic.Int64
	fewest.Store(2)
	stopWatch := make(chan struct{})
	var watch sync.WaitGroup
	watch.Go(func() {
		for {
			select {
			case <-stopWatch:
				return
			case <-time.After(5 * time.Millisecond):
			}
			for _, a := range agentks {
				if n := int64(a.agent.Tunnels()); n < fewest.Load() {
					fewest.Store(n)
				}
			}
		}
	})
	traffic = startTraffic(t, w.env, nodes, agents, creds)
	joined := c.startNode(t, "kas-4", nodeOptions{})
	nodes = append(nodes, joined)
	after := waitReceptiveHolders(t, nodes, agents, agentks, 2)
	// Let the moves settle, then look once more.
	time.Sleep(leasePeriod)
	after = waitReceptiveHolders(t, nodes, agents, agentks, 2)
	close(stopWatch)
	watch.Wait()
	ok, failed = traffic.stop()
	t.Logf("node joined: it holds agents %v; fewest tunnels any agent had meanwhile: %d; %d requests succeeded, %d failed",
		after[joined.url], load(&fewest), ok, failed)
	if load(&fewest) < 1 || failed > 0 {
		t.Errorf("while a node joined an agent had %d tunnels and %d requests failed; want no outage", load(&fewest), failed)
	}
	for _, n := range nodes {
		for _, a := range agents {
			if err := listNamespaces(t, w.env, n, creds[a.id]); err != nil {
				t.Errorf("after the join, agent %d: %v", a.id, err)
			}
		}
	}
}

// waitReceptiveHolders waits until every agent has want tunnels, each on a
// different node, as agentk counts them and as every node lists them
// (receptive), and returns the agents each node holds by its URL.
func waitReceptiveHolders(t *testing.T, nodes []*node, agents []testAgent, agentks map[int64]*agentNode, want int) map[string][]int64 {
	t.Helper()
	var held map[string][]int64
	var problem string
	eventually(t, func() bool {
		held = map[string][]int64{}
		for _, a := range agents {
			if got := agentks[a.id].agent.Tunnels(); got != want {
				problem = fmt.Sprintf("agentk of agent %d has %d tunnels, want %d", a.id, got, want)
				return false
			}
			for _, n := range nodes {
				st, err := fetchStatus(n.observability)
				if err != nil {
					problem = err.Error()
					return false
				}
				var urls []string
				for _, info := range connections(st) {
					if info.AgentID == a.id {
						if !info.Receptive {
							problem = fmt.Sprintf("%s lists agent %d's tunnel as not receptive", n.name, a.id)
							return false
						}
						urls = append(urls, info.NodeURLs...)
					}
				}
				slices.Sort(urls)
				if len(slices.Compact(urls)) != want || len(urls) != want {
					problem = fmt.Sprintf("%s lists agent %d's tunnels on %v, want %d nodes", n.name, a.id, urls, want)
					return false
				}
				if n == nodes[0] {
					for _, u := range urls {
						held[u] = append(held[u], a.id)
					}
				}
			}
		}
		return true
	}, func() string { return problem })
	return held
}

// heldBy counts the nodes among nodes that n's status page says hold
// tunnels for the agent.
func heldBy(t *testing.T, n *node, agentID int64, nodes []*node) int {
	t.Helper()
	urls, err := n.holders(agentID)
	if err != nil {
		return 0
	}
	count := 0
	for _, other := range nodes {
		if slices.Contains(urls, other.url) {
			count++
		}
	}
	return count
}

// traffic sends requests for every agent through the nodes in turn until
// stopped, counting what succeeded and what failed.
type traffic struct {
	ok, failed atomic.Int64
	done       chan struct{}
	wg         sync.WaitGroup
}

func startTraffic(t *testing.T, e *env, nodes []*node, agents []testAgent, creds map[int64]credential) *traffic {
	t.Helper()
	tr := &traffic{done: make(chan struct{})}
	tr.wg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-tr.done:
				return
			default:
			}
			n, a := nodes[i%len(nodes)], agents[(i/len(nodes))%len(agents)]
			ctx, cancel := context.WithTimeout(context.Background(), waitFor)
			resp, err := get(ctx, e, n, "/api/v1/namespaces", creds[a.id])
			if err == nil {
				if resp.StatusCode == http.StatusOK {
					tr.ok.Add(1)
				} else {
					tr.failed.Add(1)
					t.Logf("through %s for agent %d: HTTP %d", n.name, a.id, resp.StatusCode)
				}
				_ = resp.Body.Close()
			} else {
				tr.failed.Add(1)
				t.Logf("through %s for agent %d: %v", n.name, a.id, err)
			}
			cancel()
			time.Sleep(10 * time.Millisecond)
		}
	})
	return tr
}

func (tr *traffic) stop() (ok, failed int64) {
	close(tr.done)
	tr.wg.Wait()
	return tr.ok.Load(), tr.failed.Load()
}
