//go:build linux

package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// requireNetworkNamespaces returns the path of ip, or skips the test where
// it cannot create network namespaces. In CI (CI=true) a missing ip fails
// the test: the CI image is meant to install iproute2.
func requireNetworkNamespaces(t *testing.T) string {
	t.Helper()
	ip, err := exec.LookPath("ip")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("ip (iproute2) is missing, and CI=true: install it (scripts/install-test-deps.sh): %v", err)
		}
		t.Skipf("ip (iproute2) is missing, so no network namespaces can be made; install it (apt-get install -y iproute2): %v", err)
	}
	if os.Geteuid() != 0 {
		t.Skip("creating network namespaces needs root; run the tests as root")
	}
	return ip
}

// netns is a network namespace the test made; deleted when the test ends.
type netns string

// newNetns creates a network namespace with its loopback up.
func newNetns(t *testing.T, ip, name string) netns {
	t.Helper()
	if out, err := exec.Command(ip, "netns", "add", name).CombinedOutput(); err != nil {
		t.Skipf("network namespaces are not permitted here: ip netns add %s: %v: %s", name, err, bytes.TrimSpace(out))
	}
	t.Cleanup(func() {
		// Deleting a namespace also deletes the veth end inside it.
		if out, err := exec.Command(ip, "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	ns := netns(name)
	ns.ip(t, ip, "link", "set", "lo", "up")
	return ns
}

// ip runs `ip -n ns args…`: inside the namespace, never on the host's
// interfaces.
func (ns netns) ip(t *testing.T, ip string, args ...string) {
	t.Helper()
	args = append([]string{"-n", string(ns)}, args...)
	if out, err := exec.Command(ip, args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// command runs name in the namespace (ip netns exec, which execs it: the
// process is name itself).
func (ns netns) command(ip, name string, args ...string) *exec.Cmd {
	return exec.Command(ip, append([]string{"netns", "exec", string(ns), name}, args...)...)
}

// do runs fn on an OS thread that has entered the namespace, so the
// sockets fn creates live there. The thread is never unlocked, so it ends
// with the goroutine instead of returning to Go's pool in the namespace.
func (ns netns) do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		f, err := os.Open("/var/run/netns/" + string(ns))
		if err != nil {
			errc <- fmt.Errorf("open network namespace %s: %w", ns, err)
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("enter network namespace %s: %w", ns, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// listen opens a TCP listener inside the namespace.
func (ns netns) listen(t *testing.T, address string) net.Listener {
	t.Helper()
	var ln net.Listener
	if err := ns.do(func() (err error) {
		ln, err = net.Listen("tcp", address)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return ln
}

// dial connects from inside the namespace to an IP address and port.
func (ns netns) dial(ctx context.Context, network, address string) (net.Conn, error) {
	var conn net.Conn
	err := ns.do(func() (err error) {
		// An IP literal: one address, dialled on this thread (no
		// resolver or parallel dials on other threads).
		conn, err = (&net.Dialer{}).DialContext(ctx, network, address)
		return err
	})
	return conn, err
}
