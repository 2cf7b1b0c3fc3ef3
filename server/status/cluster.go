package status

// Redis keys (under redis.key_prefix <p>, beside the registry's):
//
//	<p>:node_status:<node ID>  string, JSON NodeSummary; expires after
//	                           summaryTTL unless the node publishes again
//	                           (once a minute).

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/traffic"
	"github.com/kasproject/kas/web"
)

const (
	// summaryTTL outlives two missed minutes, so one slow publication does
	// not make a node's traffic vanish from the other nodes' pages.
	summaryTTL = 3 * time.Minute
	// probeTimeout bounds how long the page waits for another node, and
	// redisTimeout for Redis.
	probeTimeout = time.Second
	redisTimeout = time.Second
)

// NodeSummary is what a node publishes about itself once a minute.
type NodeSummary struct {
	ID          string    `json:"id"`
	URLs        []string  `json:"urls"`
	Version     string    `json:"version"`
	StartedAt   time.Time `json:"started_at"`
	PublishedAt time.Time `json:"published_at"`
	// Agents are the node's traffic counts per agent (agents with requests
	// in the last hour only).
	Agents map[int64]traffic.Minutes `json:"agents"`
	// Seen are the agents that connected to the node since it started.
	Seen []SeenAgent `json:"seen"`
}

// ClusterOptions configure NewCluster.
type ClusterOptions struct {
	// Client reaches Redis. Give the status page a client of its own: the
	// registry's counts its commands to show there are none per request.
	Client    redis.UniversalClient
	KeyPrefix string
	// Address describes Redis for the page (no password).
	Address  string
	Registry *registry.Redis
	// Probe checks that another node's private API answers.
	Probe     func(ctx context.Context, url string) error
	Version   string
	StartedAt time.Time
	NodeURLs  []string
}

// Cluster publishes this node's summary and reads the other nodes'.
type Cluster struct {
	opts ClusterOptions
	// lastFailure is Redis's last failure seen by the page or the publisher.
	lastFailure atomic.Pointer[traffic.Failure]
}

// NewCluster returns a Cluster over opts.
func NewCluster(opts ClusterOptions) *Cluster { return &Cluster{opts: opts} }

// localTunnels are this node's tunnels, known without Redis.
func (c *Cluster) localTunnels() []registry.TunnelInfo { return c.opts.Registry.LocalTunnels() }

// NodeID is this node's ID in Redis.
func (c *Cluster) NodeID() string { return c.opts.Registry.NodeID() }

func (c *Cluster) key(nodeID string) string { return c.opts.KeyPrefix + ":node_status:" + nodeID }

func (c *Cluster) fail(err error) {
	c.lastFailure.Store(&traffic.Failure{Time: time.Now().UTC(), Message: err.Error()})
}

