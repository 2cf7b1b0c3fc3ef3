// Package tokencheck re-validates the tokens of connected agents with
// GitLab (or the standalone files), so that revoking an agent's token ends
// its tunnels within agent.info_cache_ttl instead of at the tunnels'
// max_connection_age.
//
// Any tunnel that authenticated with an agent token registers with the
// Checker (Watch) and selects on the returned Watch's Revoked channel
// beside its other reasons to close. The Checker asks about each token at
// most once per period however many tunnels (agentk replicas, tunnel
// flavours) use it, within a period of the last time the token was
// accepted, with a jitter so that agents connected together are not all
// checked together. A refusal (GitLab's 401, 403 or 404, or a token that
// now names another agent) revokes every tunnel of the token; a network
// error or a 5xx revokes nothing and is tried again sooner.
package tokencheck

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kasproject/kas/server/gitlab"
)

// Options configure a Checker.
type Options struct {
	// Check asks about a token without any cache: the GitLab client's
	// CheckAgentToken, or the standalone backend's GetAgentInfo.
	Check func(ctx context.Context, token string) (*gitlab.AgentInfo, error)
	// Period is agent.info_cache_ttl: every token is checked again within
	// this long of the last time it was accepted.
	Period time.Duration
	// CheckTimeout bounds one check; 0 means 30 s.
	CheckTimeout time.Duration
	Logger       *slog.Logger
	// Registerer receives the checker's metrics; nil means none.
	Registerer prometheus.Registerer
	// Now is the clock; nil means time.Now. Tests set it.
	Now func() time.Time
}

// concurrentChecks bounds the checks in flight, so that a slow GitLab
// faces a few calls at a time rather than one per token.
const concurrentChecks = 4

// Checker re-validates registered tokens until Run's context ends.
type Checker struct {
	opts    Options
	log     *slog.Logger
	now     func() time.Time
	wake    chan struct{} // a token was added whose check is due earlier
	results *prometheus.CounterVec

	mu     sync.Mutex
	tokens map[[sha256.Size]byte]*token
}

// token is one agent token and the tunnels that use it.
type token struct {
	secret   string // needed to ask again; never logged
	agentID  int64
	next     time.Time
	checking bool
	watches  map[*Watch]struct{}
}

// Watch is one tunnel's registration.
type Watch struct {
	c       *Checker
	key     [sha256.Size]byte
	revoked chan struct{}
	once    sync.Once
	err     error // set before revoked is closed
}

// Revoked is closed when the token is no longer accepted; Err says why.
func (w *Watch) Revoked() <-chan struct{} { return w.revoked }

// Err is why the token was revoked, once Revoked is closed; it never
// contains the token.
func (w *Watch) Err() error {
	select {
	case <-w.revoked:
		return w.err
	default:
		return nil
	}
}

// Stop ends the watch, when its tunnel closes for whatever reason. A token
// no tunnel watches any more is forgotten.
func (w *Watch) Stop() {
	c := w.c
	c.mu.Lock()
	defer c.mu.Unlock()
	t := c.tokens[w.key]
	if t == nil {
		return
	}
	delete(t.watches, w)
	if len(t.watches) == 0 {
		delete(c.tokens, w.key)
	}
}

func (w *Watch) revoke(err error) {
	w.once.Do(func() {
		w.err = err
		close(w.revoked)
	})
}

// New returns a checker; run it with Run.
func New(opts Options) (*Checker, error) {
	if opts.Check == nil || opts.Period <= 0 {
		return nil, errors.New("token checker: Check and a positive Period are required")
	}
	if opts.CheckTimeout <= 0 {
		opts.CheckTimeout = 30 * time.Second
	}
	c := &Checker{
		opts:   opts,
		log:    opts.Logger,
		now:    opts.Now,
		wake:   make(chan struct{}, 1),
		tokens: map[[sha256.Size]byte]*token{},
		results: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kas_agent_token_checks_total",
			Help: "Re-validations of connected agents' tokens, by result: valid, refused (the tunnels were closed) or error (GitLab could not answer; tried again).",
		}, []string{"result"}),
	}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	if c.now == nil {
		c.now = time.Now
	}
	if opts.Registerer != nil {
		if err := opts.Registerer.Register(c.results); err != nil {
			return nil, fmt.Errorf("register token checker metrics: %w", err)
		}
	}
	return c, nil
}

