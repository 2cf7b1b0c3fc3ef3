package tokencheck

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kasproject/kas/server/gitlab"
)

// fakeGitLab answers Check from a table that the test changes, and records
// when each token was asked about.
type fakeGitLab struct {
	mu      sync.Mutex
	answers map[string]func() (*gitlab.AgentInfo, error)
	asked   map[string][]time.Time
}

func newFakeGitLab() *fakeGitLab {
	return &fakeGitLab{answers: map[string]func() (*gitlab.AgentInfo, error){}, asked: map[string][]time.Time{}}
}

func (f *fakeGitLab) set(token string, answer func() (*gitlab.AgentInfo, error)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.answers[token] = answer
}

func (f *fakeGitLab) check(_ context.Context, token string) (*gitlab.AgentInfo, error) {
	f.mu.Lock()
	f.asked[token] = append(f.asked[token], time.Now())
	answer := f.answers[token]
	f.mu.Unlock()
	return answer()
}

func (f *fakeGitLab) times(token string) []time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]time.Time(nil), f.asked[token]...)
}

func valid(agentID int64) func() (*gitlab.AgentInfo, error) {
	return func() (*gitlab.AgentInfo, error) { return &gitlab.AgentInfo{AgentID: agentID}, nil }
}

func refused() (*gitlab.AgentInfo, error) {
	return nil, &gitlab.Error{Op: "check agent token", StatusCode: 401, Message: "401 Unauthorized", Err: gitlab.ErrUnauthorized}
}

func unreachable() (*gitlab.AgentInfo, error) {
	return nil, &gitlab.Error{Op: "check agent token", Message: "connection refused", Err: errors.New("connection refused")}
}

func start(t *testing.T, f *fakeGitLab, period time.Duration) *Checker {
	t.Helper()
	c, err := New(Options{Check: f.check, Period: period})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { c.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return c
}

func waitRevoked(t *testing.T, w *Watch, within time.Duration) {
	t.Helper()
	select {
	case <-w.Revoked():
	case <-time.After(within):
		t.Fatalf("not revoked within %s", within)
	}
}

// TestOneCheckPerTokenPerPeriod: however many tunnels use a token, it is
// asked about once per period, never sooner than nine tenths of it.
func TestOneCheckPerTokenPerPeriod(t *testing.T) {
	const period = 200 * time.Millisecond
	f := newFakeGitLab()
	f.set("tok", valid(7))
	c := start(t, f, period)
	for range 3 { // three replicas
		w := c.Watch("tok", gitlab.AgentInfo{AgentID: 7})
		t.Cleanup(w.Stop)
	}
	time.Sleep(5 * period)
	times := f.times("tok")
	if len(times) == 0 || len(times) > 6 {
		t.Fatalf("asked %d times in 5 periods, want 1 to 6 (3 tunnels, one token)", len(times))
	}
	for i := 1; i < len(times); i++ {
		if d := times[i].Sub(times[i-1]); d < period*9/10-10*time.Millisecond {
			t.Fatalf("asked again after %s, want at least %s", d, period*9/10)
		}
	}
}

// TestFirstCheckCountsFromValidation: a token accepted from GitLab's cache
// long ago is checked soon, so a revocation is noticed within a period of
// the answer that let the tunnel in, not of the connection.
func TestFirstCheckCountsFromValidation(t *testing.T) {
	const period = 2 * time.Second
	f := newFakeGitLab()
	f.set("tok", refused)
	c := start(t, f, period)
	start := time.Now()
	w := c.Watch("tok", gitlab.AgentInfo{AgentID: 7, ValidatedAt: time.Now().Add(-period + 200*time.Millisecond)})
	defer w.Stop()
	waitRevoked(t, w, period)
	if d := time.Since(start); d > period/2 {
		t.Fatalf("revoked after %s, want within about 200ms", d)
	}
}

// TestRefusedTokenRevokesItsTunnels: GitLab's 401 (or a token that names
// another agent now) closes every tunnel of that token, and only those.
func TestRefusedTokenRevokesItsTunnels(t *testing.T) {
	const period = 100 * time.Millisecond
	f := newFakeGitLab()
	f.set("revoked", refused)
	f.set("moved", valid(8))
	f.set("good", valid(9))
	c := start(t, f, period)
	a, b := c.Watch("revoked", gitlab.AgentInfo{AgentID: 7}), c.Watch("revoked", gitlab.AgentInfo{AgentID: 7})
	moved := c.Watch("moved", gitlab.AgentInfo{AgentID: 7})
	good := c.Watch("good", gitlab.AgentInfo{AgentID: 9})
	defer good.Stop()
	for _, w := range []*Watch{a, b} {
		waitRevoked(t, w, 5*period)
		if err := w.Err(); !errors.Is(err, gitlab.ErrUnauthorized) || strings.Contains(err.Error(), "revoked") {
			t.Errorf("Err() = %v, want the refusal, without the token", err)
		}
	}
	waitRevoked(t, moved, 5*period)
	if err := moved.Err(); !strings.Contains(err.Error(), "now belongs to agent 8") {
		t.Errorf("Err() = %v, want the other agent named", err)
	}
	time.Sleep(3 * period)
	select {
	case <-good.Revoked():
		t.Fatal("a valid token's tunnel was revoked")
	default:
	}
	if n := len(f.times("revoked")); n != 1 {
		t.Errorf("the revoked token was asked about %d times, want once", n)
	}
}

// TestGitLabTroubleKeepsTunnels: network errors and 5xx say nothing about
// the token; the tunnels stay and the check is tried again.
func TestGitLabTroubleKeepsTunnels(t *testing.T) {
	const period = 100 * time.Millisecond
	f := newFakeGitLab()
	f.set("tok", unreachable)
	c := start(t, f, period)
	w := c.Watch("tok", gitlab.AgentInfo{AgentID: 7})
	defer w.Stop()
	time.Sleep(5 * period)
	select {
	case <-w.Revoked():
		t.Fatalf("revoked on GitLab trouble: %v", w.Err())
	default:
	}
	if n := len(f.times("tok")); n < 2 {
		t.Fatalf("asked %d times, want the check tried again", n)
	}
	f.set("tok", refused) // GitLab is back, and the token was revoked meanwhile
	waitRevoked(t, w, 5*period)
}

// TestStoppedWatchesAreForgotten: a token no tunnel uses is not asked about.
func TestStoppedWatchesAreForgotten(t *testing.T) {
	const period = 50 * time.Millisecond
	f := newFakeGitLab()
	f.set("tok", valid(7))
	c := start(t, f, period)
	w := c.Watch("tok", gitlab.AgentInfo{AgentID: 7})
	w.Stop()
	time.Sleep(4 * period)
	if n := len(f.times("tok")); n != 0 {
		t.Fatalf("asked %d times about a token no tunnel uses", n)
	}
}
