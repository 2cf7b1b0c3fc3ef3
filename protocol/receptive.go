package protocol

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// Receptive mode: the dial turned around. agentk listens, kas opens the
// WebSocket (same subprotocol, same HTTP/2 roles afterwards: kas is the
// client) and authenticates itself with a short-lived JWT, an mTLS client
// certificate, or both. agentk answers the upgrade with the description
// headers it would otherwise send kas (HeaderAgentVersion, …) and, when it
// has one, its agent token in HeaderAgentToken.
const (
	// ReceptivePath is where a receptive agentk accepts kas's WebSocket.
	// agentk accepts any path; kas dials this one unless the agent's URL
	// names another.
	ReceptivePath = "/"
	// HeaderAgentToken carries the agent's token in agentk's answer to
	// kas's upgrade, sent only after kas authenticated itself. kas uses it
	// to learn the agent's project and name from GitLab (agent_info), and
	// refuses the connection when it belongs to another agent.
	HeaderAgentToken = "Kas-Agent-Token"

	// ReceptiveJWTIssuer is the iss of the JWT kas signs for agentk.
	ReceptiveJWTIssuer = "gitlab-kas"
	// ReceptiveJWTLifetime is how long the JWT kas signs is valid: long
	// enough for one handshake on a slow link.
	ReceptiveJWTLifetime = time.Minute
	// MaxReceptiveJWTLifetime is the longest lifetime (exp − iat) agentk
	// accepts, so a token that leaked cannot be replayed for long.
	MaxReceptiveJWTLifetime = 5 * time.Minute
	// ReceptiveJWTLeeway is the clock skew agentk tolerates.
	ReceptiveJWTLeeway = 30 * time.Second
)

// ReceptiveJWTAudience is the aud of the JWT kas signs for an agent: its
// GitLab ID in decimal, so a JWT for one agent does not open another.
func ReceptiveJWTAudience(agentID int64) string { return strconv.FormatInt(agentID, 10) }

// SignReceptiveJWT mints the EdDSA JWT kas presents to agent agentID,
// signed with the agent's private key.
func SignReceptiveJWT(key ed25519.PrivateKey, agentID int64) (string, error) {
	if len(key) != ed25519.PrivateKeySize {
		return "", fmt.Errorf("sign receptive JWT: want an Ed25519 private key, got %d bytes", len(key))
	}
	now := time.Now()
	var id [16]byte
	_, _ = rand.Read(id[:]) // crypto/rand.Read never fails (Go 1.24+).
	claims := jwt.RegisteredClaims{
		Issuer:    ReceptiveJWTIssuer,
		Audience:  jwt.ClaimStrings{ReceptiveJWTAudience(agentID)},
		IssuedAt:  jwt.NewNumericDate(now),
		NotBefore: jwt.NewNumericDate(now),
		ExpiresAt: jwt.NewNumericDate(now.Add(ReceptiveJWTLifetime)),
		ID:        hex.EncodeToString(id[:]),
	}
	token, err := jwt.NewWithClaims(jwt.SigningMethodEdDSA, claims).SignedString(key)
	if err != nil {
		return "", fmt.Errorf("sign receptive JWT: %w", err)
	}
	return token, nil
}

