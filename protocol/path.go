package protocol

import (
	"errors"
	"net/url"
	"strings"
)

// ErrUnsafePath is a request path that a path-routing front before the API
// server (Rancher-style /k8s/clusters/<id>/ prefixes, an API gateway,
// nginx) could resolve to somewhere outside the prefix the request was sent
// under; CheckPath's error wraps it.
var ErrUnsafePath = errors.New("the path has a dot segment or an encoded slash or dot, which kas does not forward")

// CheckPath refuses a Kubernetes API path with a "." or ".." segment, an
// encoded slash or dot (%2F, %2E, in any case), or one encoded twice (%252F
// decodes to %2F): no Kubernetes API path needs one, and each lets a path
// such as /../../escape leave the prefix it is forwarded under. kas checks
// every proxied request before authenticating it, and agentk again before
// forwarding it (defence in depth). u is the request's URL, with Path
// decoded and RawPath the path as sent when it differs.
func CheckPath(u *url.URL) error {
	decoded := u.Path
	for segment := range strings.SplitSeq(decoded, "/") {
		if segment == "." || segment == ".." {
			return ErrUnsafePath
		}
	}
	for _, p := range []string{u.EscapedPath(), u.RawPath, decoded} {
		if hasEncodedSlashOrDot(p) {
			return ErrUnsafePath
		}
	}
	return nil
}

// hasEncodedSlashOrDot reports whether s contains %2F or %2E in any case.
func hasEncodedSlashOrDot(s string) bool {
	for i := strings.IndexByte(s, '%'); i >= 0 && i+2 < len(s); {
		if s[i+1] == '2' {
			switch s[i+2] {
			case 'e', 'E', 'f', 'F':
				return true
			}
		}
		next := strings.IndexByte(s[i+1:], '%')
		if next < 0 {
			break
		}
		i += 1 + next
	}
	return false
}
