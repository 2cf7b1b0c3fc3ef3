package gitlab

import (
	"errors"
	"strings"
	"testing"
	"time"
)

type fakeClock struct{ now time.Time }

func (c *fakeClock) Now() time.Time { return c.now }

func TestCacheKeepsOnlyWhatMayBeCached(t *testing.T) {
	clk := &fakeClock{now: time.Unix(1_700_000_000, 0)}
	c := newCache(time.Minute, 10*time.Second, 100, clk.Now)
	refused := &Error{StatusCode: 403, Err: ErrForbidden}
	tests := []struct {
		key    string
		body   []byte
		err    error
		stored bool
	}{
		{"answer", []byte(`{}`), nil, true},
		{"refusal", nil, refused, true},
		{"5xx", nil, &Error{StatusCode: 502, Message: "Bad Gateway"}, false},
		{"network", nil, &Error{Message: "connection reset", Err: errors.New("connection reset")}, false},
	}
	for _, tt := range tests {
		c.put(tt.key, tt.body, tt.err)
		_, err, _, ok := c.get(tt.key)
		if ok != tt.stored {
			t.Errorf("%s: stored = %v, want %v", tt.key, ok, tt.stored)
		}
		if ok && err != tt.err {
			t.Errorf("%s: got error %v, want %v", tt.key, err, tt.err)
		}
	}
	clk.now = clk.now.Add(10 * time.Second)
	if _, _, _, ok := c.get("refusal"); ok {
		t.Error("refusal outlived its TTL")
	}
	if _, _, _, ok := c.get("answer"); !ok {
		t.Error("answer expired with the refusal TTL")
	}
	if len(c.entries) != 1 {
		t.Errorf("%d entries after get met an expired one, want 1", len(c.entries))
	}
}

func TestCacheDisabled(t *testing.T) {
	c := newCache(-1, -1, 100, time.Now)
	c.put("k", []byte(`{}`), nil)
	c.put("r", nil, &Error{StatusCode: 401, Err: ErrUnauthorized})
	if len(c.entries) != 0 {
		t.Errorf("a cache with negative TTLs stored %d entries", len(c.entries))
	}
}

func TestCacheStaysBounded(t *testing.T) {
	clk := &fakeClock{now: time.Unix(1_700_000_000, 0)}
	const limit = 50
	c := newCache(time.Minute, time.Minute, limit, clk.Now)
	for i := range 10 * limit {
		c.put(cacheKey("q", strings.Repeat("x", i)), []byte(`{}`), nil)
		if len(c.entries) > limit {
			t.Fatalf("%d entries after %d puts, limit %d", len(c.entries), i+1, limit)
		}
	}
	last := cacheKey("q", strings.Repeat("x", 10*limit-1))
	if _, _, _, ok := c.get(last); !ok {
		t.Error("the newest entry was evicted")
	}

	// Once everything expired, the next put sweeps it all away.
	clk.now = clk.now.Add(time.Minute)
	c.put("fresh", []byte(`{}`), nil)
	if len(c.entries) != 1 {
		t.Errorf("%d entries after expiry and a put, want 1", len(c.entries))
	}
}

func TestCacheKey(t *testing.T) {
	token := "glpat-secret-token"
	key := cacheKey("authorize_proxy_user", "7", "personal_access_token", token, "")
	if strings.Contains(key, token) {
		t.Errorf("key %q holds the token", key)
	}
	distinct := []string{
		key,
		cacheKey("authorize_proxy_user", "7", "personal_access_token", token, "csrf"),
		cacheKey("authorize_proxy_user", "8", "personal_access_token", token, ""),
		cacheKey("allowed_agents", "7", "personal_access_token", token, ""),
		cacheKey("q", "ab", "c"),
		cacheKey("q", "a", "bc"),
	}
	seen := map[string]bool{}
	for _, k := range distinct {
		if seen[k] {
			t.Errorf("key collision: %q", k)
		}
		seen[k] = true
	}
	if cacheKey("q", "a", "b") != cacheKey("q", "a", "b") {
		t.Error("key not deterministic")
	}
}