// VerifyReceptiveJWT checks a JWT kas presented to agent agentID: EdDSA,
// signed with the private key matching key, audience agentID, issuer
// ReceptiveJWTIssuer, unexpired and valid for at most
// MaxReceptiveJWTLifetime. The error says why in words an operator can act
// on, and never contains the token.
func VerifyReceptiveJWT(key ed25519.PublicKey, token string, agentID int64) error {
	if token == "" {
		return errors.New("the JWT is empty")
	}
	audience := ReceptiveJWTAudience(agentID)
	var claims jwt.RegisteredClaims
	var wrongAlg error
	_, err := jwt.ParseWithClaims(token, &claims, func(t *jwt.Token) (any, error) {
		// WithValidMethods refuses other algorithms first; checking the type
		// too means no parser change can hand this key to another verifier.
		if _, ok := t.Method.(*jwt.SigningMethodEd25519); !ok {
			wrongAlg = fmt.Errorf("the JWT is signed with %q; kas signs receptive JWTs with EdDSA", clipClaim(fmt.Sprint(t.Header["alg"])))
			return nil, wrongAlg
		}
		return key, nil
	},
		jwt.WithValidMethods([]string{jwt.SigningMethodEdDSA.Alg()}),
		jwt.WithAudience(audience),
		jwt.WithIssuer(ReceptiveJWTIssuer),
		jwt.WithExpirationRequired(),
		jwt.WithIssuedAt(),
		jwt.WithLeeway(ReceptiveJWTLeeway),
	)
	switch {
	case err == nil:
	case wrongAlg != nil:
		return wrongAlg
	case errors.Is(err, jwt.ErrTokenSignatureInvalid) && strings.Contains(err.Error(), "signing method"):
		return errors.New("the JWT is not signed with EdDSA, the only algorithm kas signs receptive JWTs with")
	case errors.Is(err, jwt.ErrTokenMalformed):
		return errors.New("the JWT is malformed")
	case errors.Is(err, jwt.ErrTokenSignatureInvalid):
		return errors.New("the JWT's signature does not match the public key: kas signed it with another agent's private key, or the public key file is not this agent's")
	case errors.Is(err, jwt.ErrTokenExpired):
		return fmt.Errorf("the JWT expired at %s (are the clocks of kas and this cluster in sync?)", claims.ExpiresAt.UTC().Format(time.RFC3339))
	case errors.Is(err, jwt.ErrTokenNotValidYet), errors.Is(err, jwt.ErrTokenUsedBeforeIssued):
		return errors.New("the JWT is not valid yet (kas's clock is ahead of this cluster's)")
	case errors.Is(err, jwt.ErrTokenInvalidAudience):
		return fmt.Errorf("the JWT is for agent %s, this agentk is agent %s: kas dialled the wrong agent's URL, or --receptive-agent-id is wrong",
			clipClaim(strings.Join(claims.Audience, ",")), audience)
	case errors.Is(err, jwt.ErrTokenInvalidIssuer):
		return fmt.Errorf("the JWT's issuer is %q, want %q", clipClaim(claims.Issuer), ReceptiveJWTIssuer)
	case errors.Is(err, jwt.ErrTokenRequiredClaimMissing):
		var missing []string
		for _, c := range []struct {
			name    string
			missing bool
		}{{"exp", claims.ExpiresAt == nil}, {"iss", claims.Issuer == ""}, {"aud", len(claims.Audience) == 0}} {
			if c.missing {
				missing = append(missing, c.name)
			}
		}
		return fmt.Errorf("the JWT lacks required claims: %s", strings.Join(missing, ", "))
	default:
		return fmt.Errorf("the JWT is not valid: %w", err)
	}
	if claims.IssuedAt == nil {
		return errors.New("the JWT has no issue time (iat)")
	}
	if life := claims.ExpiresAt.Sub(claims.IssuedAt.Time); life > MaxReceptiveJWTLifetime {
		return fmt.Errorf("the JWT is valid for %s; agentk accepts at most %s", life, MaxReceptiveJWTLifetime)
	}
	return nil
}

func clipClaim(s string) string {
	const max = 64
	if len(s) > max {
		return s[:max] + "…"
	}
	return s
}

// ParseEd25519PublicKey reads an Ed25519 public key as GitLab shows it
// (public_key of an agent URL configuration: base64 of the 32 raw bytes)
// or as PEM ("PUBLIC KEY", PKIX), e.g. from `openssl pkey -pubout`.
func ParseEd25519PublicKey(data []byte) (ed25519.PublicKey, error) {
	text := strings.TrimSpace(string(data))
	if block, _ := pem.Decode([]byte(text)); block != nil {
		if block.Type != "PUBLIC KEY" {
			return nil, fmt.Errorf("PEM block is %q, want \"PUBLIC KEY\"", block.Type)
		}
		key, err := x509.ParsePKIXPublicKey(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parse PEM public key: %w", err)
		}
		pub, ok := key.(ed25519.PublicKey)
		if !ok {
			return nil, fmt.Errorf("the public key is a %T, want Ed25519", key)
		}
		return pub, nil
	}
	raw, err := base64.StdEncoding.DecodeString(text)
	if err != nil {
		return nil, errors.New("neither PEM nor base64: want GitLab's public_key (base64 of 32 bytes) or a PEM \"PUBLIC KEY\"")
	}
	if len(raw) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("base64 decodes to %d bytes; an Ed25519 public key is %d", len(raw), ed25519.PublicKeySize)
	}
	return ed25519.PublicKey(raw), nil
}

