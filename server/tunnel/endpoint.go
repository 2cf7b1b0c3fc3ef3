package tunnel

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
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
	// GitLabAgentk, if set, serves GitLab's own agentk: a WebSocket
	// offering subprotocol GitLabSubprotocol is upgraded without a token
	// (GitLab's agentk sends it with each gRPC call inside) and handed to
	// it as a byte stream.
	GitLabAgentk ConnServer
}

// GitLabSubprotocol is the WebSocket subprotocol GitLab's agentk offers:
// gRPC (HTTP/2) runs inside the WebSocket's binary messages.
const GitLabSubprotocol = "ws-tunnel"

// ConnServer serves a connection that carries another protocol.
type ConnServer interface {
	// ServeConn serves c until it closes; it owns c.
	ServeConn(c net.Conn)
}

// Endpoint serves agents' WebSocket connections on /-/kubernetes-agent/.
type Endpoint struct {
	opts      Options
	upgrader  websocket.Upgrader
	transport *http2.Transport
	bodies    protocol.BulkBodies
	limiter   *tokenLimiter
	refusals  *refusalLimiter
	// gitlabUpgrader upgrades GitLab agentk's WebSockets.
	gitlabUpgrader websocket.Upgrader

	mu       sync.Mutex
	closing  bool
	tunnels  map[Managed]struct{}
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
		gitlabUpgrader: websocket.Upgrader{
			Subprotocols:    []string{GitLabSubprotocol},
			WriteBufferPool: &sync.Pool{},
			WriteBufferSize: 64 << 10,
			CheckOrigin:     func(*http.Request) bool { return true },
		},
		limiter:  newTokenLimiter(opts.ConnectionsPerTokenPerMinute),
		refusals: newRefusalLimiter(refusedPerAddressPerMinute, maxLimitedAddresses),
		tunnels:  map[Managed]struct{}{},
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
// GitLab's agentk (subprotocol GitLabSubprotocol) sends its token only
// inside the tunnel, with every gRPC call; Options.GitLabAgentk checks it
// there, before that connection becomes a tunnel.
func (e *Endpoint) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	log := e.opts.Logger.With("correlation_id", correlation.FromContext(r.Context()))
	if !websocket.IsWebSocketUpgrade(r) {
		e.refuse(w, log, http.StatusBadRequest, "bad_request",
			"this is the agent endpoint: agentk connects here with a WebSocket upgrade")
		return
	}
	if e.opts.GitLabAgentk != nil && !subprotocolOffered(r, protocol.Subprotocol) && subprotocolOffered(r, GitLabSubprotocol) {
		e.serveGitLabAgentk(w, r, log)
		return
	}
	token, ok := BearerToken(r.Header.Get("Authorization"))
	if !ok {
		e.refuse(w, log, http.StatusUnauthorized, "unauthenticated",
			"missing agent token: send Authorization: Bearer <agent token>")
		return
	}
	if !subprotocolOffered(r, protocol.Subprotocol) {
		e.refuse(w, log, http.StatusBadRequest, "bad_protocol",
			fmt.Sprintf("unsupported tunnel protocol %q: this kas speaks %s (kas's agentk) and %s (GitLab's agentk); upgrade agentk",
				r.Header.Get("Sec-WebSocket-Protocol"), protocol.Subprotocol, GitLabSubprotocol))
		return
	}
	info, refusal := e.Authenticate(r.Context(), middleware.ClientAddressOf(r), token)
	if refusal != nil {
		if refusal.RetryAfter != "" {
			w.Header().Set("Retry-After", refusal.RetryAfter)
		}
		e.writeRefusal(w, refusal)
		return
	}
	if !e.begin() {
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
	_ = e.serveTunnel(context.Background(), log, ws, token, info, r.Header, false)
}

// serveGitLabAgentk upgrades GitLab agentk's WebSocket and hands the byte
// stream to Options.GitLabAgentk.
func (e *Endpoint) serveGitLabAgentk(w http.ResponseWriter, r *http.Request, log *slog.Logger) {
	if !e.begin() {
		e.refuse(w, log, http.StatusServiceUnavailable, "shutting_down", "kas is shutting down; reconnect to another node")
		return
	}
	defer e.handlers.Done()
	ws, err := e.gitlabUpgrader.Upgrade(w, r, nil)
	if err != nil {
		e.attempts.WithLabelValues("upgrade_failed").Inc()
		log.Info("GitLab agentk WebSocket upgrade failed", "error", err.Error())
		return
	}
	e.opts.GitLabAgentk.ServeConn(protocol.NewConn(ws))
}

// Refusal is why an agent may not connect: its HTTP status, the reason to
// tell it, and the result label of kas_agent_connection_attempts_total.
type Refusal struct {
	Code   int
	Result string
	Reason string
	// RetryAfter, if set, is the Retry-After value (seconds) to send.
	RetryAfter string
}

func (r *Refusal) Error() string { return r.Reason }

// Authenticate identifies the agent owning token, the same way for every
// kind of agentk. Made-up tokens are limited per client address (clientAddr)
// before GitLab is asked; real ones per token once GitLab has accepted them,
// so nothing a caller makes up gets a limiter entry of its own. A refusal is
// counted and logged here; the caller only reports it.
func (e *Endpoint) Authenticate(ctx context.Context, clientAddr, token string) (*gitlab.AgentInfo, *Refusal) {
	log := e.opts.Logger.With("correlation_id", correlation.FromContext(ctx))
	if e.refusals.blocked(clientAddr, time.Now()) {
		return nil, e.refusal(log, &Refusal{Code: http.StatusTooManyRequests, Result: "rate_limited", RetryAfter: "60",
			Reason: fmt.Sprintf("too many connection attempts with agent tokens kas does not accept from this address (%s); wait a minute, and check the agent's token", clientAddr)})
	}
	info, err := e.opts.API.GetAgentInfo(ctx, token)
	if err == nil && info.AgentID <= 0 {
		// The GitLab client refuses such an answer itself; any other
		// backend gets the same check, so no agent runs as agent 0.
		err = &gitlab.Error{Op: "get agent info", Err: gitlab.ErrContract,
			Message: fmt.Sprintf("the answer names agent %d; an agent ID is positive", info.AgentID)}
	}
	if err != nil {
		switch {
		case gitlab.Cacheable(err):
			e.refusals.refused(clientAddr, time.Now())
			log.Info("Agent refused", "client_address", clientAddr, "error", err.Error())
			return nil, e.refusal(log, &Refusal{Code: http.StatusUnauthorized, Result: "unauthenticated", Reason: "agent token is not valid"})
		case errors.Is(err, gitlab.ErrContract):
			log.Error("Authenticate agent: GitLab contract error", "error", err.Error())
			return nil, e.refusal(log, &Refusal{Code: http.StatusBadGateway, Result: "gitlab_error",
				Reason: "GitLab's answer about this agent token cannot be used (a GitLab contract error); the kas log has the details"})
		case errors.Is(err, gitlab.ErrRedirect):
			log.Error("Authenticate agent", "error", err.Error())
			return nil, e.refusal(log, &Refusal{Code: http.StatusBadGateway, Result: "gitlab_error",
				Reason: "GitLab redirected kas's call to authenticate the agent, and kas does not follow GitLab's redirects; the kas log says where to"})
		default:
			log.Error("Authenticate agent", "error", err.Error())
			return nil, e.refusal(log, &Refusal{Code: http.StatusBadGateway, Result: "gitlab_error",
				Reason: "kas cannot reach GitLab to authenticate the agent; try again later"})
		}
	}
	if !e.limiter.allow(token, time.Now()) {
		return nil, e.refusal(log, &Refusal{Code: http.StatusTooManyRequests, Result: "rate_limited", RetryAfter: "60",
			Reason: "too many connections for this agent token; agent.listen.connections_per_token_per_minute limits them"})
	}
	return info, nil
}

func (e *Endpoint) refusal(log *slog.Logger, r *Refusal) *Refusal {
	e.attempts.WithLabelValues(r.Result).Inc()
	log.Debug("Agent connection refused", "status", r.Code, "reason", r.Reason)
	return r
}

// begin accounts for one more connection handler unless the endpoint is
// shutting down; the caller calls e.handlers.Done when it returns.
func (e *Endpoint) begin() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closing {
		return false
	}
	e.handlers.Add(1)
	return true
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
	if !e.begin() {
		_ = c.WS.Close()
		return ErrClosing
	}
	defer e.handlers.Done()
	// A receptive agent authenticated kas, not the other way round: there
	// is no agent token to re-check while it is connected.
	return e.serveTunnel(ctx, log, c.WS, "", &c.Agent, c.Description, true)
}

