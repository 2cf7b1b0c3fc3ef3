// Command kasbench measures what kas's tunnel costs. It starts everything on
// loopback, each part as its own process (kasbench re-executes itself with a
// role argument), and compares these paths to the same upstream HTTP server:
//
//	direct  client → upstream
//	chain   client → hop 1 → hop 2 → upstream (two plain httputil.ReverseProxy
//	        processes: the same number of process hops, no tunnel)
//	tunnel  client → kas (Kubernetes API proxy, PAT authentication, access as
//	        the agent) → agentk (over the WebSocket + HTTP/2 tunnel) → upstream
//	local   client → kas-a → agentk → upstream, where kas-a is one of two kas
//	        nodes sharing a redis-server and the agent is connected to kas-a
//	hop     client → kas-b → kas-a (private API, gRPC) → agentk → upstream
//	gitlab  client → kas → GitLab's own agentk (WebSocket ws-tunnel, gRPC
//	        reverse tunnel, HTTP over gRPC) → upstream
//
// From one run it prints small-GET throughput and latency at several
// concurrencies, bulk throughput each way, kas's memory per idle connected
// agent and while streaming, the Redis commands the two nodes send per
// proxied request in steady state, the tunnel/chain, tunnel/direct and
// hop/local ratios, and whether each of the performance targets is met.
// The receptive test runs three more kas nodes dialling -receptive-agents
// receptive agentk and prints the Redis commands per second their leases
// cost, the time from an agent being listed to its first proxied request,
// and the takeover time after SIGKILL of a node:
//
//	go run ./cmd/kasbench                   # table on stdout
//	go run ./cmd/kasbench -json out.json    # and machine-readable results
//	go run ./cmd/kasbench -duration 2s -tests small -paths chain,tunnel
//	go run ./cmd/kasbench -profile /tmp/prof   # CPU and allocation profiles of every process
//	go run ./cmd/kasbench -tests receptive -paths direct
//
// The load generator is a Go HTTP/1.1 client in this process, or wrk
// (-loadgen wrk, one thread) when it is installed. With the Go client the
// paths take turns in one-second slices, so background load on a shared
// machine hits every path alike. Every data point also reports the CPU time
// the path's processes spent per request or per GB (read from /proc), which
// depends far less on what else the machine runs than requests/s do.
// Memory and CPU readings need Linux's /proc. The local and hop paths need
// redis-server on PATH (Debian package redis-server); without it they are
// skipped, with a message, and the rest runs. The gitlab path needs GitLab's
// agentk binary (-gitlab-agentk, $KAS_GITLAB_AGENTK or
// ../shared/bin/gitlab-agentk); without it that path is skipped likewise.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) > 1 {
		if r, ok := roles[os.Args[1]]; ok {
			os.Exit(runRole(r, os.Args[2:]))
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

// settings are the benchmark's flags.
type settings struct {
	Duration    time.Duration `json:"duration_per_point"`
	Concurrency []int         `json:"concurrency"`
	StreamBytes int64         `json:"stream_bytes"`
	IdleAgents  int           `json:"idle_agents"`
	// ReceptiveAgents is how many receptive agentk the receptive test
	// runs; ReceptiveLeasePeriod overrides kas's default lease period.
	ReceptiveAgents      int           `json:"receptive_agents"`
	ReceptiveLeasePeriod time.Duration `json:"receptive_lease_period,omitempty"`
	Paths                []string      `json:"paths"`
	Tests                []string      `json:"tests"`
	LoadGen              string        `json:"load_generator"`
	// GitLabAgentk is GitLab's agentk binary for the gitlab path.
	GitLabAgentk string `json:"gitlab_agentk,omitempty"`
	KASLogLevel  string `json:"kas_log_level"`
}

// bench is one run: its working directory, credentials and processes.
type bench struct {
	settings
	dir        string
	profileDir string
	creds      *credentials
	children   []*child
	// redis is the multi-node paths' redis-server, once started; it stops
	// after every child, so the nodes can remove their records on the way out.
	redis *redisServer
}

func (b *bench) path(name string) string { return filepath.Join(b.dir, name) }

var (
	allPaths = []string{pathDirect, pathChain, pathTunnel, pathGitLab, pathLocal, pathHop}
	allTests = []string{testSmall, testStream, testRedis, testMemory, testReceptive}
)

const (
	pathDirect = "direct"
	pathChain  = "chain"
	pathTunnel = "tunnel"
	pathLocal  = "local"
	pathHop    = "hop"
	pathGitLab = "gitlab"

	testSmall     = "small"
	testStream    = "stream"
	testRedis     = "redis"
	testMemory    = "memory"
	testReceptive = "receptive"
)

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("kasbench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "Usage: kasbench [flags]\n\nMeasures kas's tunnel against two plain reverse proxy hops and the upstream directly,\nand a request forwarded between two kas nodes against one served where the agent is.\n\nFlags:")
		fs.PrintDefaults()
	}
	var (
		s           settings
		concurrency = fs.String("concurrency", "1,16,64", "comma-separated `list` of concurrent clients for small GETs")
		streamMiB   = fs.Int64("stream-mib", 256, "size of each streamed body in `MiB`")
		paths       = fs.String("paths", strings.Join(allPaths, ","), "comma-separated `list` of paths to measure: direct, chain, tunnel, gitlab, local, hop")
		tests       = fs.String("tests", strings.Join(allTests, ","), "comma-separated `list` of measurements: small, stream, redis (commands per request on the local and hop paths), memory, receptive (leases, first request, takeover)")
		jsonFile    = fs.String("json", "", "also write the results as JSON to `file` (- for stdout, the table then goes to stderr)")
		profileDir  = fs.String("profile", "", "write CPU and allocation profiles of every process to `dir` (for go tool pprof)")
		keep        = fs.Bool("keep", false, "keep the working directory (configuration, logs) instead of removing it")
	)
	fs.DurationVar(&s.Duration, "duration", 5*time.Second, "measuring time per data point")
	fs.IntVar(&s.IdleAgents, "agents", 1000, "idle agents connected for the memory measurement")
	fs.IntVar(&s.ReceptiveAgents, "receptive-agents", 100, "receptive agents for the receptive measurement")
	fs.DurationVar(&s.ReceptiveLeasePeriod, "receptive-lease-period", 0, "agent.receptive.lease_period for the receptive measurement (0: kas's default)")
	fs.StringVar(&s.LoadGen, "loadgen", "go", "load generator for small GETs: go (built in) or wrk (one thread; must be installed)")
	fs.StringVar(&s.GitLabAgentk, "gitlab-agentk", "", "GitLab's agentk `binary` for the gitlab path (default $"+gitlabAgentkEnv+", else "+defaultGitLabAgentk+")")
	fs.StringVar(&s.KASLogLevel, "kas-log-level", "info", "kas's observability.logging.level (info, kas's default, writes an access log line per request)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	var errs []error
	var err error
	if s.Concurrency, err = parseConcurrency(*concurrency); err != nil {
		errs = append(errs, err)
	}
	if s.Paths, err = parseList("-paths", *paths, allPaths); err != nil {
		errs = append(errs, err)
	}
	if s.Tests, err = parseList("-tests", *tests, allTests); err != nil {
		errs = append(errs, err)
	}
	if s.Duration <= 0 {
		errs = append(errs, errors.New("-duration must be positive"))
	}
	if *streamMiB <= 0 {
		errs = append(errs, errors.New("-stream-mib must be positive"))
	}
	s.StreamBytes = *streamMiB << 20
	if s.IdleAgents <= 0 && slices.Contains(s.Tests, testMemory) {
		errs = append(errs, errors.New("-agents must be positive to measure memory"))
	}
	if s.ReceptiveAgents <= 0 && slices.Contains(s.Tests, testReceptive) {
		errs = append(errs, errors.New("-receptive-agents must be positive for the receptive measurement"))
	}
	switch s.LoadGen {
	case "go":
	case "wrk":
		if _, err := exec.LookPath("wrk"); err != nil {
			errs = append(errs, errors.New("-loadgen wrk: wrk is not installed (apt-get install wrk), or use -loadgen go"))
		}
	default:
		errs = append(errs, fmt.Errorf("-loadgen %q: want go or wrk", s.LoadGen))
	}
	if len(fs.Args()) > 0 {
		errs = append(errs, fmt.Errorf("unexpected arguments %q", fs.Args()))
	}
	if err := errors.Join(errs...); err != nil {
		fmt.Fprintln(stderr, "kasbench:", err)
		return 2
	}

	table := stdout
	if *jsonFile == "-" {
		table = stderr
	}
	res, err := runBench(ctx, s, *profileDir, *keep, stderr)
	if res != nil {
		res.evaluate()
		res.printTable(table)
		if *jsonFile != "" {
			if werr := res.writeJSON(*jsonFile, stdout); werr != nil {
				err = errors.Join(err, werr)
			}
		}
	}
	if err != nil {
		fmt.Fprintln(stderr, "kasbench:", err)
		return 1
	}
	return 0
}

func parseConcurrency(v string) ([]int, error) {
	var out []int
	for f := range strings.SplitSeq(v, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 || n > maxConcurrency {
			return nil, fmt.Errorf("-concurrency: %q is not a number from 1 to %d", f, maxConcurrency)
		}
		out = append(out, n)
	}
	return out, nil
}

func parseList(flagName, v string, known []string) ([]string, error) {
	var out []string
	for f := range strings.SplitSeq(v, ",") {
		f = strings.TrimSpace(f)
		if !slices.Contains(known, f) {
			return nil, fmt.Errorf("%s: unknown %q, want some of %s", flagName, f, strings.Join(known, ","))
		}
		out = append(out, f)
	}
	return out, nil
}

// runBench starts the processes and measures. It returns what it measured
// even when a later measurement fails.
func runBench(ctx context.Context, s settings, profileDir string, keep bool, progress io.Writer) (res *results, err error) {
	b := &bench{settings: s, profileDir: profileDir}
	if b.dir, err = os.MkdirTemp("", "kasbench-"); err != nil {
		return nil, err
	}
	if keep {
		fmt.Fprintln(progress, "kasbench: working directory", b.dir)
	} else {
		defer os.RemoveAll(b.dir)
	}
	if profileDir != "" {
		if err := os.MkdirAll(profileDir, 0o755); err != nil {
			return nil, err
		}
	}
	defer func() {
		// Stop in reverse order of start: agents before kas before upstream,
		// and Redis after every kas node has removed its records.
		for _, c := range slices.Backward(b.children) {
			if serr := c.stop(); serr != nil && err == nil {
				err = serr
			}
		}
		if b.redis != nil {
			if serr := b.redis.stop(); serr != nil && err == nil {
				err = serr
			}
		}
	}()
	if b.creds, err = writeSetup(b.dir, s.IdleAgents, s.KASLogLevel); err != nil {
		return nil, err
	}
	res = &results{Settings: s, CPUs: runtime.NumCPU(), GoVersion: runtime.Version()}
	step := func(format string, a ...any) { fmt.Fprintf(progress, "kasbench: "+format+"\n", a...) }

	step("starting upstream, hops, kas and agentk")
	upstream, err := startChild(b, "upstream", roleUpstream)
	if err != nil {
		return res, err
	}
	upstreamURL := "http://" + upstream.ready.Addr
	targets := map[string]target{pathDirect: {path: pathDirect, base: upstreamURL, procs: []*child{upstream}}}
	var kas *child
	if slices.Contains(s.Paths, pathChain) {
		hop2, err := startChild(b, "hop2", roleHop, "-target", upstreamURL)
		if err != nil {
			return res, err
		}
		hop1, err := startChild(b, "hop1", roleHop, "-target", "http://"+hop2.ready.Addr)
		if err != nil {
			return res, err
		}
		targets[pathChain] = target{path: pathChain, base: "http://" + hop1.ready.Addr, procs: []*child{hop1, hop2, upstream}}
	}
	// paths are the paths measured: those asked for, less those whose
	// parts are missing (GitLab's agentk; redis-server, below).
	paths := slices.Clone(s.Paths)
	gitlabBin := ""
	if slices.Contains(paths, pathGitLab) {
		if gitlabBin, err = gitlabAgentkPath(s.GitLabAgentk); err != nil {
			res.GitLabSkipped = err.Error()
			step("%s", res.GitLabSkipped)
			paths = slices.DeleteFunc(paths, func(p string) bool { return p == pathGitLab })
		}
	}
	if slices.Contains(paths, pathTunnel) || slices.Contains(paths, pathGitLab) {
		if kas, err = startChild(b, "kas", roleKAS, "-config", b.creds.kasConfig, "-log", b.path("kas.log")); err != nil {
			return res, err
		}
		tunnels := 0
		if slices.Contains(paths, pathTunnel) {
			agentk, err := startChild(b, "agentk", roleAgents, "-kas", "ws://"+kas.ready.Addr, "-tokens", b.creds.tokensFile,
				"-api", upstreamURL, "-log", b.path("agentk.log"))
			if err != nil {
				return res, err
			}
			tunnels++
			targets[pathTunnel] = target{path: pathTunnel, base: "http://" + kas.ready.Addr + "/k8s-proxy", procs: []*child{kas, agentk, upstream}}
		}
		if gitlabBin != "" {
			agentk, err := startGitLabAgentk(b, gitlabBin, kas.ready.Addr, upstreamURL)
			if err != nil {
				return res, err
			}
			tunnels++
			targets[pathGitLab] = target{path: pathGitLab, base: "http://" + kas.ready.Addr + "/k8s-proxy", procs: []*child{kas, agentk, upstream},
				authorization: b.creds.gitlabBearerValue}
		}
		if err := waitForTunnels(ctx, "http://"+kas.ready.Observability+"/metrics", tunnels); err != nil {
			return res, err
		}
	}
	var nodes *multiNode
	if slices.ContainsFunc(paths, isMultiNode) {
		step("starting redis-server, two kas nodes (kas-a, kas-b) and agentk-a (connected to kas-a only)")
		nodes, err = startMultiNode(ctx, b, upstream)
		switch {
		case errors.Is(err, errNoRedisServer):
			res.MultiNodeSkipped = err.Error()
			step("%s", res.MultiNodeSkipped)
			paths = slices.DeleteFunc(paths, isMultiNode)
		case err != nil:
			return res, err
		default:
			for _, t := range []target{nodes.local, nodes.hop} {
				if slices.Contains(paths, t.path) {
					targets[t.path] = t
				}
			}
		}
	}
	check := newClient(1)
	defer check.CloseIdleConnections()
	for p, t := range targets {
		if t.authorization == "" {
			t.authorization = b.creds.bearerValue
		}
		targets[p] = t
		if err := getSmall(ctx, check, t, make([]byte, 4096)); err != nil {
			return res, fmt.Errorf("check the %s path: %w", p, err)
		}
	}
	if _, ok := targets[pathHop]; ok {
		if err := nodes.checkForwarded(); err != nil {
			return res, err
		}
	}

	warmup := min(max(s.Duration/5, 500*time.Millisecond), 2*time.Second)
	if nodes != nil && slices.Contains(s.Tests, testRedis) {
		// First, while the nodes are fresh: every window then ends long
		// before the registry's first periodic refresh or garbage collection.
		c := s.Concurrency[len(s.Concurrency)-1]
		window := min(s.Duration, maxRedisWindow)
		for _, p := range paths {
			if !isMultiNode(p) {
				continue
			}
			step("Redis commands, %s, %d concurrent, %s window", p, c, window)
			r, err := nodes.measureRedis(ctx, targets[p], c, warmup, window)
			if err != nil {
				return res, err
			}
			res.Redis = append(res.Redis, r)
		}
	}
	if slices.Contains(s.Tests, testSmall) {
		for _, c := range s.Concurrency {
			if s.LoadGen == "wrk" {
				for _, p := range paths {
					step("small GET, %s, %d concurrent (wrk)", p, c)
					r, err := runSmallWrk(ctx, b.dir, targets[p], c, warmup, s.Duration)
					if err != nil {
						return res, err
					}
					res.Small = append(res.Small, r)
				}
				continue
			}
			step("small GET, %d concurrent, paths taking turns", c)
			var ts []target
			for _, p := range paths {
				ts = append(ts, targets[p])
			}
			rs, err := runSmallGo(ctx, ts, c, warmup, s.Duration)
			if err != nil {
				return res, err
			}
			res.Small = append(res.Small, rs...)
		}
	}
	if slices.Contains(s.Tests, testStream) {
		for _, dir := range []string{download, upload} {
			for _, p := range paths {
				step("%s %d MiB, %s", dir, s.StreamBytes>>20, p)
				var smp *sampler
				if p == pathTunnel {
					if smp, err = startSampler(kas, 20*time.Millisecond); err != nil {
						return res, err
					}
				}
				r, err := runStream(ctx, targets[p], dir, s.StreamBytes, s.Duration)
				if smp != nil {
					g, serr := smp.stop()
					if err == nil && serr != nil {
						err = serr
					}
					if res.StreamMemory == nil {
						res.StreamMemory = map[string]growth{}
					}
					res.StreamMemory[dir] = g
				}
				if err != nil {
					return res, err
				}
				res.Stream = append(res.Stream, r)
			}
		}
	}
	if slices.Contains(s.Tests, testMemory) {
		// The throughput processes idle from here on; only the upstream is
		// still needed (agentk asks it for its version).
		step("memory per idle agent: %d agents", s.IdleAgents)
		idle, err := measureIdleAgents(ctx, b, upstreamURL)
		if err != nil {
			return res, err
		}
		res.Idle = &idle
	}
	if slices.Contains(s.Tests, testReceptive) {
		r, err := measureReceptive(ctx, b, upstreamURL, step)
		switch {
		case errors.Is(err, errNoRedisServer):
			res.ReceptiveSkipped = err.Error()
			step("%s", res.ReceptiveSkipped)
		case err != nil:
			res.Receptive = r
			return res, err
		default:
			res.Receptive = r
		}
	}
	return res, nil
}
