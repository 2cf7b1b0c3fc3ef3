package tunnel

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/http2"
	"golang.org/x/time/rate"

	"github.com/kasproject/kas/protocol"
	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/correlation"
	"github.com/kasproject/kas/server/gitlab"
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
	nextID    atomic.Int64

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
		limiter: newTokenLimiter(opts.ConnectionsPerTokenPerMinute),
		tunnels: map[*Tunnel]struct{}{},
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
	if !e.limiter.allow(token, time.Now()) {
		w.Header().Set("Retry-After", "60")
		e.refuse(w, log, http.StatusTooManyRequests, "rate_limited",
			"too many connections for this agent token; agent.listen.connections_per_token_per_minute limits them")
		return
	}
	info, err := e.opts.API.GetAgentInfo(r.Context(), token)
	if err != nil {
		if gitlab.Cacheable(err) {
			e.refuse(w, log, http.StatusUnauthorized, "unauthenticated", "agent token is not valid")
			log.Info("Agent refused", "error", err.Error())
		} else {
			e.refuse(w, log, http.StatusBadGateway, "gitlab_error", "kas cannot reach GitLab to authenticate the agent; try again later")
			log.Error("Authenticate agent", "error", err.Error())
		}
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
	_ = e.serveTunnel(context.Background(), log, ws, info, r.Header, false)
}

// ReceptiveConn is an agent connection kas opened itself (a receptive agent): the
// WebSocket after the handshake, and what kas knows about the agent.
type ReceptiveConn struct {
	WS *websocket.Conn
	// Agent identifies the agent: from its list of receptive agents and
	// GitLab (or the standalone file).
	Agent gitlab.AgentInfo
	// Description holds the description headers agentk answered the
	// handshake with (protocol.HeaderAgentVersion, …).
	Description http.Header
}

// ErrClosing is returned by ServeReceptive once the endpoint is shutting down.
var ErrClosing = errors.New("kas is shutting down")

// ServeReceptive runs a connection kas made to a receptive agent as a tunnel, exactly
// like one an agent made: registered, configured (OnConnect), pinged, closed
// at max_connection_age and drained on shutdown. It returns when the tunnel
// has closed: because the agent went away (an error), because ctx was
// cancelled or the tunnel reached its maximum age (closed gracefully, nil),
// or because the endpoint is shutting down (ErrClosing, before serving).
func (e *Endpoint) ServeReceptive(ctx context.Context, log *slog.Logger, c ReceptiveConn) error {
	e.mu.Lock()
	closing := e.closing
	if !closing {
		e.handlers.Add(1)
	}
	e.mu.Unlock()
	if closing {
		_ = c.WS.Close()
		return ErrClosing
	}
	defer e.handlers.Done()
	return e.serveTunnel(ctx, log, c.WS, &c.Agent, c.Description, true)
}

// serveTunnel serves ws as a tunnel until it closes, reaches its maximum
// age or ctx is cancelled; receptive says kas dialled the agent.
func (e *Endpoint) serveTunnel(ctx context.Context, log *slog.Logger, ws *websocket.Conn, info *gitlab.AgentInfo, h http.Header, receptive bool) error {
	conn := newNotifyConn(protocol.NewConn(ws))
	cc, err := e.transport.NewClientConn(conn)
	if err != nil {
		_ = conn.Close()
		e.attempts.WithLabelValues("http2_failed").Inc()
		log.Error("Start HTTP/2 over agent tunnel", "agent_id", info.AgentID, "error", err.Error())
		return fmt.Errorf("start HTTP/2 over the tunnel: %w", err)
	}
	t := &Tunnel{
		cc:     cc,
		conn:   conn,
		bodies: &e.bodies,
		info: registry.TunnelInfo{
			AgentID:           info.AgentID,
			ProjectID:         info.ProjectID,
			ConnectionID:      e.nextID.Add(1),
			AgentVersion:      headerValue(h, protocol.HeaderAgentVersion),
			AgentCommit:       headerValue(h, protocol.HeaderAgentCommit),
			PodName:           headerValue(h, protocol.HeaderPodName),
			PodNamespace:      headerValue(h, protocol.HeaderPodNamespace),
			KubernetesVersion: headerValue(h, protocol.HeaderKubernetesVersion),
			ConnectedAt:       time.Now().UTC(),
			NodeURLs:          e.opts.NodeURLs,
			Receptive:         receptive,
		},
	}
	log = log.With("agent_id", info.AgentID, "connection_id", t.info.ConnectionID)

	if !e.track(t) {
		_ = t.Close()
		return ErrClosing
	}
	defer e.untrack(t)
	if err := e.opts.Registry.Register(context.Background(), t); err != nil {
		log.Error("Register agent tunnel", "error", err.Error())
		_ = t.Close()
		return fmt.Errorf("register the tunnel: %w", err)
	}
	e.attempts.WithLabelValues("connected").Inc()
	e.connected.Inc()
	log.Info("Agent connected", "agent_version", t.info.AgentVersion, "pod", t.info.PodNamespace+"/"+t.info.PodName, "receptive", receptive)
	if e.opts.OnConnect != nil {
		e.opts.OnConnect(*info, t)
	}

	maxAge := time.NewTimer(jitter(e.opts.MaxConnectionAge))
	defer maxAge.Stop()
	var ended error
	select {
	case <-t.Done():
		log.Info("Agent disconnected")
		ended = errors.New("the tunnel closed: the agent went away or stopped answering pings")
	case <-maxAge.C:
		log.Info("Agent connection reached agent.listen.max_connection_age; closing it gracefully so the agent reconnects")
	case <-ctx.Done():
		log.Info("Closing the agent's connection gracefully", "reason", context.Cause(ctx).Error())
	}
	// Unregister first so no new request picks this tunnel while it drains.
	if err := e.opts.Registry.Unregister(context.Background(), t); err != nil {
		log.Error("Unregister agent tunnel", "error", err.Error())
	}
	if e.opts.OnDisconnect != nil {
		e.opts.OnDisconnect(t)
	}
	e.connected.Dec()
	e.drain(t)
	return ended
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

// tokenLimiter limits connections per agent token. Tokens are kept as
// SHA-256 digests so the limiter never holds a secret.
type tokenLimiter struct {
	perMinute int
	mu        sync.Mutex
	limiters  map[[sha256.Size]byte]*limiterEntry
	lastSweep time.Time
}

type limiterEntry struct {
	limiter *rate.Limiter
	seen    time.Time
}

func newTokenLimiter(perMinute int) *tokenLimiter {
	return &tokenLimiter{perMinute: perMinute, limiters: map[[sha256.Size]byte]*limiterEntry{}}
}

func (l *tokenLimiter) allow(token string, now time.Time) bool {
	if l.perMinute <= 0 {
		return true
	}
	key := sha256.Sum256([]byte(token))
	l.mu.Lock()
	defer l.mu.Unlock()
	// Forget tokens idle for two minutes; their buckets are full again anyway.
	if now.Sub(l.lastSweep) > time.Minute {
		for k, ent := range l.limiters {
			if now.Sub(ent.seen) > 2*time.Minute {
				delete(l.limiters, k)
			}
		}
		l.lastSweep = now
	}
	ent := l.limiters[key]
	if ent == nil {
		ent = &limiterEntry{limiter: rate.NewLimiter(rate.Limit(float64(l.perMinute)/60), l.perMinute)}
		l.limiters[key] = ent
	}
	ent.seen = now
	return ent.limiter.AllowN(now, 1)
}