// serveTunnel serves ws as a tunnel (see serve) until it closes, reaches
// its maximum age, its token is refused or ctx is cancelled; receptive says
// kas dialled the agent.
func (e *Endpoint) serveTunnel(ctx context.Context, log *slog.Logger, ws *websocket.Conn, token string, info *gitlab.AgentInfo, h http.Header, receptive bool) error {
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
			ConnectionID:      registry.NewConnectionID(),
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
	return e.serve(ctx, log, t, token, *info)
}

// drain closes t gracefully within the grace period.
func (e *Endpoint) drain(t Managed) {
	ctx, cancel := context.WithTimeout(context.Background(), e.opts.GracePeriod)
	defer cancel()
	_ = t.Shutdown(ctx)
}

func (e *Endpoint) track(t Managed) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closing {
		return false
	}
	e.tunnels[t] = struct{}{}
	return true
}

func (e *Endpoint) untrack(t Managed) {
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
	tunnels := make([]Managed, 0, len(e.tunnels))
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
	e.writeRefusal(w, e.refusal(log, &Refusal{Code: code, Result: result, Reason: reason}))
}

func (e *Endpoint) writeRefusal(w http.ResponseWriter, r *Refusal) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(r.Code)
	_, _ = fmt.Fprintln(w, r.Reason)
}

// BearerToken extracts the token of an "Authorization: Bearer <token>" header.
func BearerToken(v string) (string, bool) {
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
