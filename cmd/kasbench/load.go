package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// maxConcurrency bounds -concurrency; hops and clients keep this many idle
// connections per host so no path pays for reconnecting.
const maxConcurrency = 1024

// target is one way to the upstream.
type target struct {
	path string // direct, chain, tunnel
	base string // URL prefix; the upstream path is appended
	// authorization is sent with every request (every path gets the same
	// headers; only kas reads it).
	authorization string
	// procs are the processes the path goes through, upstream included,
	// whose CPU time is charged to it.
	procs []*child
}

// cpuTimes is the CPU time each of the path's processes has used so far.
func (t target) cpuTimes() ([]time.Duration, error) {
	times := make([]time.Duration, len(t.procs))
	for i, c := range t.procs {
		d, err := processCPUTime(c.cmd.Process.Pid)
		if err != nil {
			return nil, err
		}
		times[i] = d
	}
	return times, nil
}

// cpuMeter charges the CPU time of a path's processes to measured work.
type cpuMeter struct {
	t     target
	start []time.Duration
	used  []time.Duration
}

func newCPUMeter(t target) *cpuMeter {
	return &cpuMeter{t: t, used: make([]time.Duration, len(t.procs))}
}

func (m *cpuMeter) begin() (err error) {
	m.start, err = m.t.cpuTimes()
	return err
}

func (m *cpuMeter) end() error {
	now, err := m.t.cpuTimes()
	if err != nil {
		return err
	}
	for i := range now {
		m.used[i] += now[i] - m.start[i]
	}
	return nil
}

// per returns the CPU time per unit of work, in total and by process name.
func (m *cpuMeter) per(units float64, scale time.Duration) (total float64, byProcess map[string]float64) {
	byProcess = map[string]float64{}
	for i, c := range m.t.procs {
		v := float64(m.used[i]) / float64(scale) / units
		byProcess[c.name] = v
		total += v
	}
	return total, byProcess
}

func (t target) url(path string) string { return t.base + path }

// smallResult is one data point of small GET requests.
type smallResult struct {
	Path         string  `json:"path"`
	Concurrency  int     `json:"concurrency"`
	Requests     int64   `json:"requests"`
	Errors       int64   `json:"errors"`
	RequestsPerS float64 `json:"requests_per_second"`
	P50Millis    float64 `json:"p50_ms"`
	P99Millis    float64 `json:"p99_ms"`
	// CPUMicrosPerRequest is the CPU time the path's processes (upstream
	// included, load generator not) spent per request: unlike requests/s it
	// hardly depends on what else the machine was doing.
	CPUMicrosPerRequest float64            `json:"cpu_us_per_request,omitempty"`
	CPUByProcess        map[string]float64 `json:"cpu_us_per_request_by_process,omitempty"`
	LoadGenerator       string             `json:"load_generator"`
}

// newClient is the load generator's HTTP/1.1 client: one keep-alive
// connection per concurrent worker, nothing decompressed.
func newClient(concurrency int) *http.Client {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConnsPerHost = concurrency
	tr.MaxIdleConns = concurrency
	tr.DisableCompression = true
	tr.ForceAttemptHTTP2 = false
	tr.Proxy = nil
	return &http.Client{Transport: tr}
}

// sliceLength is how long one path is loaded before the next path's turn.
// The machine is shared (by the benchmark's own processes and whatever else
// runs), so paths take turns in short slices: a burst of background load
// then hits every path alike instead of one data point.
const sliceLength = time.Second

// runSmallGo measures GETs of smallPath on every target with concurrency
// workers each, each worker sending its next request when the previous answer
// is read (closed loop, like wrk). Targets take turns in slices until each
// has been measured for duration; warmup, first, opens the connections.
func runSmallGo(ctx context.Context, targets []target, concurrency int, warmup, duration time.Duration) ([]smallResult, error) {
	type pathState struct {
		client    *http.Client
		latencies []time.Duration
		measured  time.Duration
		cpu       *cpuMeter
	}
	states := make([]*pathState, len(targets))
	for i := range targets {
		states[i] = &pathState{client: newClient(concurrency), cpu: newCPUMeter(targets[i])}
		defer states[i].client.CloseIdleConnections()
	}
	for i, t := range targets {
		if _, err := loadSlice(ctx, states[i].client, t, concurrency, warmup); err != nil {
			return nil, fmt.Errorf("%s at %d concurrent, warming up: %w", t.path, concurrency, err)
		}
	}
	for left := duration; left > 0; left -= sliceLength {
		d := min(left, sliceLength)
		for i, t := range targets {
			if err := states[i].cpu.begin(); err != nil {
				return nil, err
			}
			lat, err := loadSlice(ctx, states[i].client, t, concurrency, d)
			if err != nil {
				return nil, fmt.Errorf("%s at %d concurrent: %w", t.path, concurrency, err)
			}
			if err := states[i].cpu.end(); err != nil {
				return nil, err
			}
			states[i].latencies = append(states[i].latencies, lat...)
			states[i].measured += d
		}
	}
	results := make([]smallResult, len(targets))
	for i, st := range states {
		slices.Sort(st.latencies)
		cpu, byProcess := st.cpu.per(float64(len(st.latencies)), time.Microsecond)
		results[i] = smallResult{
			Path:                targets[i].path,
			Concurrency:         concurrency,
			LoadGenerator:       "go",
			Requests:            int64(len(st.latencies)),
			RequestsPerS:        float64(len(st.latencies)) / st.measured.Seconds(),
			P50Millis:           millis(percentile(st.latencies, 0.50)),
			P99Millis:           millis(percentile(st.latencies, 0.99)),
			CPUMicrosPerRequest: cpu,
			CPUByProcess:        byProcess,
		}
	}
	return results, nil
}

