package registry

import "testing"

func TestNewConnectionIDIsRandomAndPositive(t *testing.T) {
	const n = 10000
	seen := make(map[int64]bool, n)
	var high int
	for range n {
		id := NewConnectionID()
		if id <= 0 {
			t.Fatalf("connection ID %d, want positive", id)
		}
		if seen[id] {
			t.Fatalf("connection ID %d twice in %d", id, n)
		}
		seen[id] = true
		if id >= 1<<62 {
			high++
		}
	}
	// Half of all random positive int63 values have bit 62 set; a counter
	// or a narrow range would not.
	if high < n*4/10 || high > n*6/10 {
		t.Fatalf("%d of %d IDs have bit 62 set, want about half", high, n)
	}
}
