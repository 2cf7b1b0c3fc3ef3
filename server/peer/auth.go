package peer

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/kasproject/kas/server/kasjwt"
)

// tokenTTL is the lifetime of the JWTs a node sends. Each token is reused for
// half of it, so signing costs nothing per request and a token is never
// sent close to its expiry.
const tokenTTL = time.Minute

// authorizationKey is the metadata key carrying "bearer <JWT>".
const authorizationKey = "authorization"

// tokenSource attaches the private API JWT to every call
// (credentials.PerRPCCredentials).
type tokenSource struct {
	secret []byte
	now    func() time.Time
	mu     sync.Mutex // serializes renewals
	cur    atomic.Pointer[signedToken]
}

type signedToken struct {
	md      map[string]string // shared read-only with gRPC
	renewAt time.Time
}

func newTokenSource(secret []byte) *tokenSource {
	return &tokenSource{secret: secret, now: time.Now}
}

// GetRequestMetadata returns the cached token's metadata, minting a new token
// when the cached one is past half its life.
func (ts *tokenSource) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	now := ts.now()
	if t := ts.cur.Load(); t != nil && now.Before(t.renewAt) {
		return t.md, nil
	}
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if t := ts.cur.Load(); t != nil && now.Before(t.renewAt) {
		return t.md, nil // another call renewed it meanwhile
	}
	token, err := kasjwt.Sign(ts.secret, kasjwt.IssuerPrivateAPI, kasjwt.AudiencePrivateAPI, tokenTTL)
	if err != nil {
		return nil, fmt.Errorf("mint private API token: %w", err)
	}
	t := &signedToken{md: map[string]string{authorizationKey: "Bearer " + token}, renewAt: now.Add(tokenTTL / 2)}
	ts.cur.Store(t)
	return t.md, nil
}

// RequireTransportSecurity is false: grpc:// (h2c) is a supported choice
// for a private network, and the JWT is what authenticates the call.
func (ts *tokenSource) RequireTransportSecurity() bool { return false }

// maxVerifiedTokens bounds the verifier's cache. Each node renews its token
// every tokenTTL/2, so a cluster needs a few entries per node.
const maxVerifiedTokens = 1024

// verifier checks the JWT of incoming calls. Verifying a JWT costs tens of
// microseconds, more than forwarding a small request, and peers reuse each
// token for many calls, so tokens that passed are remembered until they
// expire. They are short-lived and already in memory with every call that
// carries them.
type verifier struct {
	secret []byte
	now    func() time.Time

	mu       sync.RWMutex
	verified map[string]time.Time // token → expiry
}

func newVerifier(secret []byte) *verifier {
	return &verifier{secret: secret, now: time.Now, verified: map[string]time.Time{}}
}

// check authenticates the call whose incoming metadata ctx carries. The
// error is a codes.Unauthenticated status saying why, without the token.
func (v *verifier) check(ctx context.Context) error {
	values := metadata.ValueFromIncomingContext(ctx, authorizationKey)
	switch len(values) {
	case 0:
		return status.Error(codes.Unauthenticated,
			"missing private API token: send metadata \"authorization: bearer <JWT signed with the private API secret>\"")
	case 1:
	default:
		return status.Error(codes.Unauthenticated, "several authorization metadata values; send exactly one")
	}
	scheme, token, _ := strings.Cut(values[0], " ")
	token = strings.TrimSpace(token)
	if !strings.EqualFold(scheme, "bearer") || token == "" {
		return status.Error(codes.Unauthenticated, "authorization metadata must be \"bearer <JWT>\"")
	}
	if err := v.verify(token); err != nil {
		msg := "private API token refused: " + err.Error()
		if errors.Is(err, kasjwt.ErrSignature) {
			msg += "; every node must use the same private API secret (private_api.listen.authentication_secret_file)"
		}
		return status.Error(codes.Unauthenticated, msg)
	}
	return nil
}

func (v *verifier) verify(token string) error {
	now := v.now()
	v.mu.RLock()
	exp, ok := v.verified[token]
	v.mu.RUnlock()
	if ok && now.Before(exp) {
		return nil
	}
	if err := kasjwt.Verify(v.secret, token, kasjwt.AudiencePrivateAPI, kasjwt.IssuerPrivateAPI, kasjwt.MaxLifetime(kasjwt.MaxAPILifetime)); err != nil {
		return err
	}
	// The token is valid; read its expiry (Verify requires exp) to know how
	// long to remember it. Remembering only until exp is stricter than
	// Verify, which allows kasjwt.Leeway past it.
	var claims jwt.RegisteredClaims
	if _, _, err := jwt.NewParser().ParseUnverified(token, &claims); err != nil || claims.ExpiresAt == nil {
		return nil
	}
	v.remember(token, claims.ExpiresAt.Time, now)
	return nil
}

func (v *verifier) remember(token string, exp, now time.Time) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if len(v.verified) >= maxVerifiedTokens {
		for k, e := range v.verified {
			if !now.Before(e) {
				delete(v.verified, k)
			}
		}
		if len(v.verified) >= maxVerifiedTokens {
			clear(v.verified) // only a flood of distinct valid tokens gets here
		}
	}
	v.verified[token] = exp
}
