package main

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/kasproject/kas/registry"
)

// results is everything one run measured, as written by -json.
type results struct {
	Settings  settings `json:"settings"`
	CPUs      int      `json:"cpus"`
	GoVersion string   `json:"go_version"`

	Small  []smallResult  `json:"small_get,omitempty"`
	Stream []streamResult `json:"stream,omitempty"`
	// StreamMemory is kas's largest memory rise while the tunnel streamed,
	// by direction.
	StreamMemory map[string]growth `json:"kas_memory_while_streaming,omitempty"`
	// Redis is what the two nodes asked of Redis per proxied request, by
	// multi-node path.
	Redis []redisResult `json:"redis_commands,omitempty"`
	Idle  *idleResult   `json:"idle_agents,omitempty"`
	// MultiNodeSkipped says why the local and hop paths were not measured.
	MultiNodeSkipped string `json:"multi_node_skipped,omitempty"`
	// GitLabSkipped says why the gitlab path was not measured.
	GitLabSkipped string `json:"gitlab_skipped,omitempty"`
	// Receptive is the receptive agents' measurement; ReceptiveSkipped
	// says why it did not run.
	Receptive        *receptiveResult `json:"receptive,omitempty"`
	ReceptiveSkipped string           `json:"receptive_skipped,omitempty"`

	Ratios  []ratio       `json:"ratios,omitempty"`
	Targets []targetCheck `json:"targets,omitempty"`
}

// ratio compares, for one measure, the tunnel with the chain and with the
// upstream directly, and the hop with the local path; zero where a path was
// not measured.
type ratio struct {
	Measure        string  `json:"measure"`
	TunnelToChain  float64 `json:"tunnel_to_chain,omitempty"`
	TunnelToDirect float64 `json:"tunnel_to_direct,omitempty"`
	HopToLocal     float64 `json:"hop_to_local,omitempty"`
	GitLabToTunnel float64 `json:"gitlab_to_tunnel,omitempty"`
}

// targetCheck is one of the performance targets.
type targetCheck struct {
	Target   string `json:"target"`
	Measured string `json:"measured"`
	Met      bool   `json:"met"`
}

// The targets.
const (
	minSmallRatio      = 1.4      // tunnel/chain small GET requests/s at the highest concurrency
	minStreamRatio     = 0.8      // tunnel/chain MB/s, each direction
	maxBytesPerAgent   = 64 << 10 // kas memory per idle agent
	maxStreamingGrowth = 16 << 20 // kas memory rise while streaming: a few flow-control windows, not the body
	minHopSmallRatio   = 0.7      // hop/local small GET requests/s at the highest concurrency
	minHopStreamRatio  = 0.8      // hop/local MB/s, each direction
	// maxGitLabKASMicros is kas's CPU per small GET through GitLab's
	// agentk at the highest concurrency (GitLab's own KAS spends 1.3–1.6 ms).
	maxGitLabKASMicros = 300
)

func (r *results) small(path string, concurrency int) *smallResult {
	for i := range r.Small {
		if r.Small[i].Path == path && r.Small[i].Concurrency == concurrency {
			return &r.Small[i]
		}
	}
	return nil
}

func (r *results) stream(path, direction string) *streamResult {
	for i := range r.Stream {
		if r.Stream[i].Path == path && r.Stream[i].Direction == direction {
			return &r.Stream[i]
		}
	}
	return nil
}

