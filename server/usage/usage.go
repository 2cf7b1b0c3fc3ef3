// Package usage counts how the Kubernetes API proxy is used and reports the
// counts to GitLab's usage metrics (service ping) every reporting period.
//
// The counters and unique counters are GitLab's own, as its
// POST /api/v4/internal/kubernetes/usage_metrics endpoint declares them:
// requests in total and by access kind (ci_access for CI job tokens,
// user_access for browser sessions, personal access tokens), the users and
// agents seen for each kind, and every user of the proxy whatever the kind
// (agent_users_using_ci_tunnel, which GitLab's KAS fills that way). A report that fails is not lost: its
// counts are merged back and sent with the next one, and counts that were
// sent are never sent again.
package usage

import (
	"context"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/proxyauth"
)

// GitLab's counter names.
const (
	CounterRequests            = "k8s_api_proxy_request"
	CounterRequestsViaCIAccess = "k8s_api_proxy_requests_via_ci_access"
	CounterRequestsViaUser     = "k8s_api_proxy_requests_via_user_access"
	CounterRequestsViaPAT      = "k8s_api_proxy_requests_via_pat_access"
	UniqueUsersViaCIAccess     = "k8s_api_proxy_requests_unique_users_via_ci_access"
	UniqueAgentsViaCIAccess    = "k8s_api_proxy_requests_unique_agents_via_ci_access"
	UniqueUsersViaUserAccess   = "k8s_api_proxy_requests_unique_users_via_user_access"
	UniqueAgentsViaUserAccess  = "k8s_api_proxy_requests_unique_agents_via_user_access"
	UniqueUsersViaPATAccess    = "k8s_api_proxy_requests_unique_users_via_pat_access"
	UniqueAgentsViaPATAccess   = "k8s_api_proxy_requests_unique_agents_via_pat_access"
	// UniqueUsersUsingCITunnel counts every user of the proxy, by any
	// access kind (the name predates the other kinds).
	UniqueUsersUsingCITunnel = "agent_users_using_ci_tunnel"
)

const (
	// DefaultPeriod is observability.usage_reporting_period's default.
	DefaultPeriod = time.Minute
	// reportTimeout bounds each report Run makes, which ctx does not cut
	// short.
	reportTimeout = 5 * time.Second
)

// names are the counters of one access kind.
type names struct {
	requests, users, agents string
}

var kindNames = map[proxyauth.Kind]names{
	proxyauth.KindCIJob:               {CounterRequestsViaCIAccess, UniqueUsersViaCIAccess, UniqueAgentsViaCIAccess},
	proxyauth.KindSessionCookie:       {CounterRequestsViaUser, UniqueUsersViaUserAccess, UniqueAgentsViaUserAccess},
	proxyauth.KindPersonalAccessToken: {CounterRequestsViaPAT, UniqueUsersViaPATAccess, UniqueAgentsViaPATAccess},
}

// Options configure a Tracker.
type Options struct {
	// Reporter receives the counts: the *gitlab.Client. Nil (standalone
	// mode, no GitLab to tell) makes the Tracker count nothing.
	Reporter gitlab.UsageReporter
	// Period is observability.usage_reporting_period: how often Run
	// reports; zero or negative means DefaultPeriod.
	Period time.Duration
	// Logger receives failed reports; nil discards them.
	Logger *slog.Logger
}

// Tracker counts proxied requests and reports them. It is safe for
// concurrent use; Observe is cheap enough for every request.
type Tracker struct {
	reporter gitlab.UsageReporter
	period   time.Duration
	log      *slog.Logger

	// reporting serializes reports, so a failed report's counts are
	// merged back before the next report takes its snapshot.
	reporting sync.Mutex

	mu      sync.Mutex
	pending counts
}

// counts are the events not yet reported.
type counts struct {
	counters map[string]int64
	unique   map[string]map[int64]struct{}
}

