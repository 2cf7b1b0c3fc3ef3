package tunnel

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/http2"

	"github.com/kasproject/kas/middleware"
	"github.com/kasproject/kas/protocol"
	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/correlation"
	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/tokencheck"
)

// Options configure an Endpoint.
type Options struct {
	// API identifies agents by token (GitLab or standalone).
	API gitlab.API
	// Registry receives every tunnel while it is up.
	Registry registry.Registry
	Logger   *slog.Logger
	// PingInterval and PingTimeout: a tunnel idle for PingInterval is pinged
	// and closed if the PING is not answered within PingTimeout.
	PingInterval, PingTimeout time.Duration
	// MaxConnectionAge closes a tunnel gracefully (GOAWAY, in-flight requests
	// finish) so agents reconnect and load rebalances across nodes. A ±10%
	// jitter keeps agents that connected together from leaving together.
	MaxConnectionAge time.Duration
	// GracePeriod bounds how long a closing tunnel waits for in-flight requests.
	GracePeriod time.Duration
	// ConnectionsPerTokenPerMinute limits how often one token may connect.
	ConnectionsPerTokenPerMinute int
	// NodeURLs are this node's private API URLs, recorded with each tunnel.
	NodeURLs []string
	// Registerer receives the endpoint's metrics; nil means none.
	Registerer prometheus.Registerer
	// Tokens, if set, re-validates each tunnel's token periodically and
	// closes the tunnel once GitLab no longer accepts it.
	Tokens *tokencheck.Checker
	// OnConnect, if set, is told about each tunnel once it is registered,
	// with the agent's identity from GitLab (e.g. so the agent gets its
	// configuration); OnDisconnect once the tunnel is unregistered, always
	// after its OnConnect. Both run on the tunnel's goroutine and must
	// return quickly.
	OnConnect    func(agent gitlab.AgentInfo, t registry.Tunnel)
	OnDisconnect func(t registry.Tunnel)
}

// Endpoint serves agents' WebSocket connections on /-/kubernetes-agent/.
type Endpoint struct {
	opts      Options
	upgrader  websocket.Upgrader
	transport *http2.Transport
	bodies    protocol.BulkBodies
	limiter   *tokenLimiter
	refusals  *refusalLimiter

	mu       sync.Mutex
	closing  bool
	tunnels  map[*Tunnel]struct{}
	handlers sync.WaitGroup

	connected prometheus.Gauge
	attempts  *prometheus.CounterVec
}

// maxFrameSize lets one HTTP/2 DATA frame carry 1 MiB, so streaming pays
// per-frame costs (and WebSocket frames) rarely.
const maxFrameSize = 1 << 20

// NewEndpoint returns an endpoint; call Shutdown to close its tunnels.
func NewEndpoint(opts Options) (*Endpoint, error) {
	if opts.API == nil || opts.Registry == nil || opts.Logger == nil {
		return nil, errors.New("tunnel endpoint: API, Registry and Logger are required")
	}
	e := &Endpoint{
		opts: opts,
		upgrader: websocket.Upgrader{
			Subprotocols: []string{protocol.Subprotocol},
			// Reads reuse net/http's 4 KiB reader and large payloads are read
			// straight into HTTP/2's buffers; writes borrow a pooled buffer
			// only while writing, so an idle agent holds no write buffer.
			WriteBufferPool: &sync.Pool{},
			WriteBufferSize: 64 << 10,
			// Agents are not browsers; the token is the authentication.
			CheckOrigin: func(*http.Request) bool { return true },
		},
		transport: &http2.Transport{
			MaxReadFrameSize: maxFrameSize,
			ReadIdleTimeout:  opts.PingInterval,
			PingTimeout:      opts.PingTimeout,
			// A stalled agent must not block writers forever.
			WriteByteTimeout: opts.PingInterval + opts.PingTimeout,
		},
		limiter:  newTokenLimiter(opts.ConnectionsPerTokenPerMinute),
		refusals: newRefusalLimiter(refusedPerAddressPerMinute, maxLimitedAddresses),
		tunnels:  map[*Tunnel]struct{}{},
		connected: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kas_tunnels_connected",
			Help: "Agent tunnels connected to this node.",
		}),
		attempts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kas_agent_connection_attempts_total",
			Help: "Agent connection attempts by result.",
		}, []string{"result"}),
	}
	if opts.Registerer != nil {
		for _, c := range []prometheus.Collector{e.connected, e.attempts} {
			if err := opts.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("register tunnel metrics: %w", err)
			}
		}
	}
	return e, nil
}

