package correlation

import (
	"context"
	"testing"
)

func TestNewIDAndContext(t *testing.T) {
	a, b := NewID(), NewID()
	if a == b || !Valid(a) || len(a) != 32 {
		t.Fatalf("NewID gave %q and %q", a, b)
	}
	if got := FromContext(WithID(context.Background(), a)); got != a {
		t.Fatalf("FromContext = %q, want %q", got, a)
	}
	if got := FromContext(context.Background()); got != "" {
		t.Fatalf("empty context gave %q", got)
	}
}

func TestValid(t *testing.T) {
	for id, want := range map[string]bool{
		"abc-123": true, "": false, "has space": false, "new\nline": false, `q"uote`: false, "back\\slash": false, "é": false,
	} {
		if got := Valid(id); got != want {
			t.Errorf("Valid(%q) = %v, want %v", id, got, want)
		}
	}
}
