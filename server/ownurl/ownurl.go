// Package ownurl decides the private API URL(s) a kas node publishes so that
// the other nodes can forward requests to it (DESIGN §7, "Own private API URL").
//
// The first of these that is set wins:
//
//  1. OWN_PRIVATE_API_URL, used as is.
//  2. OWN_PRIVATE_API_CIDR: the node's interface addresses inside the CIDRs.
//  3. private_api.listen.address: its IP; every non-loopback, non-link-local
//     interface address when it has no IP or an unspecified one; or every
//     address its host name resolves to.
//
// With several nodes (Redis configured) an address only this machine can
// reach is refused, unless redis.allow_loopback_private_api is set for
// several nodes on one machine.
//
// A private API listening on a Unix socket is published as a grpc-go target,
// unix:///absolute/path (or unix-abstract:name for a Linux abstract socket
// "@name"). A single node publishes nothing, so the URL only shows where it
// listens; with redis.allow_loopback_private_api, nodes on the same machine
// can dial each other's sockets through it.
package ownurl

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/kasproject/kas/server/config"
)

// Input is what a node knows about its private API when it starts.
type Input struct {
	// Env holds OWN_PRIVATE_API_* as read by config.Load.
	Env config.Env
	// ListenNetwork is private_api.listen.network: tcp, tcp4, tcp6 or unix.
	ListenNetwork string
	// ListenAddress is private_api.listen.address as configured: ":8155",
	// "0.0.0.0:8155", "[::]:8155", "10.0.0.5:8155", "kas-1.internal:8155", or
	// a socket path for network unix.
	ListenAddress string
	// BoundPort is the port the listener actually bound, which differs from
	// the configured one for port 0; 0 means use the configured port.
	BoundPort int
	// MultiNode is true when Redis is configured: other nodes must reach this one.
	MultiNode bool
	// AllowLoopback is redis.allow_loopback_private_api: several nodes on one
	// machine may publish loopback addresses and Unix sockets.
	AllowLoopback bool
}

// Result is what a node publishes about its private API.
type Result struct {
	// URLs are where other nodes can reach this node's private API, in the
	// order they should be tried: grpc://ip:port or grpcs://ip:port (IPv6
	// bracketed), OWN_PRIVATE_API_URL as given, or a Unix socket target
	// (see the package comment).
	URLs []string
	// Scheme is grpc (plain-text HTTP/2) or grpcs (TLS): how peers talk to
	// every one of URLs, Unix sockets included.
	Scheme string
	// Host is the server name peers check in this node's TLS certificate:
	// OWN_PRIVATE_API_HOST, else the host name in OWN_PRIVATE_API_URL. Empty
	// when neither is set; never empty for grpcs.
	Host string
	// Source names the setting the URLs came from, for the start-up log:
	// OWN_PRIVATE_API_URL, OWN_PRIVATE_API_CIDR or private_api.listen.address.
	Source string
}

const (
	schemeGRPC  = "grpc"
	schemeGRPCS = "grpcs"

	keyListenAddress = "private_api.listen.address"
	keyListenNetwork = "private_api.listen.network"

	// whyReachable starts every refusal of an address only this machine can reach.
	whyReachable = "with redis configured, other kas nodes must reach this node's private API"
	// allowLoopbackHint is the way out for several nodes on one machine.
	allowLoopbackHint = "or set redis.allow_loopback_private_api: true to run several nodes on one machine (development only)"
)

// Discover decides the private API URLs this node publishes, following the
// rules in the package comment. ctx bounds the name resolution of a host
// name in private_api.listen.address.
func Discover(ctx context.Context, in Input, sys System) (*Result, error) {
	res, err := discover(ctx, in, sys)
	if err != nil {
		return nil, fmt.Errorf("find this node's private API URL: %w", err)
	}
	return res, nil
}

