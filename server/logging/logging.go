// Package logging builds kas's JSON logger and keeps the most recent errors
// so the status page can show them.
package logging

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"time"
)

// ParseLevel maps observability.logging.level to a slog level.
func ParseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return 0, fmt.Errorf("log level %q: want debug, info, warn or error", s)
	}
	return l, nil
}

// New returns a JSON logger writing to w at level, recording warnings and
// errors in recent (which may be nil).
func New(w io.Writer, level slog.Level, recent *Recent) *slog.Logger {
	var h slog.Handler = slog.NewJSONHandler(w, &slog.HandlerOptions{Level: level})
	if recent != nil {
		h = &recordingHandler{Handler: h, recent: recent}
	}
	return slog.New(h)
}

// Entry is one recorded log line.
type Entry struct {
	Time    time.Time         `json:"time"`
	Level   string            `json:"level"`
	Message string            `json:"msg"`
	Attrs   map[string]string `json:"attrs,omitempty"`
}

// Recent keeps the last N warnings and errors.
type Recent struct {
	mu      sync.Mutex
	entries []Entry
	next    int
	full    bool
}

// NewRecent keeps up to n entries.
func NewRecent(n int) *Recent { return &Recent{entries: make([]Entry, n)} }

func (r *Recent) add(e Entry) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.entries[r.next] = e
	r.next = (r.next + 1) % len(r.entries)
	if r.next == 0 {
		r.full = true
	}
}

// Entries returns the recorded entries, newest first.
func (r *Recent) Entries() []Entry {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := r.next
	if r.full {
		n = len(r.entries)
	}
	out := make([]Entry, 0, n)
	for i := 1; i <= n; i++ {
		out = append(out, r.entries[(r.next-i+len(r.entries))%len(r.entries)])
	}
	return out
}

type recordingHandler struct {
	slog.Handler
	recent *Recent
	attrs  []slog.Attr
}

func (h *recordingHandler) Handle(ctx context.Context, rec slog.Record) error {
	if rec.Level >= slog.LevelWarn {
		e := Entry{Time: rec.Time, Level: rec.Level.String(), Message: rec.Message, Attrs: map[string]string{}}
		add := func(a slog.Attr) bool {
			e.Attrs[a.Key] = strings.TrimSpace(a.Value.String())
			return true
		}
		for _, a := range h.attrs {
			add(a)
		}
		rec.Attrs(add)
		h.recent.add(e)
	}
	return h.Handler.Handle(ctx, rec)
}

func (h *recordingHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &recordingHandler{Handler: h.Handler.WithAttrs(attrs), recent: h.recent, attrs: append(h.attrs[:len(h.attrs):len(h.attrs)], attrs...)}
}

func (h *recordingHandler) WithGroup(name string) slog.Handler {
	return &recordingHandler{Handler: h.Handler.WithGroup(name), recent: h.recent, attrs: h.attrs}
}
