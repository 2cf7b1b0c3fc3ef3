// Package redistest runs a real redis-server for tests: on a free loopback
// port, with its own temporary directory and no persistence, stopped when the
// test ends. A test can stop it and start it again on the same port to see
// how its code lives through a Redis restart (which, without persistence,
// also loses every key), or kill it as a crash would. StartCluster runs a
// Redis Cluster of such servers and StartSentinel a Sentinel-managed
// primary with a replica, for failover tests.
package redistest

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// startTimeout bounds how long redis-server may take to answer PING.
const startTimeout = 10 * time.Second

// Server is one redis-server process, restartable on the same port.
type Server struct {
	t       testing.TB
	binary  string
	dir     string
	port    int
	conf    string   // a configuration file, which redis-server reads first ("" for none)
	args    []string // more redis-server arguments (cluster or sentinel mode)
	cmd     *exec.Cmd
	exited  chan struct{} // closed when cmd has been waited for
	waitErr error         // cmd.Wait's result, valid once exited is closed
}

// Start runs redis-server for the duration of t. Without redis-server in
// PATH it skips t, except under CI (CI=true), where a missing server is a
// broken environment and fails t.
func Start(t testing.TB) *Server {
	t.Helper()
	return start(t, "", nil, freePort)
}

// lookPath finds a Redis program, skipping t without it except under CI.
func lookPath(t testing.TB, program string) string {
	t.Helper()
	path, err := exec.LookPath(program)
	if err != nil {
		msg := program + " is not in PATH; install it (Debian: apt-get install -y redis-server redis-tools, or run scripts/install-test-deps.sh as root) to run the Redis tests"
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return path
}

// start runs redis-server with the configuration file (if any) and the
// extra arguments on a port from port.
func start(t testing.TB, conf string, args []string, port func() (int, error)) *Server {
	t.Helper()
	s := &Server{t: t, binary: lookPath(t, "redis-server"), dir: t.TempDir(), conf: conf, args: args}
	t.Cleanup(s.Stop)

	// Another process may take the port between our probe and redis-server's
	// bind, so try a few ports before giving up.
	var lastErr error
	for range 5 {
		var err error
		s.port, err = port()
		if err != nil {
			t.Fatalf("find a free port for redis-server: %v", err)
		}
		if lastErr = s.start(); lastErr == nil {
			return s
		}
	}
	t.Fatalf("start redis-server: %v", lastErr)
	return nil
}

// Addr is the server's host:port on 127.0.0.1.
func (s *Server) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port)) }

// Stop shuts the server down and waits for it to exit; its data is lost.
// Stopping a stopped server does nothing.
func (s *Server) Stop() {
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
	case <-time.After(startTimeout):
		_ = s.cmd.Process.Kill()
		<-s.exited
	}
	s.cmd = nil
}

// Kill ends the server with SIGKILL, as a crash would, and waits for it to
// exit. Killing a stopped server does nothing.
func (s *Server) Kill() {
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Kill()
	<-s.exited
	s.cmd = nil
}

// Restart starts a stopped server again on the same port, empty.
func (s *Server) Restart() {
	s.t.Helper()
	if s.cmd != nil {
		s.t.Fatal("redistest: Restart of a running server; Stop it first")
	}
	if err := s.start(); err != nil {
		s.t.Fatalf("restart redis-server on port %d: %v", s.port, err)
	}
}

// start runs redis-server on s.port and waits until it answers PING.
func (s *Server) start() error {
	logFile := filepath.Join(s.dir, "redis.log")
	var args []string
	if s.conf != "" {
		args = append(args, s.conf)
	}
	cmd := exec.Command(s.binary, append(append(args,
		"--bind", "127.0.0.1",
		"--port", strconv.Itoa(s.port),
		"--dir", s.dir,
		"--logfile", logFile,
		"--save", "",
		"--appendonly", "no",
		"--daemonize", "no",
	), s.args...)...)
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("run %s: %w", s.binary, err)
	}
	exited := make(chan struct{})
	go func() {
		s.waitErr = cmd.Wait()
		close(exited)
	}()
	s.cmd, s.exited = cmd, exited

	deadline := time.Now().Add(startTimeout)
	for {
		select {
		case <-exited:
			s.cmd = nil
			return fmt.Errorf("redis-server exited (%v) before answering PING; its log ends:\n%s", s.waitErr, tail(logFile))
		default:
		}
		err := ping(s.Addr())
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			s.Stop()
			return fmt.Errorf("redis-server did not answer PING on %s within %s (%v); its log ends:\n%s", s.Addr(), startTimeout, err, tail(logFile))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// ping sends PING over RESP and expects +PONG.
func ping(addr string) error {
	reply, err := command(addr, "PING")
	if err != nil {
		return err
	}
	if reply != "PONG" {
		return fmt.Errorf("PING answered %q", reply)
	}
	return nil
}

// command sends one inline command and returns its reply: a simple
// string, an integer or a bulk string (errors are errors).
func command(addr string, args ...string) (string, error) {
	conn, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(time.Second))
	if _, err := conn.Write([]byte(strings.Join(args, " ") + "\r\n")); err != nil {
		return "", err
	}
	r := bufio.NewReader(conn)
	line, err := r.ReadString('\n')
	if err != nil {
		return "", err
	}
	line = strings.TrimRight(line, "\r\n")
	switch {
	case strings.HasPrefix(line, "+"), strings.HasPrefix(line, ":"):
		return line[1:], nil
	case strings.HasPrefix(line, "-"):
		return "", fmt.Errorf("%s: %s", args[0], line[1:])
	case strings.HasPrefix(line, "$"):
		n, err := strconv.Atoi(line[1:])
		if err != nil || n < 0 {
			return "", fmt.Errorf("%s: unexpected reply %q", args[0], line)
		}
		buf := make([]byte, n+2)
		if _, err := io.ReadFull(r, buf); err != nil {
			return "", err
		}
		return string(buf[:n]), nil
	}
	return "", fmt.Errorf("%s: unexpected reply %q", args[0], line)
}

// infoField returns one field of a "field:value" reply such as INFO's.
func infoField(reply, field string) string {
	for line := range strings.Lines(reply) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), field+":"); ok {
			return v
		}
	}
	return ""
}

// freePort asks the kernel for a free loopback port.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	addr, ok := ln.Addr().(*net.TCPAddr)
	if !ok {
		return 0, errors.New("listener address is not TCP")
	}
	return addr.Port, nil
}

// tail returns the last lines of a log file, for error messages.
func tail(path string) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > 20 {
		lines = lines[len(lines)-20:]
	}
	return strings.Join(lines, "\n")
}