// loadSlice runs concurrency workers for d and returns the latencies of the
// requests that completed within it. A failed request fails the slice: a
// path that fails is not measured.
func loadSlice(ctx context.Context, client *http.Client, t target, concurrency int, d time.Duration) ([]time.Duration, error) {
	end := time.Now().Add(d)
	var (
		mu        sync.Mutex
		latencies []time.Duration
		errs      []error
		wg        sync.WaitGroup
	)
	for range concurrency {
		wg.Go(func() {
			lat := make([]time.Duration, 0, 1024)
			buf := make([]byte, 4096)
			var err error
			for ctx.Err() == nil {
				t0 := time.Now()
				if !t0.Before(end) {
					break
				}
				if err = getSmall(ctx, client, t, buf); err != nil {
					break
				}
				lat = append(lat, time.Since(t0))
			}
			mu.Lock()
			defer mu.Unlock()
			latencies = append(latencies, lat...)
			if err != nil {
				errs = append(errs, err)
			}
		})
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("%d of %d clients failed, first: %w", len(errs), concurrency, errs[0])
	}
	if len(latencies) == 0 {
		return nil, errors.New("no request completed")
	}
	return latencies, nil
}

func getSmall(ctx context.Context, client *http.Client, t target, buf []byte) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, t.url(smallPath), nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", t.authorization)
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	n, err := io.ReadFull(resp.Body, buf[:len(smallBody)])
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("answered %s: %s", resp.Status, strings.TrimSpace(string(buf[:n])))
	}
	if n != len(smallBody) {
		return fmt.Errorf("answered %d bytes, want %d", n, len(smallBody))
	}
	return nil
}

func percentile(sorted []time.Duration, p float64) time.Duration {
	i := int(float64(len(sorted)-1) * p)
	return sorted[i]
}

