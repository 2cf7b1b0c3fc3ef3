package tunnel

import (
	"net/http"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/kasproject/kas/protocol"
)

// FuzzAgentHandshake feeds the untrusted parts of an agent's handshake — the
// Authorization header and the self-description headers — to what parses
// them: no panic, no control character or oversized value kept for logs and
// the status page, and no empty token accepted.
func FuzzAgentHandshake(f *testing.F) {
	for _, s := range []string{"Bearer abc", "bearer  x ", "Basic abc", "Bearer", "", "Bearer \x00", strings.Repeat("v", 300), "v1.2.3\r\nX: y"} {
		f.Add(s, s)
	}
	f.Fuzz(func(t *testing.T, authorization, description string) {
		if token, ok := BearerToken(authorization); ok && (token == "" || strings.TrimSpace(token) != token) {
			t.Fatalf("BearerToken(%q) accepted %q", authorization, token)
		}
		h := http.Header{protocol.HeaderAgentVersion: {description}}
		v := headerValue(h, protocol.HeaderAgentVersion)
		if len(v) > 256 {
			t.Fatalf("kept %d bytes", len(v))
		}
		for _, r := range v {
			if r < ' ' || r == 0x7f {
				t.Fatalf("kept control character %q in %q", r, v)
			}
		}
		if utf8.ValidString(description) && len(description) <= 256 && !strings.ContainsFunc(description, func(r rune) bool { return r < ' ' || r == 0x7f || r == utf8.RuneError }) && v != description {
			t.Fatalf("changed a clean value %q to %q", description, v)
		}
	})
}
