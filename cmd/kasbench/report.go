package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
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
	Idle         *idleResult       `json:"idle_agents,omitempty"`

	Ratios  []ratio       `json:"ratios,omitempty"`
	Targets []targetCheck `json:"targets,omitempty"`
}

// ratio compares the tunnel with the chain and with the upstream directly
// for one measure; zero where a path was not measured.
type ratio struct {
	Measure        string  `json:"measure"`
	TunnelToChain  float64 `json:"tunnel_to_chain,omitempty"`
	TunnelToDirect float64 `json:"tunnel_to_direct,omitempty"`
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
	for _, c := range r.Settings.Concurrency {
		t := r.small(pathTunnel, c)
		if t == nil {
			continue
		}
		rps := ratio{Measure: fmt.Sprintf("small GET req/s @%d", c)}
		p99 := ratio{Measure: fmt.Sprintf("small GET p99 @%d", c)}
		if ch := r.small(pathChain, c); ch != nil {
			rps.TunnelToChain = div(t.RequestsPerS, ch.RequestsPerS)
			p99.TunnelToChain = div(t.P99Millis, ch.P99Millis)
		}
		if d := r.small(pathDirect, c); d != nil {
			rps.TunnelToDirect = div(t.RequestsPerS, d.RequestsPerS)
			p99.TunnelToDirect = div(t.P99Millis, d.P99Millis)
		}
		r.Ratios = append(r.Ratios, rps, p99)
	}
	for _, dir := range []string{download, upload} {
		t := r.stream(pathTunnel, dir)
		if t == nil {
			continue
		}
		rt := ratio{Measure: dir + " MB/s"}
		if ch := r.stream(pathChain, dir); ch != nil {
			rt.TunnelToChain = div(t.MBPerS, ch.MBPerS)
		}
		if d := r.stream(pathDirect, dir); d != nil {
			rt.TunnelToDirect = div(t.MBPerS, d.MBPerS)
		}
		r.Ratios = append(r.Ratios, rt)
	}

	if cs := r.Settings.Concurrency; len(cs) > 0 {
		c := cs[len(cs)-1]
		t, ch := r.small(pathTunnel, c), r.small(pathChain, c)
		if t != nil && ch != nil {
			k := div(t.RequestsPerS, ch.RequestsPerS)
			r.Targets = append(r.Targets,
				targetCheck{
					Target:   fmt.Sprintf("small GET @%d: tunnel ≥ %.1f× chain req/s", c, minSmallRatio),
					Measured: fmt.Sprintf("%.2f× (%.0f vs %.0f req/s)", k, t.RequestsPerS, ch.RequestsPerS),
					Met:      k >= minSmallRatio,
				},
				targetCheck{
					Target:   fmt.Sprintf("small GET @%d: tunnel p99 ≤ chain p99", c),
					Measured: fmt.Sprintf("%.2f ms vs %.2f ms", t.P99Millis, ch.P99Millis),
					Met:      t.P99Millis <= ch.P99Millis,
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
			Measured: fmt.Sprintf("%.2f× (%.0f vs %.0f MB/s)", k, t.MBPerS, ch.MBPerS),
			Met:      k >= minStreamRatio,
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

func mib(n int64) float64 { return float64(n) / (1 << 20) }

func (r *results) printTable(w io.Writer) {
	s := r.Settings
	fmt.Fprintf(w, "\nkasbench: %d CPUs, %s, load generator %s, %s per data point, kas log level %s\n",
		r.CPUs, r.GoVersion, s.LoadGen, s.Duration, s.KASLogLevel)
	fmt.Fprintln(w, "paths: direct = client→upstream; chain = client→hop→hop→upstream (httputil.ReverseProxy processes);")
	fmt.Fprintln(w, "       tunnel = client→kas→(WebSocket+HTTP/2)→agentk→upstream")
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
		fmt.Fprintln(tw, "measure\ttunnel/chain\ttunnel/direct\t")
		for _, x := range r.Ratios {
			fmt.Fprintf(tw, "%s\t%s\t%s\t\n", x.Measure, fmtRatio(x.TunnelToChain), fmtRatio(x.TunnelToDirect))
		}
		_ = tw.Flush()
	}
	if i := r.Idle; i != nil {
		fmt.Fprintf(w, "\nkas memory for %d idle agents: heap %+.1f MiB, stacks %+.1f MiB, RSS %+.1f MiB\n",
			i.Agents, mib(i.HeapDelta), mib(i.StackDelta), mib(i.RSSDelta))
		fmt.Fprintf(w, "  per agent: heap %.1f KiB, heap+stacks %.1f KiB, RSS %.1f KiB\n",
			i.HeapBytesPerAgent/1024, i.GoBytesPerAgent/1024, i.RSSBytesPerAgent/1024)
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
	for _, name := range []string{"kas", "agentk", "hop1", "hop2", "upstream"} {
		if v, ok := m[name]; ok {
			parts = append(parts, fmt.Sprintf("%s %.0f", name, v))
		}
	}
	return strings.Join(parts, " + ")
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