// ServeHTTP authenticates an agent and, if it may connect, upgrades to a
// WebSocket and serves the tunnel until it closes. The token is checked
// before the upgrade so a refused agent gets a plain HTTP status and reason.
func (e *Endpoint) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	log := e.opts.Logger.With("correlation_id", correlation.FromContext(r.Context()))
	if !websocket.IsWebSocketUpgrade(r) {
		e.refuse(w, log, http.StatusBadRequest, "bad_request",
			"this is the agent endpoint: agentk connects here with a WebSocket upgrade")
		return
	}
	token, ok := bearerToken(r.Header.Get("Authorization"))
	if !ok {
		e.refuse(w, log, http.StatusUnauthorized, "unauthenticated",
			"missing agent token: send Authorization: Bearer <agent token>")
		return
	}
	if !subprotocolOffered(r, protocol.Subprotocol) {
		e.refuse(w, log, http.StatusBadRequest, "bad_protocol",
			fmt.Sprintf("unsupported tunnel protocol %q: this kas speaks %s; upgrade agentk",
				r.Header.Get("Sec-WebSocket-Protocol"), protocol.Subprotocol))
		return
	}
	// Made-up tokens are limited per client address before GitLab is
	// asked; real ones per token once GitLab has accepted them, so nothing
	// a caller makes up gets a limiter entry of its own.
	addr := middleware.ClientAddressOf(r)
	if e.refusals.blocked(addr, time.Now()) {
		w.Header().Set("Retry-After", "60")
		e.refuse(w, log, http.StatusTooManyRequests, "rate_limited",
			fmt.Sprintf("too many connection attempts with agent tokens kas does not accept from this address (%s); wait a minute, and check the agent's token", addr))
		return
	}
	info, err := e.opts.API.GetAgentInfo(r.Context(), token)
	if err == nil && info.AgentID <= 0 {
		// The GitLab client refuses such an answer itself; any other
		// backend gets the same check, so no agent runs as agent 0.
		err = &gitlab.Error{Op: "get agent info", Err: gitlab.ErrContract,
			Message: fmt.Sprintf("the answer names agent %d; an agent ID is positive", info.AgentID)}
	}
	if err != nil {
		switch {
		case gitlab.Cacheable(err):
			e.refusals.refused(addr, time.Now())
			e.refuse(w, log, http.StatusUnauthorized, "unauthenticated", "agent token is not valid")
			log.Info("Agent refused", "client_address", addr, "error", err.Error())
		case errors.Is(err, gitlab.ErrContract):
			e.refuse(w, log, http.StatusBadGateway, "gitlab_error",
				"GitLab's answer about this agent token cannot be used (a GitLab contract error); the kas log has the details")
			log.Error("Authenticate agent: GitLab contract error", "error", err.Error())
		case errors.Is(err, gitlab.ErrRedirect):
			e.refuse(w, log, http.StatusBadGateway, "gitlab_error",
				"GitLab redirected kas's call to authenticate the agent, and kas does not follow GitLab's redirects; the kas log says where to")
			log.Error("Authenticate agent", "error", err.Error())
		default:
			e.refuse(w, log, http.StatusBadGateway, "gitlab_error", "kas cannot reach GitLab to authenticate the agent; try again later")
			log.Error("Authenticate agent", "error", err.Error())
		}
		return
	}
	if !e.limiter.allow(token, time.Now()) {
		w.Header().Set("Retry-After", "60")
		e.refuse(w, log, http.StatusTooManyRequests, "rate_limited",
			"too many connections for this agent token; agent.listen.connections_per_token_per_minute limits them")
		return
	}
	e.mu.Lock()
	closing := e.closing
	if !closing {
		e.handlers.Add(1)
	}
	e.mu.Unlock()
	if closing {
		e.refuse(w, log, http.StatusServiceUnavailable, "shutting_down", "kas is shutting down; reconnect to another node")
		return
	}
	defer e.handlers.Done()

	ws, err := e.upgrader.Upgrade(w, r, nil)
	if err != nil {
		e.attempts.WithLabelValues("upgrade_failed").Inc()
		log.Info("Agent WebSocket upgrade failed", "agent_id", info.AgentID, "error", err.Error())
		return // the upgrader has answered the agent
	}
	e.serveTunnel(log, ws, token, info, r.Header)
}

