// Command agentk is the Kubernetes agent: it connects to kas, keeps a reverse
// tunnel open and serves the Kubernetes API requests kas sends through it. In
// receptive mode it listens and kas connects to it instead (or as well).
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
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"k8s.io/klog/v2"

	"github.com/kasproject/kas/agent"
	"github.com/kasproject/kas/internal/buildinfo"
	"github.com/kasproject/kas/protocol"
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
	receptive           receptiveFlags
}

// receptiveFlags configure receptive mode: where agentk accepts kas's
// connections and how kas must authenticate.
type receptiveFlags struct {
	listenAddress     string
	listenNetwork     string
	certFile, keyFile string
	allowPlaintext    bool
	jwtPublicKeyFile  string
	agentID           int64
	clientCAFile      string
}

func (r receptiveFlags) enabled() bool { return r.listenAddress != "" }

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
	if err := addReceptiveFlags(fs, &f.receptive, getenv); err != nil {
		return f, err
	}
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `Usage: agentk --kas-address URL --token-file FILE [flags]
       agentk --receptive-listen-address ADDR --receptive-cert-file FILE --receptive-key-file FILE
              (--receptive-jwt-public-key-file FILE --receptive-agent-id ID | --receptive-client-ca-file FILE) [flags]

agentk connects to kas and serves the Kubernetes API requests kas tunnels to
it, using its own service account (or kubeconfig) and impersonating the
identity kas names. In receptive mode (--receptive-listen-address) it accepts
kas's connections instead, for clusters that cannot reach kas but that kas
can reach; both modes may run at once. POD_NAME and POD_NAMESPACE, when set,
are reported to kas.

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
	if f.kasAddress == "" && !f.receptive.enabled() {
		missing = append(missing, errors.New("--kas-address (or KAS_ADDRESS) is required, unless kas connects to this agent: --receptive-listen-address"))
	}
	if f.tokenFile == "" && f.kasAddress != "" {
		missing = append(missing, errors.New("--token-file (or AGENTK_TOKEN_FILE) is required"))
	}
	if f.shutdownGrace < 0 {
		missing = append(missing, errors.New("--shutdown-grace must not be negative"))
	}
	missing = append(missing, f.receptive.check())
	return f, errors.Join(missing...)
}

// addReceptiveFlags defines the receptive-mode flags. GitLab's agentk calls
// the same settings --api-listen-address, --api-listen-network,
// --api-cert-file, --api-key-file and --api-jwt-file; those names are
// accepted too so GitLab's Helm chart values carry over.
func addReceptiveFlags(fs *flag.FlagSet, r *receptiveFlags, getenv func(string) string) error {
	network := getenv("AGENTK_RECEPTIVE_LISTEN_NETWORK")
	if network == "" {
		network = "tcp"
	}
	var agentID int64
	if v := getenv("AGENTK_RECEPTIVE_AGENT_ID"); v != "" {
		id, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return fmt.Errorf("AGENTK_RECEPTIVE_AGENT_ID %q is not a number: %w", v, err)
		}
		agentID = id
	}
	r.listenAddress = getenv("AGENTK_RECEPTIVE_LISTEN_ADDRESS")
	r.listenNetwork = network
	r.certFile = getenv("AGENTK_RECEPTIVE_CERT_FILE")
	r.keyFile = getenv("AGENTK_RECEPTIVE_KEY_FILE")
	r.jwtPublicKeyFile = getenv("AGENTK_RECEPTIVE_JWT_PUBLIC_KEY_FILE")
	r.clientCAFile = getenv("AGENTK_RECEPTIVE_CLIENT_CA_FILE")
	r.agentID = agentID
	r.allowPlaintext = getenv("AGENTK_RECEPTIVE_ALLOW_PLAINTEXT") == "true"
	for _, name := range []string{"receptive-listen-address", "api-listen-address"} {
		fs.StringVar(&r.listenAddress, name, r.listenAddress,
			"receptive mode: address where agentk accepts kas's connections, e.g. :8182 (env AGENTK_RECEPTIVE_LISTEN_ADDRESS); empty: off")
	}
	for _, name := range []string{"receptive-listen-network", "api-listen-network"} {
		fs.StringVar(&r.listenNetwork, name, r.listenNetwork, "receptive mode: tcp, tcp4, tcp6 or unix (env AGENTK_RECEPTIVE_LISTEN_NETWORK)")
	}
	for _, name := range []string{"receptive-cert-file", "api-cert-file"} {
		fs.StringVar(&r.certFile, name, r.certFile, "receptive mode: PEM certificate agentk presents to kas (env AGENTK_RECEPTIVE_CERT_FILE)")
	}
	for _, name := range []string{"receptive-key-file", "api-key-file"} {
		fs.StringVar(&r.keyFile, name, r.keyFile, "receptive mode: its PEM private key (env AGENTK_RECEPTIVE_KEY_FILE)")
	}
	fs.BoolVar(&r.allowPlaintext, "receptive-allow-plaintext", r.allowPlaintext,
		"receptive mode: accept kas without TLS, when TLS ends in front of agentk (a service mesh) or for tests (env AGENTK_RECEPTIVE_ALLOW_PLAINTEXT=true)")
	for _, name := range []string{"receptive-jwt-public-key-file", "api-jwt-file"} {
		fs.StringVar(&r.jwtPublicKeyFile, name, r.jwtPublicKeyFile,
			"receptive mode: Ed25519 public key that kas's JWT must be signed with: GitLab's public_key (base64) or PEM (env AGENTK_RECEPTIVE_JWT_PUBLIC_KEY_FILE)")
	}
	fs.Int64Var(&r.agentID, "receptive-agent-id", r.agentID, "receptive mode: this agent's GitLab ID, which kas's JWT must name (env AGENTK_RECEPTIVE_AGENT_ID)")
	fs.StringVar(&r.clientCAFile, "receptive-client-ca-file", r.clientCAFile,
		"receptive mode: PEM CA certificates that kas's client certificate must chain to (mTLS) (env AGENTK_RECEPTIVE_CLIENT_CA_FILE)")
	return nil
}

// check reports every problem with the receptive flags at once.
func (r receptiveFlags) check() error {
	if !r.enabled() {
		var set []string
		for flagName, v := range map[string]string{
			"--receptive-cert-file": r.certFile, "--receptive-key-file": r.keyFile,
			"--receptive-jwt-public-key-file": r.jwtPublicKeyFile, "--receptive-client-ca-file": r.clientCAFile,
		} {
			if v != "" {
				set = append(set, flagName)
			}
		}
		if len(set) > 0 {
			slices.Sort(set)
			return fmt.Errorf("%s only apply in receptive mode: add --receptive-listen-address", strings.Join(set, ", "))
		}
		return nil
	}
	var errs []error
	switch r.listenNetwork {
	case "tcp", "tcp4", "tcp6", "unix":
	default:
		errs = append(errs, fmt.Errorf("--receptive-listen-network %q: want tcp, tcp4, tcp6 or unix", r.listenNetwork))
	}
	switch {
	case (r.certFile == "") != (r.keyFile == ""):
		errs = append(errs, errors.New("--receptive-cert-file and --receptive-key-file go together"))
	case r.certFile == "" && !r.allowPlaintext:
		errs = append(errs, errors.New("receptive mode needs TLS: pass --receptive-cert-file and --receptive-key-file, or --receptive-allow-plaintext when TLS ends in front of agentk"))
	case r.certFile != "" && r.allowPlaintext:
		errs = append(errs, errors.New("--receptive-allow-plaintext and --receptive-cert-file contradict each other: choose one"))
	}
	if r.jwtPublicKeyFile == "" && r.clientCAFile == "" {
		errs = append(errs, errors.New("receptive mode needs a way to authenticate kas: --receptive-jwt-public-key-file (with --receptive-agent-id), --receptive-client-ca-file, or both"))
	}
	if r.jwtPublicKeyFile != "" && r.agentID <= 0 {
		errs = append(errs, errors.New("--receptive-jwt-public-key-file needs --receptive-agent-id: the agent's GitLab ID, which kas's JWT names"))
	}
	if r.clientCAFile != "" && r.certFile == "" {
		errs = append(errs, errors.New("--receptive-client-ca-file (mTLS) needs TLS on the listener: --receptive-cert-file and --receptive-key-file"))
	}
	return errors.Join(errs...)
}

// serve starts the agent and its observability listener and runs them until
// ctx is cancelled.
func serve(ctx context.Context, f flags, getenv func(string) string, stderr io.Writer) error {
	logger := slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: f.logLevel}))
	klog.SetSlogLogger(logger) // client-go's own logs come out as JSON too

	var token string
	if f.tokenFile != "" {
		var err error
		if token, err = readToken(f.tokenFile); err != nil {
			return err
		}
	}
	receptive, err := receptiveOptions(f.receptive)
	if err != nil {
		return err
	}
	if receptive != nil {
		defer receptive.Listener.Close() // if agentk stops before Run serves it
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
		Receptive:     receptive,
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

// receptiveOptions loads the receptive-mode files and opens the listener;
// nil when receptive mode is off.
func receptiveOptions(r receptiveFlags) (*agent.ReceptiveOptions, error) {
	if !r.enabled() {
		return nil, nil
	}
	opts := &agent.ReceptiveOptions{AgentID: r.agentID}
	var errs []error
	var cert tls.Certificate
	if r.certFile != "" {
		var err error
		if cert, err = tls.LoadX509KeyPair(r.certFile, r.keyFile); err != nil {
			errs = append(errs, fmt.Errorf("load the receptive certificate (--receptive-cert-file %s, --receptive-key-file %s): %w", r.certFile, r.keyFile, err))
		}
	}
	if r.jwtPublicKeyFile != "" {
		data, err := os.ReadFile(r.jwtPublicKeyFile)
		if err == nil {
			opts.JWTPublicKey, err = protocol.ParseEd25519PublicKey(data)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("--receptive-jwt-public-key-file %s: %w", r.jwtPublicKeyFile, err))
		}
	}
	if r.clientCAFile != "" {
		pem, err := os.ReadFile(r.clientCAFile)
		if err != nil {
			errs = append(errs, fmt.Errorf("--receptive-client-ca-file: %w", err))
		} else {
			opts.ClientCAs = x509.NewCertPool()
			if !opts.ClientCAs.AppendCertsFromPEM(pem) {
				errs = append(errs, fmt.Errorf("--receptive-client-ca-file %s holds no PEM certificate", r.clientCAFile))
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	ln, err := net.Listen(r.listenNetwork, r.listenAddress)
	if err != nil {
		return nil, fmt.Errorf("receptive listener on %s %s: %w (pick another address with --receptive-listen-address)", r.listenNetwork, r.listenAddress, err)
	}
	if r.certFile != "" {
		ln = tls.NewListener(ln, agent.ServerTLS(cert, opts.ClientCAs != nil))
	}
	opts.Listener = ln
	return opts, nil
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
