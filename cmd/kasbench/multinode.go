package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/kasproject/kas/registry"
)

// The multi-node layout: a redis-server, two kas nodes sharing it, and the
// benchmark agent connected to kas-a only. A request to kas-a is served
// through its own tunnel (the local path); a request to kas-b is forwarded
// over the private API to kas-a (the hop path).
const (
	nodeA  = "kas-a" // holds the agent's tunnel
	nodeB  = "kas-b" // forwards to kas-a
	agentA = "agentk-a"

	// maxRedisWindow bounds the window the Redis commands are counted in.
	// The measurement runs first, right after the nodes start, so with this
	// bound every window ends long before the registry's first periodic
	// refresh (agent.redis_conn_info_refresh, 240 s) and garbage collection
	// (agent.redis_conn_info_gc, 600 s): what is counted is what requests
	// cost, not what timers do.
	maxRedisWindow = 30 * time.Second
)

// The nodes' metrics the Redis measurement reads, as /metrics prints them.
const (
	metricRedisCommands = "kas_registry_redis_commands_total"
	metricForwardsOK    = `kas_peer_forwards_total{result="ok"}`
	metricTunnels       = "kas_tunnels_connected"
)

func isMultiNode(path string) bool { return path == pathLocal || path == pathHop }

// errNoRedisServer: the multi-node paths cannot run on this machine.
var errNoRedisServer = errors.New("redis-server is not on PATH (Debian: apt-get install redis-server): " +
	"skipping the local and hop paths and the Redis measurement; everything else runs")

// multiNode is the running multi-node layout.
type multiNode struct {
	redis *redisServer
	a, b  *child
	local target // client → kas-a → agentk → upstream
	hop   target // client → kas-b → kas-a → agentk → upstream
	// lookupTTL is kas-b's redis.lookup_cache_ttl, which the nodes'
	// configuration leaves at its default.
	lookupTTL time.Duration
}

// startMultiNode starts redis-server, the two nodes and the agent, and
// returns once kas-a counts the agent's tunnel. It returns errNoRedisServer
// when redis-server is not installed.
func startMultiNode(ctx context.Context, b *bench, upstream *child) (*multiNode, error) {
	rs, err := startRedisServer(ctx, b.dir)
	if err != nil {
		return nil, err
	}
	b.redis = rs
	cfg, err := writeNodeConfigs(b.dir, rs.addr, b.KASLogLevel)
	if err != nil {
		return nil, err
	}
	m := &multiNode{redis: rs, lookupTTL: registry.DefaultRedisLookupCacheTTL}
	if m.a, err = startChild(b, nodeA, roleKAS, "-config", cfg.a, "-log", b.path(nodeA+".log")); err != nil {
		return nil, err
	}
	if m.b, err = startChild(b, nodeB, roleKAS, "-config", cfg.b, "-log", b.path(nodeB+".log")); err != nil {
		return nil, err
	}
	agent, err := startChild(b, agentA, roleAgents, "-kas", "ws://"+m.a.ready.Addr, "-tokens", b.creds.tokensFile,
		"-api", "http://"+upstream.ready.Addr, "-log", b.path(agentA+".log"))
	if err != nil {
		return nil, err
	}
	if err := waitForTunnels(ctx, metricsURL(m.a), 1); err != nil {
		return nil, err
	}
	m.local = target{path: pathLocal, base: "http://" + m.a.ready.Addr + "/k8s-proxy", procs: []*child{m.a, agent, upstream}}
	m.hop = target{path: pathHop, base: "http://" + m.b.ready.Addr + "/k8s-proxy", procs: []*child{m.b, m.a, agent, upstream}}
	return m, nil
}

func metricsURL(kas *child) string { return "http://" + kas.ready.Observability + "/metrics" }

