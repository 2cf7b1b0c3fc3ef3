package protocol

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/textproto"
	"strings"
)

// Identity is whom agentk impersonates towards the Kubernetes API server.
type Identity struct {
	Username string              `json:"username"`
	UID      string              `json:"uid,omitempty"`
	Groups   []string            `json:"groups,omitempty"`
	Extra    map[string][]string `json:"extra,omitempty"`
}

// MaxIdentitySize bounds the encoded header so a malformed one cannot cost much.
const MaxIdentitySize = 64 << 10

// EncodeIdentity encodes id for HeaderIdentity (base64url of JSON, so any
// username or extra value survives the header).
func EncodeIdentity(id Identity) (string, error) {
	if id.Username == "" {
		return "", errors.New("identity without a username")
	}
	b, err := json.Marshal(id)
	if err != nil {
		return "", fmt.Errorf("encode identity: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}

// DecodeIdentity parses a HeaderIdentity value.
func DecodeIdentity(v string) (Identity, error) {
	var id Identity
	if len(v) > MaxIdentitySize {
		return id, fmt.Errorf("identity header is %d bytes, more than %d", len(v), MaxIdentitySize)
	}
	b, err := base64.RawURLEncoding.DecodeString(v)
	if err != nil {
		return id, fmt.Errorf("identity header is not base64url: %w", err)
	}
	if err := json.Unmarshal(b, &id); err != nil {
		return id, fmt.Errorf("identity header is not valid JSON: %w", err)
	}
	if id.Username == "" {
		return id, errors.New("identity header has no username")
	}
	for k := range id.Extra {
		if k == "" || strings.ContainsAny(k, " \t\r\n:") {
			return id, fmt.Errorf("identity extra key %q is not a valid header name", k)
		}
	}
	return id, nil
}

// SetImpersonationHeaders replaces every Impersonate-* header in h with id's.
func SetImpersonationHeaders(h http.Header, id Identity) {
	DeleteImpersonationHeaders(h)
	h.Set("Impersonate-User", id.Username)
	if id.UID != "" {
		h.Set("Impersonate-Uid", id.UID)
	}
	for _, g := range id.Groups {
		h.Add("Impersonate-Group", g)
	}
	for k, vals := range id.Extra {
		// Extra keys are case-insensitive in Kubernetes and carried
		// percent-encoded in the header name (k8s.io/apiserver's rule).
		name := "Impersonate-Extra-" + escapeExtraKey(k)
		for _, v := range vals {
			h[name] = append(h[name], v)
		}
	}
}

// DeleteImpersonationHeaders removes every Impersonate-* header from h.
func DeleteImpersonationHeaders(h http.Header) {
	for k := range h {
		if strings.HasPrefix(textproto.CanonicalMIMEHeaderKey(k), "Impersonate-") {
			delete(h, k)
		}
	}
}

// escapeExtraKey percent-encodes the characters that are not legal in a header
// name, as kube-apiserver expects for Impersonate-Extra-<key> (e.g. the slash
// in agent.gitlab.com/id).
func escapeExtraKey(k string) string {
	var b strings.Builder
	for i := 0; i < len(k); i++ {
		c := k[i]
		if isHeaderTokenChar(c) && c != '%' {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

func isHeaderTokenChar(c byte) bool {
	switch {
	case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		return true
	}
	return strings.IndexByte("!#$&'*+-.^_`|~", c) >= 0
}
