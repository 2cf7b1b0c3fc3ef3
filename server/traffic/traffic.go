// Package traffic counts requests, errors and bytes per agent (and for any
// other stream of calls, such as kas's calls to GitLab) cheaply enough to
// sit on the proxy's path, and keeps them per wall-clock minute for the last
// hour so the status page can show rates over 5 and 60 minutes and a
// sparkline.
//
// The cost per request is a few atomic additions: a Series keeps running
// totals only, and a sampler (Recorder.Sample, driven by RunSampler once a
// minute, on the minute) closes each minute by subtracting the totals at the
// previous boundary. Nothing is allocated and no lock is taken per request,
// and no count is lost at a minute's edge: what arrives after a sample simply
// belongs to the next minute. Because minutes are wall-clock minutes, the
// counts of several kas nodes add up minute by minute (Merge).
package traffic

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// HistoryMinutes is how many minutes of history a series keeps, the
// current one included.
const HistoryMinutes = 60

// Failure describes the last failed request of a series.
type Failure struct {
	Time          time.Time `json:"time"`
	Message       string    `json:"message"`
	CorrelationID string    `json:"correlation_id,omitempty"`
}

// totals are running counts.
type totals struct {
	requests, errors, bytesIn, bytesOut uint64
}

func (t totals) minus(o totals) totals {
	return totals{t.requests - o.requests, t.errors - o.errors, t.bytesIn - o.bytesIn, t.bytesOut - o.bytesOut}
}

// Series counts one stream of requests. The zero value is ready to use.
type Series struct {
	requests, errors, bytesIn, bytesOut atomic.Uint64
	lastFailure                         atomic.Pointer[Failure]

	mu      sync.Mutex // guards the history, touched once a minute and by readers
	sampled bool       // whether base and sampledAt are set
	// base are the totals at the last sample, taken at the start of minute
	// sampledAt (Unix minutes): everything above them belongs to the
	// minute in progress.
	base      totals
	sampledAt int64
	minutes   [HistoryMinutes]minute // minute m at index m % HistoryMinutes
}

// minute is one closed minute's counts.
type minute struct {
	at int64 // Unix minute; 0 for an unused slot
	totals
}

// Observe counts one request: whether it failed and the bytes of its
// request and response bodies. It is safe for concurrent use and allocates
// nothing.
func (s *Series) Observe(failed bool, bytesIn, bytesOut int64) {
	s.requests.Add(1)
	if failed {
		s.errors.Add(1)
	}
	if bytesIn > 0 {
		s.bytesIn.Add(uint64(bytesIn))
	}
	if bytesOut > 0 {
		s.bytesOut.Add(uint64(bytesOut))
	}
}

// Fail remembers f as the last failure (Observe counts it).
func (s *Series) Fail(f Failure) { s.lastFailure.Store(&f) }

// LastFailure is the last failure remembered, or nil.
func (s *Series) LastFailure() *Failure { return s.lastFailure.Load() }

func (s *Series) load() totals {
	return totals{s.requests.Load(), s.errors.Load(), s.bytesIn.Load(), s.bytesOut.Load()}
}

// Sample closes the minute before boundary (a Unix minute): everything
// counted since the previous sample is recorded as that minute's. Samples
// must come in increasing order; a repeated boundary is ignored.
func (s *Series) Sample(boundary int64) {
	cur := s.load()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sampled && boundary <= s.sampledAt {
		return
	}
	closed := boundary - 1
	s.minutes[mod(closed)] = minute{at: closed, totals: cur.minus(s.base)}
	s.base, s.sampledAt, s.sampled = cur, boundary, true
}

// Minutes returns the series' counts per minute for the hour up to now,
// the minute in progress last.
func (s *Series) Minutes(now time.Time) Minutes {
	cur := s.load()
	nowMinute := unixMinute(now)
	m := newMinutes(nowMinute)
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := range HistoryMinutes - 1 {
		at := nowMinute - HistoryMinutes + 1 + int64(i)
		if slot := s.minutes[mod(at)]; slot.at == at && at != 0 {
			m.set(i, slot.totals)
		}
	}
	// Since the last sample: the minute in progress (or, if the sampler is
	// late, the minutes since it last ran, shown as the current one).
	m.set(HistoryMinutes-1, cur.minus(s.base))
	m.LastFailure = s.lastFailure.Load()
	return m
}

func mod(m int64) int64 { return ((m % HistoryMinutes) + HistoryMinutes) % HistoryMinutes }

func unixMinute(t time.Time) int64 { return t.Unix() / 60 }

// Minutes are counts per wall-clock minute over the last hour: entry i of
// each slice is Unix minute Last-HistoryMinutes+1+i, the last entry being
// the minute in progress when they were taken. It is how one node publishes
// its counts to the others (JSON), and what Merge adds up.
type Minutes struct {
	Last        int64    `json:"last_minute"`
	Requests    []uint64 `json:"requests"`
	Errors      []uint64 `json:"errors"`
	BytesIn     []uint64 `json:"bytes_in"`
	BytesOut    []uint64 `json:"bytes_out"`
	LastFailure *Failure `json:"last_failure,omitempty"`
}

