package protocol

import "strings"

// HeaderForwardedFor carries the caller's address to the API server: kas
// sets it to the address it saw the caller connect from (after
// agent.trusted_proxies), and agentk passes kas's value on, so Kubernetes
// audit logs show the true client first in sourceIPs.
const HeaderForwardedFor = "X-Forwarded-For"

// IsReservedHeader reports whether a request header named name speaks for
// kas or the caller's identity or address, so that a caller's copy must
// never reach the API server: Impersonate-*, the X-Remote-User,
// X-Remote-Group and X-Remote-Extra-* of front-proxy authentication,
// X-Real-Ip, X-Forwarded-* and Forwarded, and the tunnel's own Kas-*.
//
// Names are compared as a proxy or server in front of the API server might
// normalize them: case-insensitively and with '_' read as '-' (nginx, CGI
// and some gateways turn Impersonate_User into Impersonate-User).
func IsReservedHeader(name string) bool {
	n := strings.ReplaceAll(strings.ToLower(name), "_", "-")
	switch n {
	case "x-remote-user", "x-remote-group", "x-real-ip", "forwarded":
		return true
	}
	for _, prefix := range [...]string{"impersonate-", "x-remote-extra-", "x-forwarded-", "kas-"} {
		if strings.HasPrefix(n, prefix) {
			return true
		}
	}
	return false
}

// DeleteReservedHeaders removes every header IsReservedHeader names.
func DeleteReservedHeaders(h map[string][]string) {
	for k := range h {
		if IsReservedHeader(k) {
			delete(h, k)
		}
	}
}
