package protocol

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

func newKey(t *testing.T) (ed25519.PublicKey, ed25519.PrivateKey) {
	t.Helper()
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return pub, priv
}

func TestReceptiveJWT(t *testing.T) {
	pub, priv := newKey(t)
	_, other := newKey(t)
	sign := func(method jwt.SigningMethod, key any, claims jwt.RegisteredClaims) string {
		t.Helper()
		s, err := jwt.NewWithClaims(method, claims).SignedString(key)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	now := time.Now()
	claims := func(aud string, iat, exp time.Time) jwt.RegisteredClaims {
		return jwt.RegisteredClaims{
			Issuer: ReceptiveJWTIssuer, Audience: jwt.ClaimStrings{aud},
			IssuedAt: jwt.NewNumericDate(iat), ExpiresAt: jwt.NewNumericDate(exp),
		}
	}
	valid, err := SignReceptiveJWT(priv, 7)
	if err != nil {
		t.Fatal(err)
	}
	otherKey, err := SignReceptiveJWT(other, 7)
	if err != nil {
		t.Fatal(err)
	}
	otherAgent, err := SignReceptiveJWT(priv, 8)
	if err != nil {
		t.Fatal(err)
	}
	noIssuer := claims("7", now, now.Add(time.Minute))
	noIssuer.Issuer = ""
	otherIssuer := claims("7", now, now.Add(time.Minute))
	otherIssuer.Issuer = "gitlab"
	noExpiry := claims("7", now, now)
	noExpiry.ExpiresAt = nil
	noIssuedAt := claims("7", now, now.Add(time.Minute))
	noIssuedAt.IssuedAt = nil

	tests := []struct {
		name    string
		token   string
		wantErr string // "" for accepted
	}{
		{"signed by kas for this agent", valid, ""},
		{"another agent's key", otherKey, "signature does not match the public key"},
		{"for another agent", otherAgent, "the JWT is for agent 8, this agentk is agent 7"},
		{"expired", sign(jwt.SigningMethodEdDSA, priv, claims("7", now.Add(-3*time.Minute), now.Add(-2*time.Minute))), "the JWT expired at"},
		{"not yet valid", sign(jwt.SigningMethodEdDSA, priv, claims("7", now.Add(2*time.Minute), now.Add(3*time.Minute))), "not valid yet"},
		{"valid for too long", sign(jwt.SigningMethodEdDSA, priv, claims("7", now, now.Add(time.Hour))), "agentk accepts at most 5m0s"},
		{"no expiry", sign(jwt.SigningMethodEdDSA, priv, noExpiry), "lacks required claims: exp"},
		{"no issue time", sign(jwt.SigningMethodEdDSA, priv, noIssuedAt), "no issue time"},
		{"another issuer", sign(jwt.SigningMethodEdDSA, priv, otherIssuer), `issuer is "gitlab"`},
		{"no issuer", sign(jwt.SigningMethodEdDSA, priv, noIssuer), "lacks required claims: iss"},
		{"HMAC", sign(jwt.SigningMethodHS256, []byte(pub), claims("7", now, now.Add(time.Minute))), "not signed with EdDSA"},
		{"alg none", sign(jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, claims("7", now, now.Add(time.Minute))), "not signed with EdDSA"},
		{"garbage", "not.a.jwt", "malformed"},
		{"empty", "", "empty"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := VerifyReceptiveJWT(pub, tc.token, 7)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("got %v, want an error containing %q", err, tc.wantErr)
			}
			if tc.token != "" && strings.Contains(err.Error(), tc.token) {
				t.Fatal("the error contains the token")
			}
		})
	}
}

func TestParseEd25519Keys(t *testing.T) {
	pub, priv := newKey(t)
	privDER, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	pubDER, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ecDER, _ := x509.MarshalPKCS8PrivateKey(ecKey)
	ecPubDER, _ := x509.MarshalPKIXPublicKey(&ecKey.PublicKey)
	b64 := base64.StdEncoding.EncodeToString
	pemOf := func(typ string, der []byte) string {
		return string(pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}))
	}

	privTests := []struct {
		name, in, wantErr string
	}{
		{"GitLab's base64 seed", b64(priv.Seed()) + "\n", ""},
		{"base64 seed and public key", b64(priv), ""},
		{"PEM PKCS#8", pemOf("PRIVATE KEY", privDER), ""},
		{"ECDSA", pemOf("PRIVATE KEY", ecDER), "want Ed25519"},
		{"wrong PEM type", pemOf("EC PRIVATE KEY", ecDER), `want "PRIVATE KEY"`},
		{"short", b64(priv.Seed()[:16]), "decodes to 16 bytes"},
		{"mismatched halves", b64(append(priv.Seed(), make([]byte, 32)...)), "does not match"},
		{"neither", "hello world", "neither PEM nor base64"},
	}
	for _, tc := range privTests {
		t.Run("private "+tc.name, func(t *testing.T) {
			key, err := ParseEd25519PrivateKey([]byte(tc.in))
			if tc.wantErr == "" {
				if err != nil || !key.Equal(priv) {
					t.Fatalf("got %v, %v; want the key", key, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("got %v, want an error containing %q", err, tc.wantErr)
			}
		})
	}
	pubTests := []struct {
		name, in, wantErr string
	}{
		{"GitLab's base64 public_key", b64(pub), ""},
		{"PEM", pemOf("PUBLIC KEY", pubDER), ""},
		{"ECDSA", pemOf("PUBLIC KEY", ecPubDER), "want Ed25519"},
		{"wrong length", b64(pub[:31]), "decodes to 31 bytes"},
		{"neither", "ssh-ed25519 AAAA", "neither PEM nor base64"},
	}
	for _, tc := range pubTests {
		t.Run("public "+tc.name, func(t *testing.T) {
			key, err := ParseEd25519PublicKey([]byte(tc.in))
			if tc.wantErr == "" {
				if err != nil || !key.Equal(pub) {
					t.Fatalf("got %v, %v; want the key", key, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("got %v, want an error containing %q", err, tc.wantErr)
			}
		})
	}
}

func TestReceptiveURL(t *testing.T) {
	tests := []struct {
		in, want string
		tls      bool
		wantErr  string
	}{
		{in: "grpcs://agent.example.com:4242", want: "wss://agent.example.com:4242/", tls: true},
		{in: "grpc://10.0.0.5:8182", want: "ws://10.0.0.5:8182/"},
		{in: "wss://[fd00::5]:8182/tunnel", want: "wss://[fd00::5]:8182/tunnel", tls: true},
		{in: "ws://agentk:8182", want: "ws://agentk:8182/"},
		{in: "https://agentk:8182", wantErr: "scheme must be grpcs, wss, grpc or ws"},
		{in: "grpcs://agentk", wantErr: "want host:port"},
		{in: "grpcs://user:secret@agentk:1", wantErr: "must not hold credentials"},
		{in: "grpcs://agentk:1/path", wantErr: "a grpc(s) URL has no path"},
		{in: "wss://agentk:1/?q=1", wantErr: "query"},
		{in: "::", wantErr: "not a URL"},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			u, secure, err := ReceptiveURL(tc.in)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got %v, %v; want an error containing %q", u, err, tc.wantErr)
				}
				if strings.Contains(err.Error(), "secret") {
					t.Fatal("the error shows the URL's password")
				}
				return
			}
			if err != nil || u.String() != tc.want || secure != tc.tls {
				t.Fatalf("got %v, TLS %v, %v; want %s, TLS %v", u, secure, err, tc.want, tc.tls)
			}
		})
	}
}
