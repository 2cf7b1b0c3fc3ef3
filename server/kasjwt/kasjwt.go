// Package kasjwt signs and verifies the short-lived HS256 JSON Web Tokens
// that authenticate kas's three API hops: kas → GitLab Rails
// (Gitlab-Kas-Api-Request header), GitLab Rails → kas (internal API) and
// kas → kas (private API). Each hop has its own secret and its own
// issuer/audience pair, so a token minted for one hop is refused on another.
package kasjwt

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// Issuers and audiences of the three hops.
const (
	// IssuerKAS and AudienceGitLab mark tokens kas sends to GitLab Rails in
	// the Gitlab-Kas-Api-Request header; Rails checks both.
	IssuerKAS      = "gitlab-kas"
	AudienceGitLab = "gitlab"

	// AudienceKAS marks tokens GitLab Rails sends to kas's internal API.
	// Rails sets the issuer to its own host name, so kas does not check it.
	AudienceKAS = "gitlab-kas"

	// IssuerPrivateAPI and AudiencePrivateAPI mark tokens one kas node sends
	// to another's private API. The hop already has its own secret; the
	// distinct names additionally keep a private-API token from passing as
	// an internal-API one if an operator reuses a secret.
	IssuerPrivateAPI   = "gitlab-kas-private-api"
	AudiencePrivateAPI = "gitlab-kas-private-api"
)

// Leeway is the clock skew tolerated when checking exp, nbf and iat.
const Leeway = 5 * time.Second

// NotBeforeSkew is how far before its issue time a token Sign mints is
// already valid (nbf = iat − NotBeforeSkew), as GitLab's own KAS does: Rails
// checks nbf with no leeway, so a token whose nbf is "now" is refused by a
// Rails whose clock is a few hundred milliseconds behind kas's.
const NotBeforeSkew = 5 * time.Second

// MaxAPILifetime bounds the lifetime of the tokens kas's internal and private
// APIs accept (see MaxLifetime). GitLab Rails sends tokens valid for a
// minute and kas's nodes for a minute; a token valid for longer is a
// credential someone could keep and replay.
const MaxAPILifetime = 5 * time.Minute

// algorithm is the only signing algorithm kas signs with or accepts.
const algorithm = "HS256"

// Reasons Verify refuses a token; the returned error wraps exactly one.
var (
	ErrMalformed    = errors.New("token is malformed")
	ErrAlgorithm    = errors.New("token signing algorithm is not HS256")
	ErrSignature    = errors.New("token signature is invalid (signed with another secret?)")
	ErrExpired      = errors.New("token has expired")
	ErrNotYetValid  = errors.New("token is not valid yet")
	ErrAudience     = errors.New("token has the wrong audience")
	ErrIssuer       = errors.New("token has the wrong issuer")
	ErrMissingClaim = errors.New("token lacks a required claim")
	ErrLifetime     = errors.New("token is valid for too long")
	ErrInvalid      = errors.New("token is invalid")
)

// Sign mints an HS256 token from issuer to audience valid for ttl from now,
// with iat (now), nbf (NotBeforeSkew before now), exp and a random jti.
func Sign(secret []byte, issuer, audience string, ttl time.Duration) (string, error) {
	if len(secret) == 0 {
		return "", errors.New("sign JWT: empty secret")
	}
	if audience == "" {
		return "", errors.New("sign JWT: empty audience")
	}
	if ttl <= 0 {
		return "", fmt.Errorf("sign JWT: lifetime must be positive, got %s", ttl)
	}
	now := time.Now()
	claims := jwt.RegisteredClaims{
		Issuer:    issuer,
		Audience:  jwt.ClaimStrings{audience},
		IssuedAt:  jwt.NewNumericDate(now),
		NotBefore: jwt.NewNumericDate(now.Add(-NotBeforeSkew)),
		ExpiresAt: jwt.NewNumericDate(now.Add(ttl)),
		ID:        randomID(),
	}
	token, err := jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString(secret)
	if err != nil {
		return "", fmt.Errorf("sign JWT: %w", err)
	}
	return token, nil
}

// VerifyOption adds a check to Verify.
type VerifyOption func(*verifyOptions)

type verifyOptions struct {
	maxLifetime time.Duration
}

// MaxLifetime refuses a token valid for longer than d: exp − iat, or
// exp − now for a token without iat.
func MaxLifetime(d time.Duration) VerifyOption {
	return func(o *verifyOptions) { o.maxLifetime = d }
}

