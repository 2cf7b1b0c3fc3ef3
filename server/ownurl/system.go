package ownurl

import (
	"context"
	"fmt"
	"net"
	"net/netip"
)

// System is what Discover asks of the machine it runs on. OS is the real one;
// tests pass a fake.
type System interface {
	// InterfaceAddrs returns the addresses of the interfaces that are up, in
	// interface order, each with its prefix length (10.0.0.5/24) so an error
	// can show the networks the node is on.
	InterfaceAddrs() ([]netip.Prefix, error)
	// LookupNetIP resolves host; network is "ip", "ip4" or "ip6", as for
	// (*net.Resolver).LookupNetIP.
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

// OS is the System of the running machine: its network interfaces and
// net.DefaultResolver.
type OS struct{}

// InterfaceAddrs returns the addresses of the interfaces that are up. An
// interface that is down cannot be reached, so its addresses are left out.
func (OS) InterfaceAddrs() ([]netip.Prefix, error) {
	ifaces, err := net.Interfaces()
	if err != nil {
		return nil, fmt.Errorf("list network interfaces: %w", err)
	}
	var prefixes []netip.Prefix
	for _, iface := range ifaces {
		if iface.Flags&net.FlagUp == 0 {
			continue
		}
		addrs, err := iface.Addrs()
		if err != nil {
			return nil, fmt.Errorf("list addresses of network interface %s: %w", iface.Name, err)
		}
		for _, a := range addrs {
			if p, ok := toPrefix(a); ok {
				prefixes = append(prefixes, p)
			}
		}
	}
	return prefixes, nil
}

// LookupNetIP resolves host with net.DefaultResolver.
func (OS) LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error) {
	return net.DefaultResolver.LookupNetIP(ctx, network, host)
}

// toPrefix converts what net.Interface.Addrs returns; IPv4 addresses come
// as 16-byte IPv4-mapped slices, so they are unmapped.
func toPrefix(a net.Addr) (netip.Prefix, bool) {
	switch a := a.(type) {
	case *net.IPNet:
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			return netip.Prefix{}, false
		}
		ip = ip.Unmap()
		ones, bits := a.Mask.Size()
		if ip.Is4() && bits == 128 {
			ones -= 96 // a mask written in IPv6 form for an IPv4 address
		}
		return netip.PrefixFrom(ip, ones), true
	case *net.IPAddr:
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			return netip.Prefix{}, false
		}
		ip = ip.Unmap()
		return netip.PrefixFrom(ip, ip.BitLen()), true
	}
	return netip.Prefix{}, false
}
