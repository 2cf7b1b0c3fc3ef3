package middleware

import (
	"context"
	"net"
	"net/http"
	"net/netip"
	"strings"
)

type clientAddrKey struct{}

// ClientAddress finds the address of the client behind each request and
// records it for ClientAddressOf: the address the connection came from or,
// when that is one of the trusted proxies (agent.trusted_proxies: the load
// balancers and reverse proxies in front of kas), the address that proxy
// put in X-Forwarded-For, walking the header from the right past every
// trusted hop. Without trusted proxies no header is believed: any client
// can write X-Forwarded-For.
func ClientAddress(trusted []netip.Prefix) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			addr := clientAddress(r, trusted)
			next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), clientAddrKey{}, addr)))
		})
	}
}

// ClientAddressOf returns the client's IP address as ClientAddress found
// it, or without that middleware the host of r.RemoteAddr; "" when the
// connection has no IP address (a Unix socket).
func ClientAddressOf(r *http.Request) string {
	if addr, ok := r.Context().Value(clientAddrKey{}).(string); ok {
		return addr
	}
	if ip, ok := remoteIP(r); ok {
		return ip.String()
	}
	return ""
}

func clientAddress(r *http.Request, trusted []netip.Prefix) string {
	ip, ok := remoteIP(r)
	if !ok {
		return ""
	}
	if len(trusted) == 0 {
		return ip.String()
	}
	var hops []string
	for _, v := range r.Header.Values("X-Forwarded-For") {
		hops = append(hops, strings.Split(v, ",")...)
	}
	for i := len(hops) - 1; i >= 0 && isTrusted(ip, trusted); i-- {
		hop, err := parseHop(hops[i])
		if err != nil {
			break // a trusted proxy would not write that: stop at the proxy
		}
		ip = hop
	}
	return ip.String()
}

func remoteIP(r *http.Request) (netip.Addr, bool) {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return netip.Addr{}, false
	}
	return ap.Addr().Unmap(), true
}

func isTrusted(ip netip.Addr, trusted []netip.Prefix) bool {
	for _, p := range trusted {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// parseHop parses one X-Forwarded-For element: an IP address, possibly
// with a port ("192.0.2.1:4711", "[2001:db8::1]:4711").
func parseHop(s string) (netip.Addr, error) {
	s = strings.TrimSpace(s)
	if host, _, err := net.SplitHostPort(s); err == nil {
		s = host
	}
	ip, err := netip.ParseAddr(strings.Trim(s, "[]"))
	return ip.Unmap(), err
}
