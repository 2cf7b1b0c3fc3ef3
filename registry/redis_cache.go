package registry

import (
	"context"
	"sync"
	"time"
)

// lookupCache remembers FindRemote answers for a short while so a busy agent
// does not cost a Redis command per request. Answers are kept only while the
// pub/sub subscription is up: only then do other nodes' announcements arrive
// to invalidate them. Concurrent lookups of one agent share one Redis command.
//
// Apart from those answers it keeps, for each agent, the last nodes a lookup
// found and when (for as long as records live in Redis): when Redis cannot
// be read, a lookup answers those with its error (stale-while-error), so
// forwarding keeps working through a Redis outage or failover, and LastSeen
// can tell an agent that was connected moments ago from one long gone.
type lookupCache struct {
	ttl time.Duration
	// staleFor is how long the last known nodes are kept: the records' TTL,
	// after which they would have expired in Redis too.
	staleFor time.Duration

	mu      sync.Mutex
	active  bool // the subscription is up
	entries map[int64]*lookup
	known   map[int64]known
}

// known is what the last successful lookup of an agent found.
type known struct {
	nodes [][]string // nil when it found none
	// seen is when a lookup last found the agent on some node.
	seen time.Time
}

// lookup is one agent's answer, or a lookup in flight until done is closed.
type lookup struct {
	done    chan struct{}
	nodes   [][]string
	err     error
	expires time.Time
}

func newLookupCache(ttl, staleFor time.Duration) *lookupCache {
	return &lookupCache{ttl: ttl, staleFor: staleFor, entries: map[int64]*lookup{}, known: map[int64]known{}}
}

// get returns the agent's cached answer, or fetches it. A fetch shared with
// other callers runs without ctx's cancellation (the Redis client's timeouts
// bound it), so one caller giving up does not fail the others. A failed
// fetch answers its error with the last nodes known to hold the agent's
// tunnels, if any.
func (c *lookupCache) get(ctx context.Context, agentID int64, fetch func(context.Context, int64) ([][]string, error)) ([][]string, error) {
	nodes, err := c.getFresh(ctx, agentID, fetch)
	if err == nil || ctx.Err() != nil {
		return nodes, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if k, ok := c.known[agentID]; ok && k.nodes != nil && time.Since(k.seen) < c.staleFor {
		return k.nodes, err
	}
	return nil, err
}

// lastSeen is when a lookup last found the agent on some node; the zero time
// if none did within staleFor.
func (c *lookupCache) lastSeen(agentID int64) time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	if k, ok := c.known[agentID]; ok && time.Since(k.seen) < c.staleFor {
		return k.seen
	}
	return time.Time{}
}

// remember records what a successful fetch found; c.mu is held.
func (c *lookupCache) rememberLocked(agentID int64, nodes [][]string, now time.Time) {
	if len(nodes) > 0 {
		c.known[agentID] = known{nodes: nodes, seen: now}
		return
	}
	if k, ok := c.known[agentID]; ok {
		// Keep when it was last seen; there is nothing left to fall back to.
		c.known[agentID] = known{seen: k.seen}
	}
}

// getFresh is get without the fallback.
func (c *lookupCache) getFresh(ctx context.Context, agentID int64, fetch func(context.Context, int64) ([][]string, error)) ([][]string, error) {
	c.mu.Lock()
	if l := c.entries[agentID]; l != nil {
		select {
		case <-l.done:
			if time.Now().Before(l.expires) {
				c.mu.Unlock()
				return l.nodes, nil
			}
		default:
			c.mu.Unlock()
			select {
			case <-l.done:
				return l.nodes, l.err
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
	}
	if !c.active {
		c.mu.Unlock()
		nodes, err := fetch(ctx, agentID)
		if err == nil {
			c.mu.Lock()
			c.rememberLocked(agentID, nodes, time.Now())
			c.mu.Unlock()
		}
		return nodes, err
	}
	l := &lookup{done: make(chan struct{})}
	c.entries[agentID] = l
	c.mu.Unlock()

	nodes, err := fetch(context.WithoutCancel(ctx), agentID)

	c.mu.Lock()
	now := time.Now()
	l.nodes, l.err, l.expires = nodes, err, now.Add(c.ttl)
	if err != nil && c.entries[agentID] == l {
		delete(c.entries, agentID)
	}
	if err == nil {
		c.rememberLocked(agentID, nodes, now)
	}
	close(l.done)
	c.mu.Unlock()
	return nodes, err
}

// invalidate forgets the agent's answer; a lookup in flight still answers
// its callers but is not kept.
func (c *lookupCache) invalidate(agentID int64) {
	c.mu.Lock()
	delete(c.entries, agentID)
	c.mu.Unlock()
}

// setActive turns caching on (the subscription is up) or off, forgetting
// everything either way: announcements may have been missed in between.
func (c *lookupCache) setActive(active bool) {
	c.mu.Lock()
	c.active = active
	c.entries = map[int64]*lookup{}
	c.mu.Unlock()
}

// sweep forgets expired answers so agents asked about once do not stay.
func (c *lookupCache) sweep() {
	now := time.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	for id, k := range c.known {
		if now.Sub(k.seen) >= c.staleFor {
			delete(c.known, id)
		}
	}
	for id, l := range c.entries {
		select {
		case <-l.done:
			if !now.Before(l.expires) {
				delete(c.entries, id)
			}
		default:
		}
	}
}
