package tunnel

import (
	"crypto/sha256"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// Limits on connection attempts whose token kas refused, per client
// address. An attempt costs a GitLab call (or a cache entry) before kas
// knows whether the token is real, so a client sending made-up tokens is
// slowed down per address, and the table of addresses is bounded: memory
// does not grow with what callers send. Attempts with tokens kas accepts
// cost nothing here, so agents behind one address (a NAT, or a load
// balancer without agent.trusted_proxies) are not held back by each other.
const (
	refusedPerAddressPerMinute = 60
	maxLimitedAddresses        = 4096
	// sweepEvery is how often idle entries are dropped from a table.
	sweepEvery = time.Minute
)

// limiterEntry is one rate limit and when it was last used.
type limiterEntry struct {
	limiter *rate.Limiter
	seen    time.Time
}

// refusalLimiter counts, per client address (an IPv6 address by its /64,
// which one host usually holds whole), the connection attempts whose token
// was refused, and blocks an address that used up its allowance until it
// refills.
type refusalLimiter struct {
	perMinute int
	max       int

	mu        sync.Mutex
	entries   map[netip.Prefix]*limiterEntry
	lastSweep time.Time
}

func newRefusalLimiter(perMinute, max int) *refusalLimiter {
	return &refusalLimiter{perMinute: perMinute, max: max, entries: map[netip.Prefix]*limiterEntry{}}
}

// blocked reports whether addr has no refused attempt left.
func (l *refusalLimiter) blocked(addr string, now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	ent := l.entries[addressKey(addr)]
	return ent != nil && ent.limiter.TokensAt(now) < 1
}

// refused counts one refused attempt from addr.
func (l *refusalLimiter) refused(addr string, now time.Time) {
	key := addressKey(addr)
	l.mu.Lock()
	defer l.mu.Unlock()
	ent := l.entries[key]
	if ent == nil {
		l.makeRoom(now)
		ent = &limiterEntry{limiter: rate.NewLimiter(rate.Limit(float64(l.perMinute)/60), l.perMinute)}
		l.entries[key] = ent
	}
	ent.seen = now
	ent.limiter.AllowN(now, 1)
}

// size is how many addresses the table holds.
func (l *refusalLimiter) size() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.entries)
}

// makeRoom keeps the table below its bound: entries whose allowance has
// refilled are dropped at most once a minute, or at once when the table is
// full; if it is still full, arbitrary entries go, down to 90%.
func (l *refusalLimiter) makeRoom(now time.Time) {
	full := len(l.entries) >= l.max
	if !full && now.Sub(l.lastSweep) < sweepEvery {
		return
	}
	l.lastSweep = now
	for k, ent := range l.entries {
		if ent.limiter.TokensAt(now) >= float64(l.perMinute) {
			delete(l.entries, k)
		}
	}
	for k := range l.entries { // map order is arbitrary: random eviction
		if len(l.entries) < l.max*9/10 {
			break
		}
		delete(l.entries, k)
	}
}

// addressKey is the table key of a client address: the address itself for
// IPv4, its /64 for IPv6, and one shared key for what is not an IP address
// (a Unix socket's peer).
func addressKey(addr string) netip.Prefix {
	ip, err := netip.ParseAddr(addr)
	if err != nil {
		return netip.Prefix{}
	}
	ip = ip.Unmap()
	bits := 32
	if ip.Is6() {
		bits = 64
	}
	p, _ := ip.Prefix(bits)
	return p
}

// tokenLimiter limits connections per agent token
// (agent.listen.connections_per_token_per_minute). It is asked only once
// GitLab has accepted the token, so it holds an entry per real token: a
// made-up token never gets one. Tokens are kept as SHA-256 digests so the
// limiter never holds a secret.
type tokenLimiter struct {
	perMinute int
	mu        sync.Mutex
	limiters  map[[sha256.Size]byte]*limiterEntry
	lastSweep time.Time
}

func newTokenLimiter(perMinute int) *tokenLimiter {
	return &tokenLimiter{perMinute: perMinute, limiters: map[[sha256.Size]byte]*limiterEntry{}}
}

func (l *tokenLimiter) allow(token string, now time.Time) bool {
	if l.perMinute <= 0 {
		return true
	}
	key := sha256.Sum256([]byte(token))
	l.mu.Lock()
	defer l.mu.Unlock()
	// Forget tokens idle for two minutes; their buckets are full again anyway.
	if now.Sub(l.lastSweep) > sweepEvery {
		for k, ent := range l.limiters {
			if now.Sub(ent.seen) > 2*time.Minute {
				delete(l.limiters, k)
			}
		}
		l.lastSweep = now
	}
	ent := l.limiters[key]
	if ent == nil {
		ent = &limiterEntry{limiter: rate.NewLimiter(rate.Limit(float64(l.perMinute)/60), l.perMinute)}
		l.limiters[key] = ent
	}
	ent.seen = now
	return ent.limiter.AllowN(now, 1)
}

// size is how many tokens the table holds.
func (l *tokenLimiter) size() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.limiters)
}