func discover(ctx context.Context, in Input, sys System) (*Result, error) {
	switch in.ListenNetwork {
	case "tcp", "tcp4", "tcp6", "unix":
	default:
		return nil, fmt.Errorf("%s: want tcp, tcp4, tcp6 or unix, got %q", keyListenNetwork, in.ListenNetwork)
	}
	mustReach := in.MultiNode && !in.AllowLoopback
	if mustReach {
		if err := checkListenerReachable(in); err != nil {
			return nil, err
		}
	}
	env := in.Env
	if env.OwnPrivateAPIURL != "" {
		return fromURL(env, mustReach)
	}

	res := &Result{Scheme: schemeGRPC, Host: env.OwnPrivateAPIHost}
	switch env.OwnPrivateAPIScheme {
	case "", schemeGRPC:
	case schemeGRPCS:
		res.Scheme = schemeGRPCS
		if res.Host == "" {
			return nil, fmt.Errorf("%s is required with %s=grpcs: it is the server name the other nodes check in this node's TLS certificate", config.EnvOwnPrivateAPIHost, config.EnvOwnPrivateAPIScheme)
		}
	default:
		return nil, fmt.Errorf("%s: want grpc or grpcs, got %q", config.EnvOwnPrivateAPIScheme, env.OwnPrivateAPIScheme)
	}

	if env.OwnPrivateAPICIDR == "" && in.ListenNetwork == "unix" {
		if env.OwnPrivateAPIPort != "" {
			return nil, fmt.Errorf("%s has no effect: the private API listens on a Unix socket (%s), which has no port; unset it", config.EnvOwnPrivateAPIPort, in.ListenAddress)
		}
		u, err := unixURL(in.ListenAddress)
		if err != nil {
			return nil, err
		}
		res.URLs, res.Source = []string{u}, keyListenAddress
		return res, nil
	}

	port, err := publishedPort(in)
	if err != nil {
		return nil, err
	}
	var addrs []netip.Addr
	var from string // what gave addrs, for the loopback refusal below
	if env.OwnPrivateAPICIDR != "" {
		res.Source = config.EnvOwnPrivateAPICIDR
		from = fmt.Sprintf("%s=%s", config.EnvOwnPrivateAPICIDR, env.OwnPrivateAPICIDR)
		addrs, err = cidrAddrs(env.OwnPrivateAPICIDR, sys)
	} else {
		res.Source = keyListenAddress
		from = fmt.Sprintf("%s %s", keyListenAddress, in.ListenAddress)
		addrs, err = listenAddrs(ctx, in, sys)
	}
	if err != nil {
		return nil, err
	}
	if mustReach {
		if i := slices.IndexFunc(addrs, netip.Addr.IsLoopback); i >= 0 {
			return nil, fmt.Errorf("%s, but %s gives loopback address %s, which only this machine can reach; set %s to the network the kas nodes share, make the listen address one the other nodes can reach, %s",
				whyReachable, from, addrs[i], config.EnvOwnPrivateAPICIDR, allowLoopbackHint)
		}
	}
	for _, a := range addrs {
		u := url.URL{Scheme: res.Scheme, Host: netip.AddrPortFrom(a, uint16(port)).String()}
		res.URLs = append(res.URLs, u.String())
	}
	return res, nil
}

// checkListenerReachable refuses a private API listener that only this
// machine can connect to, whatever URL is published for it.
func checkListenerReachable(in Input) error {
	if in.ListenNetwork == "unix" {
		return fmt.Errorf("%s, but %s is unix: a Unix socket is only reachable from this machine; use network tcp with an address the other nodes can reach (such as :8155), %s",
			whyReachable, keyListenNetwork, allowLoopbackHint)
	}
	if host, _, err := net.SplitHostPort(in.ListenAddress); err == nil && isLoopbackHost(host) {
		return fmt.Errorf("%s, but %s %s listens on %s, which only this machine can reach; listen on an address the other nodes can reach (such as :8155 or this node's IP), %s",
			whyReachable, keyListenAddress, in.ListenAddress, host, allowLoopbackHint)
	}
	return nil
}

