package redistest

import "testing"

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
