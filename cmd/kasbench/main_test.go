package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestMain lets the test binary play the benchmark's child roles, since
// kasbench starts its processes by re-executing its own binary.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 {
		if r, ok := roles[os.Args[1]]; ok {
			os.Exit(runRole(r, os.Args[2:]))
		}
	}
	os.Exit(m.Run())
}

// TestRunSmall runs the whole benchmark with tiny settings: every process
// starts, every path answers, the idle agents really connect to kas, and the
// table and JSON report what was measured. Without redis-server the
// multi-node paths must be skipped, with a reason, and the rest still run.
func TestRunSmall(t *testing.T) {
	if testing.Short() {
		t.Skip("starts kas, agentk, hops and an upstream as processes")
	}
	jsonFile := filepath.Join(t.TempDir(), "results.json")
	var stdout, stderr bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	code := run(ctx, []string{"-duration", "300ms", "-concurrency", "1,4", "-stream-mib", "1", "-agents", "20",
		"-receptive-agents", "6", "-receptive-lease-period", "2s", "-json", jsonFile}, &stdout, &stderr)
	if code != 0 {
		t.Fatalf("exit code %d\nstdout:\n%s\nstderr:\n%s", code, &stdout, &stderr)
	}
	b, err := os.ReadFile(jsonFile)
	if err != nil {
		t.Fatal(err)
	}
	var res results
	if err := json.Unmarshal(b, &res); err != nil {
		t.Fatalf("results are not JSON: %v\n%s", err, b)
	}
	_, noRedis := exec.LookPath("redis-server")
	paths, wantRatios, wantTargets := []string{pathDirect, pathChain, pathTunnel, pathLocal, pathHop}, 8, 13
	if noRedis != nil {
		paths, wantTargets = []string{pathDirect, pathChain, pathTunnel}, 7
		if res.ReceptiveSkipped == "" {
			t.Error("without redis-server the JSON must say the receptive measurement was skipped")
		}
		if res.MultiNodeSkipped == "" || !strings.Contains(stdout.String(), "redis-server is not on PATH") {
			t.Errorf("without redis-server the table and JSON must say the multi-node paths were skipped: %q\n%s", res.MultiNodeSkipped, &stdout)
		}
	}
	if _, noGitLab := gitlabAgentkPath(""); noGitLab == nil {
		paths, wantTargets = append(paths, pathGitLab), wantTargets+1 // kas's CPU through GitLab's agentk
	} else if res.GitLabSkipped == "" || !strings.Contains(stdout.String(), "GitLab's agentk binary is missing") {
		t.Errorf("without GitLab's agentk the table and JSON must say the gitlab path was skipped: %q\n%s", res.GitLabSkipped, &stdout)
	}
	for _, c := range []int{1, 4} {
		for _, p := range paths {
			r := res.small(p, c)
			if r == nil || r.Requests == 0 || r.RequestsPerS <= 0 || r.P99Millis < r.P50Millis || r.CPUMicrosPerRequest <= 0 {
				t.Errorf("small GET %s @%d: %+v", p, c, r)
			}
		}
	}
	for _, dir := range []string{download, upload} {
		for _, p := range paths {
			if r := res.stream(p, dir); r == nil || r.Transfers == 0 || r.MBPerS <= 0 || r.Bytes != 1<<20 {
				t.Errorf("%s %s: %+v", dir, p, r)
			}
		}
		if g, ok := res.StreamMemory[dir]; !ok || g.Samples == 0 {
			t.Errorf("kas memory not sampled while streaming %s: %+v", dir, g)
		}
	}
	if res.Idle == nil || res.Idle.Agents != 20 || res.Idle.GoBytesPerAgent <= 0 {
		t.Errorf("idle agents: %+v", res.Idle)
	}
	if noRedis == nil {
		checkRedisResults(t, res.Redis)
		if r := res.Receptive; r == nil || r.Agents != 6 || r.CommandsPerSecond <= 0 || len(r.ByNode) != 3 ||
			len(r.FirstRequestMillis) != receptiveTrials || r.TakeoverSeconds <= 0 || r.TakeoverSeconds > r.LeasePeriodSeconds {
			t.Errorf("receptive: %+v", r)
		}
	}
	if len(res.Ratios) != wantRatios || len(res.Targets) != wantTargets {
		t.Errorf("%d ratios and %d targets, want %d and %d: %+v %+v", len(res.Ratios), len(res.Targets), wantRatios, wantTargets, res.Ratios, res.Targets)
	}
	for _, want := range []string{"Small GET", "Streaming 1 MiB", "tunnel/chain", "per agent", "Targets"} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, &stdout)
		}
	}
}

