//go:build linux

package ownurl

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/kasproject/kas/server/config"
)

// helperInputEnv carries a JSON Input to the test binary re-executed inside
// a network namespace; see TestMain.
const helperInputEnv = "KAS_OWNURL_NETNS_INPUT"

// helperOutput is what the re-executed test binary prints.
type helperOutput struct {
	Result *Result
	Err    string
}

// TestMain runs Discover against the real interfaces when the test binary is
// re-executed by TestDiscoverInNetworkNamespaces with `ip netns exec`:
// entering the namespace in a separate process leaves this one, and the
// host's interfaces, untouched.
func TestMain(m *testing.M) {
	if raw, ok := os.LookupEnv(helperInputEnv); ok {
		os.Exit(runHelper(raw))
	}
	os.Exit(m.Run())
}

func runHelper(raw string) int {
	var in Input
	if err := json.Unmarshal([]byte(raw), &in); err != nil {
		fmt.Fprintf(os.Stderr, "decode %s: %v\n", helperInputEnv, err)
		return 2
	}
	var out helperOutput
	res, err := Discover(context.Background(), in, OS{})
	if err != nil {
		out.Err = err.Error()
	}
	out.Result = res
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintf(os.Stderr, "write result: %v\n", err)
		return 2
	}
	return 0
}

