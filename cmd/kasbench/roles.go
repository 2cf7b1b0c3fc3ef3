package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"time"

	"k8s.io/client-go/rest"

	"github.com/kasproject/kas/agent"
	"github.com/kasproject/kas/server"
	"github.com/kasproject/kas/server/config"
	"github.com/kasproject/kas/server/logging"
)

// A role is one process of the benchmark's layout. kasbench re-executes its
// own binary with the role's name as first argument, so every process runs
// the same code the kas and agentk binaries wrap (server.New, agent.New)
// without a separate build step, and works the same under `go run`.
//
// The protocol between parent and child is line-based: once serving, the
// child writes one JSON readyMessage line to stdout; then it answers each
// command line read from stdin ("mem", or "gc" to collect garbage and return
// freed memory to the OS first) with one JSON memStats line. End of stdin
// means the parent is done or gone: the child shuts down and exits.
type role struct {
	name string
	// serve starts serving, returns what the parent must know, and keeps
	// serving until ctx ends. It returns once everything it started stopped.
	serve func(ctx context.Context, args []string, ready func(readyMessage)) error
}

var roles = map[string]role{
	roleUpstream: {roleUpstream, serveUpstream},
	roleHop:      {roleHop, serveHop},
	roleKAS:      {roleKAS, serveKAS},
	roleAgents:   {roleAgents, serveAgents},

	roleReceptiveAgents: {roleReceptiveAgents, serveReceptiveAgents},
}

const (
	roleUpstream = "serve-upstream"
	roleHop      = "serve-hop"
	roleKAS      = "serve-kas"
	roleAgents   = "serve-agents"
)

// readyMessage is the child's first stdout line.
type readyMessage struct {
	// Addr is the address the child serves on (kas: the public listener).
	Addr string `json:"addr,omitempty"`
	// Observability is kas's observability listener.
	Observability string `json:"observability,omitempty"`
	// Error is set instead when the child could not start.
	Error string `json:"error,omitempty"`
}

// memStats is the child's answer to "mem" and "gc".
type memStats struct {
	HeapInuse  uint64 `json:"heap_inuse"`
	StackInuse uint64 `json:"stack_inuse"`
	Sys        uint64 `json:"sys"`
	Goroutines int    `json:"goroutines"`
}

// profileEnv names the path prefix of the profiles a child writes, if set:
// PREFIX.cpu.pprof while it runs, PREFIX.allocs.pprof when it stops.
const profileEnv = "KASBENCH_PROFILE"

// runRole runs the child side of a role and returns the exit code.
func runRole(r role, args []string) int {
	if prefix := os.Getenv(profileEnv); prefix != "" {
		stop, err := startProfiles(prefix)
		if err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", r.name, err)
			return 1
		}
		defer stop()
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	out := &lineWriter{w: os.Stdout}
	readyOnce := sync.Once{}
	ready := func(m readyMessage) {
		readyOnce.Do(func() {
			_ = out.writeJSON(m)
			// Commands are served only once the parent knows the child is up.
			go serveCommands(os.Stdin, out, cancel)
		})
	}
	err := r.serve(ctx, args, ready)
	if err != nil {
		ready(readyMessage{Error: err.Error()})
		fmt.Fprintf(os.Stderr, "%s: %v\n", r.name, err)
		return 1
	}
	return 0
}

func startProfiles(prefix string) (stop func(), err error) {
	cpu, err := os.Create(prefix + ".cpu.pprof")
	if err != nil {
		return nil, err
	}
	if err := pprof.StartCPUProfile(cpu); err != nil {
		_ = cpu.Close()
		return nil, fmt.Errorf("start CPU profile: %w", err)
	}
	return func() {
		pprof.StopCPUProfile()
		_ = cpu.Close()
		if f, err := os.Create(prefix + ".allocs.pprof"); err == nil {
			_ = pprof.Lookup("allocs").WriteTo(f, 0)
			_ = f.Close()
		}
	}, nil
}

// lineWriter serializes the child's stdout lines.
type lineWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lineWriter) writeJSON(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	_, err = l.w.Write(append(b, '\n'))
	return err
}

// serveCommands answers the parent's commands until stdin ends, then stops
// the role.
func serveCommands(in io.Reader, out *lineWriter, stop context.CancelFunc) {
	defer stop()
	sc := bufio.NewScanner(in)
	for sc.Scan() {
		switch strings.TrimSpace(sc.Text()) {
		case "gc":
			debug.FreeOSMemory() // collects garbage first
			_ = out.writeJSON(readMemStats())
		case "mem":
			_ = out.writeJSON(readMemStats())
		}
	}
}

