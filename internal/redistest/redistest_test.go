package redistest

import (
	"testing"
	"time"
)

func TestStopAndRestartOnTheSamePort(t *testing.T) {
	s := Start(t)
	addr := s.Addr()
	if err := ping(addr); err != nil {
		t.Fatalf("started server does not answer: %v", err)
	}
	s.Stop()
	if err := ping(addr); err == nil {
		t.Fatal("stopped server still answers PING")
	}
	s.Stop() // stopping twice is harmless
	s.Restart()
	if s.Addr() != addr {
		t.Fatalf("restarted on %s, want %s", s.Addr(), addr)
	}
	if err := ping(addr); err != nil {
		t.Fatalf("restarted server does not answer: %v", err)
	}
}

func TestServersAreIndependent(t *testing.T) {
	a, b := Start(t), Start(t)
	if a.Addr() == b.Addr() {
		t.Fatalf("two servers share %s", a.Addr())
	}
	a.Stop()
	if err := ping(b.Addr()); err != nil {
		t.Fatalf("stopping one server stopped the other: %v", err)
	}
}

func TestClusterFailsOverAKilledMaster(t *testing.T) {
	c := StartCluster(t, 3, 1)
	if len(c.Addrs()) != 6 {
		t.Fatalf("%d nodes, want 6", len(c.Addrs()))
	}
	var master string
	for _, addr := range c.Addrs() {
		if info, err := command(addr, "INFO", "replication"); err == nil && infoField(info, "role") == "master" {
			master = addr
			break
		}
	}
	if master == "" {
		t.Fatal("no node is a master")
	}
	killed := time.Now()
	c.Kill(master)
	c.WaitFailover(master)
	t.Logf("the cluster was healthy again %s after its master %s was killed", time.Since(killed).Round(time.Millisecond), master)
}

func TestSentinelPromotesTheReplica(t *testing.T) {
	s := StartSentinel(t, "kas-test")
	primary := s.Primary()
	killed := time.Now()
	primary.Kill()
	deadline := time.Now().Add(30 * time.Second)
	for s.primaryOrNil() == nil {
		if time.Now().After(deadline) {
			t.Fatal("the replica was not promoted within 30s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("the replica was promoted %s after the primary was killed", time.Since(killed).Round(time.Millisecond))
}
