// Package agent is agentk: it dials kas over WebSocket, keeps that reverse
// tunnel open, and serves the HTTP/2 requests kas sends through it by
// forwarding them to the cluster's Kubernetes API server with the agent's own
// credentials and the identity kas asks it to impersonate. In receptive mode
// it also (or instead) listens, and kas dials it: the same tunnel with the
// dial turned around.
package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httputil"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/client-go/rest"

	"github.com/kasproject/kas/internal/backoff"
	"github.com/kasproject/kas/protocol"
)

// Defaults for the zero values of Options.
const (
	DefaultMinBackoff    = time.Second
	DefaultMaxBackoff    = time.Minute
	DefaultShutdownGrace = 15 * time.Second
)

// Options configures an Agent. RESTConfig is required, and KASAddress (with
// Token), Receptive, or both.
type Options struct {
	// KASAddress is kas's agent endpoint, ws:// or wss://. An empty path or
	// "/" means protocol.AgentPath. Empty: the agent does not dial kas.
	KASAddress string
	// Token is the agent token kas authenticates the agent with; required
	// with KASAddress. In receptive mode it is optional: the agent hands it
	// to kas once kas has authenticated itself, so kas can learn the
	// agent's project from GitLab.
	Token string
	// Receptive, if set, makes the agent accept kas's connections too.
	Receptive *ReceptiveOptions
	// RESTConfig reaches the cluster's API server with the agent's own
	// credentials (in-cluster service account or a kubeconfig).
	RESTConfig *rest.Config
	// TLS configures wss:// connections, e.g. with an extra CA. Nil means
	// the system roots.
	TLS *tls.Config
	// Logger receives the agent's logs. Nil discards them.
	Logger *slog.Logger
	// Registerer receives the agent's metrics. Nil leaves them unregistered.
	Registerer prometheus.Registerer

	// AgentVersion, AgentCommit, PodName and PodNamespace describe this
	// agent to kas in the handshake; empty ones are not sent.
	AgentVersion string
	AgentCommit  string
	PodName      string
	PodNamespace string

	// MinBackoff and MaxBackoff bound the jittered exponential delay between
	// connection attempts (defaults DefaultMinBackoff, DefaultMaxBackoff).
	MinBackoff time.Duration
	MaxBackoff time.Duration
	// ShutdownGrace is how long in-flight requests may run after Run's
	// context is cancelled (default DefaultShutdownGrace).
	ShutdownGrace time.Duration
}

// Agent keeps one tunnel to kas at a time when it dials kas, accepts any
// number of kas's connections in receptive mode, and serves the requests kas
// sends through each. Create it with New and start it with Run.
type Agent struct {
	kasURL        string            // "" when the agent does not dial kas
	receptive     *ReceptiveOptions // nil unless receptive
	token         string
	handshake     http.Header // without the Kubernetes version, learnt in Run
	dialer        *websocket.Dialer
	logger        *slog.Logger
	metrics       *metrics
	minBackoff    time.Duration
	maxBackoff    time.Duration
	shutdownGrace time.Duration

	apiServer        *url.URL               // the API server's base URL, path prefix included
	apiTransport     http.RoundTripper      // the agent's credentials, HTTP/2 allowed
	upgradeTransport http.RoundTripper      // the agent's credentials, HTTP/1.1 only (SPDY cannot run over h2)
	bulkProxy        *httputil.ReverseProxy // responses that end: lists, gets, downloads
	streamProxy      *httputil.ReverseProxy // open-ended responses: watches, logs -f
	bulkBuffers      *bufferPool
	streamBuffers    *bufferPool
	requestBodies    protocol.BulkBodies // large request bodies read from the tunnel in large chunks
	handlersRunning  handlerTracker

	// receptiveServing is true while the receptive listener accepts kas.
	receptiveServing atomic.Bool

	mu        sync.Mutex
	started   bool
	connected chan struct{} // closed while a tunnel is up; replaced when the last goes down
	tunnels   int           // tunnels up: the dialled one and kas's receptive connections
	config    []byte        // the last configuration kas pushed
}

