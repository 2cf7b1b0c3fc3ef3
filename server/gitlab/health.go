package gitlab

import (
	"context"
	"errors"
	"sync/atomic"
	"time"

	"github.com/kasproject/kas/server/traffic"
)

// Health is how GitLab has been answering kas's calls, for the status page.
type Health struct {
	// LastCall is when kas last called GitLab (zero: never).
	LastCall time.Time
	// Minutes counts calls and failures per minute over the last hour, with
	// the last failure. A failure is a call GitLab did not answer (network,
	// TLS, timeout) or answered with a 5xx or a malformed body; 401, 403
	// and 404 are answers, not failures.
	Minutes traffic.Minutes
}

// health counts the client's calls.
type health struct {
	calls    traffic.Series
	lastCall atomic.Int64 // Unix nanoseconds
}

func (h *health) observe(err error) {
	now := time.Now()
	h.lastCall.Store(now.UnixNano())
	failed := err != nil && !Cacheable(err) && !errors.Is(err, context.Canceled)
	h.calls.Observe(failed, 0, 0)
	if failed {
		h.calls.Fail(traffic.Failure{Time: now.UTC(), Message: err.Error()})
	}
}

// Health reports how GitLab has been answering, as of now.
func (c *Client) Health(now time.Time) Health {
	var last time.Time
	if ns := c.health.lastCall.Load(); ns != 0 {
		last = time.Unix(0, ns).UTC()
	}
	return Health{LastCall: last, Minutes: c.health.calls.Minutes(now)}
}

// SampleHealth closes the minute before boundary (a Unix minute) in the
// counts Health reports; call it once a minute (traffic.RunSampler).
func (c *Client) SampleHealth(boundary int64) { c.health.calls.Sample(boundary) }