func (e *Endpoint) serveTunnel(log *slog.Logger, ws *websocket.Conn, token string, info *gitlab.AgentInfo, h http.Header) {
	conn := newNotifyConn(protocol.NewConn(ws))
	cc, err := e.transport.NewClientConn(conn)
	if err != nil {
		_ = conn.Close()
		e.attempts.WithLabelValues("http2_failed").Inc()
		log.Error("Start HTTP/2 over agent tunnel", "agent_id", info.AgentID, "error", err.Error())
		return
	}
	t := &Tunnel{
		cc:     cc,
		conn:   conn,
		bodies: &e.bodies,
		info: registry.TunnelInfo{
			AgentID:           info.AgentID,
			ProjectID:         info.ProjectID,
			ConnectionID:      registry.NewConnectionID(),
			AgentVersion:      headerValue(h, protocol.HeaderAgentVersion),
			AgentCommit:       headerValue(h, protocol.HeaderAgentCommit),
			PodName:           headerValue(h, protocol.HeaderPodName),
			PodNamespace:      headerValue(h, protocol.HeaderPodNamespace),
			KubernetesVersion: headerValue(h, protocol.HeaderKubernetesVersion),
			ConnectedAt:       time.Now().UTC(),
			NodeURLs:          e.opts.NodeURLs,
		},
	}
	log = log.With("agent_id", info.AgentID, "connection_id", t.info.ConnectionID)

	if !e.track(t) {
		_ = t.Close()
		return
	}
	defer e.untrack(t)
	ctx := context.Background()
	if err := e.opts.Registry.Register(ctx, t); err != nil {
		log.Error("Register agent tunnel", "error", err.Error())
		_ = t.Close()
		return
	}
	e.attempts.WithLabelValues("connected").Inc()
	e.connected.Inc()
	log.Info("Agent connected", "agent_version", t.info.AgentVersion, "pod", t.info.PodNamespace+"/"+t.info.PodName)
	if e.opts.OnConnect != nil {
		e.opts.OnConnect(*info, t)
	}

	var revoked <-chan struct{} // nil without a token checker: never ready
	var watch *tokencheck.Watch
	if e.opts.Tokens != nil {
		watch = e.opts.Tokens.Watch(token, *info)
		defer watch.Stop()
		revoked = watch.Revoked()
	}
	maxAge := time.NewTimer(jitter(e.opts.MaxConnectionAge))
	defer maxAge.Stop()
	select {
	case <-t.Done():
		log.Info("Agent disconnected")
	case <-maxAge.C:
		log.Info("Agent connection reached agent.listen.max_connection_age; closing it gracefully so the agent reconnects")
	case <-revoked:
		log.Warn("Closing the agent's tunnel: its token is no longer accepted; register the agent again and give agentk the new token",
			"error", watch.Err().Error())
	}
	// Unregister first so no new request picks this tunnel while it drains.
	if err := e.opts.Registry.Unregister(ctx, t); err != nil {
		log.Error("Unregister agent tunnel", "error", err.Error())
	}
	if e.opts.OnDisconnect != nil {
		e.opts.OnDisconnect(t)
	}
	e.connected.Dec()
	e.drain(t)
}

// drain closes t gracefully within the grace period.
func (e *Endpoint) drain(t *Tunnel) {
	ctx, cancel := context.WithTimeout(context.Background(), e.opts.GracePeriod)
	defer cancel()
	_ = t.Shutdown(ctx)
}

func (e *Endpoint) track(t *Tunnel) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closing {
		return false
	}
	e.tunnels[t] = struct{}{}
	return true
}

func (e *Endpoint) untrack(t *Tunnel) {
	e.mu.Lock()
	defer e.mu.Unlock()
	delete(e.tunnels, t)
}

// Shutdown refuses new agents, asks every tunnel to close gracefully
// (in-flight requests finish until ctx ends), and waits for the tunnels'
// handlers to return.
func (e *Endpoint) Shutdown(ctx context.Context) error {
	e.mu.Lock()
	e.closing = true
	tunnels := make([]*Tunnel, 0, len(e.tunnels))
	for t := range e.tunnels {
		tunnels = append(tunnels, t)
	}
	e.mu.Unlock()

	var wg sync.WaitGroup
	for _, t := range tunnels {
		wg.Go(func() {
			_ = e.opts.Registry.Unregister(context.Background(), t)
			_ = t.Shutdown(ctx)
		})
	}
	wg.Wait()
	done := make(chan struct{})
	go func() { e.handlers.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("wait for agent tunnels to close: %w", ctx.Err())
	}
}

func (e *Endpoint) refuse(w http.ResponseWriter, log *slog.Logger, code int, result, reason string) {
	e.attempts.WithLabelValues(result).Inc()
	log.Debug("Agent connection refused", "status", code, "reason", reason)
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(code)
	_, _ = fmt.Fprintln(w, reason)
}

// bearerToken extracts the token of an "Authorization: Bearer <token>" header.
func bearerToken(v string) (string, bool) {
	scheme, token, ok := strings.Cut(v, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	token = strings.TrimSpace(token)
	return token, token != ""
}

func subprotocolOffered(r *http.Request, want string) bool {
	for _, p := range websocket.Subprotocols(r) {
		if p == want {
			return true
		}
	}
	return false
}

// maxDescription bounds an agent-supplied description header kept for logs
// and the status page.
const maxDescription = 256

// headerValue returns an agent-supplied description header, stripped of
// invalid UTF-8 and control characters and cut to maxDescription bytes on a
// character boundary, so it is safe to log and show.
func headerValue(h http.Header, name string) string {
	v := h.Get(name)
	if len(v) > 4*maxDescription {
		v = v[:4*maxDescription] // bound the cleaning work; cut properly below
	}
	v = strings.Map(func(r rune) rune {
		if r < ' ' || r == 0x7f || r == utf8.RuneError {
			return -1
		}
		return r
	}, strings.ToValidUTF8(v, ""))
	if len(v) > maxDescription {
		n := maxDescription
		for n > 0 && !utf8.RuneStart(v[n]) {
			n--
		}
		v = v[:n]
	}
	return v
}

func jitter(d time.Duration) time.Duration {
	if d <= 0 {
		return d
	}
	spread := int64(d) / 5 // ±10%
	return d - time.Duration(spread/2) + time.Duration(rand.Int64N(spread+1))
}