func readMemStats() memStats {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return memStats{HeapInuse: ms.HeapInuse, StackInuse: ms.StackInuse, Sys: ms.Sys, Goroutines: runtime.NumGoroutine()}
}

// serveHTTP serves h on a fresh loopback port until ctx ends.
func serveHTTP(ctx context.Context, h http.Handler, ready func(readyMessage)) error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("listen on loopback: %w", err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	ready(readyMessage{Addr: ln.Addr().String()})
	select {
	case err := <-done:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		_ = srv.Close()
	}
	<-done
	return nil
}

// Upstream paths: what every path of the benchmark ends at.
const (
	smallPath    = "/api/v1/namespaces/kasbench"
	downloadPath = "/kasbench/download" // ?bytes=N
	uploadPath   = "/kasbench/upload"
	versionPath  = "/version" // agentk asks for it when it starts
)

// smallBody is a small Kubernetes object, the typical answer to a GET.
var smallBody = []byte(`{"kind":"Namespace","apiVersion":"v1","metadata":{"name":"kasbench","uid":"5b0b1d52-8a40-4a4c-9a8e-0f1e2d3c4b5a","resourceVersion":"1"},"status":{"phase":"Active"}}`)

// serveUpstream is the stand-in for the Kubernetes API server: small JSON
// answers, and bulk bodies each way without holding them in memory.
func serveUpstream(ctx context.Context, args []string, ready func(readyMessage)) error {
	if len(args) != 0 {
		return fmt.Errorf("unexpected arguments %q", args)
	}
	pattern := patternBlock()
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+smallPath, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", strconv.Itoa(len(smallBody)))
		_, _ = w.Write(smallBody)
	})
	mux.HandleFunc("GET "+versionPath, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"major":"1","minor":"33","gitVersion":"v1.33.0-kasbench"}`)
	})
	mux.HandleFunc("GET "+downloadPath, func(w http.ResponseWriter, r *http.Request) {
		n, err := strconv.ParseInt(r.URL.Query().Get("bytes"), 10, 64)
		if err != nil || n < 0 {
			http.Error(w, "bytes must be a non-negative integer", http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
		_, _ = io.Copy(w, &patternReader{block: pattern, left: n})
	})
	mux.HandleFunc("POST "+uploadPath, func(w http.ResponseWriter, r *http.Request) {
		buf := make([]byte, copyBufferSize)
		n, err := io.CopyBuffer(io.Discard, r.Body, buf)
		if err != nil {
			http.Error(w, "read body: "+err.Error(), http.StatusBadRequest)
			return
		}
		_, _ = io.WriteString(w, strconv.FormatInt(n, 10))
	})
	return serveHTTP(ctx, mux, ready)
}

// serveHop is one plain reverse proxy hop of the comparison chain: an
// httputil.ReverseProxy with an idle pool large enough for the benchmark's
// concurrency, so the chain is not penalized by reconnecting.
func serveHop(ctx context.Context, args []string, ready func(readyMessage)) error {
	fs := flag.NewFlagSet(roleHop, flag.ContinueOnError)
	target := fs.String("target", "", "URL to forward to")
	if err := fs.Parse(args); err != nil {
		return err
	}
	u, err := url.Parse(*target)
	if err != nil || u.Host == "" {
		return fmt.Errorf("-target %q is not an absolute URL", *target)
	}
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.MaxIdleConnsPerHost = maxConcurrency
	transport.MaxIdleConns = maxConcurrency
	proxy := &httputil.ReverseProxy{
		Rewrite:   func(pr *httputil.ProxyRequest) { pr.SetURL(u) },
		Transport: transport,
	}
	defer transport.CloseIdleConnections()
	return serveHTTP(ctx, proxy, ready)
}

// serveKAS runs kas as the kas binary does: server.New and Run from a
// configuration file, JSON logs to a file.
func serveKAS(ctx context.Context, args []string, ready func(readyMessage)) error {
	fs := flag.NewFlagSet(roleKAS, flag.ContinueOnError)
	configFile := fs.String("config", "", "kas configuration `file`")
	logFile := fs.String("log", "", "log `file`")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, err := config.Load(*configFile, os.Getenv)
	if err != nil {
		return fmt.Errorf("load %s: %w", *configFile, err)
	}
	level, err := logging.ParseLevel(cfg.Observability.Logging.Level)
	if err != nil {
		return err
	}
	logOut, err := os.Create(*logFile)
	if err != nil {
		return err
	}
	defer logOut.Close()
	log := logging.New(logOut, level, logging.NewRecent(50))
	kas, err := server.New(cfg, server.Options{Logger: log, Version: "kasbench"})
	if err != nil {
		return fmt.Errorf("build kas: %w", err)
	}
	done := make(chan error, 1)
	go func() { done <- kas.Run(ctx) }()
	select {
	case <-kas.Ready():
	case err := <-done:
		return fmt.Errorf("start kas: %w", err)
	}
	ready(readyMessage{
		Addr:          kas.Addr("agent.listen").String(),
		Observability: kas.Addr("observability.listen").String(),
	})
	return <-done
}

// serveAgents runs one agentk (agent.New, Run) per token in the tokens file,
// all in this process, and is ready once every one is connected.
func serveAgents(ctx context.Context, args []string, ready func(readyMessage)) error {
	fs := flag.NewFlagSet(roleAgents, flag.ContinueOnError)
	kasURL := fs.String("kas", "", "kas agent endpoint, ws://…")
	tokensFile := fs.String("tokens", "", "`file` with one agent token a line")
	apiURL := fs.String("api", "", "Kubernetes API server URL")
	logFile := fs.String("log", "", "log `file`")
	if err := fs.Parse(args); err != nil {
		return err
	}
	tokens, err := readLines(*tokensFile)
	if err != nil {
		return err
	}
	if len(tokens) == 0 {
		return fmt.Errorf("%s holds no token", *tokensFile)
	}
	logOut, err := os.Create(*logFile)
	if err != nil {
		return err
	}
	defer logOut.Close()
	log := slog.New(slog.NewJSONHandler(logOut, &slog.HandlerOptions{Level: slog.LevelWarn}))

	agents := make([]*agent.Agent, len(tokens))
	for i, token := range tokens {
		agents[i], err = agent.New(agent.Options{
			KASAddress:   *kasURL,
			Token:        token,
			RESTConfig:   &rest.Config{Host: *apiURL},
			Logger:       log,
			AgentVersion: "kasbench",
			PodName:      "agentk-kasbench-" + strconv.Itoa(i),
			PodNamespace: "kasbench",
			// Connection storms at start are the benchmark's doing, not a
			// failing kas: retry soon.
			MinBackoff:    100 * time.Millisecond,
			MaxBackoff:    2 * time.Second,
			ShutdownGrace: time.Second,
		})
		if err != nil {
			return fmt.Errorf("build agent %d: %w", i, err)
		}
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	for _, a := range agents {
		wg.Go(func() { _ = a.Run(runCtx) })
	}
	for i, a := range agents {
		select {
		case <-a.Connected():
		case <-ctx.Done():
			return nil
		case <-time.After(time.Minute):
			return fmt.Errorf("agent %d did not connect to kas within a minute; see %s", i, *logFile)
		}
	}
	ready(readyMessage{})
	<-ctx.Done()
	return nil
}

func readLines(path string) ([]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var lines []string
	for line := range strings.Lines(string(b)) {
		if line = strings.TrimSpace(line); line != "" {
			lines = append(lines, line)
		}
	}
	return lines, nil
}

// copyBufferSize is the buffer every bulk copy of the benchmark uses.
const copyBufferSize = 256 << 10

// patternBlock is the content bulk bodies repeat.
func patternBlock() []byte {
	b := make([]byte, 1<<20)
	for i := range b {
		b[i] = byte(i*7 + i>>8)
	}
	return b
}

// patternReader yields left bytes of block, repeated, without allocating.
type patternReader struct {
	block []byte
	off   int
	left  int64
}

func (r *patternReader) Read(p []byte) (int, error) {
	if r.left <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > r.left {
		p = p[:r.left]
	}
	n := copy(p, r.block[r.off:])
	r.off = (r.off + n) % len(r.block)
	r.left -= int64(n)
	return n, nil
}

// WriteTo lets io.Copy write straight from the block, with no copy.
func (r *patternReader) WriteTo(w io.Writer) (int64, error) {
	var total int64
	for r.left > 0 {
		chunk := r.block[r.off:]
		if int64(len(chunk)) > r.left {
			chunk = chunk[:r.left]
		}
		if len(chunk) > copyBufferSize {
			chunk = chunk[:copyBufferSize]
		}
		n, err := w.Write(chunk)
		total += int64(n)
		r.off = (r.off + n) % len(r.block)
		r.left -= int64(n)
		if err != nil {
			return total, err
		}
		if n < len(chunk) {
			return total, io.ErrShortWrite
		}
	}
	return total, nil
}