// checkRedisResults checks the Redis measurement of both multi-node paths
// at the highest concurrency: every request counted, only the hop's
// forwarded, and no Redis command per request on either node. The nodes
// started seconds before, so no periodic refresh or garbage collection can
// have run in the window.
func checkRedisResults(t *testing.T, got []redisResult) {
	t.Helper()
	if len(got) != 2 || got[0].Path != pathLocal || got[1].Path != pathHop {
		t.Fatalf("Redis results %+v, want local then hop", got)
	}
	for _, r := range got {
		wantForwarded, wantLookups := int64(0), int64(0)
		if r.Path == pathHop {
			wantForwarded, wantLookups = r.Requests, 1 // the window is shorter than the lookup cache's TTL
		}
		if r.Concurrency != 4 || r.Requests == 0 || r.WindowSeconds <= 0 || r.Forwarded != wantForwarded ||
			r.LookupsAllowed != wantLookups || len(r.Commands) != 2 || len(r.PerRequest) != 2 {
			t.Errorf("%s: %+v, want %d forwarded and %d lookups allowed", r.Path, r, wantForwarded, wantLookups)
		}
		if !r.met() {
			t.Errorf("%s: Redis commands in steady state: %s", r.Path, r.summary())
		}
	}
}

func TestFlags(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want string // in stderr
	}{
		{"unknown path", []string{"-paths", "direct,ftp"}, `-paths: unknown "ftp"`},
		{"unknown test", []string{"-tests", "redis,latency"}, `-tests: unknown "latency"`},
		{"concurrency zero", []string{"-concurrency", "0"}, `-concurrency: "0" is not a number`},
		{"concurrency not a number", []string{"-concurrency", "1,x"}, `-concurrency: "x" is not a number`},
		{"negative duration", []string{"-duration", "-1s"}, "-duration must be positive"},
		{"bad load generator", []string{"-loadgen", "ab"}, `-loadgen "ab": want go or wrk`},
		{"no memory without agents", []string{"-agents", "0"}, "-agents must be positive"},
		{"arguments", []string{"extra"}, `unexpected arguments ["extra"]`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			if code := run(context.Background(), tt.args, &stdout, &stderr); code != 2 {
				t.Errorf("exit code %d, want 2", code)
			}
			if !strings.Contains(stderr.String(), tt.want) {
				t.Errorf("stderr %q lacks %q", &stderr, tt.want)
			}
		})
	}
}