// Verify checks that token is an HS256 token signed with secret, addressed
// to audience, unexpired, already valid and, unless issuer is "", from
// issuer, plus the checks opts add. Tokens without exp or aud are refused.
// The error wraps one of the Err* reasons and never contains the token
// itself.
func Verify(secret []byte, token, audience, issuer string, opts ...VerifyOption) error {
	var o verifyOptions
	for _, opt := range opts {
		opt(&o)
	}
	if len(secret) == 0 {
		return errors.New("verify JWT: empty secret")
	}
	if audience == "" {
		return errors.New("verify JWT: no audience to check against")
	}
	if token == "" {
		return fmt.Errorf("verify JWT: %w: empty", ErrMalformed)
	}
	parserOpts := []jwt.ParserOption{
		jwt.WithValidMethods([]string{algorithm}),
		jwt.WithAudience(audience),
		jwt.WithExpirationRequired(),
		jwt.WithIssuedAt(),
		jwt.WithLeeway(Leeway),
	}
	if issuer != "" {
		parserOpts = append(parserOpts, jwt.WithIssuer(issuer))
	}
	var claims jwt.RegisteredClaims
	parsed, err := jwt.ParseWithClaims(token, &claims, func(t *jwt.Token) (any, error) {
		// WithValidMethods already refused everything else; checking the
		// type too means no future parser change can hand an HMAC secret
		// to an asymmetric verifier.
		if _, ok := t.Method.(*jwt.SigningMethodHMAC); !ok {
			return nil, ErrAlgorithm
		}
		return secret, nil
	}, parserOpts...)
	if err != nil {
		return fmt.Errorf("verify JWT: %w", classify(err, parsed, &claims, audience, issuer))
	}
	if o.maxLifetime > 0 {
		if err := checkLifetime(&claims, o.maxLifetime, time.Now()); err != nil {
			return fmt.Errorf("verify JWT: %w", err)
		}
	}
	return nil
}

// checkLifetime refuses claims valid for longer than maxLifetime, counted
// from iat or, without one, from now.
func checkLifetime(claims *jwt.RegisteredClaims, maxLifetime time.Duration, now time.Time) error {
	from, what := now, "exp − now"
	if claims.IssuedAt != nil {
		from, what = claims.IssuedAt.Time, "exp − iat"
	}
	if lifetime := claims.ExpiresAt.Sub(from); lifetime > maxLifetime {
		return fmt.Errorf("%w: %s is %s, more than the %s allowed; mint a token that expires sooner (kas token --ttl)",
			ErrLifetime, what, lifetime.Round(time.Second), maxLifetime)
	}
	return nil
}

// classify turns the library's error into one of the Err* reasons with a
// detail that helps an operator (claim values, never the token).
func classify(err error, parsed *jwt.Token, claims *jwt.RegisteredClaims, audience, issuer string) error {
	switch {
	case errors.Is(err, jwt.ErrTokenMalformed):
		return ErrMalformed
	case parsed != nil && headerAlg(parsed) != algorithm:
		return fmt.Errorf("%w: alg is %q", ErrAlgorithm, clip(headerAlg(parsed)))
	case errors.Is(err, jwt.ErrTokenSignatureInvalid):
		return ErrSignature
	case errors.Is(err, jwt.ErrTokenExpired):
		return fmt.Errorf("%w at %s (check the clocks if it was just minted)", ErrExpired, claims.ExpiresAt.UTC().Format(time.RFC3339))
	case errors.Is(err, jwt.ErrTokenNotValidYet), errors.Is(err, jwt.ErrTokenUsedBeforeIssued):
		return fmt.Errorf("%w (check the clocks: the issuer's is ahead)", ErrNotYetValid)
	case errors.Is(err, jwt.ErrTokenInvalidAudience):
		return fmt.Errorf("%w: want %q, token has %q", ErrAudience, audience, clipAll(claims.Audience))
	case errors.Is(err, jwt.ErrTokenInvalidIssuer):
		return fmt.Errorf("%w: want %q, token has %q", ErrIssuer, issuer, clip(claims.Issuer))
	case errors.Is(err, jwt.ErrTokenRequiredClaimMissing):
		return fmt.Errorf("%w: %s", ErrMissingClaim, missingClaims(claims))
	default:
		return ErrInvalid
	}
}

// missingClaims names the required claims (Verify requires aud and exp)
// that claims lacks.
func missingClaims(claims *jwt.RegisteredClaims) string {
	var missing []string
	if len(claims.Audience) == 0 {
		missing = append(missing, "aud")
	}
	if claims.ExpiresAt == nil {
		missing = append(missing, "exp")
	}
	return strings.Join(missing, ", ")
}

func headerAlg(t *jwt.Token) string {
	alg, _ := t.Header["alg"].(string)
	return alg
}

// clip bounds a claim value echoed into an error, since it comes from the
// caller.
func clip(s string) string {
	const max = 64
	if len(s) > max {
		return s[:max] + "…"
	}
	return s
}

func clipAll(ss []string) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = clip(s)
	}
	return out
}

func randomID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go 1.24+).
	return hex.EncodeToString(b[:])
}