// New checks opts and prepares an Agent; it does not connect.
func New(opts Options) (*Agent, error) {
	var errs []error
	var kasURL string
	var err error
	if opts.KASAddress != "" || opts.Receptive == nil {
		if kasURL, err = kasEndpoint(opts.KASAddress); err != nil {
			errs = append(errs, err)
		}
		if opts.Token == "" {
			errs = append(errs, errors.New("agent token is empty: pass the token GitLab showed when the agent was registered"))
		}
	}
	if opts.Receptive != nil {
		if err := opts.Receptive.check(); err != nil {
			errs = append(errs, err)
		}
	}
	if opts.RESTConfig == nil {
		errs = append(errs, errors.New("no Kubernetes client configuration: run in a cluster or pass a kubeconfig"))
	}
	if opts.MinBackoff < 0 || opts.MaxBackoff < 0 || opts.ShutdownGrace < 0 {
		errs = append(errs, errors.New("backoffs and shutdown grace must not be negative"))
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}

	a := &Agent{
		kasURL:        kasURL,
		receptive:     opts.Receptive,
		token:         opts.Token,
		handshake:     handshakeHeader(opts),
		dialer:        newDialer(opts.TLS),
		logger:        opts.Logger,
		minBackoff:    orDefault(opts.MinBackoff, DefaultMinBackoff),
		maxBackoff:    orDefault(opts.MaxBackoff, DefaultMaxBackoff),
		shutdownGrace: orDefault(opts.ShutdownGrace, DefaultShutdownGrace),
		bulkBuffers:   newBufferPool(bulkBufferSize),
		streamBuffers: newBufferPool(streamBufferSize),
		connected:     make(chan struct{}),
	}
	if a.logger == nil {
		a.logger = slog.New(slog.DiscardHandler)
	}
	if a.maxBackoff < a.minBackoff {
		a.maxBackoff = a.minBackoff
	}
	if a.metrics, err = newMetrics(opts.Registerer); err != nil {
		return nil, err
	}
	if err := a.setUpAPIServer(opts.RESTConfig); err != nil {
		return nil, err
	}
	return a, nil
}

// orDefault returns v, or def when v is zero.
func orDefault(v, def time.Duration) time.Duration {
	if v == 0 {
		return def
	}
	return v
}

// Run connects to kas and serves the tunnel, reconnecting with jittered
// exponential backoff whenever it drops, and in receptive mode serves kas's
// connections on the listener, until ctx is cancelled. Then it stops
// accepting, sends GOAWAY on every tunnel, lets in-flight requests finish
// for the shutdown grace period, closes the tunnels and returns nil once
// every request handler has returned. An Agent runs once; a second Run
// returns an error.
func (a *Agent) Run(ctx context.Context) error {
	a.mu.Lock()
	if a.started {
		a.mu.Unlock()
		return errors.New("agent has already been run: create a new one with New")
	}
	a.started = true
	a.mu.Unlock()

	header := a.handshake.Clone()
	if v := a.kubernetesVersion(ctx); v != "" {
		header.Set(protocol.HeaderKubernetesVersion, v)
	}
	attrs := []any{"api_server", a.apiServer.Redacted()}
	if a.kasURL != "" {
		attrs = append(attrs, "kas_url", a.kasURL)
	}
	if a.receptive != nil {
		attrs = append(attrs, "receptive_address", a.receptive.Listener.Addr().String())
	}
	a.logger.Info("agentk starting", attrs...)

	var modes sync.WaitGroup
	if a.receptive != nil {
		modes.Go(func() { a.serveReceptive(ctx, header) })
	}
	if a.kasURL != "" {
		modes.Go(func() { a.dialLoop(ctx, header) })
	}
	modes.Wait()
	a.handlersRunning.closeAndWait()
	a.logger.Info("agentk stopped")
	return nil
}

// dialLoop connects to kas and serves the tunnel, reconnecting with backoff,
// until ctx is cancelled.
func (a *Agent) dialLoop(ctx context.Context, header http.Header) {
	b := backoff.Backoff{Min: a.minBackoff, Max: a.maxBackoff}
	for ctx.Err() == nil {
		delay := a.connectAndServe(ctx, header, &b)
		if ctx.Err() != nil {
			return
		}
		a.logger.Info("reconnecting to kas", "kas_url", a.kasURL, "delay", delay.String())
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
		case <-t.C:
		}
	}
}

// Connected returns a channel that is closed once a tunnel to kas is up. While
// a tunnel is up it returns an already closed channel; after it drops, a new
// one.
func (a *Agent) Connected() <-chan struct{} {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.connected
}

// IsConnected reports whether a tunnel to kas is up.
func (a *Agent) IsConnected() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.tunnels > 0
}

// Tunnels is the number of tunnels to kas that are up: the one the agent
// dialled and, in receptive mode, every connection kas made.
func (a *Agent) Tunnels() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.tunnels
}

// tunnelUp records a tunnel coming up (+1) or going down (-1).
func (a *Agent) tunnelUp(delta int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	was := a.tunnels > 0
	a.tunnels += delta
	a.metrics.connected.Set(float64(a.tunnels))
	switch is := a.tunnels > 0; {
	case is && !was:
		close(a.connected)
	case !is && was:
		a.connected = make(chan struct{})
	}
}
