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
type lookupCache struct {
	ttl time.Duration

	mu      sync.Mutex
	active  bool // the subscription is up
	entries map[int64]*lookup
}

// lookup is one agent's answer, or a lookup in flight until done is closed.
type lookup struct {
	done    chan struct{}
	nodes   [][]string
	err     error
	expires time.Time
}

func newLookupCache(ttl time.Duration) *lookupCache {
	return &lookupCache{ttl: ttl, entries: map[int64]*lookup{}}
}

// get returns the agent's cached answer, or fetches it. A fetch shared with
// other callers runs without ctx's cancellation (the Redis client's timeouts
// bound it), so one caller giving up does not fail the others.
func (c *lookupCache) get(ctx context.Context, agentID int64, fetch func(context.Context, int64) ([][]string, error)) ([][]string, error) {
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
		return fetch(ctx, agentID)
	}
	l := &lookup{done: make(chan struct{})}
	c.entries[agentID] = l
	c.mu.Unlock()

	nodes, err := fetch(context.WithoutCancel(ctx), agentID)

	c.mu.Lock()
	l.nodes, l.err, l.expires = nodes, err, time.Now().Add(c.ttl)
	if err != nil && c.entries[agentID] == l {
		delete(c.entries, agentID)
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
