package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

// errNotReady: the child ended before it reported that it serves.
var errNotReady = errors.New("exited before it was ready")

// child is one process of the layout, started by the parent.
type child struct {
	name    string
	logPath string
	cmd     *exec.Cmd
	stdin   io.WriteCloser
	stdout  *bufio.Reader
	waited  chan struct{}
	waitErr error

	ready readyMessage
	mu    sync.Mutex // one command at a time

	// signal, if set, stops a child that is not one of kasbench's roles
	// (GitLab's agentk), which has no stdin to close.
	signal os.Signal
	// killed: the benchmark killed it on purpose (SIGKILL), so its exit
	// status is no failure.
	killed bool
}

// kill ends the child with SIGKILL, as a crash would.
func (c *child) kill() error {
	c.killed = true
	if err := c.cmd.Process.Kill(); err != nil {
		return fmt.Errorf("kill %s: %w", c.name, err)
	}
	<-c.waited
	return nil
}

// startChild runs `<this binary> role args…` and waits until
// it reports that it serves. Its stderr goes to <dir>/<name>.stderr.
func startChild(b *bench, name, role string, args ...string) (*child, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find the kasbench binary to start %s: %w", name, err)
	}
	logPath := filepath.Join(b.dir, name+".stderr")
	stderr, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer stderr.Close() // the child has its own descriptor
	cmd := exec.Command(exe, append([]string{role}, args...)...)
	if b.profileDir != "" {
		cmd.Env = append(os.Environ(), profileEnv+"="+filepath.Join(b.profileDir, name))
	}
	cmd.Stderr = stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	c := &child{name: name, logPath: logPath, cmd: cmd, stdin: stdin, stdout: bufio.NewReader(stdout), waited: make(chan struct{})}
	go func() { c.waitErr = cmd.Wait(); close(c.waited) }()
	b.children = append(b.children, c)

	type result struct {
		msg readyMessage
		err error
	}
	got := make(chan result, 1)
	go func() {
		var r result
		r.err = c.readLine(&r.msg)
		got <- r
	}()
	select {
	case r := <-got:
		switch {
		case r.err != nil:
			return nil, fmt.Errorf("%s: %w%s", name, r.err, c.logTail())
		case r.msg.Error != "":
			return nil, fmt.Errorf("%s: %s%s", name, r.msg.Error, c.logTail())
		}
		c.ready = r.msg
		return c, nil
	case <-time.After(2 * time.Minute):
		return nil, fmt.Errorf("%s did not start within 2 minutes%s", name, c.logTail())
	}
}

func (c *child) readLine(v any) error {
	line, err := c.stdout.ReadBytes('\n')
	if err != nil {
		if errors.Is(err, io.EOF) {
			return errNotReady
		}
		return err
	}
	return json.Unmarshal(line, v)
}

// memStats asks the child for its Go memory statistics, after a garbage
// collection that returns freed memory to the OS when gc is set.
func (c *child) memStats(gc bool) (memStats, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	cmd := "mem\n"
	if gc {
		cmd = "gc\n"
	}
	var ms memStats
	if _, err := io.WriteString(c.stdin, cmd); err != nil {
		return ms, fmt.Errorf("ask %s for its memory: %w", c.name, err)
	}
	if err := c.readLine(&ms); err != nil {
		return ms, fmt.Errorf("read %s's memory: %w", c.name, err)
	}
	return ms, nil
}

// rss is the child's resident set size in bytes, from /proc.
func (c *child) rss() (int64, error) {
	return processRSS(c.cmd.Process.Pid)
}

func processRSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("read RSS (Linux /proc only): %w", err)
	}
	for line := range bytes.Lines(b) {
		if v, ok := bytes.CutPrefix(line, []byte("VmRSS:")); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(string(v)), " kB"), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("parse VmRSS %q: %w", v, err)
			}
			return kb << 10, nil
		}
	}
	return 0, errors.New("no VmRSS in /proc status")
}

// processCPUTime is the user+system CPU time of a process, from /proc.
func processCPUTime(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("read CPU time (Linux /proc only): %w", err)
	}
	// The command name, field 2, is in parentheses and may hold spaces.
	i := bytes.LastIndexByte(b, ')')
	fields := strings.Fields(string(b[i+1:]))
	if len(fields) < 13 {
		return 0, fmt.Errorf("short /proc/%d/stat", pid)
	}
	// utime and stime (fields 14 and 15) are in USER_HZ ticks, 100 a second
	// on every Linux.
	var ticks int64
	for _, f := range fields[11:13] {
		n, err := strconv.ParseInt(f, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("parse /proc/%d/stat: %w", pid, err)
		}
		ticks += n
	}
	return time.Duration(ticks) * 10 * time.Millisecond, nil
}

// snapshot is one reading of a child's memory.
type snapshot struct {
	heap, stack, rss int64
}

func (c *child) snapshot(gc bool) (snapshot, error) {
	ms, err := c.memStats(gc)
	if err != nil {
		return snapshot{}, err
	}
	rss, err := c.rss()
	if err != nil {
		return snapshot{}, err
	}
	return snapshot{heap: int64(ms.HeapInuse), stack: int64(ms.StackInuse), rss: rss}, nil
}

// stop closes the child's stdin, which makes it shut down, and waits for it;
// a child that does not exit in time is killed.
func (c *child) stop() error {
	if c.signal != nil {
		_ = c.cmd.Process.Signal(c.signal)
	} else {
		_ = c.stdin.Close()
	}
	select {
	case <-c.waited:
	case <-time.After(15 * time.Second):
		_ = c.cmd.Process.Kill()
		<-c.waited
		return fmt.Errorf("%s did not stop within 15s and was killed", c.name)
	}
	if c.waitErr != nil && !c.killed {
		return fmt.Errorf("%s: %w%s", c.name, c.waitErr, c.logTail())
	}
	return nil
}

// logTail is the end of the child's stderr, to explain a failure.
func (c *child) logTail() string { return logTail(c.logPath) }
