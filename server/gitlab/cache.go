package gitlab

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"sync"
	"time"
)

// cache keeps GitLab's answers to one question: successful bodies for ttl,
// cacheable refusals (401, 403, 404) for errTTL. It stores the raw JSON body,
// and every caller decodes its own copy, so no caller can change what the
// next one gets.
//
// Memory stays bounded without a goroutine to stop: get drops the expired
// entry it meets, put drops every expired entry at most once per sweep
// interval, and a put into a full cache first drops the expired entries and,
// if that is not enough, arbitrary live ones down to 90% of the limit (so the
// next tenth of puts cost O(1) again).
type cache struct {
	ttl, errTTL time.Duration
	limit       int
	now         func() time.Time
	sweepEvery  time.Duration

	mu        sync.Mutex
	entries   map[string]cacheEntry
	nextSweep time.Time
}

type cacheEntry struct {
	body    []byte
	err     error
	stored  time.Time // when GitLab gave the answer
	expires time.Time
}

func newCache(ttl, errTTL time.Duration, limit int, now func() time.Time) *cache {
	return &cache{
		ttl:        ttl,
		errTTL:     errTTL,
		limit:      limit,
		now:        now,
		sweepEvery: max(ttl, errTTL),
		entries:    make(map[string]cacheEntry),
	}
}

// get returns the stored body or refusal for key and when GitLab gave it,
// ok false on a miss.
func (c *cache) get(key string) (body []byte, err error, stored time.Time, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, found := c.entries[key]
	if !found {
		return nil, nil, time.Time{}, false
	}
	if !c.now().Before(e.expires) {
		delete(c.entries, key)
		return nil, nil, time.Time{}, false
	}
	return e.body, e.err, e.stored, true
}

// put stores the outcome of a call: a body, or an error if it is cacheable.
// Network errors and 5xx are not stored, so the next caller tries again.
func (c *cache) put(key string, body []byte, err error) {
	ttl := c.ttl
	if err != nil {
		if !Cacheable(err) {
			return
		}
		ttl = c.errTTL
	}
	if ttl <= 0 {
		return
	}
	now := c.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if !now.Before(c.nextSweep) {
		c.dropExpired(now)
		c.nextSweep = now.Add(c.sweepEvery)
	}
	if _, replace := c.entries[key]; !replace && len(c.entries) >= c.limit {
		c.dropExpired(now)
		for k := range c.entries { // map order is arbitrary: random eviction
			if len(c.entries) <= c.limit*9/10 {
				break
			}
			delete(c.entries, k)
		}
	}
	c.entries[key] = cacheEntry{body: body, err: err, stored: now, expires: now.Add(ttl)}
}

func (c *cache) dropExpired(now time.Time) {
	for k, e := range c.entries {
		if !now.Before(e.expires) {
			delete(c.entries, k)
		}
	}
}

// cacheKey names a question without keeping its credential: the SHA-256 of
// the length-prefixed fields (so no two field lists collide), after the
// question's name.
func cacheKey(question string, fields ...string) string {
	h := sha256.New()
	var n [8]byte
	for _, f := range fields {
		binary.BigEndian.PutUint64(n[:], uint64(len(f)))
		h.Write(n[:])
		h.Write([]byte(f))
	}
	return question + ":" + hex.EncodeToString(h.Sum(nil))
}
