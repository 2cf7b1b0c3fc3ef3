package proxyauth

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"strings"
	"testing"

	"github.com/kasproject/kas/protocol"
	"github.com/kasproject/kas/server/kubestatus"
)

// req builds a request to the proxy with the given headers (name, value pairs)
// and raw query.
func req(rawQuery string, headers ...string) *http.Request {
	r := httptest.NewRequest(http.MethodGet, "/k8s-proxy/api/v1/pods", nil)
	r.URL.RawQuery = rawQuery
	for i := 0; i+1 < len(headers); i += 2 {
		r.Header.Add(headers[i], headers[i+1])
	}
	return r
}

func TestParseCredentials(t *testing.T) {
	const cookie = "_gitlab_kas=s3ss%2Bk3y%3D%3D" // rack-escaped "s3ss+k3y=="
	for _, tc := range []struct {
		name string
		r    *http.Request
		want credentials
		// wantErr is a substring of the 401 message; "" means success.
		wantErr string
	}{
		// CI job and personal access token.
		{name: "ci", r: req("", "Authorization", "Bearer ci:5:glcbt-job"),
			want: credentials{kind: KindCIJob, agentID: 5, key: "glcbt-job"}},
		{name: "pat", r: req("", "Authorization", "Bearer pat:12:glpat-xyz"),
			want: credentials{kind: KindPersonalAccessToken, agentID: 12, key: "glpat-xyz"}},
		{name: "scheme is case-insensitive", r: req("", "Authorization", "bearer ci:5:s3cr3t"),
			want: credentials{kind: KindCIJob, agentID: 5, key: "s3cr3t"}},
		{name: "token keeps later colons", r: req("", "Authorization", "Bearer pat:5:a:b:c"),
			want: credentials{kind: KindPersonalAccessToken, agentID: 5, key: "a:b:c"}},
		{name: "largest agent id", r: req("", "Authorization", "Bearer ci:9223372036854775807:s3cr3t"),
			want: credentials{kind: KindCIJob, agentID: 9223372036854775807, key: "s3cr3t"}},
		{name: "agent id query is ignored for bearer", r: req("gitlab-agent-id=9", "Authorization", "Bearer ci:5:s3cr3t"),
			want: credentials{kind: KindCIJob, agentID: 5, key: "s3cr3t"}},

		{name: "no credentials", r: req(""), wantErr: "no credentials: send " + formatCI},
		{name: "other cookies only", r: req("", "Cookie", "_gitlab_session=abc"), wantErr: "no credentials"},
		{name: "empty header", r: req("", "Authorization", ""), wantErr: formatBearer},
		{name: "scheme only", r: req("", "Authorization", "Bearer"), wantErr: formatBearer},
		{name: "scheme and space", r: req("", "Authorization", "Bearer "), wantErr: formatBearer},
		{name: "prefix only", r: req("", "Authorization", "Bearer ci"), wantErr: formatBearer},
		{name: "no token part", r: req("", "Authorization", "Bearer ci:5"), wantErr: formatBearer},
		{name: "empty agent id", r: req("", "Authorization", "Bearer ci::s3cr3t"), wantErr: "positive decimal"},
		{name: "empty token", r: req("", "Authorization", "Bearer ci:5:"), wantErr: "token in the Authorization header is empty"},
		{name: "non-numeric agent id", r: req("", "Authorization", "Bearer ci:abc:s3cr3t"), wantErr: "positive decimal"},
		{name: "negative agent id", r: req("", "Authorization", "Bearer ci:-5:s3cr3t"), wantErr: "positive decimal"},
		{name: "plus sign", r: req("", "Authorization", "Bearer ci:+5:s3cr3t"), wantErr: "positive decimal"},
		{name: "zero", r: req("", "Authorization", "Bearer ci:0:s3cr3t"), wantErr: "positive decimal"},
		{name: "leading zero", r: req("", "Authorization", "Bearer ci:05:s3cr3t"), wantErr: "positive decimal"},
		{name: "overflow", r: req("", "Authorization", "Bearer ci:9223372036854775808:s3cr3t"), wantErr: "positive decimal"},
		{name: "space in agent id", r: req("", "Authorization", "Bearer ci: 5:s3cr3t"), wantErr: "positive decimal"},
		{name: "hex agent id", r: req("", "Authorization", "Bearer ci:0x5:s3cr3t"), wantErr: "positive decimal"},
		{name: "underscore agent id", r: req("", "Authorization", "Bearer ci:1_0:s3cr3t"), wantErr: "positive decimal"},
		{name: "space in token", r: req("", "Authorization", "Bearer ci:5:s3c r3t"), wantErr: "no GitLab token has"},
		{name: "non-ASCII token", r: req("", "Authorization", "Bearer ci:5:s3cr3tö"), wantErr: "no GitLab token has"},
		{name: "double space", r: req("", "Authorization", "Bearer  ci:5:s3cr3t"), wantErr: "must start with ci: or pat:"},
		{name: "unknown prefix", r: req("", "Authorization", "Bearer job:5:s3cr3t"), wantErr: "must start with ci: or pat:"},
		{name: "prefix is case-sensitive", r: req("", "Authorization", "Bearer CI:5:s3cr3t"), wantErr: "must start with ci: or pat:"},
		{name: "plain bearer token", r: req("", "Authorization", "Bearer glpat-xyz"), wantErr: formatBearer},
		{name: "basic auth", r: req("", "Authorization", "Basic dXNlcjpwYXNz"), wantErr: formatBearer},
		{name: "token scheme", r: req("", "Authorization", "Token ci:5:s3cr3t"), wantErr: formatBearer},
		{name: "two headers", r: req("", "Authorization", "Bearer ci:5:s3cr3t", "Authorization", "Bearer ci:5:s3cr3t"),
			wantErr: "send one Authorization header, not 2"},

		// Browser session.
		{name: "cookie with header", r: req("", "Cookie", "a=b; "+cookie, "Gitlab-Agent-Id", "7", "X-Csrf-Token", "c5rf=="),
			want: credentials{kind: KindSessionCookie, agentID: 7, key: "s3ss+k3y==", csrfToken: "c5rf=="}},
		{name: "cookie with query", r: req("watch=1&gitlab-agent-id=7", "Cookie", cookie, "X-Csrf-Token", "c"),
			want: credentials{kind: KindSessionCookie, agentID: 7, key: "s3ss+k3y==", csrfToken: "c"}},
		{name: "cookie with escaped query name", r: req("gitlab%2Dagent%2Did=7", "Cookie", cookie, "X-Csrf-Token", "c"),
			want: credentials{kind: KindSessionCookie, agentID: 7, key: "s3ss+k3y==", csrfToken: "c"}},
		{name: "cookie with header and same query", r: req("gitlab-agent-id=7", "Cookie", cookie, "Gitlab-Agent-Id", "7", "X-Csrf-Token", "c"),
			want: credentials{kind: KindSessionCookie, agentID: 7, key: "s3ss+k3y==", csrfToken: "c"}},
		{name: "bearer wins over cookie", r: req("", "Authorization", "Bearer pat:3:s3cr3t", "Cookie", cookie, "Gitlab-Agent-Id", "7", "X-Csrf-Token", "c"),
			want: credentials{kind: KindPersonalAccessToken, agentID: 3, key: "s3cr3t"}},
		{name: "malformed bearer is not rescued by cookie", r: req("", "Authorization", "Basic x", "Cookie", cookie, "Gitlab-Agent-Id", "7", "X-Csrf-Token", "c"),
			wantErr: formatBearer},

		{name: "cookie without agent id", r: req("", "Cookie", cookie, "X-Csrf-Token", "c"), wantErr: "must name the agent"},
		{name: "header and query disagree", r: req("gitlab-agent-id=8", "Cookie", cookie, "Gitlab-Agent-Id", "7", "X-Csrf-Token", "c"),
			wantErr: "the Gitlab-Agent-Id header and the gitlab-agent-id query parameter differ"},
		{name: "two agent id headers", r: req("", "Cookie", cookie, "Gitlab-Agent-Id", "7", "Gitlab-Agent-Id", "7", "X-Csrf-Token", "c"),
			wantErr: "name the agent once"},
		{name: "two agent id parameters", r: req("gitlab-agent-id=7&gitlab-agent-id=7", "Cookie", cookie, "X-Csrf-Token", "c"),
			wantErr: "name the agent once"},
		{name: "bad agent id header", r: req("", "Cookie", cookie, "Gitlab-Agent-Id", "7x", "X-Csrf-Token", "c"), wantErr: "positive decimal"},
		{name: "negative agent id header", r: req("", "Cookie", cookie, "Gitlab-Agent-Id", "-7", "X-Csrf-Token", "c"), wantErr: "positive decimal"},
		{name: "no csrf token", r: req("", "Cookie", cookie, "Gitlab-Agent-Id", "7"), wantErr: "exactly one non-empty CSRF token, in the X-Csrf-Token header or the gitlab-csrf-token query parameter"},
		{name: "empty csrf token", r: req("", "Cookie", cookie, "Gitlab-Agent-Id", "7", "X-Csrf-Token", ""), wantErr: "exactly one non-empty CSRF token"},
		{name: "empty csrf parameter", r: req("gitlab-csrf-token=", "Cookie", cookie, "Gitlab-Agent-Id", "7"), wantErr: "exactly one non-empty CSRF token"},
		{name: "two csrf tokens", r: req("", "Cookie", cookie, "Gitlab-Agent-Id", "7", "X-Csrf-Token", "a", "X-Csrf-Token", "b"),
			wantErr: "send the CSRF token once"},
		{name: "two csrf parameters", r: req("gitlab-csrf-token=a&gitlab-csrf-token=a", "Cookie", cookie, "Gitlab-Agent-Id", "7"),
			wantErr: "send the CSRF token once"},
		{name: "csrf header and parameter differ", r: req("gitlab-csrf-token=b", "Cookie", cookie, "Gitlab-Agent-Id", "7", "X-Csrf-Token", "a"),
			wantErr: "the X-Csrf-Token header and the gitlab-csrf-token query parameter differ"},
		// A browser WebSocket cannot send headers: everything in the query.
		{name: "browser WebSocket: csrf and agent in the query", r: req("watch=true&gitlab-agent-id=7&gitlab-csrf-token=c5rf%3D%3D", "Cookie", cookie),
			want: credentials{kind: KindSessionCookie, agentID: 7, key: "s3ss+k3y==", csrfToken: "c5rf=="}},
		{name: "csrf header and same parameter", r: req("gitlab-csrf-token=c", "Cookie", cookie, "Gitlab-Agent-Id", "7", "X-Csrf-Token", "c"),
			want: credentials{kind: KindSessionCookie, agentID: 7, key: "s3ss+k3y==", csrfToken: "c"}},
		{name: "empty cookie", r: req("", "Cookie", "_gitlab_kas=", "Gitlab-Agent-Id", "7", "X-Csrf-Token", "c"), wantErr: "cookie is empty or malformed"},
		{name: "badly escaped cookie", r: req("", "Cookie", "_gitlab_kas=%zz", "Gitlab-Agent-Id", "7", "X-Csrf-Token", "c"), wantErr: "cookie is empty or malformed"},
		{name: "cookie escaping a control character", r: req("", "Cookie", "_gitlab_kas=a%00b", "Gitlab-Agent-Id", "7", "X-Csrf-Token", "c"), wantErr: "cookie is empty or malformed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseCredentials(tc.r)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("error %v, want %+v", err, tc.want)
				}
				if got != tc.want {
					t.Errorf("got %+v, want %+v", got, tc.want)
				}
				return
			}
			var perr *Error
			if !errors.As(err, &perr) {
				t.Fatalf("got %+v, %v; want a *Error containing %q", got, err, tc.wantErr)
			}
			if perr.Code != http.StatusUnauthorized || perr.Reason != kubestatus.ReasonUnauthorized {
				t.Errorf("error %d %s, want 401 Unauthorized", perr.Code, perr.Reason)
			}
			if !strings.Contains(perr.Message, tc.wantErr) {
				t.Errorf("message %q does not contain %q", perr.Message, tc.wantErr)
			}
			for _, secret := range []string{"s3cr3t", "s3c r3t", "glpat-xyz", "s3ss", "c5rf"} {
				if strings.Contains(perr.Error(), secret) {
					t.Errorf("error %q repeats what the caller sent (%q)", perr.Error(), secret)
				}
			}
		})
	}
}

