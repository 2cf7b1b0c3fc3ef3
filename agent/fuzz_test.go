package agent

import (
	"net/http"
	"net/textproto"
	"slices"
	"strings"
	"testing"

	"golang.org/x/net/http/httpguts"

	"github.com/kasproject/kas/protocol"
)

// FuzzUpstreamIdentity feeds arbitrary identity headers (untrusted bytes from
// the tunnel) and caller headers through the agent's header preparation: it
// must never panic, and whatever it accepts must reach the API server as
// valid headers carrying exactly that identity and no caller credentials.
func FuzzUpstreamIdentity(f *testing.F) {
	for _, id := range []protocol.Identity{
		{Username: "gitlab:user:alice", Groups: []string{"gitlab:user"}},
		{Username: "gitlab:ci_job:9", UID: "9", Extra: map[string][]string{"agent.gitlab.com/job_id": {"9"}, "a%b c": {"x"}}},
	} {
		v, err := protocol.EncodeIdentity(id)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(v, "Impersonate-User", "system:admin")
	}
	f.Add("", "Authorization", "Bearer caller")
	f.Add("e30", "impersonate-group", "system:masters")  // {}
	f.Add("eyJ1c2VybmFtZSI6IlxuIn0", "X-Other", "value") // {"username":"\n"}
	f.Add("!!", "Impersonate-Extra-Scopes", "all")
	f.Add("", "Impersonate_User", "system:admin")
	f.Add("", "X-Real-Ip", "10.0.0.1")

	f.Fuzz(func(t *testing.T, identity, callerName, callerValue string) {
		h := http.Header{}
		h[callerName] = []string{callerValue}
		if identity != "" {
			h.Set(protocol.HeaderIdentity, identity)
		}
		id, err := requestIdentity(h)
		if err != nil {
			return // refused with 400: nothing is forwarded
		}
		setUpstreamIdentity(h, id, nil)

		if h.Get("Authorization") != "" || h.Get(protocol.HeaderIdentity) != "" {
			t.Fatalf("caller credentials or the identity header survived: %v", h)
		}
		var users []string
		for name, values := range h {
			canonical := textproto.CanonicalMIMEHeaderKey(name)
			if !strings.HasPrefix(canonical, "Impersonate-") {
				if protocol.IsReservedHeader(name) {
					t.Fatalf("the caller's %s: %q goes upstream", name, values)
				}
				continue
			}
			if id == nil {
				t.Fatalf("no identity, but %s: %q goes upstream", name, values)
			}
			if !httpguts.ValidHeaderFieldName(name) {
				t.Fatalf("invalid header name %q", name)
			}
			for _, v := range values {
				if !httpguts.ValidHeaderFieldValue(v) {
					t.Fatalf("invalid value %q for %s", v, name)
				}
			}
			if canonical == "Impersonate-User" {
				users = append(users, values...)
			}
		}
		if id != nil && !slices.Equal(users, []string{id.Username}) {
			t.Fatalf("Impersonate-User = %q, want exactly %q", users, id.Username)
		}
	})
}