// Publish writes this node's summary: one SET a minute.
func (c *Cluster) Publish(ctx context.Context, rec *traffic.Recorder, seen *Seen) error {
	now := time.Now().UTC()
	s := NodeSummary{
		ID:          c.NodeID(),
		URLs:        c.opts.NodeURLs,
		Version:     c.opts.Version,
		StartedAt:   c.opts.StartedAt,
		PublishedAt: now,
		Agents:      rec.Minutes(now),
		Seen:        seen.List(),
	}
	value, err := json.Marshal(s)
	if err != nil {
		return fmt.Errorf("encode this node's status summary: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := c.opts.Client.Set(ctx, c.key(s.ID), value, summaryTTL).Err(); err != nil {
		err = fmt.Errorf("publish this node's status summary to Redis (%s): %w", c.key(s.ID), err)
		c.fail(err)
		return err
	}
	return nil
}

// Remove deletes this node's summary, at shutdown.
func (c *Cluster) Remove(ctx context.Context) error {
	return c.opts.Client.Del(ctx, c.key(c.NodeID())).Err()
}

// clusterView is what the page learnt of the other nodes and Redis.
type clusterView struct {
	self      string
	live      []registry.Node
	summaries map[string]NodeSummary
	probes    map[string]probeResult
	redis     *web.Redis
	problems  []string
}

type probeResult struct {
	err error
	ms  float64
}

// view reads the live nodes and their summaries, pings Redis and probes the
// other nodes, all at once.
func (c *Cluster) view(ctx context.Context) clusterView {
	v := clusterView{self: c.NodeID(), summaries: map[string]NodeSummary{}, probes: map[string]probeResult{}}
	v.redis = &web.Redis{Address: c.opts.Address}
	var wg sync.WaitGroup
	wg.Go(func() {
		pctx, cancel := context.WithTimeout(ctx, redisTimeout)
		defer cancel()
		start := time.Now()
		if err := c.opts.Client.Ping(pctx).Err(); err != nil {
			err = fmt.Errorf("PING: %w", err)
			v.redis.Error = err.Error()
			c.fail(err)
			return
		}
		v.redis.LatencyMS = float64(time.Since(start).Microseconds()) / 1000
	})
	nodes, err := c.opts.Registry.Nodes(ctx)
	if err != nil {
		v.problems = append(v.problems, fmt.Sprintf("List kas nodes: %v", err))
	}
	v.live = nodes
	var mu sync.Mutex
	wg.Go(func() {
		sums, err := c.readSummaries(ctx, nodes)
		if err != nil {
			mu.Lock()
			v.problems = append(v.problems, err.Error())
			mu.Unlock()
		}
		v.summaries = sums
	})
	for _, n := range nodes {
		if n.ID == v.self || c.opts.Probe == nil {
			continue
		}
		wg.Go(func() {
			pctx, cancel := context.WithTimeout(ctx, probeTimeout)
			defer cancel()
			var res probeResult
			res.err = errors.New("no private API URL")
			for _, u := range n.URLs {
				start := time.Now()
				if res.err = c.opts.Probe(pctx, u); res.err == nil {
					res.ms = float64(time.Since(start).Microseconds()) / 1000
					break
				}
			}
			mu.Lock()
			v.probes[n.ID] = res
			mu.Unlock()
		})
	}
	wg.Wait()
	v.redis.LastFailure = c.lastFailure.Load()
	return v
}

// readSummaries GETs the nodes' summaries in one pipeline.
func (c *Cluster) readSummaries(ctx context.Context, nodes []registry.Node) (map[string]NodeSummary, error) {
	out := map[string]NodeSummary{}
	if len(nodes) == 0 {
		return out, nil
	}
	pipe := c.opts.Client.Pipeline()
	cmds := make([]*redis.StringCmd, len(nodes))
	for i, n := range nodes {
		cmds[i] = pipe.Get(ctx, c.key(n.ID))
	}
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
		err = fmt.Errorf("read the nodes' status summaries from Redis: %w", err)
		c.fail(err)
		return out, err
	}
	var bad []string
	for i, cmd := range cmds {
		b, err := cmd.Bytes()
		if err != nil {
			continue // redis.Nil: the node has not published yet
		}
		var s NodeSummary
		if err := json.Unmarshal(b, &s); err != nil {
			bad = append(bad, fmt.Sprintf("%s: %v", c.key(nodes[i].ID), err))
			continue
		}
		out[nodes[i].ID] = s
	}
	if len(bad) > 0 {
		return out, fmt.Errorf("unreadable status summaries in Redis (skipped): %s", strings.Join(bad, "; "))
	}
	return out, nil
}

// nodes lists the live nodes for the page, this one first, with the
// tunnels each holds.
func (v clusterView) nodes(tunnels []registry.TunnelInfo, selfURLs []string) []web.Node {
	if v.live == nil && v.self == "" {
		return nil
	}
	held := map[string]int{}
	for _, t := range tunnels {
		held[urlsKey(t.NodeURLs)]++
	}
	out := make([]web.Node, 0, len(v.live))
	for _, n := range v.live {
		wn := web.Node{ID: n.ID, URLs: n.URLs, Self: n.ID == v.self, Tunnels: held[urlsKey(n.URLs)]}
		if s, ok := v.summaries[n.ID]; ok {
			wn.Version, wn.StartedAt, wn.LastHeartbeat = s.Version, s.StartedAt, s.PublishedAt
		}
		if wn.Self {
			wn.Reachable = true
		} else if p, ok := v.probes[n.ID]; ok {
			wn.Reachable, wn.ProbeMS = p.err == nil, p.ms
			if p.err != nil {
				wn.ReachError = p.err.Error()
			}
		}
		out = append(out, wn)
	}
	if !slices.ContainsFunc(out, func(n web.Node) bool { return n.Self }) {
		// Not (yet, or no longer) in Redis's node list: show it anyway.
		out = append(out, web.Node{ID: v.self, URLs: selfURLs, Self: true, Reachable: true, Tunnels: held[urlsKey(selfURLs)]})
	}
	slices.SortStableFunc(out, func(a, b web.Node) int {
		switch {
		case a.Self && !b.Self:
			return -1
		case b.Self && !a.Self:
			return 1
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out
}

// Run publishes this node's summary now and after each minute's sample,
// until ctx ends; sample is called first at each minute boundary.
func (c *Cluster) Run(ctx context.Context, rec *traffic.Recorder, seen *Seen, sample func(boundary int64)) {
	_ = c.Publish(ctx, rec, seen) // a failure is remembered and shown on the page
	traffic.RunSampler(ctx, func(boundary int64) {
		sample(boundary)
		_ = c.Publish(ctx, rec, seen)
	})
}