func TestParseAgentID(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		ok   bool
	}{
		{"1", 1, true},
		{"42", 42, true},
		{"9223372036854775807", 9223372036854775807, true},
		{"9223372036854775808", 0, false},
		{"99999999999999999999", 0, false},
		{"", 0, false},
		{"0", 0, false},
		{"00", 0, false},
		{"01", 0, false},
		{"-1", 0, false},
		{"+1", 0, false},
		{" 1", 0, false},
		{"1 ", 0, false},
		{"1e3", 0, false},
		{"١", 0, false}, // Arabic-Indic digit one
	} {
		got, ok := parseAgentID(tc.in)
		if got != tc.want || ok != tc.ok {
			t.Errorf("parseAgentID(%q) = %d, %v; want %d, %v", tc.in, got, ok, tc.want, tc.ok)
		}
	}
}

func TestStripCredentials(t *testing.T) {
	for _, tc := range []struct {
		name      string
		header    http.Header
		rawQuery  string
		wantHdr   http.Header
		wantQuery string
	}{
		{
			name: "credentials, impersonation and tunnel headers",
			header: http.Header{
				"Authorization":               {"Bearer ci:5:tok"},
				"Cookie":                      {"_gitlab_kas=x; _gitlab_session=y"},
				"Gitlab-Agent-Id":             {"5"},
				"X-Csrf-Token":                {"c"},
				"Impersonate-User":            {"admin"},
				"Impersonate-Group":           {"system:masters"},
				"Impersonate-Uid":             {"0"},
				"Impersonate-Extra-Scopes":    {"x"},
				protocol.HeaderIdentity:       {"e30"},
				protocol.HeaderUpgrade:        {"websocket"},
				protocol.HeaderUpgradeStatus:  {"101"},
				"Kas-Agent-Version":           {"v1"},
				"Accept":                      {"application/json"},
				"User-Agent":                  {"kubectl/v1.36"},
				"X-Request-Id":                {"abc"},
				"Content-Type":                {"application/json"},
				"Accept-Encoding":             {"gzip"},
				"Gitlab-Agent-Id-Not-Exactly": {"kept: not a credential header"},
			},
			rawQuery: "watch=1&gitlab-agent-id=5&labelSelector=a%3Db&gitlab%2Dagent%2Did=5",
			wantHdr: http.Header{
				"Accept":                      {"application/json"},
				"User-Agent":                  {"kubectl/v1.36"},
				"X-Request-Id":                {"abc"},
				"Content-Type":                {"application/json"},
				"Accept-Encoding":             {"gzip"},
				"Gitlab-Agent-Id-Not-Exactly": {"kept: not a credential header"},
			},
			wantQuery: "watch=1&labelSelector=a%3Db",
		},
		{
			name: "client addresses, front-proxy identity, and spellings a front end would normalize",
			header: http.Header{
				"X-Real-Ip":                 {"10.9.9.9"},
				"X-Forwarded-For":           {"10.9.9.9"},
				"X-Forwarded-Host":          {"evil.example.com"},
				"X-Forwarded-Proto":         {"https"},
				"Forwarded":                 {"for=10.9.9.9"},
				"X-Remote-User":             {"system:admin"},
				"X-Remote-Group":            {"system:masters"},
				"X-Remote-Extra-Scopes":     {"x"},
				"Impersonate_User":          {"system:admin"},
				"Impersonate_Group":         {"system:masters"},
				"IMPERSONATE_EXTRA_REASONS": {"x"},
				"X_Real_Ip":                 {"10.9.9.9"},
				"X_Remote_User":             {"system:admin"},
				"Kas_Impersonate":           {"e30"},
				"Accept":                    {"application/json"},
			},
			rawQuery:  "watch=true&gitlab-agent-id=5&gitlab-csrf-token=c&gitlab%2Dcsrf%2Dtoken=c",
			wantHdr:   http.Header{"Accept": {"application/json"}},
			wantQuery: "watch=true",
		},
		{
			name: "hop-by-hop, with an upgrade",
			header: http.Header{
				"Connection":          {"Upgrade, X-Hop", "keep-alive"},
				"Upgrade":             {"websocket"},
				"X-Hop":               {"1"},
				"Keep-Alive":          {"timeout=5"},
				"Proxy-Connection":    {"keep-alive"},
				"Proxy-Authorization": {"Basic x"},
				"Proxy-Authenticate":  {"Basic"},
				"Te":                  {"trailers"},
				"Trailer":             {"X-T"},
				"Transfer-Encoding":   {"chunked"},
				"X-Stream-Protocol":   {"v4.channel.k8s.io"},
				"Sec-Websocket-Key":   {"k"},
			},
			rawQuery: "command=sh&stdin=true",
			wantHdr: http.Header{
				"Upgrade":           {"websocket"},
				"X-Stream-Protocol": {"v4.channel.k8s.io"},
				"Sec-Websocket-Key": {"k"},
			},
			wantQuery: "command=sh&stdin=true",
		},
		{
			name: "stray Upgrade without Connection: upgrade",
			header: http.Header{
				"Connection": {"close"},
				"Upgrade":    {"websocket"},
				"Accept":     {"*/*"},
			},
			wantHdr: http.Header{"Accept": {"*/*"}},
		},
		{
			name: "non-canonical keys from a hand-built map",
			header: http.Header{
				"authorization":    {"Bearer ci:5:tok"},
				"impersonate-user": {"admin"},
				"connection":       {"x-hop"},
				"x-hop":            {"1"},
				"kas-impersonate":  {"e30"},
				"accept":           {"*/*"},
			},
			wantHdr: http.Header{"accept": {"*/*"}},
		},
		{
			name:      "query without the parameter is untouched",
			header:    http.Header{},
			rawQuery:  "a=1&&b=%zz;c&gitlab-agent-idx=2",
			wantHdr:   http.Header{},
			wantQuery: "a=1&&b=%zz;c&gitlab-agent-idx=2",
		},
		{
			name:      "only the parameter",
			header:    http.Header{},
			rawQuery:  "gitlab-agent-id=5",
			wantHdr:   http.Header{},
			wantQuery: "",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := &http.Request{Header: tc.header, URL: &url.URL{Path: "/api/v1/pods", RawQuery: tc.rawQuery}}
			StripCredentials(r)
			if !reflect.DeepEqual(r.Header, tc.wantHdr) {
				t.Errorf("headers\n got %v\nwant %v", r.Header, tc.wantHdr)
			}
			if r.URL.RawQuery != tc.wantQuery {
				t.Errorf("query %q, want %q", r.URL.RawQuery, tc.wantQuery)
			}
		})
	}
}