func newMinutes(last int64) Minutes {
	return Minutes{
		Last:     last,
		Requests: make([]uint64, HistoryMinutes),
		Errors:   make([]uint64, HistoryMinutes),
		BytesIn:  make([]uint64, HistoryMinutes),
		BytesOut: make([]uint64, HistoryMinutes),
	}
}

func (m Minutes) set(i int, t totals) {
	m.Requests[i], m.Errors[i], m.BytesIn[i], m.BytesOut[i] = t.requests, t.errors, t.bytesIn, t.bytesOut
}

// at returns the counts of Unix minute u (zero outside the hour m covers or
// for malformed slices from another node).
func (m Minutes) at(u int64) totals {
	i := int(u - (m.Last - HistoryMinutes + 1))
	get := func(s []uint64) uint64 {
		if i < 0 || i >= len(s) {
			return 0
		}
		return s[i]
	}
	return totals{get(m.Requests), get(m.Errors), get(m.BytesIn), get(m.BytesOut)}
}

// Merge adds up several series' minutes (the same agent on several nodes)
// as of now's minute; the latest failure wins.
func Merge(now time.Time, all ...Minutes) Minutes {
	out := newMinutes(unixMinute(now))
	for _, m := range all {
		for i := range HistoryMinutes {
			t := m.at(out.Last - HistoryMinutes + 1 + int64(i))
			out.Requests[i] += t.requests
			out.Errors[i] += t.errors
			out.BytesIn[i] += t.bytesIn
			out.BytesOut[i] += t.bytesOut
		}
		if f := m.LastFailure; f != nil && (out.LastFailure == nil || f.Time.After(out.LastFailure.Time)) {
			out.LastFailure = f
		}
	}
	return out
}

// Window is what happened over the last few minutes.
type Window struct {
	Requests uint64 `json:"requests"`
	Errors   uint64 `json:"errors"`
	// RequestsPerMinute is Requests divided by the minutes the window
	// covers: its length, or the time since counting started if shorter,
	// but at least one minute.
	RequestsPerMinute float64 `json:"requests_per_minute"`
	// ErrorRate is Errors/Requests, 0 without requests.
	ErrorRate float64 `json:"error_rate"`
	BytesIn   uint64  `json:"bytes_in"`
	BytesOut  uint64  `json:"bytes_out"`
}

// Window sums the last n minutes up to now (the minute in progress and the
// n-1 before it); since is when counting started.
func (m Minutes) Window(now, since time.Time, n int) Window {
	var w Window
	nowMinute := unixMinute(now)
	for u := nowMinute - int64(n) + 1; u <= nowMinute; u++ {
		t := m.at(u)
		w.Requests += t.requests
		w.Errors += t.errors
		w.BytesIn += t.bytesIn
		w.BytesOut += t.bytesOut
	}
	start := time.Unix((nowMinute-int64(n)+1)*60, 0)
	if since.After(start) {
		start = since
	}
	covered := max(now.Sub(start).Minutes(), 1)
	w.RequestsPerMinute = float64(w.Requests) / covered
	if w.Requests > 0 {
		w.ErrorRate = float64(w.Errors) / float64(w.Requests)
	}
	return w
}

// Recorder keeps a Series per agent, created at the agent's first request.
type Recorder struct {
	agents sync.Map // int64 agent ID → *Series
}

// Agent returns the agent's series, creating it on first use.
func (r *Recorder) Agent(agentID int64) *Series {
	if s, ok := r.agents.Load(agentID); ok {
		return s.(*Series)
	}
	s, _ := r.agents.LoadOrStore(agentID, &Series{})
	return s.(*Series)
}

// Sample closes the minute before boundary in every agent's series.
func (r *Recorder) Sample(boundary int64) {
	r.agents.Range(func(_, s any) bool {
		s.(*Series).Sample(boundary)
		return true
	})
}

// Minutes returns every agent's minutes as of now; agents without a request
// in the last hour are left out.
func (r *Recorder) Minutes(now time.Time) map[int64]Minutes {
	out := map[int64]Minutes{}
	r.agents.Range(func(id, s any) bool {
		m := s.(*Series).Minutes(now)
		if m.active() {
			out[id.(int64)] = m
		}
		return true
	})
	return out
}

func (m Minutes) active() bool {
	for _, n := range m.Requests {
		if n > 0 {
			return true
		}
	}
	return false
}

// RunSampler calls sample with each minute's boundary (a Unix minute) just
// after the minute starts, until ctx ends.
func RunSampler(ctx context.Context, sample func(boundary int64)) {
	for {
		now := time.Now()
		next := now.Truncate(time.Minute).Add(time.Minute)
		t := time.NewTimer(next.Sub(now))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
			sample(unixMinute(next))
		}
	}
}
