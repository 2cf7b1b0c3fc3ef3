package main

import (
	"context"
	"fmt"
	"sync"
	"time"
)

// idleResult is kas's memory per idle connected agent.
type idleResult struct {
	Agents int `json:"agents"`
	// Deltas between kas with no agent and kas with Agents idle agents, each
	// read after a garbage collection that returned freed memory to the OS.
	HeapDelta  int64 `json:"heap_inuse_delta_bytes"`
	StackDelta int64 `json:"stack_inuse_delta_bytes"`
	RSSDelta   int64 `json:"rss_delta_bytes"`
	// Per agent: heap+stack (what kas's Go runtime holds) and RSS.
	GoBytesPerAgent   float64 `json:"go_bytes_per_agent"`
	HeapBytesPerAgent float64 `json:"heap_bytes_per_agent"`
	RSSBytesPerAgent  float64 `json:"rss_bytes_per_agent"`
}

// measureIdleAgents starts a kas of its own, reads its memory, connects
// agents idle agents (real agentk tunnels, all in one agents process), waits
// until kas counts them all connected, lets them settle and reads its memory
// again.
func measureIdleAgents(ctx context.Context, b *bench, upstream string) (idleResult, error) {
	res := idleResult{Agents: len(b.creds.idleTokens)}
	kas, err := startChild(b, "kas-idle", roleKAS, "-config", b.creds.kasConfig, "-log", b.path("kas-idle.log"))
	if err != nil {
		return res, err
	}
	defer func() { _ = kas.stop() }()
	metricsURL := "http://" + kas.ready.Observability + "/metrics"
	settle(ctx, time.Second)
	before, err := kas.snapshot(true)
	if err != nil {
		return res, err
	}
	agents, err := startChild(b, "agents-idle", roleAgents,
		"-kas", "ws://"+kas.ready.Addr, "-tokens", b.creds.idleFile, "-api", upstream, "-log", b.path("agents-idle.log"))
	if err != nil {
		return res, err
	}
	defer func() { _ = agents.stop() }()
	if err := waitForTunnels(ctx, metricsURL, res.Agents); err != nil {
		return res, err
	}
	// Connection set-up garbage is collected below; what stays is per tunnel.
	settle(ctx, 2*time.Second)
	after, err := kas.snapshot(true)
	if err != nil {
		return res, err
	}
	if n, err := tunnelsConnected(metricsURL); err != nil || n != res.Agents {
		return res, fmt.Errorf("kas counts %d tunnels after settling, want %d (%v)", n, res.Agents, err)
	}
	res.HeapDelta = after.heap - before.heap
	res.StackDelta = after.stack - before.stack
	res.RSSDelta = after.rss - before.rss
	n := float64(res.Agents)
	res.HeapBytesPerAgent = float64(res.HeapDelta) / n
	res.GoBytesPerAgent = float64(res.HeapDelta+res.StackDelta) / n
	res.RSSBytesPerAgent = float64(res.RSSDelta) / n
	return res, nil
}

func settle(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

// waitForTunnels polls kas's kas_tunnels_connected until it reaches want:
// only tunnels kas registered count.
func waitForTunnels(ctx context.Context, metricsURL string, want int) error {
	deadline := time.Now().Add(2 * time.Minute)
	for {
		n, err := tunnelsConnected(metricsURL)
		if err == nil && n >= want {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("kas counts %d of %d tunnels connected after 2 minutes (%v)", n, want, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func tunnelsConnected(metricsURL string) (int, error) {
	m, err := scrapeMetrics(metricsURL)
	if err != nil {
		return 0, err
	}
	n, ok := m[metricTunnels]
	if !ok {
		return 0, fmt.Errorf("no %s in %s", metricTunnels, metricsURL)
	}
	return int(n), nil
}

// growth is the most kas's memory rose above its level before a transfer.
type growth struct {
	HeapMax int64 `json:"heap_inuse_max_growth_bytes"`
	RSSMax  int64 `json:"rss_max_growth_bytes"`
	Samples int   `json:"samples"`
}

// sampler reads a child's heap and RSS every interval until stopped and
// keeps the largest rise above the baseline read at start.
type sampler struct {
	c      *child
	base   snapshot
	stopCh chan struct{}
	done   sync.WaitGroup
	g      growth
	err    error
}

func startSampler(c *child, interval time.Duration) (*sampler, error) {
	base, err := c.snapshot(true)
	if err != nil {
		return nil, err
	}
	s := &sampler{c: c, base: base, stopCh: make(chan struct{})}
	s.done.Go(func() {
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			s.sample()
			select {
			case <-s.stopCh:
				return
			case <-t.C:
			}
		}
	})
	return s, nil
}

func (s *sampler) sample() {
	snap, err := s.c.snapshot(false)
	if err != nil {
		if s.err == nil {
			s.err = err
		}
		return
	}
	s.g.Samples++
	s.g.HeapMax = max(s.g.HeapMax, snap.heap-s.base.heap)
	s.g.RSSMax = max(s.g.RSSMax, snap.rss-s.base.rss)
}

func (s *sampler) stop() (growth, error) {
	close(s.stopCh)
	s.done.Wait()
	s.sample()
	return s.g, s.err
}