// checkForwarded makes sure the hop path's requests went over the private
// API: kas-b must count forwards, and must not hold a tunnel of its own.
func (m *multiNode) checkForwarded() error {
	got, err := scrapeMetrics(metricsURL(m.b))
	if err != nil {
		return err
	}
	if got[metricForwardsOK] < 1 || got[metricTunnels] != 0 {
		return fmt.Errorf("check the hop path: %s counts %v forwarded requests and %v tunnels, want at least 1 and 0; see %s",
			nodeB, got[metricForwardsOK], got[metricTunnels], m.b.logPath)
	}
	return nil
}

// redisResult is what the nodes asked of Redis while one path was loaded in
// steady state.
type redisResult struct {
	Path          string  `json:"path"`
	Concurrency   int     `json:"concurrency"`
	WindowSeconds float64 `json:"window_seconds"`
	Requests      int64   `json:"requests"`
	// Forwarded is how many requests kas-b forwarded to kas-a in the window.
	Forwarded int64 `json:"forwarded_by_kas_b"`
	// Commands is the rise of each node's kas_registry_redis_commands_total
	// over the window, and PerRequest that divided by Requests.
	Commands   map[string]int64   `json:"redis_commands_by_node"`
	PerRequest map[string]float64 `json:"redis_commands_per_request_by_node"`
	// LookupsAllowed is how many lookups kas-b's lookup cache may make in the
	// window on the hop path (0 on the local path): it keeps an agent's
	// location for redis.lookup_cache_ttl and then asks Redis once (one
	// HGETALL), however many requests there are. That is a cost per agent
	// and second, not per request.
	LookupsAllowed int64 `json:"lookups_allowed"`
	// ByCommand is what Redis counted in the window (INFO commandstats, all
	// clients), kasbench's own INFO left out: which commands the nodes sent.
	// It also holds what the nodes' counters leave out, such as the PING
	// checking a silent pub/sub subscription.
	ByCommand map[string]int64 `json:"redis_commandstats,omitempty"`
}

// met reports whether no node sent Redis commands beyond the lookups the
// cache allows: none that grow with the number of requests.
func (r redisResult) met() bool {
	for node, n := range r.Commands {
		allowed := int64(0)
		if node == nodeB {
			allowed = r.LookupsAllowed
		}
		if n > allowed {
			return false
		}
	}
	return true
}

// perRequest is both nodes' commands per request.
func (r redisResult) perRequest() float64 {
	var total int64
	for _, n := range r.Commands {
		total += n
	}
	return div(float64(total), float64(r.Requests))
}

// summary is the figure the target reports.
func (r redisResult) summary() string {
	var notes []string
	if r.LookupsAllowed > 0 {
		notes = append(notes, fmt.Sprintf("kas-b's lookup cache allows %d lookups", r.LookupsAllowed))
	}
	if len(r.ByCommand) > 0 {
		notes = append(notes, "Redis counted "+fmtCounts(r.ByCommand))
	}
	s := fmt.Sprintf("kas-a %d, kas-b %d commands / %d requests in %.1f s = %.6f per request",
		r.Commands[nodeA], r.Commands[nodeB], r.Requests, r.WindowSeconds, r.perRequest())
	if len(notes) > 0 {
		s += " (" + strings.Join(notes, "; ") + ")"
	}
	return s
}

// redisReading is one reading of the counters the Redis measurement compares.
type redisReading struct {
	commands  map[string]int64
	forwarded int64
	stats     map[string]int64
}

func (m *multiNode) read(ctx context.Context) (redisReading, error) {
	r := redisReading{commands: map[string]int64{}}
	for _, n := range []*child{m.a, m.b} {
		got, err := scrapeMetrics(metricsURL(n))
		if err != nil {
			return r, err
		}
		v, ok := got[metricRedisCommands]
		if !ok {
			return r, fmt.Errorf("%s's metrics have no %s: is its redis section missing?", n.name, metricRedisCommands)
		}
		r.commands[n.name] = int64(v)
		if n == m.b {
			r.forwarded = int64(got[metricForwardsOK])
		}
	}
	var err error
	r.stats, err = m.redis.commandStats(ctx)
	return r, err
}

