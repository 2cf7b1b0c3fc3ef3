package kasjwt

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

var (
	secret      = []byte("0123456789abcdef0123456789abcdef")
	otherSecret = []byte("fedcba9876543210fedcba9876543210")
)

// claimsAt builds claims valid from now for ttl, shifted by offset.
func claimsAt(iss, aud string, offset, ttl time.Duration) jwt.RegisteredClaims {
	now := time.Now().Add(offset)
	c := jwt.RegisteredClaims{
		Issuer:    iss,
		IssuedAt:  jwt.NewNumericDate(now),
		NotBefore: jwt.NewNumericDate(now),
		ExpiresAt: jwt.NewNumericDate(now.Add(ttl)),
		ID:        "test",
	}
	if aud != "" {
		c.Audience = jwt.ClaimStrings{aud}
	}
	return c
}

func sign(t *testing.T, method jwt.SigningMethod, key any, claims jwt.Claims) string {
	t.Helper()
	s, err := jwt.NewWithClaims(method, claims).SignedString(key)
	if err != nil {
		t.Fatalf("sign test token: %v", err)
	}
	return s
}

func TestVerify(t *testing.T) {
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	valid := claimsAt(IssuerKAS, AudienceGitLab, 0, time.Minute)
	noExp := valid
	noExp.ExpiresAt = nil
	signed, err := Sign(secret, IssuerKAS, AudienceGitLab, time.Minute)
	if err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name    string
		token   string
		issuer  string // expected issuer; "" = unchecked
		wantErr error  // nil = accepted
	}{
		{"signed by Sign", signed, IssuerKAS, nil},
		{"valid, issuer unchecked", sign(t, jwt.SigningMethodHS256, secret, claimsAt("gitlab.example.com", AudienceGitLab, 0, time.Minute)), "", nil},
		{"expired within leeway", sign(t, jwt.SigningMethodHS256, secret, claimsAt(IssuerKAS, AudienceGitLab, -time.Minute-2*time.Second, time.Minute)), IssuerKAS, nil},
		{"expired", sign(t, jwt.SigningMethodHS256, secret, claimsAt(IssuerKAS, AudienceGitLab, -2*time.Minute, time.Minute)), IssuerKAS, ErrExpired},
		{"not yet valid", sign(t, jwt.SigningMethodHS256, secret, claimsAt(IssuerKAS, AudienceGitLab, time.Minute, time.Minute)), IssuerKAS, ErrNotYetValid},
		{"wrong audience", sign(t, jwt.SigningMethodHS256, secret, claimsAt(IssuerKAS, AudienceKAS, 0, time.Minute)), IssuerKAS, ErrAudience},
		{"no audience", sign(t, jwt.SigningMethodHS256, secret, claimsAt(IssuerKAS, "", 0, time.Minute)), IssuerKAS, ErrMissingClaim},
		{"no expiry", sign(t, jwt.SigningMethodHS256, secret, noExp), IssuerKAS, ErrMissingClaim},
		{"wrong issuer", sign(t, jwt.SigningMethodHS256, secret, claimsAt(IssuerPrivateAPI, AudienceGitLab, 0, time.Minute)), IssuerKAS, ErrIssuer},
		{"alg none", sign(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, valid), IssuerKAS, ErrAlgorithm},
		{"HS512 with the right secret", sign(t, jwt.SigningMethodHS512, secret, valid), IssuerKAS, ErrAlgorithm},
		{"RS256", sign(t, jwt.SigningMethodRS256, rsaKey, valid), IssuerKAS, ErrAlgorithm},
		{"ES256", sign(t, jwt.SigningMethodES256, ecKey, valid), IssuerKAS, ErrAlgorithm},
		{"another secret", sign(t, jwt.SigningMethodHS256, otherSecret, valid), IssuerKAS, ErrSignature},
		{"tampered payload", tamper(t, signed), IssuerKAS, ErrSignature},
		{"garbage", "not-a-token", IssuerKAS, ErrMalformed},
		{"garbage with dots", "a.b.c", IssuerKAS, ErrMalformed},
		{"empty", "", IssuerKAS, ErrMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := Verify(secret, tt.token, AudienceGitLab, tt.issuer)
			if tt.wantErr == nil {
				if err != nil {
					t.Fatalf("Verify: %v, want accepted", err)
				}
				return
			}
			t.Log(err)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("Verify: %v, want %v", err, tt.wantErr)
			}
			if tt.token != "" && strings.Contains(err.Error(), tt.token) {
				t.Fatalf("error echoes the token: %v", err)
			}
		})
	}
}

// tamper swaps the payload of a signed token for another one, keeping the
// signature.
func tamper(t *testing.T, token string) string {
	t.Helper()
	other := sign(t, jwt.SigningMethodHS256, otherSecret, claimsAt(IssuerKAS, AudienceGitLab, 0, time.Hour))
	p := strings.Split(token, ".")
	q := strings.Split(other, ".")
	return p[0] + "." + q[1] + "." + p[2]
}

