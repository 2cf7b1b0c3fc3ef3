package registry

import (
	"context"
	"net/http"
	"testing"
	"time"
)

type fakeTunnel struct{ info TunnelInfo }

func (f *fakeTunnel) Info() TunnelInfo                                { return f.info }
func (f *fakeTunnel) RoundTrip(*http.Request) (*http.Response, error) { return nil, nil }

func tun(agent, conn int64) *fakeTunnel {
	return &fakeTunnel{info: TunnelInfo{AgentID: agent, ConnectionID: conn}}
}

func TestMemoryFindLocalSpreadsOverReplicas(t *testing.T) {
	ctx := context.Background()
	m := NewMemory()
	a, b := tun(1, 1), tun(1, 2)
	for _, x := range []*fakeTunnel{a, b, tun(2, 3)} {
		if err := m.Register(ctx, x); err != nil {
			t.Fatal(err)
		}
	}
	seen := map[Tunnel]int{}
	for range 10 {
		got, ok := m.FindLocal(1)
		if !ok {
			t.Fatal("FindLocal(1) found nothing")
		}
		seen[got]++
	}
	if seen[a] != 5 || seen[b] != 5 {
		t.Fatalf("replicas not used in turn: %v", seen)
	}
	if err := m.Unregister(ctx, a); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if got, _ := m.FindLocal(1); got != b {
			t.Fatalf("after unregistering a, got %v", got)
		}
	}
	_ = m.Unregister(ctx, b)
	if _, ok := m.FindLocal(1); ok {
		t.Fatal("agent 1 still found after its last tunnel left")
	}
}

func TestMemoryTunnels(t *testing.T) {
	ctx := context.Background()
	m := NewMemory()
	for _, x := range []*fakeTunnel{tun(2, 3), tun(1, 2), tun(1, 1), tun(3, 4)} {
		_ = m.Register(ctx, x)
	}
	tests := []struct {
		name  string
		ids   []int64
		conns []int64
	}{
		{"all, sorted", nil, []int64{1, 2, 3, 4}},
		{"one agent", []int64{1}, []int64{1, 2}},
		{"several and unknown, sorted", []int64{3, 9, 2}, []int64{3, 4}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := m.Tunnels(ctx, tc.ids...)
			if err != nil {
				t.Fatal(err)
			}
			var conns []int64
			for _, g := range got {
				conns = append(conns, g.ConnectionID)
			}
			if len(conns) != len(tc.conns) {
				t.Fatalf("got connections %v, want %v", conns, tc.conns)
			}
			for i := range conns {
				if conns[i] != tc.conns[i] {
					t.Fatalf("got connections %v, want %v", conns, tc.conns)
				}
			}
		})
	}
}

func TestMemoryWaitForAgent(t *testing.T) {
	m := NewMemory()
	ctx := context.Background()

	done := make(chan error, 2)
	for range 2 {
		go func() { done <- m.WaitForAgent(ctx, 7) }()
	}
	// Both waiters must be parked before the agent arrives.
	deadline := time.Now().Add(5 * time.Second)
	for {
		m.mu.Lock()
		n := 0
		if w := m.waiters[7]; w != nil {
			n = w.waiting
		}
		m.mu.Unlock()
		if n == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("waiters never parked")
		}
		time.Sleep(time.Millisecond)
	}
	_ = m.Register(ctx, tun(7, 1))
	for range 2 {
		if err := <-done; err != nil {
			t.Fatalf("waiter: %v", err)
		}
	}
	// Already connected: returns at once.
	if err := m.WaitForAgent(ctx, 7); err != nil {
		t.Fatal(err)
	}

	// A waiter that gives up leaves nothing behind.
	short, cancel := context.WithTimeout(ctx, 10*time.Millisecond)
	defer cancel()
	if err := m.WaitForAgent(short, 8); err == nil {
		t.Fatal("WaitForAgent for an absent agent returned nil")
	}
	m.mu.Lock()
	left := len(m.waiters)
	m.mu.Unlock()
	if left != 0 {
		t.Fatalf("%d wait lists left after the waiter gave up", left)
	}
}

// TestMemoryLastSeen: now while connected, the departure afterwards, never
// for an agent that was not connected.
func TestMemoryLastSeen(t *testing.T) {
	ctx := context.Background()
	m := NewMemory()
	if seen := m.LastSeen(1); !seen.IsZero() {
		t.Fatalf("never connected: LastSeen = %v, want zero", seen)
	}
	a, b := tun(1, 1), tun(1, 2)
	_ = m.Register(ctx, a)
	_ = m.Register(ctx, b)
	if seen := m.LastSeen(1); time.Since(seen) > time.Second {
		t.Fatalf("connected: LastSeen = %v, want now", seen)
	}
	_ = m.Unregister(ctx, a)
	if seen := m.LastSeen(1); time.Since(seen) > time.Second {
		t.Fatalf("one replica left: LastSeen = %v, want now", seen)
	}
	before := time.Now()
	_ = m.Unregister(ctx, b)
	time.Sleep(10 * time.Millisecond)
	if seen := m.LastSeen(1); seen.Before(before) || time.Since(seen) < 10*time.Millisecond {
		t.Fatalf("gone: LastSeen = %v, want the departure at %v", seen, before)
	}
	_ = m.Register(ctx, a)
	if _, ok := m.departed[1]; ok {
		t.Fatal("the departure is still remembered after the agent came back")
	}
}