// measureRedis loads t with concurrency clients for warmup (which also
// fills kas-b's lookup cache), then for window between two readings of the
// nodes' Redis command counters, and divides each node's rise by the
// requests made in between.
func (m *multiNode) measureRedis(ctx context.Context, t target, concurrency int, warmup, window time.Duration) (redisResult, error) {
	res := redisResult{Path: t.path, Concurrency: concurrency}
	client := newClient(concurrency)
	defer client.CloseIdleConnections()
	if _, err := loadSlice(ctx, client, t, concurrency, warmup); err != nil {
		return res, fmt.Errorf("%s at %d concurrent, warming up: %w", t.path, concurrency, err)
	}
	before, err := m.read(ctx)
	if err != nil {
		return res, err
	}
	start := time.Now()
	lat, err := loadSlice(ctx, client, t, concurrency, window)
	if err != nil {
		return res, fmt.Errorf("%s at %d concurrent: %w", t.path, concurrency, err)
	}
	elapsed := time.Since(start) // loadSlice returns once every request it started has ended
	after, err := m.read(ctx)
	if err != nil {
		return res, err
	}
	res.WindowSeconds = elapsed.Seconds()
	res.Requests = int64(len(lat))
	res.Forwarded = after.forwarded - before.forwarded
	res.Commands = map[string]int64{}
	res.PerRequest = map[string]float64{}
	for node, n := range after.commands {
		res.Commands[node] = n - before.commands[node]
		res.PerRequest[node] = float64(res.Commands[node]) / float64(res.Requests)
	}
	if t.path == pathHop {
		res.LookupsAllowed = int64(elapsed/m.lookupTTL) + 1
	}
	res.ByCommand = diffCounts(before.stats, after.stats)
	delete(res.ByCommand, "info")
	return res, nil
}

// diffCounts is after-before for each key that rose.
func diffCounts(before, after map[string]int64) map[string]int64 {
	d := map[string]int64{}
	for k, v := range after {
		if v > before[k] {
			d[k] = v - before[k]
		}
	}
	return d
}

// scrapeMetrics reads a Prometheus text exposition: each sample's series,
// as printed (name{labels}), to its value.
func scrapeMetrics(url string) (map[string]float64, error) {
	resp, err := http.Get(url)
	if err != nil {
		return nil, fmt.Errorf("read kas's metrics: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("read kas's metrics at %s: %s", url, resp.Status)
	}
	m, err := parseMetrics(bufio.NewScanner(resp.Body))
	if err != nil {
		return nil, fmt.Errorf("read kas's metrics at %s: %w", url, err)
	}
	return m, nil
}

func parseMetrics(sc *bufio.Scanner) (map[string]float64, error) {
	m := map[string]float64{}
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		// Label values may hold spaces; the value is the last field (kas
		// prints no timestamps).
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			return nil, fmt.Errorf("sample %q has no value", line)
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			return nil, fmt.Errorf("sample %q: %w", line, err)
		}
		m[strings.TrimSpace(line[:i])] = v
	}
	return m, sc.Err()
}

// redisServer is the redis-server process the nodes share: loopback only,
// nothing saved to disk.
type redisServer struct {
	addr    string
	logPath string
	cmd     *exec.Cmd
	waited  chan struct{}
	waitErr error
	// client is kasbench's own connection, for PING and INFO.
	client *redis.Client
}

// redisStartTimeout bounds how long redis-server may take to answer PING.
const redisStartTimeout = 10 * time.Second

