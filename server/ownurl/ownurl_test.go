package ownurl

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/kasproject/kas/server/config"
)

// fakeSystem is a machine with fixed interfaces and a fixed host table.
type fakeSystem struct {
	addrs     []netip.Prefix
	addrsErr  error
	hosts     map[string][]netip.Addr
	lookupErr error
}

func (f fakeSystem) InterfaceAddrs() ([]netip.Prefix, error) {
	return f.addrs, f.addrsErr
}

// LookupNetIP filters by family as the real resolver does, so a test sees
// which network Discover asked for.
func (f fakeSystem) LookupNetIP(_ context.Context, network, host string) ([]netip.Addr, error) {
	if f.lookupErr != nil {
		return nil, f.lookupErr
	}
	all, ok := f.hosts[host]
	if !ok {
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	var out []netip.Addr
	for _, a := range all {
		if network == "ip" || (network == "ip4") == a.Unmap().Is4() {
			out = append(out, a)
		}
	}
	return out, nil
}

func prefixes(s ...string) []netip.Prefix {
	ps := make([]netip.Prefix, len(s))
	for i, p := range s {
		ps[i] = netip.MustParsePrefix(p)
	}
	return ps
}

func addrs(s ...string) []netip.Addr {
	as := make([]netip.Addr, len(s))
	for i, a := range s {
		as[i] = netip.MustParseAddr(a)
	}
	return as
}

// node has loopback, link-local (IPv4 and IPv6), global and unique-local
// addresses on three interfaces, and a host table.
var node = fakeSystem{
	addrs: prefixes(
		"127.0.0.1/8", "::1/128", // lo
		"10.0.0.5/24", "169.254.3.4/16", "2001:db8::5/64", "fe80::5/64", // eth0
		"192.168.1.7/24", "fd00::7/64", // eth1
	),
	hosts: map[string][]netip.Addr{
		"kas-1.internal":  addrs("10.0.0.5", "2001:db8::5"),
		"kas-v6.internal": addrs("2001:db8::5"),
		// A Debian-style /etc/hosts entry for the machine's own name.
		"kas-debian": addrs("127.0.1.1"),
		"localhost":  addrs("127.0.0.1", "::1"),
		// Resolvers may answer IPv4 in IPv4-mapped form, and twice.
		"kas-mapped": addrs("::ffff:10.0.0.5", "10.0.0.5"),
	},
}

var errFake = errors.New("netlink: operation not permitted")

func TestDiscover(t *testing.T) {
	relSocket, err := filepath.Abs("kas-private.sock")
	if err != nil {
		t.Fatal(err)
	}
	tcp := func(address string) Input {
		return Input{ListenNetwork: "tcp", ListenAddress: address}
	}
	with := func(in Input, f func(*Input)) Input {
		f(&in)
		return in
	}
	fromListen := func(scheme string, urls ...string) *Result {
		return &Result{URLs: urls, Scheme: scheme, Source: "private_api.listen.address"}
	}
	fromCIDR := func(urls ...string) *Result {
		return &Result{URLs: urls, Scheme: "grpc", Source: config.EnvOwnPrivateAPICIDR}
	}
	const notReachable = "with redis configured, other kas nodes must reach this node's private API"

	tests := []struct {
		name    string
		in      Input
		sys     System // node when nil
		want    *Result
		wantErr []string // substrings of the error, in any order
		errIs   error
	}{
		// Rule 1: OWN_PRIVATE_API_URL.
		{
			name: "URL used as is, its host name is the TLS server name",
			in:   Input{Env: config.Env{OwnPrivateAPIURL: "grpc://kas-1.internal:8155"}, ListenNetwork: "tcp", ListenAddress: ":8155", MultiNode: true},
			want: &Result{URLs: []string{"grpc://kas-1.internal:8155"}, Scheme: "grpc", Host: "kas-1.internal", Source: config.EnvOwnPrivateAPIURL},
		},
		{
			name: "grpcs URL with an IPv6 address and OWN_PRIVATE_API_HOST",
			in:   Input{Env: config.Env{OwnPrivateAPIURL: "grpcs://[fd00::7]:8155", OwnPrivateAPIHost: "kas.internal"}, ListenNetwork: "tcp", ListenAddress: ":8155", MultiNode: true},
			want: &Result{URLs: []string{"grpcs://[fd00::7]:8155"}, Scheme: "grpcs", Host: "kas.internal", Source: config.EnvOwnPrivateAPIURL},
		},
		{
			name: "grpcs URL naming a host needs no OWN_PRIVATE_API_HOST",
			in:   Input{Env: config.Env{OwnPrivateAPIURL: "grpcs://kas-1.internal:8155"}, ListenNetwork: "tcp", ListenAddress: ":8155"},
			want: &Result{URLs: []string{"grpcs://kas-1.internal:8155"}, Scheme: "grpcs", Host: "kas-1.internal", Source: config.EnvOwnPrivateAPIURL},
		},
		{
			name:    "grpcs URL with an IP address needs OWN_PRIVATE_API_HOST",
			in:      Input{Env: config.Env{OwnPrivateAPIURL: "grpcs://10.0.0.5:8155"}, ListenNetwork: "tcp", ListenAddress: ":8155"},
			wantErr: []string{"OWN_PRIVATE_API_HOST is required", "grpcs://10.0.0.5:8155"},
		},
		{
			name:    "URL and CIDR together",
			in:      Input{Env: config.Env{OwnPrivateAPIURL: "grpc://10.0.0.5:8155", OwnPrivateAPICIDR: "10.0.0.0/8"}, ListenNetwork: "tcp", ListenAddress: ":8155"},
			wantErr: []string{"set either OWN_PRIVATE_API_URL or OWN_PRIVATE_API_CIDR, not both"},
		},
		{
			name:    "URL and port together",
			in:      Input{Env: config.Env{OwnPrivateAPIURL: "grpc://10.0.0.5:8155", OwnPrivateAPIPort: "9000"}, ListenNetwork: "tcp", ListenAddress: ":8155"},
			wantErr: []string{"OWN_PRIVATE_API_PORT has no effect when OWN_PRIVATE_API_URL is set"},
		},
		{
			name:    "URL and scheme together",
			in:      Input{Env: config.Env{OwnPrivateAPIURL: "grpc://10.0.0.5:8155", OwnPrivateAPIScheme: "grpcs"}, ListenNetwork: "tcp", ListenAddress: ":8155"},
			wantErr: []string{"OWN_PRIVATE_API_SCHEME has no effect when OWN_PRIVATE_API_URL is set"},
		},
		{
			name:    "URL with another scheme",
			in:      Input{Env: config.Env{OwnPrivateAPIURL: "https://10.0.0.5:8155"}, ListenNetwork: "tcp", ListenAddress: ":8155"},
			wantErr: []string{"OWN_PRIVATE_API_URL: want grpc://host:port or grpcs://host:port", `"https://10.0.0.5:8155"`},
		},
		{
			name:    "unix URL",
			in:      Input{Env: config.Env{OwnPrivateAPIURL: "unix:///run/kas.sock"}, ListenNetwork: "unix", ListenAddress: "/run/kas.sock"},
			wantErr: []string{"unix:// is not supported"},
		},
		{
			name:    "URL without a port",
			in:      Input{Env: config.Env{OwnPrivateAPIURL: "grpc://10.0.0.5"}, ListenNetwork: "tcp", ListenAddress: ":8155"},
			wantErr: []string{"with both host and port"},
		},
		{
			name:    "URL with an unbracketed IPv6 address",
			in:      Input{Env: config.Env{OwnPrivateAPIURL: "grpc://fd00::7:8155"}, ListenNetwork: "tcp", ListenAddress: ":8155"},
			wantErr: []string{"OWN_PRIVATE_API_URL", "fd00::7:8155"},
		},
		{
			name:    "URL with port 0",
			in:      Input{Env: config.Env{OwnPrivateAPIURL: "grpc://10.0.0.5:0"}, ListenNetwork: "tcp", ListenAddress: ":8155"},
			wantErr: []string{`port "0" is not a number from 1 to 65535`},
		},
		{
			name:    "URL with a path",
			in:      Input{Env: config.Env{OwnPrivateAPIURL: "grpc://10.0.0.5:8155/kas"}, ListenNetwork: "tcp", ListenAddress: ":8155"},
			wantErr: []string{"want only grpc://host:port"},
		},
		{
			name:    "several nodes refuse a loopback URL",
			in:      Input{Env: config.Env{OwnPrivateAPIURL: "grpc://127.0.0.1:8155"}, ListenNetwork: "tcp", ListenAddress: ":8155", MultiNode: true},
			wantErr: []string{notReachable, "OWN_PRIVATE_API_URL=grpc://127.0.0.1:8155 names 127.0.0.1, which only this machine can reach", "OWN_PRIVATE_API_CIDR", "redis.allow_loopback_private_api: true"},
		},
		{
			name:    "several nodes refuse a localhost URL",
			in:      Input{Env: config.Env{OwnPrivateAPIURL: "grpc://localhost:8155"}, ListenNetwork: "tcp", ListenAddress: ":8155", MultiNode: true},
			wantErr: []string{notReachable, "names localhost"},
		},
		{
			name:    "several nodes refuse an IPv6 loopback URL",
			in:      Input{Env: config.Env{OwnPrivateAPIURL: "grpc://[::1]:8155"}, ListenNetwork: "tcp", ListenAddress: ":8155", MultiNode: true},
			wantErr: []string{notReachable, "names ::1"},
		},
		{
			name: "a single node may publish a loopback URL",
			in:   Input{Env: config.Env{OwnPrivateAPIURL: "grpc://127.0.0.1:8155"}, ListenNetwork: "tcp", ListenAddress: "127.0.0.1:8155"},
			want: &Result{URLs: []string{"grpc://127.0.0.1:8155"}, Scheme: "grpc", Source: config.EnvOwnPrivateAPIURL},
		},
		{
			name: "several nodes on one machine may publish a loopback URL",
			in:   Input{Env: config.Env{OwnPrivateAPIURL: "grpc://127.0.0.1:8155"}, ListenNetwork: "tcp", ListenAddress: "127.0.0.1:8155", MultiNode: true, AllowLoopback: true},
			want: &Result{URLs: []string{"grpc://127.0.0.1:8155"}, Scheme: "grpc", Source: config.EnvOwnPrivateAPIURL},
		},

		// Rule 2: OWN_PRIVATE_API_CIDR.
		{
			name: "CIDR picks the interface address inside it, port from the listen address",
			in:   with(tcp(":8155"), func(in *Input) { in.Env.OwnPrivateAPICIDR = "10.0.0.0/24"; in.MultiNode = true }),
			want: fromCIDR("grpc://10.0.0.5:8155"),
		},
		{
			name: "IPv6 CIDR",
			in:   with(tcp(":8155"), func(in *Input) { in.Env.OwnPrivateAPICIDR = "2001:db8::/32" }),
			want: fromCIDR("grpc://[2001:db8::5]:8155"),
		},
		{
			name: "several CIDRs give addresses in CIDR order, then interface order",
			in:   with(tcp(":8155"), func(in *Input) { in.Env.OwnPrivateAPICIDR = "fc00::/7, 10.0.0.0/8,192.168.0.0/16" }),
			want: fromCIDR("grpc://[fd00::7]:8155", "grpc://10.0.0.5:8155", "grpc://192.168.1.7:8155"),
		},
		{
			name: "a CIDR holding several addresses gives them all in interface order",
			in:   with(tcp(":8155"), func(in *Input) { in.Env.OwnPrivateAPICIDR = "2000::/3,fd00::/8" }),
			want: fromCIDR("grpc://[2001:db8::5]:8155", "grpc://[fd00::7]:8155"),
		},
		{
			name: "overlapping CIDRs give each address once",
			in:   with(tcp(":8155"), func(in *Input) { in.Env.OwnPrivateAPICIDR = "10.0.0.0/24,10.0.0.0/8" }),
			want: fromCIDR("grpc://10.0.0.5:8155"),
		},
		{
			name: "a single node's CIDR may take in loopback and link-local addresses",
			in:   with(tcp(":8155"), func(in *Input) { in.Env.OwnPrivateAPICIDR = "0.0.0.0/0" }),
			want: fromCIDR("grpc://127.0.0.1:8155", "grpc://10.0.0.5:8155", "grpc://169.254.3.4:8155", "grpc://192.168.1.7:8155"),
		},
		{
			name: "CIDR with OWN_PRIVATE_API_PORT, scheme and host",
			in: with(tcp(":8155"), func(in *Input) {
				in.Env = config.Env{OwnPrivateAPICIDR: "10.0.0.0/8", OwnPrivateAPIPort: "9155", OwnPrivateAPIScheme: "grpcs", OwnPrivateAPIHost: "kas.internal"}
			}),
			want: &Result{URLs: []string{"grpcs://10.0.0.5:9155"}, Scheme: "grpcs", Host: "kas.internal", Source: config.EnvOwnPrivateAPICIDR},
		},
		{
			name: "CIDR with the bound port of a listener on port 0",
			in:   with(tcp(":0"), func(in *Input) { in.Env.OwnPrivateAPICIDR = "10.0.0.0/8"; in.BoundPort = 41234 }),
			want: fromCIDR("grpc://10.0.0.5:41234"),
		},
		{
			name:    "a CIDR matching no interface address",
			in:      with(tcp(":8155"), func(in *Input) { in.Env.OwnPrivateAPICIDR = "10.0.0.0/8,192.0.2.0/24,fd99::/16" }),
			wantErr: []string{"OWN_PRIVATE_API_CIDR=10.0.0.0/8,192.0.2.0/24,fd99::/16: no interface address of this node is inside 192.0.2.0/24, fd99::/16", "127.0.0.1/8, ::1/128, 10.0.0.5/24, 169.254.3.4/16, 2001:db8::5/64, fe80::5/64, 192.168.1.7/24, fd00::7/64", "network the kas nodes share"},
		},
		{
			name:    "a CIDR on a node without addresses",
			in:      with(tcp(":8155"), func(in *Input) { in.Env.OwnPrivateAPICIDR = "10.0.0.0/8" }),
			sys:     fakeSystem{},
			wantErr: []string{"inside 10.0.0.0/8; the node has no interface addresses"},
		},
		{
			name:    "not a CIDR",
			in:      with(tcp(":8155"), func(in *Input) { in.Env.OwnPrivateAPICIDR = "10.0.0.5" }),
			wantErr: []string{"OWN_PRIVATE_API_CIDR: ", `"10.0.0.5": not a CIDR`},
		},
		{
			name:    "CIDR when the interfaces cannot be listed",
			in:      with(tcp(":8155"), func(in *Input) { in.Env.OwnPrivateAPICIDR = "10.0.0.0/8" }),
			sys:     fakeSystem{addrsErr: errFake},
			wantErr: []string{"list this node's interface addresses for OWN_PRIVATE_API_CIDR"},
			errIs:   errFake,
		},
		{
			name:    "several nodes refuse a CIDR that takes in a loopback address",
			in:      with(tcp(":8155"), func(in *Input) { in.Env.OwnPrivateAPICIDR = "0.0.0.0/0"; in.MultiNode = true }),
			wantErr: []string{notReachable, "OWN_PRIVATE_API_CIDR=0.0.0.0/0 gives loopback address 127.0.0.1", "set OWN_PRIVATE_API_CIDR to the network the kas nodes share", "redis.allow_loopback_private_api: true"},
		},
		{
			name: "several nodes on one machine may use a CIDR with loopback",
			in: with(tcp(":8155"), func(in *Input) {
				in.Env.OwnPrivateAPICIDR = "127.0.0.0/8"
				in.MultiNode, in.AllowLoopback = true, true
			}),
			want: fromCIDR("grpc://127.0.0.1:8155"),
		},
		{
			name: "CIDR for a Unix socket listener with OWN_PRIVATE_API_PORT",
			in:   Input{Env: config.Env{OwnPrivateAPICIDR: "10.0.0.0/8", OwnPrivateAPIPort: "8155"}, ListenNetwork: "unix", ListenAddress: "/run/kas/private.sock"},
			want: fromCIDR("grpc://10.0.0.5:8155"),
		},
		{
			name:    "CIDR for a Unix socket listener has no port",
			in:      Input{Env: config.Env{OwnPrivateAPICIDR: "10.0.0.0/8"}, ListenNetwork: "unix", ListenAddress: "/run/kas/private.sock"},
			wantErr: []string{"OWN_PRIVATE_API_CIDR needs OWN_PRIVATE_API_PORT", "/run/kas/private.sock"},
		},

		// Rule 3: private_api.listen.address.
		{
			name: "no IP: every routable address of both families, in interface order",
			in:   with(tcp(":8155"), func(in *Input) { in.MultiNode = true }),
			want: fromListen("grpc", "grpc://10.0.0.5:8155", "grpc://[2001:db8::5]:8155", "grpc://192.168.1.7:8155", "grpc://[fd00::7]:8155"),
		},
		{
			name: "0.0.0.0 with tcp listens on both families",
			in:   tcp("0.0.0.0:8155"),
			want: fromListen("grpc", "grpc://10.0.0.5:8155", "grpc://[2001:db8::5]:8155", "grpc://192.168.1.7:8155", "grpc://[fd00::7]:8155"),
		},
		{
			name: "tcp4 gives IPv4 only",
			in:   Input{ListenNetwork: "tcp4", ListenAddress: "0.0.0.0:8155"},
			want: fromListen("grpc", "grpc://10.0.0.5:8155", "grpc://192.168.1.7:8155"),
		},
		{
			name: "tcp6 gives IPv6 only",
			in:   Input{ListenNetwork: "tcp6", ListenAddress: "[::]:8155"},
			want: fromListen("grpc", "grpc://[2001:db8::5]:8155", "grpc://[fd00::7]:8155"),
		},
		{
			name: "an address on two interfaces is published once",
			in:   tcp(":8155"),
			sys:  fakeSystem{addrs: prefixes("10.0.0.5/24", "10.0.0.5/32")},
			want: fromListen("grpc", "grpc://10.0.0.5:8155"),
		},
		{
			name: "no IP with OWN_PRIVATE_API_PORT, scheme and host",
			in: with(Input{ListenNetwork: "tcp4", ListenAddress: ":8155"}, func(in *Input) {
				in.Env = config.Env{OwnPrivateAPIPort: "443", OwnPrivateAPIScheme: "grpcs", OwnPrivateAPIHost: "kas.internal"}
			}),
			want: &Result{URLs: []string{"grpcs://10.0.0.5:443", "grpcs://192.168.1.7:443"}, Scheme: "grpcs", Host: "kas.internal", Source: "private_api.listen.address"},
		},
		{
			name: "explicit grpc scheme",
			in:   with(tcp("10.0.0.5:8155"), func(in *Input) { in.Env.OwnPrivateAPIScheme = "grpc" }),
			want: fromListen("grpc", "grpc://10.0.0.5:8155"),
		},
		{
			name:    "only loopback and link-local addresses",
			in:      tcp(":8155"),
			sys:     fakeSystem{addrs: prefixes("127.0.0.1/8", "::1/128", "169.254.3.4/16", "fe80::5/64")},
			wantErr: []string{"private_api.listen.address :8155 (network tcp) listens on every address, but this node has no address other than loopback and link-local ones to publish (it has 127.0.0.1/8, ::1/128, 169.254.3.4/16, fe80::5/64)", "set OWN_PRIVATE_API_CIDR or OWN_PRIVATE_API_URL"},
		},
		{
			name:    "tcp6 on a node with IPv4 only",
			in:      Input{ListenNetwork: "tcp6", ListenAddress: "[::]:8155"},
			sys:     fakeSystem{addrs: prefixes("127.0.0.1/8", "10.0.0.5/24")},
			wantErr: []string{"no IPv6 address other than loopback and link-local ones", "10.0.0.5/24"},
		},
		{
			name:    "no interfaces at all",
			in:      tcp(":8155"),
			sys:     fakeSystem{},
			wantErr: []string{"(it has no interface addresses)"},
		},
		{
			name:    "interfaces cannot be listed",
			in:      tcp(":8155"),
			sys:     fakeSystem{addrsErr: errFake},
			wantErr: []string{"list this node's interface addresses (private_api.listen.address :8155 listens on all of them)"},
			errIs:   errFake,
		},
		{
			name: "fixed IPv4 address",
			in:   with(tcp("10.0.0.5:8155"), func(in *Input) { in.MultiNode = true }),
			want: fromListen("grpc", "grpc://10.0.0.5:8155"),
		},
		{
			name: "fixed IPv6 address is bracketed",
			in:   with(tcp("[fd00::7]:8155"), func(in *Input) { in.MultiNode = true }),
			want: fromListen("grpc", "grpc://[fd00::7]:8155"),
		},
		{
			name: "fixed IPv4-mapped address is published as IPv4",
			in:   tcp("[::ffff:10.0.0.5]:8155"),
			want: fromListen("grpc", "grpc://10.0.0.5:8155"),
		},
		{
			name: "fixed link-local address keeps its zone, escaped",
			in:   tcp("[fe80::5%eth0]:8155"),
			want: fromListen("grpc", "grpc://[fe80::5%25eth0]:8155"),
		},
		{
			name: "fixed address with OWN_PRIVATE_API_PORT",
			in:   with(tcp("10.0.0.5:8155"), func(in *Input) { in.Env.OwnPrivateAPIPort = "9000" }),
			want: fromListen("grpc", "grpc://10.0.0.5:9000"),
		},
		{
			name: "bound port replaces port 0",
			in:   with(tcp("10.0.0.5:0"), func(in *Input) { in.BoundPort = 41234 }),
			want: fromListen("grpc", "grpc://10.0.0.5:41234"),
		},
		{
			name: "OWN_PRIVATE_API_PORT wins over the bound port",
			in:   with(tcp("10.0.0.5:0"), func(in *Input) { in.BoundPort = 41234; in.Env.OwnPrivateAPIPort = "8155" }),
			want: fromListen("grpc", "grpc://10.0.0.5:8155"),
		},
		{
			name: "host name gives every address it resolves to",
			in:   with(tcp("kas-1.internal:8155"), func(in *Input) { in.MultiNode = true }),
			want: fromListen("grpc", "grpc://10.0.0.5:8155", "grpc://[2001:db8::5]:8155"),
		},
		{
			name: "host name with tcp4 resolves IPv4 only",
			in:   Input{ListenNetwork: "tcp4", ListenAddress: "kas-1.internal:8155"},
			want: fromListen("grpc", "grpc://10.0.0.5:8155"),
		},
		{
			name: "host name with tcp6 resolves IPv6 only",
			in:   Input{ListenNetwork: "tcp6", ListenAddress: "kas-1.internal:8155"},
			want: fromListen("grpc", "grpc://[2001:db8::5]:8155"),
		},
		{
			name: "IPv4-mapped answers are published as IPv4, once",
			in:   tcp("kas-mapped:8155"),
			want: fromListen("grpc", "grpc://10.0.0.5:8155"),
		},
		{
			name:    "host name that does not resolve",
			in:      tcp("kas-9.internal:8155"),
			wantErr: []string{"resolve kas-9.internal from private_api.listen.address kas-9.internal:8155", "no such host"},
		},
		{
			name:    "resolver failure",
			in:      tcp("kas-1.internal:8155"),
			sys:     fakeSystem{lookupErr: errFake},
			wantErr: []string{"resolve kas-1.internal"},
			errIs:   errFake,
		},
		{
			name:    "host name without an address of the listen family",
			in:      Input{ListenNetwork: "tcp4", ListenAddress: "kas-v6.internal:8155"},
			wantErr: []string{"kas-v6.internal (in private_api.listen.address kas-v6.internal:8155) resolves to no IPv4 address"},
		},
		{
			name:    "several nodes refuse a host name resolving to loopback",
			in:      with(tcp("kas-debian:8155"), func(in *Input) { in.MultiNode = true }),
			wantErr: []string{notReachable, "private_api.listen.address kas-debian:8155 gives loopback address 127.0.1.1", "OWN_PRIVATE_API_CIDR", "redis.allow_loopback_private_api: true"},
		},
		{
			name: "a single node may listen on localhost",
			in:   tcp("localhost:8155"),
			want: fromListen("grpc", "grpc://127.0.0.1:8155", "grpc://[::1]:8155"),
		},
		{
			name: "a single node may listen on a loopback IP",
			in:   tcp("127.0.0.1:8155"),
			want: fromListen("grpc", "grpc://127.0.0.1:8155"),
		},
		{
			name:    "several nodes refuse a loopback listen address",
			in:      with(tcp("127.0.0.1:8155"), func(in *Input) { in.MultiNode = true }),
			wantErr: []string{notReachable, "private_api.listen.address 127.0.0.1:8155 listens on 127.0.0.1, which only this machine can reach", "listen on an address the other nodes can reach", "redis.allow_loopback_private_api: true"},
		},
		{
			name:    "several nodes refuse an IPv6 loopback listen address",
			in:      with(tcp("[::1]:8155"), func(in *Input) { in.MultiNode = true }),
			wantErr: []string{notReachable, "listens on ::1"},
		},
		{
			name:    "several nodes refuse localhost, even with a CIDR set",
			in:      with(tcp("localhost:8155"), func(in *Input) { in.MultiNode = true; in.Env.OwnPrivateAPICIDR = "10.0.0.0/8" }),
			wantErr: []string{notReachable, "listens on localhost"},
		},
		{
			name:    "several nodes refuse a *.localhost name",
			in:      with(tcp("kas.localhost:8155"), func(in *Input) { in.MultiNode = true }),
			wantErr: []string{notReachable, "listens on kas.localhost"},
		},
		{
			name: "several nodes on one machine may listen on loopback",
			in:   with(tcp("127.0.0.1:0"), func(in *Input) { in.MultiNode, in.AllowLoopback, in.BoundPort = true, true, 40001 }),
			want: fromListen("grpc", "grpc://127.0.0.1:40001"),
		},
		{
			name:    "port 0 without the bound port",
			in:      tcp(":0"),
			wantErr: []string{"private_api.listen.address :0 has port 0", "OWN_PRIVATE_API_PORT"},
		},
		{
			name:    "bound port out of range",
			in:      with(tcp(":0"), func(in *Input) { in.BoundPort = 70000 }),
			wantErr: []string{"bound port 70000"},
		},
		{
			name:    "listen port not a number",
			in:      tcp(":http"),
			wantErr: []string{`private_api.listen.address: port "http" in ":http" is not a number`},
		},
		{
			name:    "listen address without a port",
			in:      tcp("10.0.0.5"),
			wantErr: []string{`private_api.listen.address: want host:port such as :8155 or 10.0.0.5:8155, got "10.0.0.5"`},
		},
		{
			name:    "listen address without a port, with OWN_PRIVATE_API_PORT",
			in:      with(tcp("10.0.0.5"), func(in *Input) { in.Env.OwnPrivateAPIPort = "8155" }),
			wantErr: []string{`private_api.listen.address: want host:port`},
		},
		{
			name:    "OWN_PRIVATE_API_PORT not a port",
			in:      with(tcp(":8155"), func(in *Input) { in.Env.OwnPrivateAPIPort = "65536" }),
			wantErr: []string{`OWN_PRIVATE_API_PORT: want a port number from 1 to 65535, got "65536"`},
		},
		{
			name:    "unknown scheme",
			in:      with(tcp(":8155"), func(in *Input) { in.Env.OwnPrivateAPIScheme = "https" }),
			wantErr: []string{`OWN_PRIVATE_API_SCHEME: want grpc or grpcs, got "https"`},
		},
		{
			name:    "grpcs without OWN_PRIVATE_API_HOST",
			in:      with(tcp(":8155"), func(in *Input) { in.Env.OwnPrivateAPIScheme = "grpcs" }),
			wantErr: []string{"OWN_PRIVATE_API_HOST is required with OWN_PRIVATE_API_SCHEME=grpcs"},
		},
		{
			name:    "unknown listen network",
			in:      Input{ListenNetwork: "udp", ListenAddress: ":8155"},
			wantErr: []string{`private_api.listen.network: want tcp, tcp4, tcp6 or unix, got "udp"`},
		},

		// Unix sockets.
		{
			name: "a single node on a Unix socket publishes its path",
			in:   Input{ListenNetwork: "unix", ListenAddress: "/run/kas/private.sock"},
			want: fromListen("grpc", "unix:///run/kas/private.sock"),
		},
		{
			name: "a relative socket path is made absolute",
			in:   Input{ListenNetwork: "unix", ListenAddress: "kas-private.sock"},
			want: fromListen("grpc", "unix://"+relSocket),
		},
		{
			name: "an abstract socket",
			in:   Input{ListenNetwork: "unix", ListenAddress: "@kas-private"},
			want: fromListen("grpc", "unix-abstract:kas-private"),
		},
		{
			name: "a Unix socket serving TLS",
			in:   Input{Env: config.Env{OwnPrivateAPIScheme: "grpcs", OwnPrivateAPIHost: "kas.internal"}, ListenNetwork: "unix", ListenAddress: "/run/kas/private.sock"},
			want: &Result{URLs: []string{"unix:///run/kas/private.sock"}, Scheme: "grpcs", Host: "kas.internal", Source: "private_api.listen.address"},
		},
		{
			name: "several nodes on one machine may use Unix sockets",
			in:   Input{ListenNetwork: "unix", ListenAddress: "/run/kas/node-2.sock", MultiNode: true, AllowLoopback: true},
			want: fromListen("grpc", "unix:///run/kas/node-2.sock"),
		},
		{
			name:    "several nodes refuse a Unix socket",
			in:      Input{ListenNetwork: "unix", ListenAddress: "/run/kas/private.sock", MultiNode: true},
			wantErr: []string{notReachable, "private_api.listen.network is unix: a Unix socket is only reachable from this machine", "use network tcp", "redis.allow_loopback_private_api: true"},
		},
		{
			name:    "a Unix socket with OWN_PRIVATE_API_PORT",
			in:      Input{Env: config.Env{OwnPrivateAPIPort: "8155"}, ListenNetwork: "unix", ListenAddress: "/run/kas/private.sock"},
			wantErr: []string{"OWN_PRIVATE_API_PORT has no effect: the private API listens on a Unix socket (/run/kas/private.sock)"},
		},
		{
			name:    "a Unix socket without a path",
			in:      Input{ListenNetwork: "unix"},
			wantErr: []string{"private_api.listen.address: want a socket path for network unix, got none"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sys := tc.sys
			if sys == nil {
				sys = node
			}
			got, err := Discover(t.Context(), tc.in, sys)
			if tc.wantErr == nil {
				if err != nil {
					t.Fatalf("Discover: %v", err)
				}
				if !reflect.DeepEqual(got, tc.want) {
					t.Fatalf("Discover:\n got %+v\nwant %+v", got, tc.want)
				}
				return
			}
			if err == nil {
				t.Fatalf("Discover = %+v, want an error containing %q", got, tc.wantErr)
			}
			if got != nil {
				t.Errorf("Discover returned %+v with its error", got)
			}
			msg := err.Error()
			if !strings.HasPrefix(msg, "find this node's private API URL: ") {
				t.Errorf("error does not say what was being done: %s", msg)
			}
			for _, want := range tc.wantErr {
				if !strings.Contains(msg, want) {
					t.Errorf("error does not contain %q:\n%s", want, msg)
				}
			}
			if tc.errIs != nil && !errors.Is(err, tc.errIs) {
				t.Errorf("error does not wrap %v: %v", tc.errIs, err)
			}
		})
	}
}

func TestToPrefix(t *testing.T) {
	tests := []struct {
		name   string
		addr   net.Addr
		want   netip.Prefix
		wantOK bool
	}{
		{"IPv4 in 16-byte form", &net.IPNet{IP: net.ParseIP("10.0.0.5"), Mask: net.CIDRMask(24, 32)}, netip.MustParsePrefix("10.0.0.5/24"), true},
		{"IPv4 with an IPv6-form mask", &net.IPNet{IP: net.ParseIP("10.0.0.5"), Mask: net.CIDRMask(120, 128)}, netip.MustParsePrefix("10.0.0.5/24"), true},
		{"IPv6", &net.IPNet{IP: net.ParseIP("fd00::7"), Mask: net.CIDRMask(64, 128)}, netip.MustParsePrefix("fd00::7/64"), true},
		{"address without a mask", &net.IPAddr{IP: net.ParseIP("fd00::7")}, netip.MustParsePrefix("fd00::7/128"), true},
		{"IPv4 address without a mask", &net.IPAddr{IP: net.ParseIP("10.0.0.5")}, netip.MustParsePrefix("10.0.0.5/32"), true},
		{"malformed IP", &net.IPNet{IP: net.IP{1, 2, 3}, Mask: net.CIDRMask(24, 32)}, netip.Prefix{}, false},
		{"not an IP address", &net.UnixAddr{Name: "/run/kas.sock", Net: "unix"}, netip.Prefix{}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := toPrefix(tc.addr)
			if got != tc.want || ok != tc.wantOK {
				t.Fatalf("toPrefix(%v) = %v, %v; want %v, %v", tc.addr, got, ok, tc.want, tc.wantOK)
			}
		})
	}
}
