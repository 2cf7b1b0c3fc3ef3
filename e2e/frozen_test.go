package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sort"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestFrozenNode freezes (SIGSTOP) one of two nodes holding an agent's
// tunnels: a node without a tunnel that forwards requests for the agent must
// notice within the private API's accept timeout that the frozen node does
// not take them, serve them through the other holder, and skip the frozen
// node from then on, so that no caller sees an error.
func TestFrozenNode(t *testing.T) {
	t.Parallel()
	bin := buildKAS(t)
	const acceptTimeout = time.Second
	e := newWorld(t)
	c := newCluster(t, bin, clusterOptions{standaloneFile: e.scenarioFile, acceptTimeout: acceptTimeout})
	a, b, entry := c.startNode(t, "kas-a", nodeOptions{}), c.startNode(t, "kas-b", nodeOptions{}), c.startNode(t, "kas-c", nodeOptions{})
	nodes := []*node{a, b, entry}
	f := newFleet(t, e)
	// Two replicas of one agent, one on a, one on b.
	f.run(t, asAgent, a.public, e.kubeServer.URL)
	f.run(t, asAgent, b.public, e.kubeServer.URL)
	waitHolders(t, nodes, asAgent.id, a, b)
	cred := pat(asAgent.id, alicePAT)
	// The entry node alternates between the holders: after a few requests
	// it has a connection to each, as it would in production.
	for range 4 {
		if err := listNamespaces(t, e, entry, cred); err != nil {
			t.Fatal(err)
		}
	}

	b.freeze(t)
	defer b.thaw(t)
	// clientTimeout is how long a caller waits: well over the accept
	// timeout, so that a request that hangs is one a caller gives up on.
	const clientTimeout = 10 * time.Second
	load := steadyLoad(10, 12*time.Second, func() (int, error) {
		ctx, cancel := context.WithTimeout(context.Background(), clientTimeout)
		defer cancel()
		resp, err := get(ctx, e, entry, "/version", cred)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		_, err = io.Copy(io.Discard, resp.Body)
		return resp.StatusCode, err
	})
	t.Logf("10 req/s for 12 s into %s with one of two holders frozen: %s", entry.name, load)
	if load.failed > 0 {
		t.Errorf("%d of %d requests failed (%v); want none", load.failed, load.sent, load.errors)
	}
	// A request that met the frozen node first waited for the accept
	// timeout, then went to the other holder.
	if limit := acceptTimeout + 2*time.Second; load.worst > limit {
		t.Errorf("the slowest request took %s, want at most %s (the accept timeout and a hop)", load.worst, limit)
	}
	// The cause is logged once, not once per request.
	const skipped = "kas node did not take the request in time; skipping it for a while"
	line := entry.proc.waitLog(t, skipped)
	if line["kas_url"] != b.url || line["level"] != "WARN" {
		t.Errorf("the entry node logged %v at %v as not answering, want %s at WARN", line["kas_url"], line["level"], b.url)
	}
	if n := entry.proc.count(skipped, "level", "WARN"); n != 1 {
		t.Errorf("the entry node warned %d times that %s does not answer, want once", n, b.url)
	}
}

// freeze stops the node's process (SIGSTOP): its sockets stay open, but it
// answers nothing, as a node stuck in a long pause or on a dead VM would.
func (n *node) freeze(t *testing.T) {
	t.Helper()
	if err := n.proc.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatalf("freeze %s: %v", n.name, err)
	}
}

// thaw lets a frozen node run again.
func (n *node) thaw(t *testing.T) {
	t.Helper()
	if err := n.proc.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Errorf("thaw %s: %v", n.name, err)
	}
}

// loadResult sums up a steadyLoad run.
type loadResult struct {
	sent, failed int
	worst, p50   time.Duration
	errors       map[string]int // what failed, by status or error
}

func (r loadResult) String() string {
	return fmt.Sprintf("%d requests, %d failed, median %s, worst %s", r.sent, r.failed, r.p50.Round(time.Millisecond), r.worst.Round(time.Millisecond))
}

// steadyLoad calls do rate times a second for d, each call in its own
// goroutine as independent callers would, and waits for all of them. A call
// fails unless it returns 200 and no error.
func steadyLoad(rate int, d time.Duration, do func() (int, error)) loadResult {
	var (
		mu        sync.Mutex
		wg        sync.WaitGroup
		latencies []time.Duration
	)
	res := loadResult{errors: map[string]int{}}
	tick := time.NewTicker(time.Second / time.Duration(rate))
	defer tick.Stop()
	for end := time.Now().Add(d); time.Now().Before(end); <-tick.C {
		res.sent++
		wg.Go(func() {
			start := time.Now()
			code, err := do()
			took := time.Since(start)
			mu.Lock()
			defer mu.Unlock()
			latencies = append(latencies, took)
			switch {
			case err != nil:
				res.failed++
				res.errors[err.Error()]++
			case code != http.StatusOK:
				res.failed++
				res.errors[fmt.Sprintf("HTTP %d", code)]++
			}
		})
	}
	wg.Wait()
	sort.Slice(latencies, func(i, j int) bool { return latencies[i] < latencies[j] })
	if len(latencies) > 0 {
		res.worst, res.p50 = latencies[len(latencies)-1], latencies[len(latencies)/2]
	}
	return res
}