// fromURL applies rule 1: OWN_PRIVATE_API_URL is published as is.
func fromURL(env config.Env, mustReach bool) (*Result, error) {
	raw := env.OwnPrivateAPIURL
	// Each of these would be silently ignored, since the URL is used as is.
	if env.OwnPrivateAPICIDR != "" {
		return nil, fmt.Errorf("set either %s or %s, not both", config.EnvOwnPrivateAPIURL, config.EnvOwnPrivateAPICIDR)
	}
	if env.OwnPrivateAPIPort != "" {
		return nil, fmt.Errorf("%s has no effect when %s is set, which is used as is; put the port in the URL and unset %[1]s", config.EnvOwnPrivateAPIPort, config.EnvOwnPrivateAPIURL)
	}
	if env.OwnPrivateAPIScheme != "" {
		return nil, fmt.Errorf("%s has no effect when %s is set, which is used as is; put the scheme in the URL and unset %[1]s", config.EnvOwnPrivateAPIScheme, config.EnvOwnPrivateAPIURL)
	}

	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("%s: want grpc://host:port or grpcs://host:port, got %q", config.EnvOwnPrivateAPIURL, raw)
	}
	switch u.Scheme {
	case schemeGRPC, schemeGRPCS:
	case "unix":
		return nil, fmt.Errorf("%s: unix:// is not supported: a single node (no redis) needs no %[1]s, and a private API listening on a Unix socket is published from %s; several nodes need a grpc:// or grpcs:// address the others can reach", config.EnvOwnPrivateAPIURL, keyListenAddress)
	default:
		return nil, fmt.Errorf("%s: want grpc://host:port or grpcs://host:port, got %q", config.EnvOwnPrivateAPIURL, raw)
	}
	host, port, err := net.SplitHostPort(u.Host)
	if err != nil || host == "" {
		return nil, fmt.Errorf("%s: want %s://host:port with both host and port (IPv6 in brackets: [fd00::1]:8155), got %q", config.EnvOwnPrivateAPIURL, u.Scheme, raw)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return nil, fmt.Errorf("%s: port %q is not a number from 1 to 65535", config.EnvOwnPrivateAPIURL, port)
	}
	if u.User != nil || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("%s: want only %s://host:port, got %q", config.EnvOwnPrivateAPIURL, u.Scheme, raw)
	}
	if mustReach && isLoopbackHost(host) {
		return nil, fmt.Errorf("%s, but %s=%s names %s, which only this machine can reach; set it to an address the other nodes can reach, or unset it and set %s to the network the kas nodes share, %s",
			whyReachable, config.EnvOwnPrivateAPIURL, raw, host, config.EnvOwnPrivateAPICIDR, allowLoopbackHint)
	}

	res := &Result{URLs: []string{raw}, Scheme: u.Scheme, Host: env.OwnPrivateAPIHost, Source: config.EnvOwnPrivateAPIURL}
	if _, err := netip.ParseAddr(host); res.Host == "" && err != nil {
		res.Host = host // a name: peers check it in the certificate
	}
	if res.Scheme == schemeGRPCS && res.Host == "" {
		return nil, fmt.Errorf("%s is required with %s=%s: its host is an IP address, so name the server the other nodes check in this node's TLS certificate", config.EnvOwnPrivateAPIHost, config.EnvOwnPrivateAPIURL, raw)
	}
	return res, nil
}

// publishedPort is OWN_PRIVATE_API_PORT, else the port the listener bound.
func publishedPort(in Input) (int, error) {
	if p := in.Env.OwnPrivateAPIPort; p != "" {
		port, err := strconv.Atoi(p)
		if err != nil || port < 1 || port > 65535 {
			return 0, fmt.Errorf("%s: want a port number from 1 to 65535, got %q", config.EnvOwnPrivateAPIPort, p)
		}
		return port, nil
	}
	if in.ListenNetwork == "unix" {
		return 0, fmt.Errorf("%s needs %s: the private API listens on a Unix socket (%s), which has no port to publish", config.EnvOwnPrivateAPICIDR, config.EnvOwnPrivateAPIPort, in.ListenAddress)
	}
	if in.BoundPort != 0 {
		if in.BoundPort < 1 || in.BoundPort > 65535 {
			return 0, fmt.Errorf("bound port %d of the private API listener is not a number from 1 to 65535", in.BoundPort)
		}
		return in.BoundPort, nil
	}
	_, p, err := net.SplitHostPort(in.ListenAddress)
	if err != nil {
		return 0, fmt.Errorf("%s: want host:port such as :8155 or 10.0.0.5:8155, got %q", keyListenAddress, in.ListenAddress)
	}
	port, err := strconv.Atoi(p)
	switch {
	case err != nil || port < 0 || port > 65535:
		return 0, fmt.Errorf("%s: port %q in %q is not a number from 1 to 65535", keyListenAddress, p, in.ListenAddress)
	case port == 0:
		return 0, fmt.Errorf("%s %s has port 0, so the kernel picks the port, and the one it picked is unknown here; listen on a fixed port or set %s", keyListenAddress, in.ListenAddress, config.EnvOwnPrivateAPIPort)
	}
	return port, nil
}

// cidrAddrs applies rule 2: the node's interface addresses inside the CIDRs,
// in CIDR order, then interface order. Every CIDR must hold at least one,
// or the administrator named a network the node is not on.
func cidrAddrs(raw string, sys System) ([]netip.Addr, error) {
	prefixes, err := config.ParseCIDRs(raw)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", config.EnvOwnPrivateAPICIDR, err)
	}
	have, err := sys.InterfaceAddrs()
	if err != nil {
		return nil, fmt.Errorf("list this node's interface addresses for %s: %w", config.EnvOwnPrivateAPICIDR, err)
	}
	var addrs []netip.Addr
	var unmatched []string
	for _, p := range prefixes {
		matched := false
		for _, h := range have {
			a := h.Addr().Unmap().WithZone("")
			if !p.Contains(a) {
				continue
			}
			matched = true
			if !slices.Contains(addrs, a) {
				addrs = append(addrs, a)
			}
		}
		if !matched {
			unmatched = append(unmatched, p.String())
		}
	}
	if len(unmatched) > 0 {
		return nil, fmt.Errorf("%s=%s: no interface address of this node is inside %s; the node has %s; set %[1]s to the network the kas nodes share",
			config.EnvOwnPrivateAPICIDR, raw, strings.Join(unmatched, ", "), describePrefixes(have))
	}
	return addrs, nil
}

