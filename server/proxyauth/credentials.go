package proxyauth

import (
	"net/http"
	"net/textproto"
	"net/url"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/net/http/httpguts"

	"github.com/kasproject/kas/protocol"
)

// What the three ways in carry (GitLab KAS's names).
const (
	// CookieName is the browser session cookie GitLab sets for kas.
	CookieName = "_gitlab_kas"
	// HeaderAgentID names the agent on the browser path.
	HeaderAgentID = "Gitlab-Agent-Id"
	// QueryAgentID names the agent on the browser path where the GitLab UI
	// cannot set a header (a browser WebSocket, for watches).
	QueryAgentID = "gitlab-agent-id"
	// HeaderCSRFToken carries the GitLab page's CSRF token on the browser path.
	HeaderCSRFToken = "X-Csrf-Token"
	// QueryCSRFToken carries it where the GitLab UI cannot set a header (a
	// browser WebSocket, for watches), as GitLab's KAS accepts it.
	QueryCSRFToken = "gitlab-csrf-token"
)

// The formats, spelled out in 401 answers so the caller learns what to send.
const (
	formatCI     = `"Authorization: Bearer ci:<agent id>:<job token>"`
	formatPAT    = `"Authorization: Bearer pat:<agent id>:<personal access token>"`
	formatCookie = "the " + CookieName + " cookie with the " + HeaderAgentID + " header (or the " + QueryAgentID +
		" query parameter) and the " + HeaderCSRFToken + " header (or the " + QueryCSRFToken + " query parameter)"
	formatBearer = "the Authorization header must be " + formatCI + " for a CI job or " + formatPAT +
		" for a personal access token"
	formatAll = "send " + formatCI + " (CI job), " + formatPAT + " (personal access token) or " +
		formatCookie + " (GitLab UI)"
)

// credentials is what one request presented, before GitLab has judged it.
type credentials struct {
	kind    Kind
	agentID int64
	// key is the job token, the personal access token or the session key.
	key string
	// csrfToken is set for KindSessionCookie only.
	csrfToken string
}

// parseCredentials reads the credentials of r. The Authorization header wins:
// when it is present the request is judged by it alone, even if it is
// malformed and a _gitlab_kas cookie is present too, as GitLab KAS does.
// Otherwise the _gitlab_kas cookie is used. Every error is a 401 *Error whose
// message never repeats what the caller sent.
func parseCredentials(r *http.Request) (credentials, error) {
	if auth := r.Header.Values("Authorization"); len(auth) > 0 {
		if len(auth) > 1 {
			return credentials{}, unauthorized("send one Authorization header, not %d", len(auth))
		}
		return parseAuthorization(auth[0])
	}
	cookie, err := r.Cookie(CookieName)
	if err != nil {
		return credentials{}, unauthorized("no credentials: %s", formatAll)
	}
	return parseSessionCookie(r, cookie)
}

// parseAuthorization parses "Bearer ci:<agent id>:<job token>" and
// "Bearer pat:<agent id>:<token>". The scheme is case-insensitive (RFC 9110
// §11.1); the rest is exact. The token is everything after the second colon.
func parseAuthorization(v string) (credentials, error) {
	scheme, rest, ok := strings.Cut(v, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return credentials{}, unauthorized("%s", formatBearer)
	}
	prefix, rest, ok := strings.Cut(rest, ":")
	if !ok {
		return credentials{}, unauthorized("%s", formatBearer)
	}
	var c credentials
	switch prefix {
	case "ci":
		c.kind = KindCIJob
	case "pat":
		c.kind = KindPersonalAccessToken
	default:
		return credentials{}, unauthorized("the bearer token must start with ci: or pat:; %s", formatBearer)
	}
	agentID, token, ok := strings.Cut(rest, ":")
	if !ok {
		return credentials{}, unauthorized("%s", formatBearer)
	}
	if c.agentID, ok = parseAgentID(agentID); !ok {
		return credentials{}, unauthorized("the agent id in the Authorization header must be a positive decimal number without sign or leading zeros; %s", formatBearer)
	}
	switch {
	case token == "":
		return credentials{}, unauthorized("the token in the Authorization header is empty; %s", formatBearer)
	case !isVisibleASCII(token):
		return credentials{}, unauthorized("the token in the Authorization header has spaces, control or non-ASCII characters, which no GitLab token has")
	}
	c.key = token
	return c, nil
}

// parseSessionCookie parses the browser path: the cookie, the agent id and
// the CSRF token, each given exactly once.
func parseSessionCookie(r *http.Request, cookie *http.Cookie) (credentials, error) {
	// GitLab Rails (rack) escapes cookie values like a query component.
	key, err := url.QueryUnescape(cookie.Value)
	if err != nil || key == "" || !isVisibleASCII(key) {
		return credentials{}, unauthorized("the %s cookie is empty or malformed; sign in to GitLab again", CookieName)
	}
	var query url.Values
	if r.URL != nil {
		// A malformed pair elsewhere in the query is the API server's business.
		query, _ = url.ParseQuery(r.URL.RawQuery)
	}
	agentID, err := headerOrQuery(r.Header.Values(HeaderAgentID), query[QueryAgentID], HeaderAgentID, QueryAgentID, "name the agent")
	if err != nil {
		return credentials{}, err
	}
	if agentID == "" {
		return credentials{}, unauthorized("a request with the %s cookie must name the agent: send %s", CookieName, formatCookie)
	}
	id, ok := parseAgentID(agentID)
	if !ok {
		return credentials{}, unauthorized("the agent id in the %s header or %s query parameter must be a positive decimal number without sign or leading zeros", HeaderAgentID, QueryAgentID)
	}
	csrf, err := headerOrQuery(r.Header.Values(HeaderCSRFToken), query[QueryCSRFToken], HeaderCSRFToken, QueryCSRFToken, "send the CSRF token")
	if err != nil {
		return credentials{}, err
	}
	if csrf == "" || !isVisibleASCII(csrf) {
		return credentials{}, unauthorized("a request with the %s cookie needs exactly one non-empty CSRF token, in the %s header or the %s query parameter",
			CookieName, HeaderCSRFToken, QueryCSRFToken)
	}
	return credentials{kind: KindSessionCookie, agentID: id, key: key, csrfToken: csrf}, nil
}

