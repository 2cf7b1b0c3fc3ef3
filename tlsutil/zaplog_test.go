package tlsutil

import (
	"errors"
	"log/slog"
	"strings"
	"testing"

	"go.uber.org/zap"
)

func TestZapLogger(t *testing.T) {
	var buf logBuffer
	log := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelInfo}))
	z := zapLogger(log).Named("obtain").With(zap.String("identifier", "kas.test"))

	z.Debug("hidden below the level")
	z.Info("obtaining certificate", zap.Int("attempt", 2))
	z.Error("could not get certificate", zap.Error(errors.New("connection refused")))

	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	want := []string{
		`level=INFO msg="obtaining certificate" identifier=kas.test component=certmagic.obtain attempt=2`,
		`level=ERROR msg="could not get certificate" identifier=kas.test component=certmagic.obtain error="connection refused"`,
	}
	if len(lines) != len(want) {
		t.Fatalf("got %d lines, want %d:\n%s", len(lines), len(want), buf.String())
	}
	for i, w := range want {
		if !strings.HasSuffix(lines[i], w) {
			t.Errorf("line %d = %q, want it to end with %q", i, lines[i], w)
		}
	}
}
