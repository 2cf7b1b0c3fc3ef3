package gitlab_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// TestHealth counts calls and failures: 5xx and unanswered calls fail,
// refusals (401) are answers. The last failure keeps GitLab's hint.
func TestHealth(t *testing.T) {
	status := http.StatusUnauthorized
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(status)
		_, _ = w.Write([]byte(`{"message":"nope"}`))
	}))
	defer srv.Close()
	c := newClient(t, srv.URL, nil)
	if h := c.Health(time.Now()); !h.LastCall.IsZero() || h.Minutes.LastFailure != nil {
		t.Fatalf("health before any call: %+v", h)
	}
	before := time.Now()
	_, _ = c.GetAgentInfo(context.Background(), "token-1") // 401: an answer
	status = http.StatusBadGateway
	_, _ = c.GetAgentInfo(context.Background(), "token-2")
	srv.Close()
	_, _ = c.GetAgentInfo(context.Background(), "token-3") // connection refused

	h := c.Health(time.Now())
	if h.LastCall.Before(before.Truncate(time.Second)) {
		t.Errorf("last call %s, want after %s", h.LastCall, before)
	}
	w := h.Minutes.Window(time.Now(), before.Add(-time.Minute), 5)
	// 401 and 502 each answer the current path; the 502 is retried on
	// the legacy path by the agent_info fallback only after a 404.
	if w.Requests < 3 || w.Errors != w.Requests-1 {
		t.Errorf("window %+v, want every call but the 401 failed", w)
	}
	f := h.Minutes.LastFailure
	if f == nil || !strings.Contains(f.Message, "is gitlab.address (") || strings.Contains(f.Message, "token-3") {
		t.Errorf("last failure %+v, want the connection refused with its hint and no token", f)
	}
	// Sampled at the next minute, the calls are that minute's.
	next := time.Now().Truncate(time.Minute).Add(time.Minute)
	c.SampleHealth(next.Unix() / 60)
	if w := c.Health(next.Add(time.Second)).Minutes.Window(next.Add(time.Second), before.Add(-time.Minute), 5); w.Requests < 3 {
		t.Errorf("after the minute closed: %+v, want the calls counted in it", w)
	}
}
