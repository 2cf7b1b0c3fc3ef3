package traffic

import (
	"context"
	"sync"
	"testing"
	"time"
)

// at returns a time in Unix minute m, s seconds in.
func at(m int64, s int) time.Time { return time.Unix(m*60+int64(s), 0) }

func TestSeriesMinutesAndWindows(t *testing.T) {
	const m0 = 29_000_000 // some Unix minute
	start := at(m0, 30)
	var s Series

	// Minute m0 (from start): 4 requests, 1 failed.
	for i := range 4 {
		s.Observe(i == 0, 10, 100)
	}
	s.Sample(m0 + 1)
	// Minute m0+1: nothing; the sampler ran.
	s.Sample(m0 + 2)
	// Minute m0+2: 6 requests, 3 failed; the sampler is late and misses
	// the m0+3 boundary, so they land in m0+3.
	for i := range 6 {
		s.Observe(i%2 == 0, 0, 1)
	}
	s.Sample(m0 + 4)
	// Minute m0+4, in progress: 2 requests.
	s.Observe(false, 5, 5)
	s.Observe(false, 5, 5)
	s.Fail(Failure{Time: at(m0+4, 10), Message: "boom"})

	now := at(m0+4, 30)
	m := s.Minutes(now)
	if m.Last != m0+4 || len(m.Requests) != HistoryMinutes {
		t.Fatalf("Minutes: last %d len %d, want %d %d", m.Last, len(m.Requests), m0+4, HistoryMinutes)
	}
	want := map[int64]uint64{m0: 4, m0 + 1: 0, m0 + 2: 0, m0 + 3: 6, m0 + 4: 2}
	for u, n := range want {
		if got := m.at(u).requests; got != n {
			t.Errorf("minute %+d: %d requests, want %d", u-m0, got, n)
		}
	}
	if m.LastFailure == nil || m.LastFailure.Message != "boom" {
		t.Errorf("last failure %+v, want boom", m.LastFailure)
	}

	tests := []struct {
		name       string
		n          int
		since      time.Time
		requests   uint64
		errors     uint64
		perMinute  float64
		errorRate  float64
		bytesIn    uint64
		bytesOutGE uint64
	}{
		// 5 minutes: m0..m0+4, but counting started at m0:30, so 4 minutes covered.
		{"5m since start", 5, start, 12, 4, 3, 4.0 / 12, 50, 0},
		// 2 minutes: m0+3 and m0+4 (1.5 minutes covered).
		{"2m", 2, start, 8, 3, 8 / 1.5, 3.0 / 8, 10, 0},
		// 60 minutes: everything, over the 4 minutes since start.
		{"60m", 60, start, 12, 4, 3, 4.0 / 12, 50, 0},
		// One minute, 30 s covered: at least one minute is assumed.
		{"1m", 1, start, 2, 0, 2, 0, 10, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := m.Window(now, tt.since, tt.n)
			if w.Requests != tt.requests || w.Errors != tt.errors || w.BytesIn != tt.bytesIn {
				t.Errorf("window %+v, want %d requests %d errors %d bytes in", w, tt.requests, tt.errors, tt.bytesIn)
			}
			if !near(w.RequestsPerMinute, tt.perMinute) || !near(w.ErrorRate, tt.errorRate) {
				t.Errorf("rate %.3f/min error rate %.3f, want %.3f and %.3f", w.RequestsPerMinute, w.ErrorRate, tt.perMinute, tt.errorRate)
			}
		})
	}

	// An hour later the old minutes have left the window; the two
	// requests of the minute in progress, never sampled until now, count
	// for the minute before this sample.
	later := at(m0+70, 0)
	s.Sample(m0 + 70)
	if w := s.Minutes(later).Window(later, start, 60); w.Requests != 2 {
		t.Errorf("an hour later: %d requests in the last 60 minutes, want the 2 not sampled before", w.Requests)
	}
	// A repeated or older boundary changes nothing.
	s.Observe(false, 0, 0)
	s.Sample(m0 + 70)
	s.Sample(m0 + 3)
	if got := s.Minutes(later).Requests[HistoryMinutes-1]; got != 1 {
		t.Errorf("minute in progress after stale samples: %d requests, want 1", got)
	}
}

func near(a, b float64) bool { return a-b < 1e-9 && b-a < 1e-9 }

func TestMerge(t *testing.T) {
	const m0 = 29_000_000
	var a, b Series
	a.Observe(false, 1, 1)
	a.Sample(m0)
	a.Observe(true, 1, 1)
	a.Fail(Failure{Time: at(m0, 5), Message: "a failed"})
	b.Observe(false, 2, 2)
	b.Observe(false, 2, 2)
	b.Fail(Failure{Time: at(m0-1, 5), Message: "b failed earlier"})

	// b published during minute m0-1, its two requests then in progress.
	ma, mb := a.Minutes(at(m0, 30)), b.Minutes(at(m0-1, 59))
	got := Merge(at(m0, 30), ma, mb)
	if r := got.at(m0 - 1).requests; r != 3 {
		t.Errorf("minute m0-1: %d requests, want a's 1 and b's 2", r)
	}
	if r := got.at(m0).requests; r != 1 {
		t.Errorf("minute m0: %d requests, want a's 1", r)
	}
	if w := got.Window(at(m0, 30), at(m0-10, 0), 5); w.Requests != 4 || w.Errors != 1 || w.BytesIn != 6 {
		t.Errorf("merged 5-minute window %+v, want 4 requests, 1 error, 6 bytes in", w)
	}
	if got.LastFailure == nil || got.LastFailure.Message != "a failed" {
		t.Errorf("merged last failure %+v, want the newest (a's)", got.LastFailure)
	}
	// Short slices from another node count as zeros where they end, not a panic.
	short := Minutes{Last: m0, Requests: []uint64{5}}
	if w := Merge(at(m0, 0), short).Window(at(m0, 0), at(m0-60, 0), 60); w.Requests != 5 || w.Errors != 0 {
		t.Errorf("short slices: %+v, want the 5 requests of their first minute and nothing else", w)
	}
}

func TestRecorder(t *testing.T) {
	const m0 = 29_000_000
	var r Recorder
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			for range 1000 {
				r.Agent(int64(i%2)).Observe(false, 0, 0)
			}
		})
	}
	wg.Wait()
	r.Agent(7) // created, never used
	r.Sample(m0)
	all := r.Minutes(at(m0, 1))
	if len(all) != 2 {
		t.Fatalf("%d agents with traffic, want 2 (agent 7 had none)", len(all))
	}
	for id, m := range all {
		if w := m.Window(at(m0, 1), at(m0-5, 0), 5); w.Requests != 4000 {
			t.Errorf("agent %d: %d requests, want 4000 (none lost under concurrency)", id, w.Requests)
		}
	}
}

func TestObserveAllocatesNothing(t *testing.T) {
	var r Recorder
	r.Agent(123456) // as after the agent's first request
	allocs := testing.AllocsPerRun(1000, func() {
		r.Agent(123456).Observe(true, 100, 1000)
	})
	if allocs != 0 {
		t.Fatalf("Observe allocates %.1f times per request, want 0", allocs)
	}
}

func TestRunSamplerStops(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		RunSampler(ctx, func(int64) {})
		close(done)
	}()
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("RunSampler did not return after its context ended")
	}
}

func BenchmarkObserve(b *testing.B) {
	var r Recorder
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			r.Agent(42).Observe(false, 0, 512)
		}
	})
}