// Watch registers a tunnel that authenticated with secret as agent
// info.AgentID, accepted at info.ValidatedAt (zero: just now). Call Stop
// when the tunnel closes.
func (c *Checker) Watch(secret string, info gitlab.AgentInfo) *Watch {
	w := &Watch{c: c, key: sha256.Sum256([]byte(secret)), revoked: make(chan struct{})}
	validated := info.ValidatedAt
	if validated.IsZero() {
		validated = c.now()
	}
	next := c.nextCheck(validated)
	c.mu.Lock()
	t := c.tokens[w.key]
	if t == nil {
		t = &token{secret: secret, agentID: info.AgentID, next: next, watches: map[*Watch]struct{}{}}
		c.tokens[w.key] = t
	} else if next.Before(t.next) {
		t.next = next
	}
	t.watches[w] = struct{}{}
	c.mu.Unlock()
	c.signal()
	return w
}

// nextCheck is when a token accepted at validated is asked about again:
// within a period of it, up to a tenth earlier, at random.
func (c *Checker) nextCheck(validated time.Time) time.Time {
	p := c.opts.Period
	return validated.Add(p - time.Duration(rand.Int64N(int64(p)/10+1)))
}

// retryAfter is how soon a check that got no answer is tried again.
func (c *Checker) retryAfter() time.Duration {
	return min(c.opts.Period, max(c.opts.Period/10, time.Second))
}

// Run checks tokens as they fall due until ctx ends, then waits for the
// checks in flight.
func (c *Checker) Run(ctx context.Context) {
	var inFlight sync.WaitGroup
	defer inFlight.Wait()
	slots := make(chan struct{}, concurrentChecks)
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		due, wait := c.due()
		for _, t := range due {
			select {
			case slots <- struct{}{}:
			case <-ctx.Done():
				c.release(due)
				return
			}
			inFlight.Go(func() {
				defer func() { <-slots }()
				c.check(ctx, t)
			})
		}
		timer.Reset(wait)
		select {
		case <-ctx.Done():
			return
		case <-c.wake:
		case <-timer.C:
		}
	}
}

// due takes the tokens whose check is due (marking them as being checked)
// and says how long until the next one is.
func (c *Checker) due() ([]*token, time.Duration) {
	now := c.now()
	wait := time.Hour
	c.mu.Lock()
	defer c.mu.Unlock()
	var due []*token
	for _, t := range c.tokens {
		if t.checking {
			continue
		}
		if d := t.next.Sub(now); d > 0 {
			wait = min(wait, d)
			continue
		}
		t.checking = true
		due = append(due, t)
	}
	return due, wait
}

// release puts back tokens taken by due but not checked.
func (c *Checker) release(ts []*token) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, t := range ts {
		t.checking = false
	}
}

// check asks about one token and acts on the answer.
func (c *Checker) check(ctx context.Context, t *token) {
	defer c.signal() // the token's next check is set: Run must know it
	cctx, cancel := context.WithTimeout(ctx, c.opts.CheckTimeout)
	info, err := c.opts.Check(cctx, t.secret)
	cancel()
	if ctx.Err() != nil {
		c.release([]*token{t}) // shutting down: no verdict
		return
	}
	refused := gitlab.Cacheable(err)
	if err == nil && info.AgentID != t.agentID {
		err, refused = fmt.Errorf("the token now belongs to agent %d", info.AgentID), true
	}
	now := c.now()

	c.mu.Lock()
	t.checking = false
	var revoked []*Watch
	switch {
	case err == nil:
		t.next = c.nextCheck(now)
	case refused:
		for w := range t.watches {
			revoked = append(revoked, w)
		}
		key := sha256.Sum256([]byte(t.secret))
		if c.tokens[key] == t {
			delete(c.tokens, key)
		}
	default:
		t.next = now.Add(c.retryAfter())
	}
	c.mu.Unlock()

	switch {
	case err == nil:
		c.results.WithLabelValues("valid").Inc()
	case refused:
		c.results.WithLabelValues("refused").Inc()
		c.log.Warn("Agent token no longer accepted; closing the agent's tunnels on this node",
			"agent_id", t.agentID, "tunnels", len(revoked), "error", err.Error())
		reason := fmt.Errorf("the agent token is no longer accepted: %w", err)
		for _, w := range revoked {
			w.revoke(reason)
		}
	default:
		// A network error, a 5xx or a contract error says nothing about
		// the token: the tunnels stay.
		c.results.WithLabelValues("error").Inc()
		c.log.Warn("Could not re-validate an agent token; its tunnels stay open and the check is tried again",
			"agent_id", t.agentID, "retry_in", c.retryAfter().String(), "error", err.Error())
	}
}

// signal wakes Run to look at the tokens again.
func (c *Checker) signal() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}