func TestSignClaims(t *testing.T) {
	a, err := Sign(secret, IssuerPrivateAPI, AudiencePrivateAPI, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Sign(secret, IssuerPrivateAPI, AudiencePrivateAPI, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var ca, cb jwt.RegisteredClaims
	if _, err := jwt.ParseWithClaims(a, &ca, func(*jwt.Token) (any, error) { return secret, nil }); err != nil {
		t.Fatal(err)
	}
	if _, err := jwt.ParseWithClaims(b, &cb, func(*jwt.Token) (any, error) { return secret, nil }); err != nil {
		t.Fatal(err)
	}
	if ca.Issuer != IssuerPrivateAPI || len(ca.Audience) != 1 || ca.Audience[0] != AudiencePrivateAPI {
		t.Errorf("iss/aud = %q/%q", ca.Issuer, ca.Audience)
	}
	if ca.IssuedAt == nil || ca.NotBefore == nil || ca.ExpiresAt == nil {
		t.Fatalf("missing time claims: %+v", ca)
	}
	if got := ca.ExpiresAt.Sub(ca.IssuedAt.Time); got != 30*time.Second {
		t.Errorf("exp - iat = %s, want 30s", got)
	}
	if ca.ID == "" || ca.ID == cb.ID {
		t.Errorf("jti not random: %q, %q", ca.ID, cb.ID)
	}
	if err := Verify(secret, a, AudienceKAS, ""); !errors.Is(err, ErrAudience) {
		t.Errorf("private API token accepted as internal API token: %v", err)
	}
}

// TestSignBackdatesNotBefore: Rails checks nbf without leeway, so a token
// kas mints must already be valid on a Rails whose clock is behind.
func TestSignBackdatesNotBefore(t *testing.T) {
	token, err := Sign(secret, IssuerKAS, AudienceGitLab, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var c jwt.RegisteredClaims
	if _, err := jwt.ParseWithClaims(token, &c, func(*jwt.Token) (any, error) { return secret, nil }); err != nil {
		t.Fatal(err)
	}
	if got := c.IssuedAt.Sub(c.NotBefore.Time); got != NotBeforeSkew {
		t.Errorf("iat - nbf = %s, want %s", got, NotBeforeSkew)
	}
	// A verifier whose clock is 3 s behind, with no leeway (ruby-jwt's
	// default for nbf), accepts it.
	behind := jwt.NewParser(jwt.WithTimeFunc(func() time.Time { return time.Now().Add(-3 * time.Second) }))
	if _, err := behind.ParseWithClaims(token, &jwt.RegisteredClaims{}, func(*jwt.Token) (any, error) { return secret, nil }); err != nil {
		t.Errorf("a verifier 3 s behind refuses the token: %v", err)
	}
}

func TestVerifyMaxLifetime(t *testing.T) {
	noIAT := func(ttl time.Duration) jwt.RegisteredClaims {
		c := claimsAt("gitlab.example.com", AudienceKAS, 0, ttl)
		c.IssuedAt = nil
		return c
	}
	tests := []struct {
		name    string
		claims  jwt.RegisteredClaims
		wantErr bool
	}{
		{"a minute, as Rails sends", claimsAt("gitlab.example.com", AudienceKAS, 0, time.Minute), false},
		{"exactly the bound", claimsAt("gitlab.example.com", AudienceKAS, 0, MaxAPILifetime), false},
		{"a year", claimsAt("gitlab.example.com", AudienceKAS, 0, 365*24*time.Hour), true},
		{"issued long ago, expiring soon", claimsAt("gitlab.example.com", AudienceKAS, -MaxAPILifetime, MaxAPILifetime+time.Minute), true},
		{"no iat, a year left", noIAT(365 * 24 * time.Hour), true},
		{"no iat, a minute left", noIAT(time.Minute), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := Verify(secret, sign(t, jwt.SigningMethodHS256, secret, tt.claims), AudienceKAS, "", MaxLifetime(MaxAPILifetime))
			if tt.wantErr != (err != nil) || (err != nil && !errors.Is(err, ErrLifetime)) {
				t.Fatalf("Verify: %v, want ErrLifetime: %v", err, tt.wantErr)
			}
			if err != nil {
				t.Log(err)
			}
		})
	}
	// Without the option the lifetime is not checked.
	if err := Verify(secret, sign(t, jwt.SigningMethodHS256, secret, claimsAt("x", AudienceKAS, 0, 24*time.Hour)), AudienceKAS, ""); err != nil {
		t.Fatalf("Verify without MaxLifetime: %v", err)
	}
}

func TestBadArguments(t *testing.T) {
	tests := []struct {
		name string
		err  error
	}{
		{"sign with empty secret", func() error { _, err := Sign(nil, IssuerKAS, AudienceGitLab, time.Minute); return err }()},
		{"sign with empty audience", func() error { _, err := Sign(secret, IssuerKAS, "", time.Minute); return err }()},
		{"sign with zero lifetime", func() error { _, err := Sign(secret, IssuerKAS, AudienceGitLab, 0); return err }()},
		{"verify with empty secret", Verify(nil, "a.b.c", AudienceGitLab, "")},
		{"verify without audience", Verify(secret, "a.b.c", "", "")},
	}
	for _, tt := range tests {
		if tt.err == nil {
			t.Errorf("%s: no error", tt.name)
		}
	}
}
