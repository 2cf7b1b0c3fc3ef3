package tunnel

import (
	"fmt"
	"testing"
	"time"
)

func TestRefusalLimiter(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	l := newRefusalLimiter(3, 100)
	for i := range 3 {
		if l.blocked("203.0.113.7", now) {
			t.Fatalf("blocked after %d refusals, want after 3", i)
		}
		l.refused("203.0.113.7", now)
	}
	if !l.blocked("203.0.113.7", now) {
		t.Fatal("not blocked after 3 refusals")
	}
	if l.blocked("203.0.113.8", now) {
		t.Fatal("another address is blocked too")
	}
	if l.blocked("203.0.113.7", now.Add(20*time.Second)) {
		t.Fatal("still blocked after a third of a minute (one refusal's worth)")
	}
	// An IPv6 host usually holds a whole /64.
	for i := range 3 {
		l.refused(fmt.Sprintf("2001:db8:1:2::%x", i+1), now)
	}
	if !l.blocked("2001:db8:1:2::ffff", now) || l.blocked("2001:db8:1:3::1", now) {
		t.Fatal("IPv6 addresses are not limited by their /64")
	}
}

// TestRefusalLimiterIsBounded: addresses without end (a botnet, or an IPv6
// range) do not grow the table past its bound.
func TestRefusalLimiterIsBounded(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	l := newRefusalLimiter(60, 1000)
	for i := range 20000 {
		l.refused(fmt.Sprintf("10.%d.%d.%d", i>>16&255, i>>8&255, i&255), now.Add(time.Duration(i)*time.Millisecond))
	}
	if n := l.size(); n > 1000 {
		t.Fatalf("the table holds %d addresses, want at most 1000", n)
	}
	// Entries whose allowance has refilled are dropped on the next sweep.
	later := now.Add(time.Hour)
	l.refused("192.0.2.1", later)
	if n := l.size(); n != 1 {
		t.Fatalf("an hour later the table holds %d addresses, want 1", n)
	}
}
