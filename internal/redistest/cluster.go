package redistest

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// clusterNodeTimeout is the cluster-node-timeout of test clusters: a master
// that does not answer for this long is failed over to its replica, which
// takes two to four seconds in all.
const clusterNodeTimeout = time.Second

// Cluster is a Redis Cluster of redis-server processes on loopback ports,
// made with redis-cli --cluster create, stopped when the test ends.
type Cluster struct {
	t     testing.TB
	nodes []*Server
}

// StartCluster runs masters × (1 + replicas) servers and joins them into a
// cluster (redis-cli decides which replica follows which master), then
// waits until every node reports the cluster ok. It needs redis-cli
// (Debian: redis-tools).
func StartCluster(t testing.TB, masters, replicas int) *Cluster {
	t.Helper()
	cli := lookPath(t, "redis-cli")
	c := &Cluster{t: t}
	args := []string{
		"--cluster-enabled", "yes",
		"--cluster-config-file", "nodes.conf",
		"--cluster-node-timeout", strconv.Itoa(int(clusterNodeTimeout / time.Millisecond)),
		// A replica that has not synced once cannot be promoted; without
		// this, a master waits five seconds before the first sync.
		"--repl-diskless-sync-delay", "0",
	}
	for range masters * (1 + replicas) {
		c.nodes = append(c.nodes, start(t, "", args, freeClusterPort))
	}
	create := append([]string{"--cluster", "create"}, c.Addrs()...)
	create = append(create, "--cluster-replicas", strconv.Itoa(replicas), "--cluster-yes")
	if out, err := exec.Command(cli, create...).CombinedOutput(); err != nil {
		t.Fatalf("redis-cli --cluster create: %v\n%s", err, out)
	}
	c.WaitHealthy()
	return c
}

// Addrs are the host:port of every node, masters and replicas.
func (c *Cluster) Addrs() []string {
	addrs := make([]string, len(c.nodes))
	for i, n := range c.nodes {
		addrs[i] = n.Addr()
	}
	return addrs
}

// Kill ends the node at addr with SIGKILL, as a crash would.
func (c *Cluster) Kill(addr string) {
	c.t.Helper()
	for _, n := range c.nodes {
		if n.Addr() == addr {
			n.Kill()
			return
		}
	}
	c.t.Fatalf("redistest: no cluster node at %s", addr)
}

// WaitFailover waits until every running node sees the node at addr (a
// killed master) failed and serving no slots, its replica promoted in its
// place, and the cluster healthy again.
func (c *Cluster) WaitFailover(addr string) {
	c.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := c.failedOver(addr)
		if err == nil {
			err = c.healthy()
		}
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("redistest: %s was not failed over within 30s: %v", addr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// FailedOver reports whether every running node sees the node at addr
// failed and its slots served by another (see WaitFailover).
func (c *Cluster) FailedOver(addr string) bool {
	return c.failedOver(addr) == nil && c.healthy() == nil
}

func (c *Cluster) failedOver(addr string) error {
	for _, n := range c.nodes {
		if n.cmd == nil {
			continue
		}
		nodes, err := command(n.Addr(), "CLUSTER", "NODES")
		if err != nil {
			return err
		}
		for line := range strings.Lines(nodes) {
			f := strings.Fields(line)
			if len(f) < 8 || !strings.HasPrefix(f[1], addr+"@") {
				continue
			}
			flags := strings.Split(f[2], ",")
			if !slices.Contains(flags, "fail") || len(f) > 8 {
				return fmt.Errorf("%s sees %s as %s with %d slot ranges", n.Addr(), addr, f[2], len(f)-8)
			}
		}
	}
	return nil
}

// WaitHealthy waits until every running node reports cluster_state:ok
// and every replica is in sync with its master.
func (c *Cluster) WaitHealthy() {
	c.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := c.healthy()
		if err == nil {
			err = replicasInSync(c.nodes)
		}
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("redistest: the cluster is not healthy after 30s: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (c *Cluster) healthy() error {
	for _, n := range c.nodes {
		if n.cmd == nil {
			continue
		}
		info, err := command(n.Addr(), "CLUSTER", "INFO")
		if err != nil {
			return err
		}
		if state := infoField(info, "cluster_state"); state != "ok" {
			return fmt.Errorf("%s reports cluster_state %q", n.Addr(), state)
		}
	}
	return nil
}

// replicasInSync reports an error unless every running replica among
// servers has its link to its master up.
func replicasInSync(servers []*Server) error {
	for _, n := range servers {
		if n.cmd == nil {
			continue
		}
		info, err := command(n.Addr(), "INFO", "replication")
		if err != nil {
			return err
		}
		if infoField(info, "role") == "slave" && infoField(info, "master_link_status") != "up" {
			return fmt.Errorf("replica %s is not in sync with its master yet", n.Addr())
		}
	}
	return nil
}

// freeClusterPort finds a free port whose cluster bus port (port + 10000)
// is free too.
func freeClusterPort() (int, error) {
	for range 50 {
		port, err := freePort()
		if err != nil {
			return 0, err
		}
		if port+10000 > 65535 {
			continue
		}
		bus, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port+10000)))
		if err != nil {
			continue
		}
		_ = bus.Close()
		return port, nil
	}
	return 0, errors.New("no free port with a free cluster bus port")
}