// listenAddrs applies rule 3: the addresses private_api.listen.address
// stands for.
func listenAddrs(ctx context.Context, in Input, sys System) ([]netip.Addr, error) {
	host, _, err := net.SplitHostPort(in.ListenAddress)
	if err != nil {
		return nil, fmt.Errorf("%s: want host:port such as :8155 or 10.0.0.5:8155, got %q", keyListenAddress, in.ListenAddress)
	}
	ip, ipErr := netip.ParseAddr(host)
	switch {
	case host == "" || (ipErr == nil && ip.IsUnspecified()):
		return everyRoutableAddr(in, sys)
	case ipErr == nil:
		return []netip.Addr{ip.Unmap()}, nil
	}

	resolved, err := sys.LookupNetIP(ctx, lookupNetwork(in.ListenNetwork), host)
	if err != nil {
		return nil, fmt.Errorf("resolve %s from %s %s: %w", host, keyListenAddress, in.ListenAddress, err)
	}
	var addrs []netip.Addr
	for _, a := range resolved {
		a = a.Unmap()
		if !slices.Contains(addrs, a) {
			addrs = append(addrs, a)
		}
	}
	if len(addrs) == 0 {
		return nil, fmt.Errorf("%s (in %s %s) resolves to no %saddress; make it resolve to this node's address, or set %s or %s",
			host, keyListenAddress, in.ListenAddress, familyWord(in.ListenNetwork), config.EnvOwnPrivateAPICIDR, config.EnvOwnPrivateAPIURL)
	}
	return addrs, nil
}

// everyRoutableAddr is what a listener on every address publishes: each
// interface address of the listener's family that another machine could
// dial. Link-local addresses are left out because they need an interface
// zone that means nothing on the peer.
func everyRoutableAddr(in Input, sys System) ([]netip.Addr, error) {
	have, err := sys.InterfaceAddrs()
	if err != nil {
		return nil, fmt.Errorf("list this node's interface addresses (%s %s listens on all of them): %w", keyListenAddress, in.ListenAddress, err)
	}
	var addrs []netip.Addr
	for _, h := range have {
		a := h.Addr().Unmap().WithZone("")
		if a.IsLoopback() || a.IsLinkLocalUnicast() || !familyMatches(in.ListenNetwork, a) || slices.Contains(addrs, a) {
			continue
		}
		addrs = append(addrs, a)
	}
	if len(addrs) == 0 {
		return nil, fmt.Errorf("%s %s (network %s) listens on every address, but this node has no %saddress other than loopback and link-local ones to publish (it has %s); set %s or %s, or listen on a specific address",
			keyListenAddress, in.ListenAddress, in.ListenNetwork, familyWord(in.ListenNetwork), describePrefixes(have), config.EnvOwnPrivateAPICIDR, config.EnvOwnPrivateAPIURL)
	}
	return addrs, nil
}

// unixURL is the grpc-go target for a Unix socket listener. The path is made
// absolute because the peer dialing it need not share this working directory.
func unixURL(path string) (string, error) {
	if path == "" {
		return "", errors.New(keyListenAddress + ": want a socket path for network unix, got none")
	}
	if name, ok := strings.CutPrefix(path, "@"); ok {
		// Go's listener takes "@name" as a Linux abstract socket.
		return (&url.URL{Scheme: "unix-abstract", Opaque: name}).String(), nil
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return "", fmt.Errorf("make socket path %s from %s absolute: %w", path, keyListenAddress, err)
	}
	return (&url.URL{Scheme: "unix", Path: abs}).String(), nil
}

// isLoopbackHost reports whether host names this machine only: localhost
// (RFC 6761 reserves every *.localhost name for it too) or a loopback IP.
func isLoopbackHost(host string) bool {
	host = strings.ToLower(strings.TrimSuffix(host, "."))
	if host == "localhost" || strings.HasSuffix(host, ".localhost") {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.Unmap().IsLoopback()
}

func familyMatches(network string, a netip.Addr) bool {
	switch network {
	case "tcp4":
		return a.Is4()
	case "tcp6":
		return a.Is6()
	}
	return true
}

func lookupNetwork(network string) string {
	switch network {
	case "tcp4":
		return "ip4"
	case "tcp6":
		return "ip6"
	}
	return "ip"
}

// familyWord qualifies "address" in messages: "IPv4 ", "IPv6 " or nothing.
func familyWord(network string) string {
	switch network {
	case "tcp4":
		return "IPv4 "
	case "tcp6":
		return "IPv6 "
	}
	return ""
}

func describePrefixes(ps []netip.Prefix) string {
	if len(ps) == 0 {
		return "no interface addresses"
	}
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ", ")
}
