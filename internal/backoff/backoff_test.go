package backoff

import (
	"testing"
	"time"
)

func TestBackoff(t *testing.T) {
	b := Backoff{Min: 10 * time.Millisecond, Max: 80 * time.Millisecond}
	for i, ceiling := range []time.Duration{10, 20, 40, 80, 80, 80} {
		ceiling *= time.Millisecond
		for range 100 {
			probe := b
			if d := probe.Next(); d <= 0 || d > ceiling {
				t.Fatalf("delay %d = %v, want in (0, %v]", i, d, ceiling)
			}
		}
		b.Next()
	}
	for range 100 {
		if d := b.Longest(); d < 40*time.Millisecond || d > 80*time.Millisecond {
			t.Fatalf("Longest() = %v, want in [40ms, 80ms]", d)
		}
	}
	b.Reset()
	if d := b.Next(); d > 10*time.Millisecond {
		t.Errorf("after Reset delay = %v, want at most 10ms", d)
	}
}