// Sentinel is a primary with one replica, watched by one Sentinel (quorum
// 1), stopped when the test ends.
type Sentinel struct {
	t          testing.TB
	masterName string
	servers    []*Server // the primary and its replica, in either role
	sentinel   *Server
}

// StartSentinel runs a primary, a replica of it and a Sentinel monitoring
// them as masterName, and waits until the replica is in sync and the
// Sentinel knows it. The
// Sentinel declares the primary down after a second without an answer.
func StartSentinel(t testing.TB, masterName string) *Sentinel {
	t.Helper()
	s := &Sentinel{t: t, masterName: masterName}
	primary := start(t, "", []string{"--repl-diskless-sync-delay", "0"}, freePort)
	replica := start(t, "", []string{"--replicaof", "127.0.0.1", strconv.Itoa(primary.port)}, freePort)
	s.servers = []*Server{primary, replica}
	// A Sentinel rewrites its configuration file, so it gets one of its own.
	conf := filepath.Join(t.TempDir(), "sentinel.conf")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf(
		"sentinel monitor %[1]s 127.0.0.1 %[2]d 1\n"+
			"sentinel down-after-milliseconds %[1]s 1000\n"+
			"sentinel failover-timeout %[1]s 5000\n",
		masterName, primary.port)), 0o600); err != nil {
		t.Fatal(err)
	}
	s.sentinel = start(t, conf, []string{"--sentinel"}, freePort)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if n, err := s.knownReplicas(); err == nil && n > 0 && replicasInSync(s.servers) == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("redistest: the Sentinel does not know the replica after 30s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	return s
}

// knownReplicas is how many replicas the Sentinel knows for the primary,
// from its INFO.
func (s *Sentinel) knownReplicas() (int, error) {
	info, err := command(s.sentinel.Addr(), "INFO", "sentinel")
	if err != nil {
		return 0, err
	}
	// master0:name=…,status=ok,address=…,slaves=1,sentinels=1
	line := infoField(info, "master0")
	for _, kv := range strings.Split(line, ",") {
		if v, ok := strings.CutPrefix(kv, "slaves="); ok {
			return strconv.Atoi(v)
		}
	}
	return 0, fmt.Errorf("no slaves= in %q", line)
}

// Addr is the Sentinel's host:port.
func (s *Sentinel) Addr() string { return s.sentinel.Addr() }

// MasterName is the name the Sentinel monitors the primary as.
func (s *Sentinel) MasterName() string { return s.masterName }

// Primary is the running server that is the primary now, as its INFO
// says.
func (s *Sentinel) Primary() *Server {
	s.t.Helper()
	p := s.primaryOrNil()
	if p == nil {
		s.t.Fatal("redistest: no running server is the primary")
	}
	return p
}

// PrimaryAddr is the address of the running server that is the primary
// now, or "" while there is none.
func (s *Sentinel) PrimaryAddr() string {
	if p := s.primaryOrNil(); p != nil {
		return p.Addr()
	}
	return ""
}

func (s *Sentinel) primaryOrNil() *Server {
	for _, srv := range s.servers {
		if srv.cmd == nil {
			continue
		}
		if info, err := command(srv.Addr(), "INFO", "replication"); err == nil && infoField(info, "role") == "master" {
			return srv
		}
	}
	return nil
}