// headerOrQuery returns the one value given in a header, a query parameter
// or both (the same value twice), "" for none; what names what must be
// given once ("name the agent").
func headerOrQuery(fromHeader, fromQuery []string, header, param, what string) (string, error) {
	switch {
	case len(fromHeader) > 1 || len(fromQuery) > 1:
		return "", unauthorized("%s once: several %s headers or %s query parameters", what, header, param)
	case len(fromHeader) == 1 && len(fromQuery) == 1 && fromHeader[0] != fromQuery[0]:
		return "", unauthorized("the %s header and the %s query parameter differ", header, param)
	case len(fromHeader) == 1:
		return fromHeader[0], nil
	case len(fromQuery) == 1:
		return fromQuery[0], nil
	}
	return "", nil
}

// parseAgentID accepts only the canonical decimal spelling of a positive
// int64: no sign, no leading zeros, no spaces, no overflow. One spelling per
// agent keeps logs, metrics and cache keys unambiguous.
func parseAgentID(s string) (int64, bool) {
	if s == "" || s[0] < '1' || s[0] > '9' {
		return 0, false
	}
	for i := 1; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, false
		}
	}
	id, err := strconv.ParseInt(s, 10, 64) // fails on overflow
	if err != nil {
		return 0, false
	}
	return id, true
}

// isVisibleASCII reports whether s has only printable ASCII other than space,
// the alphabet of every GitLab token, session key and CSRF token.
func isVisibleASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] > '~' {
			return false
		}
	}
	return true
}

// StripCredentials removes from a request everything the cluster must never
// see from the caller. Call it on the outgoing copy of the request, after
// Authenticate and before forwarding. It removes:
//
//   - the credentials: Authorization, the Gitlab-Agent-Id and X-Csrf-Token
//     headers, the gitlab-agent-id and gitlab-csrf-token query parameters,
//     and every Cookie header. All cookies go, not only _gitlab_kas: kas
//     shares GitLab's domain, so the browser also sends GitLab's own session
//     cookie, and the API server authenticates nobody by cookie;
//   - every header protocol.IsReservedHeader names, however it is spelt
//     (Impersonate_User as well as Impersonate-User): Impersonate-* (whom
//     the agent impersonates is kas's decision alone), front-proxy identity
//     (X-Remote-User, X-Remote-Group, X-Remote-Extra-*), client addresses
//     (X-Real-Ip, X-Forwarded-*, Forwarded: kas sets X-Forwarded-For
//     itself), and the tunnel protocol's own Kas-* headers;
//   - hop-by-hop headers (RFC 9110 §7.6.1): Connection and every header it
//     names, Keep-Alive, Proxy-*, TE, Trailer, Transfer-Encoding.
//
// Upgrade is kept when Connection asks for an upgrade, because the forwarder
// needs it for exec, attach and port-forward, and removed otherwise as the
// stray hop-by-hop header it then is. So after StripCredentials, an Upgrade
// header means the caller asked to switch protocols.
func StripCredentials(r *http.Request) {
	h := r.Header
	// Keys are canonicalized here because a header map built in code, rather
	// than parsed by net/http, may hold them in any case.
	var connection []string
	for k, vs := range h {
		if textproto.CanonicalMIMEHeaderKey(k) == "Connection" {
			connection = append(connection, vs...)
		}
	}
	upgrade := httpguts.HeaderValuesContainsToken(connection, "upgrade")
	named := make(map[string]bool)
	for _, v := range connection {
		for _, name := range strings.Split(v, ",") {
			if name = textproto.TrimString(name); name != "" {
				named[textproto.CanonicalMIMEHeaderKey(name)] = true
			}
		}
	}
	delete(named, "Upgrade")
	for k := range h {
		switch ck := textproto.CanonicalMIMEHeaderKey(k); {
		case named[ck],
			ck == "Authorization", ck == "Cookie", ck == HeaderAgentID, ck == HeaderCSRFToken,
			ck == "Connection", ck == "Keep-Alive", ck == "Te", ck == "Trailer", ck == "Transfer-Encoding",
			ck == "Upgrade" && !upgrade,
			strings.HasPrefix(ck, "Proxy-"),
			protocol.IsReservedHeader(ck):
			delete(h, k)
		}
	}
	if r.URL != nil {
		r.URL.RawQuery = removeQueryParams(r.URL.RawQuery, QueryAgentID, QueryCSRFToken)
	}
}

// removeQueryParams drops every name=value pair of rawQuery whose
// (unescaped) name is one of names, keeping every other byte as the caller
// sent it.
func removeQueryParams(rawQuery string, names ...string) string {
	if rawQuery == "" {
		return rawQuery
	}
	pairs := strings.Split(rawQuery, "&")
	kept := pairs[:0]
	for _, p := range pairs {
		k, _, _ := strings.Cut(p, "=")
		if uk, err := url.QueryUnescape(k); err == nil && slices.Contains(names, uk) {
			continue
		}
		kept = append(kept, p)
	}
	return strings.Join(kept, "&")
}
