// Command agentk is the Kubernetes agent: it connects to kas, keeps a reverse
// tunnel open and serves the Kubernetes API requests kas sends through it.
package main

import (
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"k8s.io/klog/v2"

	"github.com/kasproject/kas/agent"
	"github.com/kasproject/kas/internal/buildinfo"
)

// May be set at build time: go build -ldflags "-X main.version=v1.2.3 -X main.commit=abc123";
// otherwise what Go recorded in the binary is used (internal/buildinfo).
var (
	version = "dev"
	commit  = "unknown"
)

// Exit codes.
const (
	exitOK      = 0
	exitFailure = 1 // could not start: unreadable token file, bad kubeconfig, busy port
	exitUsage   = 2 // bad flags
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr))
}

type flags struct {
	kasAddress          string
	tokenFile           string
	kubeconfig          string
	kubeContext         string
	observabilityListen string
	caCertFile          string
	logLevel            slog.Level
	shutdownGrace       time.Duration
	version             bool
}

// run is agentk's whole life: it returns the exit code once ctx is cancelled
// and the agent has shut down gracefully, or at once if it cannot start.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	f, err := parseFlags(args, getenv, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return exitOK
	}
	if err != nil {
		fmt.Fprintf(stderr, "agentk: %v\nRun agentk --help for usage.\n", err)
		return exitUsage
	}
	if f.version {
		build := buildinfo.Read(version, commit)
		fmt.Fprintf(stdout, "agentk %s (commit %s, %s)\n", build.Version, cmp.Or(build.Commit, "unknown"), runtime.Version())
		return exitOK
	}
	if err := serve(ctx, f, getenv, stderr); err != nil {
		fmt.Fprintf(stderr, "agentk: %v\n", err)
		return exitFailure
	}
	return exitOK
}

func parseFlags(args []string, getenv func(string) string, stderr io.Writer) (flags, error) {
	var f flags
	fs := flag.NewFlagSet("agentk", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&f.kasAddress, "kas-address", getenv("KAS_ADDRESS"),
		"kas's agent endpoint, ws:// or wss://, e.g. wss://gitlab.example.com/-/kubernetes-agent/ (env KAS_ADDRESS)")
	fs.StringVar(&f.tokenFile, "token-file", getenv("AGENTK_TOKEN_FILE"),
		"file holding the agent token GitLab showed when the agent was registered (env AGENTK_TOKEN_FILE)")
	fs.StringVar(&f.kubeconfig, "kubeconfig", "",
		"kubeconfig for the cluster's API server; default: the in-cluster service account, else $KUBECONFIG or ~/.kube/config")
	fs.StringVar(&f.kubeContext, "context", "", "kubeconfig context to use (default: its current context)")
	fs.StringVar(&f.observabilityListen, "observability-listen", "127.0.0.1:8080",
		"address serving /metrics, /liveness and /readiness; empty turns it off")
	fs.StringVar(&f.caCertFile, "ca-cert-file", "", "PEM file of extra CA certificates to trust for wss:// (e.g. a private kas CA)")
	fs.TextVar(&f.logLevel, "log-level", slog.LevelInfo, "log level: debug, info, warn or error")
	fs.DurationVar(&f.shutdownGrace, "shutdown-grace", agent.DefaultShutdownGrace,
		"how long in-flight requests may finish after SIGTERM")
	fs.BoolVar(&f.version, "version", false, "print the version and exit")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `Usage: agentk --kas-address URL --token-file FILE [flags]

agentk connects to kas and serves the Kubernetes API requests kas tunnels to
it, using its own service account (or kubeconfig) and impersonating the
identity kas names. POD_NAME and POD_NAMESPACE, when set, are reported to kas.

Flags:
`)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return f, err
	}
	if fs.NArg() > 0 {
		return f, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if f.version {
		return f, nil
	}
	var missing []error
	if f.kasAddress == "" {
		missing = append(missing, errors.New("--kas-address (or KAS_ADDRESS) is required"))
	}
	if f.tokenFile == "" {
		missing = append(missing, errors.New("--token-file (or AGENTK_TOKEN_FILE) is required"))
	}
	if f.shutdownGrace < 0 {
		missing = append(missing, errors.New("--shutdown-grace must not be negative"))
	}
	return f, errors.Join(missing...)
}

// serve starts the agent and its observability listener and runs them until
// ctx is cancelled.
func serve(ctx context.Context, f flags, getenv func(string) string, stderr io.Writer) error {
	logger := slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: f.logLevel}))
	klog.SetSlogLogger(logger) // client-go's own logs come out as JSON too

	token, err := readToken(f.tokenFile)
	if err != nil {
		return err
	}
	tlsConfig, err := kasTLS(f.caCertFile)
	if err != nil {
		return err
	}
	restConfig, err := agent.LoadRESTConfig(f.kubeconfig, f.kubeContext)
	if err != nil {
		return err
	}
	build := buildinfo.Read(version, commit)
	registry := prometheus.NewRegistry()
	registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	a, err := agent.New(agent.Options{
		KASAddress:    f.kasAddress,
		Token:         token,
		RESTConfig:    restConfig,
		TLS:           tlsConfig,
		Logger:        logger,
		Registerer:    registry,
		AgentVersion:  build.Version,
		AgentCommit:   build.Commit,
		PodName:       getenv("POD_NAME"),
		PodNamespace:  getenv("POD_NAMESPACE"),
		ShutdownGrace: f.shutdownGrace,
	})
	if err != nil {
		return err
	}

	if f.observabilityListen != "" {
		ln, err := net.Listen("tcp", f.observabilityListen)
		if err != nil {
			return fmt.Errorf("observability listener on %s: %w (pick another address with --observability-listen)", f.observabilityListen, err)
		}
		srv := &http.Server{Handler: a.ObservabilityHandler(registry), ReadHeaderTimeout: 10 * time.Second}
		served := make(chan struct{})
		go func() {
			defer close(served)
			if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
				logger.Error("observability listener failed", "address", ln.Addr().String(), "error", err.Error())
			}
		}()
		logger.Info("observability listening", "address", ln.Addr().String())
		// Liveness keeps answering until the agent has finished shutting down.
		defer func() {
			shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = srv.Shutdown(shutdownCtx)
			<-served
		}()
	}
	return a.Run(ctx)
}

// readToken reads the agent token, which must not be empty.
func readToken(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("read the agent token: %w (point --token-file at the file holding it)", err)
	}
	token := strings.TrimSpace(string(b))
	if token == "" {
		return "", fmt.Errorf("token file %s is empty: put the agent token GitLab showed when the agent was registered in it", path)
	}
	return token, nil
}

// kasTLS trusts the system roots plus the CAs in caFile, if given.
func kasTLS(caFile string) (*tls.Config, error) {
	if caFile == "" {
		return nil, nil
	}
	pool, err := x509.SystemCertPool()
	if err != nil {
		pool = x509.NewCertPool()
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("read kas CA certificates: %w", err)
	}
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("no PEM certificates found in %s", caFile)
	}
	return &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}, nil
}