// The tunnel protocol's headers must share the prefix StripCredentials removes.
func TestProtocolHeadersHaveKasPrefix(t *testing.T) {
	for _, h := range []string{protocol.HeaderIdentity, protocol.HeaderUpgrade, protocol.HeaderUpgradeStatus} {
		if !strings.HasPrefix(http.CanonicalHeaderKey(h), "Kas-") {
			t.Errorf("protocol header %q does not start with Kas-; StripCredentials would let a caller send it", h)
		}
	}
}

// FuzzParseCredentials feeds arbitrary header and query bytes to the parser.
// It must never panic, never accept an agent id ≤ 0 or an empty or blank key,
// refuse only with a 401 that does not repeat the token, and after
// StripCredentials no credentials must be left.
func FuzzParseCredentials(f *testing.F) {
	for _, seed := range [][5]string{
		{"Bearer ci:5:glcbt-job", "", "", "", ""},
		{"Bearer pat:12:glpat-xyz", "", "", "", ""},
		{"bearer ci:9223372036854775807:t", "", "", "", ""},
		{"Bearer ci:9223372036854775808:t", "", "", "", ""},
		{"Bearer ci:-1:t", "", "", "", ""},
		{"Bearer ci:0:t", "", "", "", ""},
		{"Bearer ci:5:", "", "", "", ""},
		{"Bearer ci:5", "", "", "", ""},
		{"Basic dXNlcjpwYXNz", "", "", "", ""},
		{"Bearer ci:5:a\nBearer ci:5:b", "", "", "", ""},
		{"", "_gitlab_kas=sess%2Bkey", "7", "csrf", ""},
		{"", "_gitlab_kas=sess", "", "csrf", "gitlab-agent-id=7"},
		{"", "_gitlab_kas=sess", "7", "csrf", "gitlab-agent-id=8"},
		{"", "_gitlab_kas=%zz", "7", "csrf", ""},
		{"", "_gitlab_kas=\"quoted\"", "7\n7", "c\nc", "gitlab-agent-id=7&gitlab-agent-id=7"},
		{"", "a=b; _gitlab_kas=x; _gitlab_kas=y", "007", "", "gitlab%2dagent-id=7;x"},
	} {
		f.Add(seed[0], seed[1], seed[2], seed[3], seed[4])
	}
	f.Fuzz(func(t *testing.T, authorization, cookie, agentID, csrf, rawQuery string) {
		h := http.Header{}
		for name, v := range map[string]string{
			"Authorization": authorization, "Cookie": cookie, HeaderAgentID: agentID, HeaderCSRFToken: csrf,
		} {
			if v != "" {
				h[name] = strings.Split(v, "\n") // several lines, several header values
			}
		}
		r := &http.Request{Header: h, URL: &url.URL{Path: "/api/v1/pods", RawQuery: rawQuery}}

		c, err := parseCredentials(r)
		if err == nil {
			if c.agentID <= 0 {
				t.Fatalf("accepted agent id %d", c.agentID)
			}
			if c.key == "" || !isVisibleASCII(c.key) {
				t.Fatalf("accepted key %q", c.key)
			}
			switch c.kind {
			case KindCIJob, KindPersonalAccessToken:
				if c.csrfToken != "" {
					t.Fatalf("bearer credentials with a CSRF token: %+v", c)
				}
			case KindSessionCookie:
				if c.csrfToken == "" {
					t.Fatalf("session without a CSRF token: %+v", c)
				}
			default:
				t.Fatalf("unknown kind %q", c.kind)
			}
		} else {
			var perr *Error
			if !errors.As(err, &perr) || perr.Code != http.StatusUnauthorized || perr.Reason != kubestatus.ReasonUnauthorized || perr.Message == "" {
				t.Fatalf("refusal %#v is not a 401 *Error with a message", err)
			}
			// The part after the second colon is the token; it must not come back.
			if parts := strings.SplitN(authorization, ":", 3); len(parts) == 3 && len(parts[2]) >= 4 &&
				!strings.Contains(formatAll, parts[2]) && strings.Contains(perr.Message, parts[2]) {
				t.Fatalf("message %q repeats the token %q", perr.Message, parts[2])
			}
		}

		StripCredentials(r)
		if q, _ := url.ParseQuery(r.URL.RawQuery); q.Has(QueryAgentID) {
			t.Fatalf("query %q still names the agent", r.URL.RawQuery)
		}
		if _, err := parseCredentials(r); err == nil || !strings.HasPrefix(err.(*Error).Message, "no credentials") {
			t.Fatalf("credentials left after StripCredentials: headers %q, query %q (%v)", r.Header, r.URL.RawQuery, err)
		}
	})
}
