package registry

import (
	"cmp"
	"context"
	"slices"
	"sync"
	"time"
)

// departureMemory is how long Memory remembers when an agent's last tunnel
// went away (LastSeen): long enough to tell an agent that is reconnecting
// from one that is gone, short enough that agents that never come back do
// not accumulate.
const departureMemory = 10 * time.Minute

// Memory is the registry of a single node: it knows only this node's tunnels.
// It is also the local half of the Redis registry.
type Memory struct {
	mu      sync.Mutex
	agents  map[int64]*agentTunnels
	waiters map[int64]*waitList
	// departed holds when each agent's last tunnel here went away, for
	// departureMemory.
	departed map[int64]time.Time
}

type agentTunnels struct {
	tunnels []Tunnel
	next    int // round-robin position for FindLocal
}

// waitList is closed when a tunnel for its agent registers.
type waitList struct {
	ready   chan struct{}
	waiting int
}

// NewMemory returns an empty in-memory registry.
func NewMemory() *Memory {
	return &Memory{agents: map[int64]*agentTunnels{}, waiters: map[int64]*waitList{}, departed: map[int64]time.Time{}}
}

// Register records t and wakes requests waiting for its agent.
func (m *Memory) Register(_ context.Context, t Tunnel) error {
	id := t.Info().AgentID
	m.mu.Lock()
	defer m.mu.Unlock()
	at := m.agents[id]
	if at == nil {
		at = &agentTunnels{}
		m.agents[id] = at
	}
	at.tunnels = append(at.tunnels, t)
	delete(m.departed, id)
	if w := m.waiters[id]; w != nil {
		close(w.ready)
		delete(m.waiters, id)
	}
	return nil
}

// Unregister forgets t; it is a no-op for an unknown tunnel.
func (m *Memory) Unregister(_ context.Context, t Tunnel) error {
	id := t.Info().AgentID
	m.mu.Lock()
	defer m.mu.Unlock()
	at := m.agents[id]
	if at == nil {
		return nil
	}
	at.tunnels = slices.DeleteFunc(at.tunnels, func(x Tunnel) bool { return x == t })
	if len(at.tunnels) == 0 {
		delete(m.agents, id)
		now := time.Now()
		for other, gone := range m.departed {
			if now.Sub(gone) > departureMemory {
				delete(m.departed, other)
			}
		}
		m.departed[id] = now
	}
	return nil
}

// LastSeen is now while the agent has a tunnel here, or when its last one
// went away (remembered for departureMemory); otherwise the zero time.
func (m *Memory) LastSeen(agentID int64) time.Time {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.agents[agentID] != nil {
		return time.Now()
	}
	if gone, ok := m.departed[agentID]; ok && time.Since(gone) <= departureMemory {
		return gone
	}
	return time.Time{}
}

// FindLocal returns the agent's tunnels in turn.
func (m *Memory) FindLocal(agentID int64) (Tunnel, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	at := m.agents[agentID]
	if at == nil {
		return nil, false
	}
	at.next = (at.next + 1) % len(at.tunnels)
	return at.tunnels[at.next], true
}

// FindRemote always answers none: a single node has no peers.
func (m *Memory) FindRemote(context.Context, int64) ([][]string, error) { return nil, nil }

// WaitForAgent returns once the agent has a tunnel here, or with ctx's error.
func (m *Memory) WaitForAgent(ctx context.Context, agentID int64) error {
	m.mu.Lock()
	if m.agents[agentID] != nil {
		m.mu.Unlock()
		return nil
	}
	w := m.waiters[agentID]
	if w == nil {
		w = &waitList{ready: make(chan struct{})}
		m.waiters[agentID] = w
	}
	w.waiting++
	m.mu.Unlock()

	select {
	case <-w.ready:
		return nil
	case <-ctx.Done():
		m.mu.Lock()
		// Forget the list when its last waiter leaves so agents that never
		// connect do not accumulate entries.
		if w.waiting--; w.waiting == 0 && m.waiters[agentID] == w {
			delete(m.waiters, agentID)
		}
		m.mu.Unlock()
		return ctx.Err()
	}
}

// Tunnels lists this node's connections for the given agents (all when none given).
func (m *Memory) Tunnels(_ context.Context, agentIDs ...int64) ([]TunnelInfo, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []TunnelInfo
	add := func(at *agentTunnels) {
		if at == nil {
			return
		}
		for _, t := range at.tunnels {
			out = append(out, t.Info())
		}
	}
	if len(agentIDs) == 0 {
		for _, at := range m.agents {
			add(at)
		}
	} else {
		for _, id := range agentIDs {
			add(m.agents[id])
		}
	}
	slices.SortFunc(out, func(a, b TunnelInfo) int {
		if a.AgentID != b.AgentID {
			return cmp.Compare(a.AgentID, b.AgentID)
		}
		return cmp.Compare(a.ConnectionID, b.ConnectionID)
	})
	return out, nil
}
