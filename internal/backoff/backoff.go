// Package backoff is exponential backoff with full jitter, for the loops
// that reconnect: agentk dialling kas, and kas dialling receptive agents.
package backoff

import (
	"math/rand/v2"
	"time"
)

// Backoff yields the delays before successive attempts: the n-th is uniform
// in (0, Min·2ⁿ], capped at Max, so many clients retrying after the same
// outage spread out instead of arriving together. The zero value is not
// useful: set Min and Max (Max ≥ Min > 0).
type Backoff struct {
	Min, Max time.Duration
	attempt  int
}

// Next is the delay before the next attempt.
func (b *Backoff) Next() time.Duration {
	ceiling := b.Max
	if d := b.Min << b.attempt; b.attempt < 62 && d > 0 && d < b.Max {
		ceiling = d
		b.attempt++
	}
	return rand.N(ceiling) + 1
}

// Longest waits between half and all of Max: for a failure that retrying
// sooner cannot fix.
func (b *Backoff) Longest() time.Duration {
	half := b.Max / 2
	return half + rand.N(b.Max-half) + 1
}

// Reset starts again from Min, after a success.
func (b *Backoff) Reset() { b.attempt = 0 }
