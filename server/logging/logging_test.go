package logging

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"testing"
)

func TestParseLevel(t *testing.T) {
	tests := []struct {
		in      string
		want    slog.Level
		wantErr bool
	}{
		{"debug", slog.LevelDebug, false},
		{"info", slog.LevelInfo, false},
		{"warn", slog.LevelWarn, false},
		{"error", slog.LevelError, false},
		{"verbose", 0, true},
	}
	for _, tc := range tests {
		got, err := ParseLevel(tc.in)
		if (err != nil) != tc.wantErr || (!tc.wantErr && got != tc.want) {
			t.Errorf("ParseLevel(%q) = %v, %v", tc.in, got, err)
		}
	}
}

func TestRecentKeepsNewestWarnings(t *testing.T) {
	var out bytes.Buffer
	recent := NewRecent(3)
	log := New(&out, slog.LevelDebug, recent).With("agent_id", 7)
	log.Info("not kept")
	for _, msg := range []string{"w1", "w2", "w3", "w4"} {
		log.Warn(msg, "error", "boom")
	}
	got := recent.Entries()
	if len(got) != 3 || got[0].Message != "w4" || got[2].Message != "w2" {
		t.Fatalf("entries %+v, want w4, w3, w2", got)
	}
	if got[0].Attrs["agent_id"] != "7" || got[0].Attrs["error"] != "boom" {
		t.Fatalf("attributes lost: %+v", got[0].Attrs)
	}
	lines := bytes.Split(bytes.TrimSpace(out.Bytes()), []byte("\n"))
	if len(lines) != 5 {
		t.Fatalf("%d log lines, want 5", len(lines))
	}
	for _, l := range lines {
		if !json.Valid(l) {
			t.Fatalf("not JSON: %s", l)
		}
	}
}