// TestDiscoverInNetworkNamespaces runs Discover with OS{} in two network
// namespaces joined by a veth pair, each with loopback up, IPv4 and IPv6
// addresses, and link-local ones of both families.
func TestDiscoverInNetworkNamespaces(t *testing.T) {
	ip := requireNetworkNamespaces(t)
	nsA, nsB := fmt.Sprintf("kas-ownurl-%d-a", os.Getpid()), fmt.Sprintf("kas-ownurl-%d-b", os.Getpid())
	for _, ns := range []string{nsA, nsB} {
		if out, err := exec.Command(ip, "netns", "add", ns).CombinedOutput(); err != nil {
			t.Skipf("network namespaces are not permitted here: ip netns add %s: %v: %s", ns, err, bytes.TrimSpace(out))
		}
		t.Cleanup(func() {
			// Deleting a namespace also deletes the veth end inside it.
			if out, err := exec.Command(ip, "netns", "del", ns).CombinedOutput(); err != nil {
				t.Errorf("ip netns del %s: %v: %s", ns, err, out)
			}
		})
	}
	// Every command runs inside a namespace (ip -n), so the host's
	// interfaces are never touched. Kernel-generated link-local addresses
	// are turned off (addrgenmode none) and fixed ones added instead, so
	// the test knows exactly which addresses exist.
	for _, args := range [][]string{
		{"-n", nsA, "link", "set", "lo", "up"},
		{"-n", nsB, "link", "set", "lo", "up"},
		{"-n", nsA, "link", "add", "veth0", "type", "veth", "peer", "name", "veth0", "netns", nsB},
		{"-n", nsA, "link", "set", "veth0", "addrgenmode", "none"},
		{"-n", nsB, "link", "set", "veth0", "addrgenmode", "none"},
		{"-n", nsA, "addr", "add", "10.231.0.1/24", "dev", "veth0"},
		{"-n", nsA, "addr", "add", "169.254.31.1/16", "dev", "veth0"},
		{"-n", nsA, "addr", "add", "fd31::1/64", "dev", "veth0", "nodad"},
		{"-n", nsA, "addr", "add", "fe80::31:1/64", "dev", "veth0", "nodad"},
		{"-n", nsB, "addr", "add", "10.231.0.2/24", "dev", "veth0"},
		{"-n", nsB, "addr", "add", "fd31::2/64", "dev", "veth0", "nodad"},
		{"-n", nsA, "link", "set", "veth0", "up"},
		{"-n", nsB, "link", "set", "veth0", "up"},
	} {
		if out, err := exec.Command(ip, args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}

	tcp := func(address string, env config.Env) Input {
		return Input{Env: env, ListenNetwork: "tcp", ListenAddress: address}
	}
	tests := []struct {
		name    string
		ns      string
		in      Input
		want    []string // compared as a set: the kernel chooses the order
		wantErr []string
	}{
		{
			name: "CIDR finds the IPv4 address",
			ns:   nsA,
			in:   tcp(":8155", config.Env{OwnPrivateAPICIDR: "10.231.0.0/24"}),
			want: []string{"grpc://10.231.0.1:8155"},
		},
		{
			name: "IPv6 and IPv4 CIDRs",
			ns:   nsA,
			in:   tcp(":8155", config.Env{OwnPrivateAPICIDR: "fd31::/64,10.231.0.0/24"}),
			want: []string{"grpc://[fd31::1]:8155", "grpc://10.231.0.1:8155"},
		},
		{
			name: "the other namespace finds its own address",
			ns:   nsB,
			in:   tcp(":8155", config.Env{OwnPrivateAPICIDR: "10.231.0.0/24"}),
			want: []string{"grpc://10.231.0.2:8155"},
		},
		{
			name:    "CIDR matching nothing lists the addresses found",
			ns:      nsA,
			in:      tcp(":8155", config.Env{OwnPrivateAPICIDR: "10.99.0.0/16"}),
			wantErr: []string{"no interface address of this node is inside 10.99.0.0/16", "10.231.0.1/24", "fd31::1/64", "127.0.0.1/8"},
		},
		// The loopback and link-local addresses are there (these two cases
		// find them), so leaving them out below is Discover's doing.
		{
			name: "loopback is up",
			ns:   nsA,
			in:   tcp(":8155", config.Env{OwnPrivateAPICIDR: "127.0.0.0/8,::1/128"}),
			want: []string{"grpc://127.0.0.1:8155", "grpc://[::1]:8155"},
		},
		{
			name: "link-local addresses exist",
			ns:   nsA,
			in:   tcp(":8155", config.Env{OwnPrivateAPICIDR: "169.254.0.0/16,fe80::/10"}),
			want: []string{"grpc://169.254.31.1:8155", "grpc://[fe80::31:1]:8155"},
		},
		{
			name: "no IP gives both families without loopback or link-local",
			ns:   nsA,
			in:   Input{ListenNetwork: "tcp", ListenAddress: ":8155", MultiNode: true},
			want: []string{"grpc://10.231.0.1:8155", "grpc://[fd31::1]:8155"},
		},
		{
			name: "0.0.0.0 with tcp4",
			ns:   nsA,
			in:   Input{ListenNetwork: "tcp4", ListenAddress: "0.0.0.0:8155"},
			want: []string{"grpc://10.231.0.1:8155"},
		},
		{
			name: "[::] with tcp6",
			ns:   nsA,
			in:   Input{ListenNetwork: "tcp6", ListenAddress: "[::]:8155"},
			want: []string{"grpc://[fd31::1]:8155"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			out := discoverInNamespace(t, ip, tc.ns, tc.in)
			if tc.wantErr != nil {
				if out.Err == "" {
					t.Fatalf("Discover = %+v, want an error containing %q", out.Result, tc.wantErr)
				}
				for _, want := range tc.wantErr {
					if !strings.Contains(out.Err, want) {
						t.Errorf("error does not contain %q:\n%s", want, out.Err)
					}
				}
				return
			}
			if out.Err != "" {
				t.Fatalf("Discover: %s", out.Err)
			}
			got := slices.Sorted(slices.Values(out.Result.URLs))
			want := slices.Sorted(slices.Values(tc.want))
			if !slices.Equal(got, want) {
				t.Fatalf("URLs = %q, want %q (in any order)", out.Result.URLs, tc.want)
			}
		})
	}
}

// requireNetworkNamespaces returns the path of ip, or skips the test where
// it cannot create network namespaces. In CI (CI=true) a missing ip fails
// the test: the CI image is meant to install iproute2.
func requireNetworkNamespaces(t *testing.T) string {
	t.Helper()
	ip, err := exec.LookPath("ip")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("ip (iproute2) is missing, and CI=true: install it in the CI image (apt-get install -y iproute2): %v", err)
		}
		t.Skipf("ip (iproute2) is missing, so no network namespaces can be made; install it (apt-get install -y iproute2) to run this test: %v", err)
	}
	if os.Geteuid() != 0 {
		t.Skip("creating network namespaces needs root; run the tests as root to check discovery against real interfaces")
	}
	return ip
}

// discoverInNamespace re-executes this test binary inside namespace ns,
// where TestMain runs Discover(in) with OS{}.
func discoverInNamespace(t *testing.T, ip, ns string, in Input) helperOutput {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatalf("find the test binary: %v", err)
	}
	raw, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(t.Context(), ip, "netns", "exec", ns, self)
	cmd.Env = append(os.Environ(), helperInputEnv+"="+string(raw),
		// Under -race the child would otherwise sleep a second at exit.
		"GORACE="+os.Getenv("GORACE")+" atexit_sleep_ms=0")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("run discovery in namespace %s: %v\nstderr: %s", ns, err, stderr.Bytes())
	}
	var out helperOutput
	if err := json.Unmarshal(stdout.Bytes(), &out); err != nil {
		t.Fatalf("decode discovery output %q: %v\nstderr: %s", stdout.Bytes(), err, stderr.Bytes())
	}
	return out
}
