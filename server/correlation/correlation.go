// Package correlation carries a request's correlation ID through contexts,
// logs, and calls to GitLab and to other kas nodes.
package correlation

import (
	"context"
	"crypto/rand"
	"encoding/hex"
)

// Header is where callers pass and kas returns the correlation ID.
const Header = "X-Request-Id"

type ctxKey struct{}

// WithID returns ctx carrying id.
func WithID(ctx context.Context, id string) context.Context {
	return context.WithValue(ctx, ctxKey{}, id)
}

// FromContext returns the correlation ID in ctx, or "".
func FromContext(ctx context.Context) string {
	id, _ := ctx.Value(ctxKey{}).(string)
	return id
}

// NewID makes a random correlation ID (16 bytes, hex).
func NewID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go 1.24+).
	return hex.EncodeToString(b[:])
}

// Valid reports whether a caller-supplied ID is safe to adopt and log:
// 1–128 printable ASCII characters without spaces or quotes.
func Valid(id string) bool {
	if id == "" || len(id) > 128 {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if c <= ' ' || c > '~' || c == '"' || c == '\\' {
			return false
		}
	}
	return true
}
