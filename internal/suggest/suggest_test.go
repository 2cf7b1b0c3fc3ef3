package suggest

import "testing"

func TestClosest(t *testing.T) {
	known := []string{"address", "network", "certificate_file", "key_file"}
	tests := []struct {
		word   string
		max    int
		want   string
		wantOK bool
	}{
		{"adress", 2, "address", true},
		{"netwrk", 2, "network", true},
		{"keyfile", 2, "key_file", true},
		{"zzzzzzz", 2, "", false},
		{"address", 0, "address", true},
	}
	for _, tc := range tests {
		got, ok := Closest(tc.word, known, tc.max)
		if ok != tc.wantOK || (ok && got != tc.want) {
			t.Errorf("Closest(%q) = %q, %v; want %q, %v", tc.word, got, ok, tc.want, tc.wantOK)
		}
	}
	if _, ok := Closest("x", nil, 5); ok {
		t.Error("Closest with no known words found one")
	}
}

func TestDistance(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		want int
	}{{"", "", 0}, {"abc", "", 3}, {"kitten", "sitting", 3}, {"ci_acess", "ci_access", 1}} {
		if got := Distance(tc.a, tc.b); got != tc.want {
			t.Errorf("Distance(%q, %q) = %d, want %d", tc.a, tc.b, got, tc.want)
		}
	}
}
