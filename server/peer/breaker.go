package peer

import (
	"sync"
	"sync/atomic"
	"time"
)

// How long a failing peer URL is skipped: breakerBase after its first
// failure, doubling with each further one up to breakerMax. A node frozen
// or cut off is then tried about once a minute, so one request a minute
// pays the accept timeout; a node that comes back is used again after its
// first successful call.
const (
	breakerBase = 5 * time.Second
	breakerMax  = time.Minute
	// breakerForget is how long the failure of a URL nobody tried again is
	// remembered: nodes come and go, and their URLs with them.
	breakerForget = 10 * time.Minute
)

// breaker is a circuit breaker per peer URL. A URL that failed is skipped
// for a while: requests go first to the URLs and nodes that did not fail,
// and to a skipped one only when nothing else is left, so a request is never
// refused for a node's past. The first call after the pause is the trial: it
// closes the breaker on success, or doubles the pause.
type breaker struct {
	now func() time.Time
	// failing counts the URLs in peers, so that the common case, every
	// peer healthy, costs no lock.
	failing atomic.Int32

	mu    sync.Mutex
	peers map[string]*peerHealth
}

// peerHealth is one failing URL's state.
type peerHealth struct {
	failures  int
	openUntil time.Time // skipped until then
	lastFail  time.Time
	cause     string // what failed last, as logged
}

func newBreaker() *breaker {
	return &breaker{now: time.Now, peers: map[string]*peerHealth{}}
}

// failed records a failure of rawURL for the given cause and pauses it. It
// reports whether the cause is new for this URL (the first failure, or a
// different one than last time), which is when it is worth logging, and for
// how long the URL is now skipped.
func (b *breaker) failed(rawURL, cause string) (newCause bool, pause time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := b.now()
	for u, h := range b.peers {
		if now.Sub(h.lastFail) > breakerForget {
			delete(b.peers, u)
		}
	}
	h := b.peers[rawURL]
	if h == nil {
		h = &peerHealth{}
		b.peers[rawURL] = h
	}
	b.failing.Store(int32(len(b.peers)))
	pause = breakerBase << min(h.failures, 10)
	pause = min(pause, breakerMax)
	h.failures++
	h.openUntil = now.Add(pause)
	h.lastFail = now
	newCause = h.cause != cause
	h.cause = cause
	return newCause, pause
}

// succeeded closes rawURL's breaker, returning how many failures in a row
// it had (0 if none).
func (b *breaker) succeeded(rawURL string) int {
	if b.failing.Load() == 0 {
		return 0
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	h := b.peers[rawURL]
	if h == nil {
		return 0
	}
	delete(b.peers, rawURL)
	b.failing.Store(int32(len(b.peers)))
	return h.failures
}

// order returns nodes with those that can be tried now first, each with
// its URLs that can be tried now first, keeping the order otherwise. nodes
// itself is returned, unchanged, when nothing is paused.
func (b *breaker) order(nodes [][]string) [][]string {
	if b.failing.Load() == 0 {
		return nodes
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	now := b.now()
	paused := func(u string) bool {
		h := b.peers[u]
		return h != nil && now.Before(h.openUntil)
	}
	var ready, held [][]string
	for _, urls := range nodes {
		var ok, skip []string
		for _, u := range urls {
			if paused(u) {
				skip = append(skip, u)
			} else {
				ok = append(ok, u)
			}
		}
		switch {
		case len(skip) == 0:
			ready = append(ready, urls)
		case len(ok) == 0:
			held = append(held, urls)
		default:
			ready = append(ready, append(ok, skip...))
		}
	}
	return append(ready, held...)
}