func div(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

// evaluate computes the ratios and checks the targets.
func (r *results) evaluate() {
	r.Ratios, r.Targets = nil, nil
	smallMeasures := []struct {
		name  string
		value func(*smallResult) float64
	}{
		{"small GET req/s", func(x *smallResult) float64 { return x.RequestsPerS }},
		{"small GET p50", func(x *smallResult) float64 { return x.P50Millis }},
		{"small GET p99", func(x *smallResult) float64 { return x.P99Millis }},
	}
	for _, c := range r.Settings.Concurrency {
		for _, m := range smallMeasures {
			r.addRatio(fmt.Sprintf("%s @%d", m.name, c), func(path string) float64 {
				if x := r.small(path, c); x != nil {
					return m.value(x)
				}
				return 0
			})
		}
	}
	for _, dir := range []string{download, upload} {
		r.addRatio(dir+" MB/s", func(path string) float64 {
			if x := r.stream(path, dir); x != nil {
				return x.MBPerS
			}
			return 0
		})
	}

	// Targets print ratios to three places, so one just under a threshold
	// does not read as meeting it.
	if cs := r.Settings.Concurrency; len(cs) > 0 {
		c := cs[len(cs)-1]
		t, ch := r.small(pathTunnel, c), r.small(pathChain, c)
		if t != nil && ch != nil {
			k := div(t.RequestsPerS, ch.RequestsPerS)
			r.Targets = append(r.Targets,
				targetCheck{
					Target:   fmt.Sprintf("small GET @%d: tunnel ≥ %.1f× chain req/s", c, minSmallRatio),
					Measured: fmt.Sprintf("%.3f× (%.0f vs %.0f req/s)", k, t.RequestsPerS, ch.RequestsPerS),
					Met:      k >= minSmallRatio,
				},
				targetCheck{
					Target:   fmt.Sprintf("small GET @%d: tunnel p99 ≤ chain p99", c),
					Measured: fmt.Sprintf("%.2f ms vs %.2f ms", t.P99Millis, ch.P99Millis),
					Met:      t.P99Millis <= ch.P99Millis,
				})
		}
		if g := r.small(pathGitLab, c); g != nil && g.CPUByProcess != nil {
			kas := g.CPUByProcess["kas"]
			r.Targets = append(r.Targets, targetCheck{
				Target:   fmt.Sprintf("small GET @%d through GitLab's agentk: kas CPU ≤ %d µs per request", c, maxGitLabKASMicros),
				Measured: fmt.Sprintf("%.0f µs (%s)", kas, fmtByProcess(g.CPUByProcess)),
				Met:      kas > 0 && kas <= maxGitLabKASMicros,
			})
		}
		if h, l := r.small(pathHop, c), r.small(pathLocal, c); h != nil && l != nil {
			k := div(h.RequestsPerS, l.RequestsPerS)
			r.Targets = append(r.Targets, targetCheck{
				Target: fmt.Sprintf("small GET @%d: hop ≥ %.1f× local req/s", c, minHopSmallRatio),
				Measured: fmt.Sprintf("%.3f× (%.0f vs %.0f req/s; p50 %.2f vs %.2f ms, p99 %.2f vs %.2f ms)",
					k, h.RequestsPerS, l.RequestsPerS, h.P50Millis, l.P50Millis, h.P99Millis, l.P99Millis),
				Met: k >= minHopSmallRatio,
			})
		}
	}
	for _, dir := range []string{download, upload} {
		t, ch := r.stream(pathTunnel, dir), r.stream(pathChain, dir)
		if t == nil || ch == nil {
			continue
		}
		k := div(t.MBPerS, ch.MBPerS)
		r.Targets = append(r.Targets, targetCheck{
			Target:   fmt.Sprintf("%s: tunnel ≥ %.1f× chain MB/s", dir, minStreamRatio),
			Measured: fmt.Sprintf("%.3f× (%.0f vs %.0f MB/s)", k, t.MBPerS, ch.MBPerS),
			Met:      k >= minStreamRatio,
		})
	}
	for _, dir := range []string{download, upload} {
		h, l := r.stream(pathHop, dir), r.stream(pathLocal, dir)
		if h == nil || l == nil {
			continue
		}
		k := div(h.MBPerS, l.MBPerS)
		r.Targets = append(r.Targets, targetCheck{
			Target:   fmt.Sprintf("%s: hop ≥ %.1f× local MB/s", dir, minHopStreamRatio),
			Measured: fmt.Sprintf("%.3f× (%.0f vs %.0f MB/s)", k, h.MBPerS, l.MBPerS),
			Met:      k >= minHopStreamRatio,
		})
	}
	for _, x := range r.Redis {
		r.Targets = append(r.Targets, targetCheck{
			Target:   fmt.Sprintf("Redis commands per proxied request in steady state (%s @%d) = 0", x.Path, x.Concurrency),
			Measured: x.summary(),
			Met:      x.met(),
		})
	}
	if i := r.Idle; i != nil {
		r.Targets = append(r.Targets, targetCheck{
			Target: fmt.Sprintf("kas memory per idle agent < %d KiB (heap+stacks and RSS)", maxBytesPerAgent>>10),
			Measured: fmt.Sprintf("%.1f KiB heap+stacks, %.1f KiB RSS",
				i.GoBytesPerAgent/1024, i.RSSBytesPerAgent/1024),
			Met: i.GoBytesPerAgent < maxBytesPerAgent && i.RSSBytesPerAgent < maxBytesPerAgent,
		})
	}
	if x := r.Receptive; x != nil && x.TakeoverSeconds > 0 {
		r.Targets = append(r.Targets, targetCheck{
			Target:   fmt.Sprintf("receptive: kill -9 of a holder → its agents held again within one lease period (%gs)", x.LeasePeriodSeconds),
			Measured: fmt.Sprintf("%.2fs", x.TakeoverSeconds),
			Met:      x.TakeoverSeconds <= x.LeasePeriodSeconds,
		})
	}
	for _, dir := range []string{download, upload} {
		g, ok := r.StreamMemory[dir]
		if !ok {
			continue
		}
		r.Targets = append(r.Targets, targetCheck{
			Target: fmt.Sprintf("kas memory flat while streaming %d MiB %s (rise < %d MiB)",
				r.Settings.StreamBytes>>20, dir, maxStreamingGrowth>>20),
			Measured: fmt.Sprintf("heap +%.1f MiB, RSS +%.1f MiB at most (%d samples)",
				mib(g.HeapMax), mib(g.RSSMax), g.Samples),
			Met: g.HeapMax < maxStreamingGrowth && g.RSSMax < maxStreamingGrowth,
		})
	}
}

// addRatio adds one measure's ratios, given its value on each path (0 where
// not measured), if any of them can be computed.
func (r *results) addRatio(measure string, value func(path string) float64) {
	t := value(pathTunnel)
	x := ratio{
		Measure:        measure,
		TunnelToChain:  div(t, value(pathChain)),
		TunnelToDirect: div(t, value(pathDirect)),
		HopToLocal:     div(value(pathHop), value(pathLocal)),
		GitLabToTunnel: div(value(pathGitLab), t),
	}
	if x.TunnelToChain != 0 || x.TunnelToDirect != 0 || x.HopToLocal != 0 || x.GitLabToTunnel != 0 {
		r.Ratios = append(r.Ratios, x)
	}
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }

func (r *results) printTable(w io.Writer) {
	s := r.Settings
	fmt.Fprintf(w, "\nkasbench: %d CPUs, %s, load generator %s, %s per data point, kas log level %s\n",
		r.CPUs, r.GoVersion, s.LoadGen, s.Duration, s.KASLogLevel)
	fmt.Fprintln(w, "paths: direct = client→upstream; chain = client→hop→hop→upstream (httputil.ReverseProxy processes);")
	fmt.Fprintln(w, "       tunnel = client→kas→(WebSocket+HTTP/2)→agentk→upstream")
	fmt.Fprintln(w, "       local = client→kas-a→agentk→upstream, hop = client→kas-b→(private API, gRPC)→kas-a→agentk→upstream")
	fmt.Fprintln(w, "       (kas-a and kas-b share a redis-server; the agent is connected to kas-a only)")
	fmt.Fprintln(w, "       gitlab = client→kas→(WebSocket ws-tunnel, gRPC reverse tunnel)→GitLab's own agentk→upstream")
	if r.MultiNodeSkipped != "" {
		fmt.Fprintln(w, "\n"+r.MultiNodeSkipped)
	}
	if r.GitLabSkipped != "" {
		fmt.Fprintln(w, "\n"+r.GitLabSkipped)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	if len(r.Small) > 0 {
		fmt.Fprintf(w, "\nSmall GET (%d-byte JSON answer)\n", len(smallBody))
		fmt.Fprintln(tw, "concurrency\tpath\treq/s\tp50 ms\tp99 ms\tCPU µs/req\t by process")
		for _, x := range r.Small {
			fmt.Fprintf(tw, "%d\t%s\t%.0f\t%.3f\t%.3f\t%s\t %s\n", x.Concurrency, x.Path, x.RequestsPerS, x.P50Millis, x.P99Millis,
				fmtOptional(x.CPUMicrosPerRequest), fmtByProcess(x.CPUByProcess))
		}
		_ = tw.Flush()
	}
	if len(r.Stream) > 0 {
		fmt.Fprintf(w, "\nStreaming %d MiB bodies (MB = 10^6 bytes)\n", s.StreamBytes>>20)
		fmt.Fprintln(tw, "direction\tpath\tMB/s\ttransfers\tCPU ms/GB\t by process")
		for _, x := range r.Stream {
			fmt.Fprintf(tw, "%s\t%s\t%.0f\t%d\t%s\t %s\n", x.Direction, x.Path, x.MBPerS, x.Transfers,
				fmtOptional(x.CPUMillisPerGB), fmtByProcess(x.CPUByProcess))
		}
		_ = tw.Flush()
	}
	if len(r.Ratios) > 0 {
		fmt.Fprintln(w, "\nRatios (p99: lower is better; everything else: higher is better)")
		fmt.Fprintln(tw, "measure\ttunnel/chain\ttunnel/direct\thop/local\tgitlab/tunnel\t")
		for _, x := range r.Ratios {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t\n", x.Measure, fmtRatio(x.TunnelToChain), fmtRatio(x.TunnelToDirect), fmtRatio(x.HopToLocal), fmtRatio(x.GitLabToTunnel))
		}
		_ = tw.Flush()
	}
	if len(r.Redis) > 0 {
		fmt.Fprintf(w, "\nRedis commands in steady state: each node's %s rise over a window after a warm-up,\n", metricRedisCommands)
		fmt.Fprintf(w, "and what Redis counted (INFO commandstats). kas-b may look the agent up once per lookup-cache TTL (%s).\n",
			registry.DefaultRedisLookupCacheTTL)
		fmt.Fprintln(tw, "path\tconcurrency\twindow s\trequests\tforwarded\tkas-a\tkas-b\tper request\tlookups allowed\t Redis counted")
		for _, x := range r.Redis {
			fmt.Fprintf(tw, "%s\t%d\t%.1f\t%d\t%d\t%d\t%d\t%.6f\t%d\t %s\n", x.Path, x.Concurrency, x.WindowSeconds, x.Requests,
				x.Forwarded, x.Commands[nodeA], x.Commands[nodeB], x.perRequest(), x.LookupsAllowed, fmtCounts(x.ByCommand))
		}
		_ = tw.Flush()
	}
	if i := r.Idle; i != nil {
		fmt.Fprintf(w, "\nkas memory for %d idle agents: heap %+.1f MiB, stacks %+.1f MiB, RSS %+.1f MiB\n",
			i.Agents, mib(i.HeapDelta), mib(i.StackDelta), mib(i.RSSDelta))
		fmt.Fprintf(w, "  per agent: heap %.1f KiB, heap+stacks %.1f KiB, RSS %.1f KiB\n",
			i.HeapBytesPerAgent/1024, i.GoBytesPerAgent/1024, i.RSSBytesPerAgent/1024)
	}
	if x := r.Receptive; x != nil {
		fmt.Fprintf(w, "\nReceptive agents: %d agentk, %d kas nodes sharing a redis-server, connections_per_agent %d, lease_period %gs\n",
			x.Agents, x.Nodes, x.PerAgent, x.LeasePeriodSeconds)
		if x.WindowSeconds > 0 {
			fmt.Fprintf(w, "  Redis commands for leases: %.1f/s in all (%s) over %gs\n", x.CommandsPerSecond, fmtRates(x.ByNode), x.WindowSeconds)
		}
		if len(x.FirstRequestMillis) > 0 {
			fmt.Fprintf(w, "  listed in the standalone file → first proxied request: %s ms (poll_period %gs, file rechecked every 1s)\n",
				fmtMillis(x.FirstRequestMillis), x.PollPeriodSeconds)
		}
		if x.TakeoverSeconds > 0 {
			fmt.Fprintf(w, "  kill -9 of the node holding %d agents → every agent back to its connections: %.2fs\n", x.KilledHeld, x.TakeoverSeconds)
		}
	}
	if r.ReceptiveSkipped != "" {
		fmt.Fprintln(w, "\n"+r.ReceptiveSkipped)
	}
	if len(r.Targets) > 0 {
		fmt.Fprintln(w, "\nTargets")
		for _, t := range r.Targets {
			mark := "MET    "
			if !t.Met {
				mark = "NOT MET"
			}
			fmt.Fprintf(w, "  %s  %s: %s\n", mark, t.Target, t.Measured)
		}
	}
	fmt.Fprintln(w)
}

// fmtByProcess lists CPU by process in the path's order (alphabetical
// would do too, but kas, agentk, upstream reads better).
func fmtByProcess(m map[string]float64) string {
	var parts []string
	for _, name := range []string{"kas", nodeB, nodeA, "agentk", "gitlab-agentk", agentA, "hop1", "hop2", "upstream"} {
		if v, ok := m[name]; ok {
			parts = append(parts, fmt.Sprintf("%s %.0f", name, v))
		}
	}
	return strings.Join(parts, " + ")
}

// fmtCounts lists counts by name, alphabetically; "-" if there are none.
func fmtCounts(m map[string]int64) string {
	if len(m) == 0 {
		return "-"
	}
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(m)) {
		parts = append(parts, fmt.Sprintf("%s %d", k, m[k]))
	}
	return strings.Join(parts, ", ")
}

func fmtOptional(v float64) string {
	if v == 0 {
		return "-"
	}
	return fmt.Sprintf("%.0f", v)
}

func fmtRatio(v float64) string {
	if v == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2f×", v)
}

// writeJSON writes the results to path, or to stdout when path is "-".
func (r *results) writeJSON(path string, stdout io.Writer) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	b = append(b, '\n')
	if path == "-" {
		_, err = stdout.Write(b)
		return err
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return fmt.Errorf("write results: %w", err)
	}
	return nil
}

func fmtRates(byNode map[string]float64) string {
	var parts []string
	for _, name := range slices.Sorted(maps.Keys(byNode)) {
		parts = append(parts, fmt.Sprintf("%s %.1f", name, byNode[name]))
	}
	return strings.Join(parts, ", ")
}

func fmtMillis(ms []float64) string {
	parts := make([]string, len(ms))
	for i, m := range ms {
		parts[i] = fmt.Sprintf("%.0f", m)
	}
	return strings.Join(parts, ", ")
}
