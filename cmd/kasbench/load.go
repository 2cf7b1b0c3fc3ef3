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
}

func (t target) url(path string) string { return t.base + path }

// smallResult is one data point of small GET requests.
type smallResult struct {
	Path          string  `json:"path"`
	Concurrency   int     `json:"concurrency"`
	Requests      int64   `json:"requests"`
	Errors        int64   `json:"errors"`
	RequestsPerS  float64 `json:"requests_per_second"`
	P50Millis     float64 `json:"p50_ms"`
	P99Millis     float64 `json:"p99_ms"`
	LoadGenerator string  `json:"load_generator"`
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

// runSmallGo measures GETs of smallPath with concurrency workers, each
// sending its next request when the previous answer is read (closed loop,
// like wrk). The first warmup of the run opens connections and is not counted.
func runSmallGo(ctx context.Context, t target, concurrency int, warmup, duration time.Duration) (smallResult, error) {
	client := newClient(concurrency)
	defer client.CloseIdleConnections()
	res := smallResult{Path: t.path, Concurrency: concurrency, LoadGenerator: "go"}

	start := time.Now()
	measureFrom := start.Add(warmup)
	end := measureFrom.Add(duration)
	var (
		mu        sync.Mutex
		latencies []time.Duration
		firstErr  error
		wg        sync.WaitGroup
	)
	for range concurrency {
		wg.Go(func() {
			lat := make([]time.Duration, 0, 1<<14)
			var errs int64
			var werr error
			buf := make([]byte, 4096)
			for ctx.Err() == nil {
				t0 := time.Now()
				if t0.After(end) {
					break
				}
				err := getSmall(ctx, client, t, buf)
				if t0.Before(measureFrom) {
					if err != nil && werr == nil {
						werr = err
					}
					continue
				}
				if err != nil {
					errs++
					if werr == nil {
						werr = err
					}
					continue
				}
				lat = append(lat, time.Since(t0))
			}
			mu.Lock()
			latencies = append(latencies, lat...)
			res.Errors += errs
			if firstErr == nil {
				firstErr = werr
			}
			mu.Unlock()
		})
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return res, err
	}
	res.Requests = int64(len(latencies))
	if res.Requests == 0 {
		return res, fmt.Errorf("%s: no request succeeded: %w", t.path, firstErr)
	}
	if res.Errors > 0 {
		// A path that fails is not measured: say why rather than print a number.
		return res, fmt.Errorf("%s at %d concurrent: %d requests failed, first: %w", t.path, concurrency, res.Errors, firstErr)
	}
	res.RequestsPerS = float64(res.Requests) / duration.Seconds()
	slices.Sort(latencies)
	res.P50Millis = millis(percentile(latencies, 0.50))
	res.P99Millis = millis(percentile(latencies, 0.99))
	return res, nil
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
	start := time.Now()
	for res.Transfers == 0 || time.Since(start) < duration {
		if err := transfer(); err != nil {
			return res, fmt.Errorf("%s %s: %w", t.path, direction, err)
		}
		res.Transfers++
	}
	res.MBPerS = float64(size) * float64(res.Transfers) / time.Since(start).Seconds() / 1e6
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
