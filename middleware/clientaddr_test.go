package middleware

import (
	"net/http"
	"net/http/httptest"
	"net/netip"
	"testing"
)

func TestClientAddress(t *testing.T) {
	lb := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/24"), netip.MustParsePrefix("fd00::/64")}
	tests := []struct {
		name         string
		trusted      []netip.Prefix
		remote       string
		forwardedFor []string
		want         string
	}{
		{"no proxies trusted: the header is ignored", nil, "198.51.100.7:5000", []string{"203.0.113.9"}, "198.51.100.7"},
		{"from a trusted proxy", lb, "10.0.0.2:5000", []string{"203.0.113.9"}, "203.0.113.9"},
		{"the client's own claims are skipped", lb, "10.0.0.2:5000", []string{"1.2.3.4, 203.0.113.9"}, "203.0.113.9"},
		{"several trusted hops", lb, "10.0.0.2:5000", []string{"1.2.3.4, 203.0.113.9, 10.0.0.3"}, "203.0.113.9"},
		{"header lines are joined", lb, "10.0.0.2:5000", []string{"1.2.3.4", "203.0.113.9"}, "203.0.113.9"},
		{"from an untrusted peer", lb, "198.51.100.7:5000", []string{"203.0.113.9"}, "198.51.100.7"},
		{"trusted proxy without the header", lb, "10.0.0.2:5000", nil, "10.0.0.2"},
		{"garbage stops at the proxy", lb, "10.0.0.2:5000", []string{"203.0.113.9, not-an-ip"}, "10.0.0.2"},
		{"IPv6 with a port", lb, "[fd00::5]:5000", []string{"[2001:db8::1]:4711"}, "2001:db8::1"},
		{"IPv4-mapped IPv6 peer", lb, "[::ffff:10.0.0.2]:5000", []string{"203.0.113.9"}, "203.0.113.9"},
		{"all hops trusted", lb, "10.0.0.2:5000", []string{"10.0.0.9"}, "10.0.0.9"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got string
			h := ClientAddress(tt.trusted)(http.HandlerFunc(func(_ http.ResponseWriter, r *http.Request) {
				got = ClientAddressOf(r)
			}))
			r := httptest.NewRequest(http.MethodGet, "/", nil)
			r.RemoteAddr = tt.remote
			for _, v := range tt.forwardedFor {
				r.Header.Add("X-Forwarded-For", v)
			}
			h.ServeHTTP(httptest.NewRecorder(), r)
			if got != tt.want {
				t.Fatalf("client address %q, want %q", got, tt.want)
			}
		})
	}
	r := httptest.NewRequest(http.MethodGet, "/", nil)
	r.RemoteAddr = "192.0.2.10:80"
	if got := ClientAddressOf(r); got != "192.0.2.10" {
		t.Fatalf("without the middleware: %q, want the peer's address", got)
	}
}