// startRedisServer runs redis-server on a free loopback port. Another
// process may take the port between asking the kernel for it and
// redis-server binding it, so a few ports are tried.
func startRedisServer(ctx context.Context, dir string) (*redisServer, error) {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		return nil, errNoRedisServer
	}
	var errs []error
	for range 3 {
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		s, err := runRedisServer(ctx, bin, dir, port)
		if err == nil {
			return s, nil
		}
		errs = append(errs, err)
	}
	return nil, fmt.Errorf("start redis-server: %w", errors.Join(errs...))
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free loopback port: %w", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func runRedisServer(ctx context.Context, bin, dir string, port int) (*redisServer, error) {
	s := &redisServer{
		addr:    net.JoinHostPort("127.0.0.1", strconv.Itoa(port)),
		logPath: filepath.Join(dir, "redis-server.log"),
		waited:  make(chan struct{}),
	}
	s.cmd = exec.Command(bin,
		"--bind", "127.0.0.1",
		"--port", strconv.Itoa(port),
		"--dir", dir,
		"--logfile", s.logPath,
		"--save", "",
		"--appendonly", "no",
		"--daemonize", "no",
	)
	if err := s.cmd.Start(); err != nil {
		return nil, fmt.Errorf("run %s: %w", bin, err)
	}
	go func() { s.waitErr = s.cmd.Wait(); close(s.waited) }()
	s.client = redis.NewClient(&redis.Options{Addr: s.addr, MaxRetries: -1, DialTimeout: time.Second})

	deadline := time.Now().Add(redisStartTimeout)
	for {
		err := s.client.Ping(ctx).Err()
		if err == nil {
			return s, nil
		}
		select {
		case <-s.waited:
			_ = s.client.Close()
			return nil, fmt.Errorf("redis-server on port %d exited (%v) before answering PING%s", port, s.waitErr, logTail(s.logPath))
		default:
		}
		if ctx.Err() != nil || time.Now().After(deadline) {
			_ = s.stop()
			return nil, fmt.Errorf("redis-server did not answer PING on %s within %s: %w%s", s.addr, redisStartTimeout, err, logTail(s.logPath))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// commandStats is how many times Redis ran each command so far, by name
// (INFO commandstats).
func (s *redisServer) commandStats(ctx context.Context) (map[string]int64, error) {
	info, err := s.client.Info(ctx, "commandstats").Result()
	if err != nil {
		return nil, fmt.Errorf("ask redis-server for its command statistics: %w", err)
	}
	return parseCommandStats(info)
}

// parseCommandStats reads INFO commandstats lines such as
// "cmdstat_hgetall:calls=3,usec=40,usec_per_call=13.33,…".
func parseCommandStats(info string) (map[string]int64, error) {
	stats := map[string]int64{}
	for line := range strings.Lines(info) {
		rest, ok := strings.CutPrefix(strings.TrimSpace(line), "cmdstat_")
		if !ok {
			continue
		}
		name, fields, ok := strings.Cut(rest, ":")
		if !ok {
			return nil, fmt.Errorf("INFO commandstats line %q has no colon", line)
		}
		calls := ""
		for f := range strings.SplitSeq(fields, ",") {
			if v, ok := strings.CutPrefix(f, "calls="); ok {
				calls = v
			}
		}
		n, err := strconv.ParseInt(calls, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("INFO commandstats line %q: no calls count", strings.TrimSpace(line))
		}
		stats[name] = n
	}
	return stats, nil
}

// stop shuts redis-server down (SIGTERM) and waits for it; it is killed if
// it does not exit in time.
func (s *redisServer) stop() error {
	_ = s.client.Close()
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.waited:
	case <-time.After(redisStartTimeout):
		_ = s.cmd.Process.Kill()
		<-s.waited
		return fmt.Errorf("redis-server did not stop within %s and was killed", redisStartTimeout)
	}
	if s.waitErr != nil {
		return fmt.Errorf("redis-server: %w%s", s.waitErr, logTail(s.logPath))
	}
	return nil
}

// logTail is the end of a log file, to explain a failure; "" if it is
// empty or unreadable.
func logTail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil || len(strings.TrimSpace(string(b))) == 0 {
		return ""
	}
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return "\n--- " + path + " ---\n" + strings.TrimSpace(string(b))
}
