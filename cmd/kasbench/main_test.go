package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
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
// table and JSON report what was measured.
func TestRunSmall(t *testing.T) {
	if testing.Short() {
		t.Skip("starts kas, agentk, hops and an upstream as processes")
	}
	jsonFile := filepath.Join(t.TempDir(), "results.json")
	var stdout, stderr bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	code := run(ctx, []string{"-duration", "300ms", "-concurrency", "1,4", "-stream-mib", "1", "-agents", "20", "-json", jsonFile}, &stdout, &stderr)
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
	for _, c := range []int{1, 4} {
		for _, p := range allPaths {
			r := res.small(p, c)
			if r == nil || r.Requests == 0 || r.RequestsPerS <= 0 || r.P99Millis < r.P50Millis || r.CPUMicrosPerRequest <= 0 {
				t.Errorf("small GET %s @%d: %+v", p, c, r)
			}
		}
	}
	for _, dir := range []string{download, upload} {
		for _, p := range allPaths {
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
	if len(res.Ratios) != 6 || len(res.Targets) != 7 {
		t.Errorf("%d ratios and %d targets, want 6 and 7: %+v %+v", len(res.Ratios), len(res.Targets), res.Ratios, res.Targets)
	}
	for _, want := range []string{"Small GET", "Streaming 1 MiB", "tunnel/chain", "per agent", "Targets"} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, &stdout)
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
		},
		Stream: []streamResult{
			{Path: pathChain, Direction: download, MBPerS: 1000},
			{Path: pathTunnel, Direction: download, MBPerS: 700},
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
		"small GET @64: tunnel ≥ 1.4× chain req/s":                         true,
		"small GET @64: tunnel p99 ≤ chain p99":                            true,
		"download: tunnel ≥ 0.8× chain MB/s":                               false,
		"kas memory per idle agent < 64 KiB (heap+stacks and RSS)":         true,
		"kas memory flat while streaming 256 MiB download (rise < 16 MiB)": false,
	}
	if len(met) != len(want) {
		t.Errorf("targets %v, want %v", met, want)
	}
	for k, v := range want {
		if got, ok := met[k]; !ok || got != v {
			t.Errorf("target %q: met %v (present %v), want %v", k, got, ok, v)
		}
	}
	i := slices.IndexFunc(r.Ratios, func(x ratio) bool { return x.Measure == "small GET req/s @64" })
	if i < 0 || r.Ratios[i].TunnelToChain != 1.5 || r.Ratios[i].TunnelToDirect != 0.5 {
		t.Errorf("ratios %+v", r.Ratios)
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
