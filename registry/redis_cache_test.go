package registry

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// countingFetch answers every lookup with one node, counting calls; while
// gate is non-nil it blocks until gate is closed.
type countingFetch struct {
	calls atomic.Int32
	gate  chan struct{}
	err   error
}

func (f *countingFetch) fetch(context.Context, int64) ([][]string, error) {
	f.calls.Add(1)
	if f.gate != nil {
		<-f.gate
	}
	if f.err != nil {
		return nil, f.err
	}
	return [][]string{{"grpc://n:8155"}}, nil
}

func TestLookupCache(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name      string
		active    bool
		ttl       time.Duration
		err       error
		between   func(*lookupCache) // runs between the two lookups
		wantCalls int32
	}{
		{"cached while active", true, time.Hour, nil, nil, 1},
		{"not cached while the subscription is down", false, time.Hour, nil, nil, 2},
		{"expired", true, time.Nanosecond, nil, func(*lookupCache) { time.Sleep(time.Millisecond) }, 2},
		{"invalidated", true, time.Hour, nil, func(c *lookupCache) { c.invalidate(1) }, 2},
		{"another agent invalidated", true, time.Hour, nil, func(c *lookupCache) { c.invalidate(2) }, 1},
		{"subscription lost", true, time.Hour, nil, func(c *lookupCache) { c.setActive(false) }, 2},
		{"subscription back: everything dropped", true, time.Hour, nil, func(c *lookupCache) { c.setActive(true) }, 2},
		{"errors not cached", true, time.Hour, errors.New("redis down"), nil, 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := newLookupCache(tc.ttl, time.Hour)
			c.setActive(tc.active)
			f := &countingFetch{err: tc.err}
			for i := range 2 {
				nodes, err := c.get(ctx, 1, f.fetch)
				if (err != nil) != (tc.err != nil) || (err == nil && len(nodes) != 1) {
					t.Fatalf("get: %v, %v", nodes, err)
				}
				if i == 0 && tc.between != nil {
					tc.between(c)
				}
			}
			if got := f.calls.Load(); got != tc.wantCalls {
				t.Fatalf("fetched %d times, want %d", got, tc.wantCalls)
			}
		})
	}
}

func TestLookupCacheSharesLookupsInFlight(t *testing.T) {
	c := newLookupCache(time.Hour, time.Hour)
	c.setActive(true)
	f := &countingFetch{gate: make(chan struct{})}
	const callers = 5
	var wg sync.WaitGroup
	for range callers {
		wg.Go(func() {
			if nodes, err := c.get(context.Background(), 1, f.fetch); err != nil || len(nodes) != 1 {
				t.Errorf("get: %v, %v", nodes, err)
			}
		})
	}
	// A caller that gives up leaves without disturbing the others.
	impatient, cancel := context.WithCancel(context.Background())
	eventually(t, 5*time.Second, "first lookup in flight", func() bool { return f.calls.Load() == 1 })
	cancel()
	if _, err := c.get(impatient, 1, f.fetch); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled caller got %v", err)
	}
	close(f.gate)
	wg.Wait()
	if got := f.calls.Load(); got != 1 {
		t.Fatalf("%d concurrent lookups fetched %d times, want once", callers, got)
	}
}

func TestLookupCacheDropsAnswerInvalidatedInFlight(t *testing.T) {
	c := newLookupCache(time.Hour, time.Hour)
	c.setActive(true)
	f := &countingFetch{gate: make(chan struct{})}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _ = c.get(context.Background(), 1, f.fetch)
	}()
	eventually(t, 5*time.Second, "lookup in flight", func() bool { return f.calls.Load() == 1 })
	// The answer being fetched may predate this change: it must not stay.
	c.invalidate(1)
	close(f.gate)
	<-done
	f.gate = nil
	if _, err := c.get(context.Background(), 1, f.fetch); err != nil {
		t.Fatal(err)
	}
	if got := f.calls.Load(); got != 2 {
		t.Fatalf("fetched %d times, want 2: the answer invalidated in flight was kept", got)
	}
}

func TestLookupCacheSweep(t *testing.T) {
	c := newLookupCache(time.Nanosecond, time.Hour)
	c.setActive(true)
	f := &countingFetch{}
	for id := range int64(3) {
		if _, err := c.get(context.Background(), id, f.fetch); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, 5*time.Second, "entries expire", func() bool {
		c.sweep()
		c.mu.Lock()
		defer c.mu.Unlock()
		return len(c.entries) == 0
	})
}

// TestLookupCacheStaleWhileError: a lookup that fails answers its error
// with the nodes the last successful one found, while they can still be
// there; LastSeen remembers when a lookup last found the agent.
func TestLookupCacheStaleWhileError(t *testing.T) {
	ctx := context.Background()
	outage := errors.New("redis down")
	holder := [][]string{{"grpc://n:8155"}}
	found := func(context.Context, int64) ([][]string, error) { return holder, nil }
	none := func(context.Context, int64) ([][]string, error) { return nil, nil }
	failing := func(context.Context, int64) ([][]string, error) { return nil, outage }
	tests := []struct {
		name     string
		active   bool // the subscription is up (answers cached)
		staleFor time.Duration
		before   []func(context.Context, int64) ([][]string, error)
		want     [][]string
		wantSeen bool
	}{
		{"last known nodes, subscription up", true, time.Hour, []func(context.Context, int64) ([][]string, error){found}, holder, true},
		{"last known nodes, subscription down", false, time.Hour, []func(context.Context, int64) ([][]string, error){found}, holder, true},
		{"never found", false, time.Hour, nil, nil, false},
		{"found, then gone", false, time.Hour, []func(context.Context, int64) ([][]string, error){found, none}, nil, true},
		{"too old to trust", false, time.Nanosecond, []func(context.Context, int64) ([][]string, error){found}, nil, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := newLookupCache(time.Nanosecond, tc.staleFor) // answers expire at once: every get fetches
			c.setActive(tc.active)
			for _, fetch := range tc.before {
				if _, err := c.get(ctx, 1, fetch); err != nil {
					t.Fatal(err)
				}
			}
			time.Sleep(time.Millisecond)
			nodes, err := c.get(ctx, 1, failing)
			if !errors.Is(err, outage) {
				t.Fatalf("get during the outage: error %v, want %v", err, outage)
			}
			if len(nodes) != len(tc.want) {
				t.Fatalf("get during the outage answered %v, want %v", nodes, tc.want)
			}
			if seen := c.lastSeen(1); seen.IsZero() == tc.wantSeen {
				t.Fatalf("lastSeen = %v, want a time: %t", seen, tc.wantSeen)
			}
		})
	}
}