func millis(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// wrkScript sets the Authorization header without putting the token on a
// command line.
const wrkScript = `wrk.headers["Authorization"] = %q
`

// runSmallWrk measures with wrk (one thread, like the figures).
// A warm-up run opens the connections and is discarded.
func runSmallWrk(ctx context.Context, dir string, t target, concurrency int, warmup, duration time.Duration) (smallResult, error) {
	res := smallResult{Path: t.path, Concurrency: concurrency, LoadGenerator: "wrk"}
	script := filepath.Join(dir, "wrk.lua")
	if err := os.WriteFile(script, fmt.Appendf(nil, wrkScript, t.authorization), 0o600); err != nil {
		return res, err
	}
	run := func(d time.Duration) (string, error) {
		secs := max(1, int(d.Round(time.Second)/time.Second))
		cmd := exec.CommandContext(ctx, "wrk", "-t1", "-c"+strconv.Itoa(concurrency), "-d"+strconv.Itoa(secs)+"s",
			"--latency", "-s", script, t.url(smallPath))
		out, err := cmd.CombinedOutput()
		if err != nil {
			return "", fmt.Errorf("wrk: %w: %s", err, out)
		}
		return string(out), nil
	}
	if _, err := run(warmup); err != nil {
		return res, err
	}
	out, err := run(duration)
	if err != nil {
		return res, err
	}
	return parseWrk(out, res)
}

var (
	wrkRate     = regexp.MustCompile(`(?m)^Requests/sec:\s+([0-9.]+)`)
	wrkTotal    = regexp.MustCompile(`(?m)^\s+(\d+) requests in`)
	wrkErrors   = regexp.MustCompile(`(?m)^\s+Non-2xx or 3xx responses: (\d+)|^\s+Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)`)
	wrkLatency  = regexp.MustCompile(`(?m)^\s+(50|99)%\s+([0-9.]+)(us|ms|s)\s*$`)
	unitToMilli = map[string]float64{"us": 0.001, "ms": 1, "s": 1000}
)

func parseWrk(out string, res smallResult) (smallResult, error) {
	m := wrkRate.FindStringSubmatch(out)
	n := wrkTotal.FindStringSubmatch(out)
	if m == nil || n == nil {
		return res, fmt.Errorf("cannot read wrk's output:\n%s", out)
	}
	res.RequestsPerS, _ = strconv.ParseFloat(m[1], 64)
	res.Requests, _ = strconv.ParseInt(n[1], 10, 64)
	for _, e := range wrkErrors.FindAllStringSubmatch(out, -1) {
		for _, v := range e[1:] {
			k, _ := strconv.ParseInt(v, 10, 64)
			res.Errors += k
		}
	}
	for _, l := range wrkLatency.FindAllStringSubmatch(out, -1) {
		v, _ := strconv.ParseFloat(l[2], 64)
		v *= unitToMilli[l[3]]
		if l[1] == "50" {
			res.P50Millis = v
		} else {
			res.P99Millis = v
		}
	}
	if res.Errors > 0 {
		return res, fmt.Errorf("%s at %d concurrent: wrk counted %d errors:\n%s", res.Path, res.Concurrency, res.Errors, out)
	}
	return res, nil
}

// streamResult is one bulk transfer measurement.
type streamResult struct {
	Path      string  `json:"path"`
	Direction string  `json:"direction"` // download (response body) or upload (request body)
	Bytes     int64   `json:"bytes"`     // per transfer
	Transfers int     `json:"transfers"`
	MBPerS    float64 `json:"mb_per_second"` // 10^6 bytes per second
	// CPUMillisPerGB is the CPU time the path's processes spent per 10^9
	// bytes moved (upstream included, load generator not).
	CPUMillisPerGB float64            `json:"cpu_ms_per_gb,omitempty"`
	CPUByProcess   map[string]float64 `json:"cpu_ms_per_gb_by_process,omitempty"`
}

const (
	download = "download"
	upload   = "upload"
)

// runStream repeats one transfer of size bytes until duration has passed
// (at least once) and reports the mean rate. Every transfer is checked to
// carry exactly size bytes.
func runStream(ctx context.Context, t target, direction string, size int64, duration time.Duration) (streamResult, error) {
	res := streamResult{Path: t.path, Direction: direction, Bytes: size}
	client := newClient(1)
	defer client.CloseIdleConnections()
	buf := make([]byte, copyBufferSize)
	block := patternBlock()
	// One transfer first, not measured: connections and windows warm up.
	transfer := func() error {
		if direction == download {
			return downloadOnce(ctx, client, t, size, buf)
		}
		return uploadOnce(ctx, client, t, size, block)
	}
	if err := transfer(); err != nil {
		return res, fmt.Errorf("%s %s: %w", t.path, direction, err)
	}
	meter := newCPUMeter(t)
	if err := meter.begin(); err != nil {
		return res, err
	}
	start := time.Now()
	for res.Transfers == 0 || time.Since(start) < duration {
		if err := transfer(); err != nil {
			return res, fmt.Errorf("%s %s: %w", t.path, direction, err)
		}
		res.Transfers++
	}
	elapsed := time.Since(start)
	if err := meter.end(); err != nil {
		return res, err
	}
	moved := float64(size) * float64(res.Transfers)
	res.MBPerS = moved / elapsed.Seconds() / 1e6
	res.CPUMillisPerGB, res.CPUByProcess = meter.per(moved/1e9, time.Millisecond)
	return res, nil
}

func downloadOnce(ctx context.Context, client *http.Client, t target, size int64, buf []byte) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, t.url(downloadPath)+"?bytes="+strconv.FormatInt(size, 10), nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", t.authorization)
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		return fmt.Errorf("answered %s: %s", resp.Status, b)
	}
	n, err := io.CopyBuffer(io.Discard, struct{ io.Reader }{resp.Body}, buf)
	if err != nil {
		return fmt.Errorf("read body after %d bytes: %w", n, err)
	}
	if n != size {
		return fmt.Errorf("received %d bytes, want %d", n, size)
	}
	return nil
}

func uploadOnce(ctx context.Context, client *http.Client, t target, size int64, block []byte) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, t.url(uploadPath), &patternReader{block: block, left: size})
	if err != nil {
		return err
	}
	req.ContentLength = size
	req.Header.Set("Authorization", t.authorization)
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1024))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("answered %s: %s", resp.Status, b)
	}
	if got := strings.TrimSpace(string(b)); got != strconv.FormatInt(size, 10) {
		return fmt.Errorf("upstream received %s bytes, want %d", got, size)
	}
	return nil
}