func TestParseWrk(t *testing.T) {
	const ok = `Running 5s test @ http://127.0.0.1:8080/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     6.51ms    2.10ms  40.00ms   90.00%
    Req/Sec     9.85k   500.00    10.50k    70.00%
  Latency Distribution
     50%    6.10ms
     75%    7.00ms
     90%    8.50ms
     99%    1.20s
  49012 requests in 5.00s, 15.00MB read
Requests/sec:   9802.40
Transfer/sec:      3.00MB
`
	tests := []struct {
		name    string
		out     string
		want    smallResult
		wantErr string
	}{
		{"ok", ok, smallResult{Requests: 49012, RequestsPerS: 9802.40, P50Millis: 6.10, P99Millis: 1200}, ""},
		{"non-2xx", strings.Replace(ok, "Requests/sec", "  Non-2xx or 3xx responses: 12\nRequests/sec", 1), smallResult{}, "wrk counted 12 errors"},
		{"socket errors", strings.Replace(ok, "Requests/sec", "  Socket errors: connect 0, read 2, write 0, timeout 3\nRequests/sec", 1), smallResult{}, "wrk counted 5 errors"},
		{"garbage", "unable to connect", smallResult{}, "cannot read wrk's output"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseWrk(tt.out, smallResult{})
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.Requests != tt.want.Requests || got.RequestsPerS != tt.want.RequestsPerS ||
				got.P50Millis != tt.want.P50Millis || got.P99Millis != tt.want.P99Millis {
				t.Errorf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestEvaluate(t *testing.T) {
	r := &results{
		Settings: settings{Concurrency: []int{1, 64}, StreamBytes: 256 << 20},
		Small: []smallResult{
			{Path: pathChain, Concurrency: 64, RequestsPerS: 1000, P99Millis: 10},
			{Path: pathTunnel, Concurrency: 64, RequestsPerS: 1500, P99Millis: 9},
			{Path: pathDirect, Concurrency: 64, RequestsPerS: 3000, P99Millis: 3},
			{Path: pathLocal, Concurrency: 64, RequestsPerS: 1500, P50Millis: 4, P99Millis: 9},
			{Path: pathHop, Concurrency: 64, RequestsPerS: 1200, P50Millis: 5, P99Millis: 12},
			{Path: pathLocal, Concurrency: 1, RequestsPerS: 1000, P50Millis: 1, P99Millis: 2},
			{Path: pathHop, Concurrency: 1, RequestsPerS: 500, P50Millis: 2, P99Millis: 4},
			{Path: pathGitLab, Concurrency: 64, RequestsPerS: 750, P99Millis: 18, CPUByProcess: map[string]float64{"kas": 280, "gitlab-agentk": 900}},
		},
		Stream: []streamResult{
			{Path: pathChain, Direction: download, MBPerS: 1000},
			{Path: pathTunnel, Direction: download, MBPerS: 700},
			{Path: pathLocal, Direction: download, MBPerS: 500},
			{Path: pathHop, Direction: download, MBPerS: 450},
			{Path: pathLocal, Direction: upload, MBPerS: 500},
			{Path: pathHop, Direction: upload, MBPerS: 350},
		},
		Redis: []redisResult{
			{Path: pathLocal, Concurrency: 64, Requests: 1000, Commands: map[string]int64{nodeA: 0, nodeB: 0}},
			{Path: pathHop, Concurrency: 64, Requests: 1000, LookupsAllowed: 2, Commands: map[string]int64{nodeA: 0, nodeB: 2}},
		},
		StreamMemory: map[string]growth{download: {HeapMax: 1 << 20, RSSMax: 20 << 20}},
		Idle:         &idleResult{GoBytesPerAgent: 30 << 10, RSSBytesPerAgent: 40 << 10},
	}
	r.evaluate()
	met := map[string]bool{}
	for _, tc := range r.Targets {
		met[tc.Target] = tc.Met
	}
	want := map[string]bool{
		"small GET @64: tunnel ≥ 1.4× chain req/s":                            true,
		"small GET @64: tunnel p99 ≤ chain p99":                               true,
		"download: tunnel ≥ 0.8× chain MB/s":                                  false,
		"kas memory per idle agent < 64 KiB (heap+stacks and RSS)":            true,
		"kas memory flat while streaming 256 MiB download (rise < 16 MiB)":    false,
		"small GET @64: hop ≥ 0.7× local req/s":                               true,
		"download: hop ≥ 0.8× local MB/s":                                     true,
		"upload: hop ≥ 0.8× local MB/s":                                       false,
		"Redis commands per proxied request in steady state (local @64) = 0":  true,
		"Redis commands per proxied request in steady state (hop @64) = 0":    true,
		"small GET @64 through GitLab's agentk: kas CPU ≤ 300 µs per request": true,
	}
	if len(met) != len(want) {
		t.Errorf("targets %v, want %v", met, want)
	}
	for k, v := range want {
		if got, ok := met[k]; !ok || got != v {
			t.Errorf("target %q: met %v (present %v), want %v", k, got, ok, v)
		}
	}
	wantRatios := map[string]ratio{
		"small GET req/s @1":  {HopToLocal: 0.5},
		"small GET p50 @1":    {HopToLocal: 2},
		"small GET p99 @1":    {HopToLocal: 2},
		"small GET req/s @64": {TunnelToChain: 1.5, TunnelToDirect: 0.5, HopToLocal: 0.8, GitLabToTunnel: 0.5},
		"small GET p50 @64":   {HopToLocal: 1.25},
		"small GET p99 @64":   {TunnelToChain: 0.9, TunnelToDirect: 3, HopToLocal: 12.0 / 9, GitLabToTunnel: 2},
		"download MB/s":       {TunnelToChain: 0.7, HopToLocal: 0.9},
		"upload MB/s":         {HopToLocal: 0.7},
	}
	if len(r.Ratios) != len(wantRatios) {
		t.Errorf("ratios %+v, want %d", r.Ratios, len(wantRatios))
	}
	for _, got := range r.Ratios {
		want := wantRatios[got.Measure]
		want.Measure = got.Measure
		if got != want {
			t.Errorf("ratio %+v, want %+v", got, want)
		}
	}
}

func TestRedisTarget(t *testing.T) {
	tests := []struct {
		name     string
		path     string
		allowed  int64
		commands map[string]int64
		want     bool
	}{
		{"local, none", pathLocal, 0, map[string]int64{nodeA: 0, nodeB: 0}, true},
		{"local, one on the tunnel's node", pathLocal, 0, map[string]int64{nodeA: 1, nodeB: 0}, false},
		{"hop, lookups the cache allows", pathHop, 2, map[string]int64{nodeA: 0, nodeB: 2}, true},
		{"hop, more lookups than the cache allows", pathHop, 2, map[string]int64{nodeA: 0, nodeB: 3}, false},
		{"hop, a command on the tunnel's node", pathHop, 2, map[string]int64{nodeA: 1, nodeB: 0}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := redisResult{Path: tt.path, Requests: 100, LookupsAllowed: tt.allowed, Commands: tt.commands}
			if got := r.met(); got != tt.want {
				t.Errorf("met() = %v, want %v (%s)", got, tt.want, r.summary())
			}
		})
	}
}

func TestParseMetrics(t *testing.T) {
	tests := []struct {
		name    string
		text    string
		want    map[string]float64
		wantErr string
	}{
		{"counters and labels", `# HELP kas_registry_redis_commands_total Redis commands sent by the agent registry's client.
# TYPE kas_registry_redis_commands_total counter
kas_registry_redis_commands_total 17
kas_peer_forwards_total{result="ok"} 1234
kas_peer_forwards_total{result="no tunnel"} 2

kas_tunnels_connected 1e+00
`, map[string]float64{metricRedisCommands: 17, metricForwardsOK: 1234, `kas_peer_forwards_total{result="no tunnel"}`: 2, metricTunnels: 1}, ""},
		{"no value", "kas_tunnels_connected\n", nil, "has no value"},
		{"not a number", "kas_tunnels_connected one\n", nil, `sample "kas_tunnels_connected one"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseMetrics(bufio.NewScanner(strings.NewReader(tt.text)))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !maps.Equal(got, tt.want) {
				t.Errorf("got %v, want %v", got, tt.want)
			}
		})
	}
}

func TestParseCommandStats(t *testing.T) {
	tests := []struct {
		name    string
		info    string
		want    map[string]int64
		wantErr string
	}{
		{"commands", "# Commandstats\r\ncmdstat_hgetall:calls=3,usec=40,usec_per_call=13.33,rejected_calls=0,failed_calls=0\r\n" +
			"cmdstat_client|setinfo:calls=2,usec=1,usec_per_call=0.50,rejected_calls=0,failed_calls=2\r\n",
			map[string]int64{"hgetall": 3, "client|setinfo": 2}, ""},
		{"none yet", "# Commandstats\r\n", map[string]int64{}, ""},
		{"no colon", "cmdstat_hgetall\r\n", nil, "has no colon"},
		{"no calls", "cmdstat_hgetall:usec=40\r\n", nil, "no calls count"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseCommandStats(tt.info)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !maps.Equal(got, tt.want) {
				t.Errorf("got %v, want %v", got, tt.want)
			}
		})
	}
}

func TestProcessReadings(t *testing.T) {
	rss, err := processRSS(os.Getpid())
	if err != nil {
		t.Skip("no /proc:", err)
	}
	if rss <= 0 {
		t.Errorf("RSS %d", rss)
	}
	if cpu, err := processCPUTime(os.Getpid()); err != nil || cpu < 0 {
		t.Errorf("CPU time %v, %v", cpu, err)
	}
}