func newCounts() counts {
	return counts{counters: make(map[string]int64), unique: make(map[string]map[int64]struct{})}
}

func (c *counts) empty() bool { return len(c.counters) == 0 && len(c.unique) == 0 }

func (c *counts) add(name string, n int64) { c.counters[name] += n }

func (c *counts) addUnique(name string, id int64) {
	set := c.unique[name]
	if set == nil {
		set = make(map[int64]struct{})
		c.unique[name] = set
	}
	set[id] = struct{}{}
}

// merge adds other's counts into c.
func (c *counts) merge(other counts) {
	for name, n := range other.counters {
		c.add(name, n)
	}
	for name, ids := range other.unique {
		for id := range ids {
			c.addUnique(name, id)
		}
	}
}

// metrics is c as GitLab's request body, IDs sorted.
func (c *counts) metrics() gitlab.UsageMetrics {
	m := gitlab.UsageMetrics{}
	if len(c.counters) > 0 {
		m.Counters = maps.Clone(c.counters)
	}
	if len(c.unique) > 0 {
		m.UniqueCounters = make(map[string][]int64, len(c.unique))
		for name, ids := range c.unique {
			m.UniqueCounters[name] = slices.Sorted(maps.Keys(ids))
		}
	}
	return m
}

// New returns a tracker; call Run to report periodically.
func New(opts Options) *Tracker {
	period := opts.Period
	if period <= 0 {
		period = DefaultPeriod
	}
	logger := opts.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return &Tracker{reporter: opts.Reporter, period: period, log: logger, pending: newCounts()}
}

// Observe counts one authorized proxy request; it fits
// k8sproxy.Options.OnAuthorized. A request's user (0 when GitLab named
// none) and agent count towards the unique counters of its access kind.
func (t *Tracker) Observe(r *proxyauth.Result) {
	if t.reporter == nil || r == nil {
		return
	}
	n, known := kindNames[r.Kind]
	t.mu.Lock()
	defer t.mu.Unlock()
	t.pending.add(CounterRequests, 1)
	if r.UserID > 0 {
		t.pending.addUnique(UniqueUsersUsingCITunnel, r.UserID)
	}
	if !known {
		return
	}
	t.pending.add(n.requests, 1)
	if r.UserID > 0 {
		t.pending.addUnique(n.users, r.UserID)
	}
	if r.AgentID > 0 {
		t.pending.addUnique(n.agents, r.AgentID)
	}
}

// Run reports every period until ctx ends, then makes a last report so
// counts since the previous one are not lost at shutdown. A report in
// flight when ctx ends is let finish (within a few seconds): cut short,
// GitLab might count what kas then sends again. Without a Reporter Run just
// waits for ctx.
func (t *Tracker) Run(ctx context.Context) {
	if t.reporter == nil {
		<-ctx.Done()
		return
	}
	ticker := time.NewTicker(t.period)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			t.report(ctx)
			return
		case <-ticker.C:
			t.report(ctx)
		}
	}
}

// Report sends the counts observed since the last successful report, if
// any. On failure they are kept, merged with newer counts, for the next
// report, and the error is returned.
func (t *Tracker) Report(ctx context.Context) error {
	if t.reporter == nil {
		return nil
	}
	t.reporting.Lock()
	defer t.reporting.Unlock()
	t.mu.Lock()
	snapshot := t.pending
	t.pending = newCounts()
	t.mu.Unlock()
	if snapshot.empty() {
		return nil
	}
	if err := t.reporter.SendUsageMetrics(ctx, snapshot.metrics()); err != nil {
		t.mu.Lock()
		t.pending.merge(snapshot)
		t.mu.Unlock()
		return err
	}
	return nil
}

func (t *Tracker) report(ctx context.Context) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), reportTimeout)
	defer cancel()
	if err := t.Report(ctx); err != nil {
		t.log.Warn("Usage metrics: report to GitLab failed; the counts are sent with the next report", "error", err.Error())
	}
}