// ParseEd25519PrivateKey reads an Ed25519 private key as GitLab's receptive
// agents API gives it (base64 of the 32-byte seed, or of the 64-byte
// seed and public key) or as PEM ("PRIVATE KEY", PKCS#8), e.g. from
// `openssl genpkey -algorithm ed25519`. Errors never contain key material.
func ParseEd25519PrivateKey(data []byte) (ed25519.PrivateKey, error) {
	text := strings.TrimSpace(string(data))
	if block, _ := pem.Decode([]byte(text)); block != nil {
		if block.Type != "PRIVATE KEY" {
			return nil, fmt.Errorf("PEM block is %q, want \"PRIVATE KEY\" (PKCS#8)", block.Type)
		}
		key, err := x509.ParsePKCS8PrivateKey(block.Bytes)
		if err != nil {
			return nil, errors.New("the PEM private key is not valid PKCS#8")
		}
		priv, ok := key.(ed25519.PrivateKey)
		if !ok {
			return nil, fmt.Errorf("the private key is a %T, want Ed25519", key)
		}
		return priv, nil
	}
	raw, err := base64.StdEncoding.DecodeString(text)
	if err != nil {
		return nil, errors.New("neither PEM nor base64: want base64 of the 32-byte Ed25519 seed or a PEM \"PRIVATE KEY\"")
	}
	switch len(raw) {
	case ed25519.SeedSize:
		return ed25519.NewKeyFromSeed(raw), nil
	case ed25519.PrivateKeySize:
		key := ed25519.NewKeyFromSeed(raw[:ed25519.SeedSize])
		if !key.Public().(ed25519.PublicKey).Equal(ed25519.PublicKey(raw[ed25519.SeedSize:])) {
			return nil, errors.New("the 64-byte private key's public half does not match its seed")
		}
		return key, nil
	default:
		return nil, fmt.Errorf("base64 decodes to %d bytes; an Ed25519 private key is a %d-byte seed", len(raw), ed25519.SeedSize)
	}
}

// ReceptiveURL maps the URL of a receptive agent, as GitLab or the
// standalone file gives it, to the WebSocket URL kas dials, and says whether
// the connection uses TLS. agentk's receptive listener speaks the tunnel
// protocol over a WebSocket, so:
//
//	wss://host:port[/path]  as is (TLS)
//	ws://host:port[/path]   as is (no TLS)
//	grpcs://host:port       wss://host:port/  (GitLab's name for the TLS URL)
//	grpc://host:port        ws://host:port/   (GitLab's name for the plaintext URL)
//
// An empty path is ReceptivePath. A port is required: agentk has no
// default one.
func ReceptiveURL(raw string) (*url.URL, bool, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, false, fmt.Errorf("%q is not a URL: %w", raw, err)
	}
	var secure bool
	switch u.Scheme {
	case "wss", "grpcs":
		secure = true
	case "ws", "grpc":
	default:
		return nil, false, fmt.Errorf("URL %q: scheme must be grpcs, wss, grpc or ws (agentk's receptive listener)", raw)
	}
	if u.Hostname() == "" || u.Port() == "" {
		return nil, false, fmt.Errorf("URL %q: want host:port, e.g. grpcs://agentk.example.com:8182", raw)
	}
	if u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return nil, false, fmt.Errorf("URL %q must not hold credentials, a query or a fragment", u.Redacted())
	}
	if (u.Scheme == "grpc" || u.Scheme == "grpcs") && u.Path != "" && u.Path != "/" {
		return nil, false, fmt.Errorf("URL %q: a grpc(s) URL has no path; use wss:// for a path", raw)
	}
	out := &url.URL{Scheme: "ws", Host: u.Host, Path: u.Path}
	if secure {
		out.Scheme = "wss"
	}
	if out.Path == "" {
		out.Path = ReceptivePath
	}
	return out, secure, nil
}
