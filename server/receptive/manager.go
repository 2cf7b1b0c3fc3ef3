// Package receptive is kas's side of receptive agents: agents in clusters
// that cannot reach kas but that kas can reach. kas gets the list of them
// and how to reach each (URL, CA certificate, TLS name, JWT private key or
// mTLS client certificate) from GitLab's internal API or the standalone
// file, polled every agent.receptive.poll_period; dials each agent it should
// hold, verifies agentk's certificate, authenticates itself, and serves the
// connection as a tunnel through server/tunnel, exactly like one an agent
// made (registration, configuration push, pings, max age, drain). Failed
// dials are retried with jittered exponential backoff and logged once per
// cause, with a hint.
//
// On a single node the node holds every receptive agent. With several
// nodes, each agent is held by agent.receptive.connections_per_agent nodes
// chosen by rendezvous hashing and confirmed with leases in Redis (see
// lease.go); the other nodes reach it through the holders over the private
// API, as for any agent.
package receptive

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kasproject/kas/internal/backoff"
	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/tunnel"
)

// Source lists the receptive agents: *gitlab.Client (GitLab's internal
// API) or *standalone.Backend (the standalone file).
type Source interface {
	GetReceptiveAgents(ctx context.Context) ([]gitlab.ReceptiveAgent, error)
}

// Server serves a connection kas made as a tunnel: *tunnel.Endpoint.
type Server interface {
	ServeReceptive(ctx context.Context, log *slog.Logger, c tunnel.ReceptiveConn) error
}

// Defaults for the zero values of Options.
const (
	DefaultPollPeriod  = time.Minute
	DefaultDialTimeout = 10 * time.Second
	DefaultMinBackoff  = time.Second
	DefaultMaxBackoff  = time.Minute
	// stableConnection is how long a connection must have lasted for the
	// next dial to start again from the shortest delay.
	stableConnection = 10 * time.Second
)

// Options configure a Manager.
type Options struct {
	// Source lists the receptive agents; required.
	Source Source
	// API identifies an agent by the token agentk hands over; required.
	API gitlab.API
	// AgentByID identifies an agent by its ID where kas can (the
	// standalone file); nil with GitLab, which has no such call.
	AgentByID func(ctx context.Context, id int64) (*gitlab.AgentInfo, error)
	// Server serves each connection as a tunnel; required.
	Server Server
	// Leases share the agents among nodes; nil on a single node, which
	// holds every agent.
	Leases *Leases
	// TLS is the client TLS for agents without a CA certificate of their
	// own: the system pool and SSL_CERT_DIR. Nil means Go's defaults.
	TLS *tls.Config
	// PollPeriod is agent.receptive.poll_period (DefaultPollPeriod).
	PollPeriod time.Duration
	// DialTimeout bounds connecting, the handshake and identifying the
	// agent (DefaultDialTimeout).
	DialTimeout time.Duration
	// MinBackoff and MaxBackoff bound the jittered exponential delay
	// between dials of one agent (DefaultMinBackoff, DefaultMaxBackoff).
	MinBackoff, MaxBackoff time.Duration
	// Version is kas's version, sent as User-Agent kas/<Version>.
	Version string
	Logger  *slog.Logger
	// Registerer receives the metrics; nil leaves them unregistered.
	Registerer prometheus.Registerer
}

// Manager keeps this node connected to the receptive agents it holds. Run
// it with Run; it stops when Run's context ends.
type Manager struct {
	source      Source
	api         gitlab.API
	agentByID   func(context.Context, int64) (*gitlab.AgentInfo, error)
	server      Server
	leases      *Leases
	baseTLS     *tls.Config
	poll        time.Duration
	dialTimeout time.Duration
	minBackoff  time.Duration
	maxBackoff  time.Duration
	userAgent   string
	log         *slog.Logger
	metrics     *metrics

	writeBuffers  sync.Pool      // WebSocket write buffers, shared by every connection
	warnedNoToken sync.Map       // agent IDs warned about a missing token
	draining      sync.WaitGroup // connectors closing their connection gracefully

	// Owned by Run's goroutine.
	specs      map[int64]*spec // the listed agents
	held       map[int64]bool  // the agents this node holds
	connectors map[int64]*connector
	// dialErrs are the agents' last dial failures, kept across
	// connectors (a changed configuration) so each cause is logged once.
	dialErrs map[int64]*causeLog
	listErr  causeLog // the last failure to get the list
	leaseErr causeLog // the last failure to sync leases
	badSpecs map[int64]string
}

// NewManager checks opts.
func NewManager(opts Options) (*Manager, error) {
	if opts.Source == nil || opts.API == nil || opts.Server == nil {
		return nil, errors.New("receptive agents: Source, API and Server are required")
	}
	if opts.PollPeriod < 0 || opts.DialTimeout < 0 || opts.MinBackoff < 0 || opts.MaxBackoff < 0 {
		return nil, errors.New("receptive agents: durations must not be negative")
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	base := opts.TLS
	if base == nil {
		base = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	m := &Manager{
		source:      opts.Source,
		api:         opts.API,
		agentByID:   opts.AgentByID,
		server:      opts.Server,
		leases:      opts.Leases,
		baseTLS:     base,
		poll:        orDefault(opts.PollPeriod, DefaultPollPeriod),
		dialTimeout: orDefault(opts.DialTimeout, DefaultDialTimeout),
		minBackoff:  orDefault(opts.MinBackoff, DefaultMinBackoff),
		maxBackoff:  orDefault(opts.MaxBackoff, DefaultMaxBackoff),
		userAgent:   "kas",
		log:         log,
		specs:       map[int64]*spec{},
		held:        map[int64]bool{},
		connectors:  map[int64]*connector{},
		dialErrs:    map[int64]*causeLog{},
		badSpecs:    map[int64]string{},
	}
	m.maxBackoff = max(m.maxBackoff, m.minBackoff)
	if opts.Version != "" {
		m.userAgent += "/" + opts.Version
	}
	var err error
	if m.metrics, err = newMetrics(opts.Registerer, opts.Leases); err != nil {
		return nil, err
	}
	return m, nil
}

func orDefault(d, def time.Duration) time.Duration {
	if d == 0 {
		return def
	}
	return d
}

// Run polls the list of receptive agents, shares them with the other
// nodes and keeps connected to those this node holds, until ctx ends. Then
// it closes every connection gracefully and, with several nodes, gives up
// its leases so the other nodes take over at once.
func (m *Manager) Run(ctx context.Context) {
	m.log.Info("Receptive agents enabled: kas dials the agents listed by GitLab or the standalone file", "poll_period", m.poll.String(), "several_nodes", m.leases != nil)
	poll := time.NewTimer(0)
	defer poll.Stop()
	var leaseTick <-chan time.Time
	if m.leases != nil {
		t := time.NewTicker(m.leases.SyncInterval())
		defer t.Stop()
		leaseTick = t.C
	}
	for {
		select {
		case <-ctx.Done():
			m.stop()
			return
		case <-poll.C:
			if m.refreshList(ctx) && m.leases != nil {
				// New agents get their holders now, not a sync later.
				m.syncLeases(ctx)
			}
			poll.Reset(jitter(m.poll))
		case <-leaseTick:
			m.syncLeases(ctx)
		}
		m.reconcile(ctx)
	}
}

// refreshList gets the list of receptive agents and reports whether agents
// were added. When it cannot, the agents listed before stay: nothing is
// dropped because GitLab is down.
func (m *Manager) refreshList(ctx context.Context) (added bool) {
	ctx, cancel := context.WithTimeout(ctx, m.dialTimeout)
	defer cancel()
	list, err := m.source.GetReceptiveAgents(ctx)
	if err != nil {
		if ctx.Err() != nil && errors.Is(err, context.Canceled) {
			return false
		}
		hint := "kas keeps the receptive agents it knows and asks again in " + m.poll.String()
		if errors.Is(err, gitlab.ErrNotFound) {
			hint = "this GitLab serves no receptive agents list (it needs GitLab EE Ultimate 17.4 or later); set agent.receptive.enabled to false if you do not use them"
		}
		m.listErr.log(m.log, "Get the list of receptive agents", err, hint)
		m.metrics.polls.WithLabelValues("failed").Inc()
		return false
	}
	m.listErr.ok(m.log, "Got the list of receptive agents again")
	m.metrics.polls.WithLabelValues("ok").Inc()
	specs := make(map[int64]*spec, len(list))
	for _, ra := range list {
		s, err := parseSpec(ra, m.baseTLS)
		if err != nil {
			// Keep an agent's last good configuration rather than drop it.
			if msg := err.Error(); m.badSpecs[ra.ID] != msg {
				m.badSpecs[ra.ID] = msg
				m.log.Error("Receptive agent's URL configuration is not usable; fix it in GitLab (or the standalone file)", "agent_id", ra.ID, "error", msg)
			}
			if old := m.specs[ra.ID]; old != nil {
				specs[ra.ID] = old
			}
			continue
		}
		delete(m.badSpecs, ra.ID)
		if _, dup := specs[s.id]; dup {
			m.log.Warn("Receptive agent listed twice; kas uses the first URL configuration", "agent_id", s.id)
			continue
		}
		specs[s.id] = s
	}
	var gone, listed []int64
	for id := range m.specs {
		if specs[id] == nil {
			gone = append(gone, id)
			delete(m.dialErrs, id)
		}
	}
	for id := range specs {
		if m.specs[id] == nil {
			listed = append(listed, id)
		}
	}
	if len(listed) > 0 {
		m.log.Info("Receptive agents listed", "count", len(listed), "agent_ids", idList(listed))
	}
	if len(gone) > 0 {
		m.log.Info("Receptive agents no longer listed; closing kas's connections to them", "count", len(gone), "agent_ids", idList(gone))
	}
	added = len(listed) > 0
	m.specs = specs
	m.metrics.listed.Set(float64(len(specs)))
	if m.leases == nil {
		m.held = map[int64]bool{}
		for id := range specs {
			m.held[id] = true
		}
	}
	return added
}

// syncLeases renews this node's leases. When Redis cannot be reached the
// node keeps what it holds: no other node can take it meanwhile.
func (m *Manager) syncLeases(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, m.leases.SyncInterval())
	defer cancel()
	ids := slices.Sorted(maps.Keys(m.specs))
	held, err := m.leases.Sync(ctx, ids,
		func(id int64) bool { return m.held[id] },
		func(id int64) bool { c := m.connectors[id]; return c != nil && c.connected.Load() },
	)
	if err != nil {
		if ctx.Err() == nil || !errors.Is(err, context.Canceled) {
			m.leaseErr.log(m.log, "Renew leases on receptive agents", err, "this node keeps the agents it holds until Redis answers again")
		}
		return
	}
	m.leaseErr.ok(m.log, "Renewed leases on receptive agents again")
	var lost, taken []int64
	for id := range m.held {
		if !held[id] && m.specs[id] != nil {
			lost = append(lost, id)
		}
	}
	for id := range held {
		if !m.held[id] {
			taken = append(taken, id)
		}
	}
	if len(lost) > 0 || len(taken) > 0 {
		m.log.Info("This node's share of the receptive agents changed", "holds", len(held),
			"took", idList(taken), "gave_up_to_other_nodes", idList(lost))
	}
	// Leases on agents no longer listed lapse; give them up at once.
	var unlisted []int64
	for id := range m.held {
		if m.specs[id] == nil {
			unlisted = append(unlisted, id)
		}
	}
	if len(unlisted) > 0 {
		if err := m.leases.Release(ctx, unlisted, false); err != nil {
			m.log.Warn("Release leases on receptive agents no longer listed; they lapse by themselves", "error", err.Error())
		}
	}
	m.held = held
}

// reconcile makes the connectors match the agents this node holds: it
// starts the missing ones, restarts those whose configuration changed,
// and stops the rest.
func (m *Manager) reconcile(ctx context.Context) {
	for id, c := range m.connectors {
		s := m.specs[id]
		if s == nil || !m.held[id] || s.version != c.spec.version {
			// The connection drains in the background; a changed agent's
			// new connection need not wait for it.
			c.cancel(errStopped)
			m.draining.Go(func() { <-c.done })
			delete(m.connectors, id)
		}
	}
	for id := range m.held {
		s := m.specs[id]
		if s == nil || m.connectors[id] != nil {
			continue
		}
		failures := m.dialErrs[id]
		if failures == nil {
			failures = &causeLog{}
			m.dialErrs[id] = failures
		}
		c := newConnector(m, s, failures)
		m.connectors[id] = c
		// Stopped explicitly, with the reason, by reconcile or stop.
		c.start(context.WithoutCancel(ctx))
	}
	m.metrics.held.Set(float64(len(m.connectors)))
}

// stop closes every connection gracefully and gives up the leases.
func (m *Manager) stop() {
	for _, c := range m.connectors {
		c.cancel(errShuttingDown)
		m.draining.Go(func() { <-c.done })
	}
	m.draining.Wait()
	if m.leases != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := m.leases.Release(ctx, slices.Collect(maps.Keys(m.held)), true); err != nil {
			m.log.Warn("Give up leases on receptive agents; the other nodes take over when they lapse", "error", err.Error())
		}
	}
	m.log.Info("Receptive agents: stopped")
}

// idList names agents in a log line: sorted, at most 20, then how many more.
func idList(ids []int64) string {
	const most = 20
	slices.Sort(ids)
	var b strings.Builder
	for i, id := range ids {
		if i == most {
			fmt.Fprintf(&b, " …and %d more", len(ids)-most)
			break
		}
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(strconv.FormatInt(id, 10))
	}
	return b.String()
}

// jitter spreads d by ±10% so nodes started together do not poll together.
func jitter(d time.Duration) time.Duration {
	spread := int64(d) / 5
	if spread <= 0 {
		return d
	}
	return d - time.Duration(spread/2) + time.Duration(rand.Int64N(spread+1))
}

// causeLog logs a recurring failure when it starts and when its cause
// changes, and once more when it ends, instead of at every retry.
type causeLog struct {
	mu   sync.Mutex
	last string
}

func (c *causeLog) log(log *slog.Logger, msg string, err error, hint string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	text := err.Error()
	if text == c.last {
		log.Debug(msg, "error", text)
		return
	}
	c.last = text
	log.Warn(msg, "error", text, "hint", hint)
}

func (c *causeLog) ok(log *slog.Logger, msg string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.last != "" {
		log.Info(msg)
	}
	c.last = ""
}

// connector keeps one connection to one agent: it dials, serves the
// tunnel until it ends, and dials again with backoff, until stopped.
type connector struct {
	m         *Manager
	spec      *spec
	log       *slog.Logger
	connected atomic.Bool
	cancel    context.CancelCauseFunc
	done      chan struct{}
	// failures is the agent's, shared with the connector a changed
	// configuration replaces this one with.
	failures *causeLog
}

func newConnector(m *Manager, s *spec, failures *causeLog) *connector {
	return &connector{m: m, spec: s, log: m.log.With("agent_id", s.id, "url", s.rawURL), done: make(chan struct{}), failures: failures}
}

func (c *connector) start(ctx context.Context) {
	ctx, c.cancel = context.WithCancelCause(ctx)
	go func() {
		defer close(c.done)
		c.run(ctx)
	}()
}

// Why a connector stops: the cause its connection is closed with.
var (
	errStopped      = errors.New("this node no longer holds the receptive agent, or its configuration changed")
	errShuttingDown = errors.New("kas is shutting down")
)

func (c *connector) run(ctx context.Context) {
	b := backoff.Backoff{Min: c.m.minBackoff, Max: c.m.maxBackoff}
	for ctx.Err() == nil {
		start := time.Now()
		err := c.connectAndServe(ctx)
		if ctx.Err() != nil || errors.Is(err, tunnel.ErrClosing) {
			return
		}
		if time.Since(start) >= stableConnection {
			b.Reset()
		}
		t := time.NewTimer(b.Next())
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// connectAndServe makes one connection and serves it until it ends.
func (c *connector) connectAndServe(ctx context.Context) error {
	m, s := c.m, c.spec
	dialCtx, cancel := context.WithTimeout(ctx, m.dialTimeout)
	hs, err := m.dial(dialCtx, s)
	var info *gitlab.AgentInfo
	if err == nil {
		if info, err = m.identify(dialCtx, s, hs.answer); err != nil {
			_ = hs.ws.Close()
		}
	}
	cancel()
	if err != nil {
		if ctx.Err() != nil {
			return err
		}
		var de *dialError
		if !errors.As(err, &de) {
			de = &dialError{cause: causeOther, err: err}
		}
		m.metrics.dials.WithLabelValues(de.cause).Inc()
		c.failures.log(c.log, "Connect to receptive agent", de, de.hint)
		return err
	}
	m.metrics.dials.WithLabelValues("connected").Inc()
	c.failures.ok(c.log, "Connected to receptive agent again")
	c.connected.Store(true)
	m.metrics.connected.Inc()
	defer func() {
		c.connected.Store(false)
		m.metrics.connected.Dec()
	}()
	// The tunnel adds agent_id to its logs itself.
	return m.server.ServeReceptive(ctx, m.log.With("url", s.rawURL), tunnel.ReceptiveConn{WS: hs.ws, Agent: *info, Description: hs.answer})
}

// metrics are the receptive agents' Prometheus metrics.
type metrics struct {
	listed    prometheus.Gauge
	held      prometheus.Gauge
	connected prometheus.Gauge
	dials     *prometheus.CounterVec
	polls     *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer, leases *Leases) (*metrics, error) {
	m := &metrics{
		listed: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kas_receptive_agents",
			Help: "Receptive agents listed by GitLab (or the standalone file).",
		}),
		held: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kas_receptive_agents_held",
			Help: "Receptive agents this node holds: it keeps a connection to each.",
		}),
		connected: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kas_receptive_tunnels_connected",
			Help: "Tunnels to receptive agents this node dialled that are up (also counted in kas_tunnels_connected).",
		}),
		dials: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kas_receptive_dials_total",
			Help: "Connections kas opened to receptive agents, by result: connected, or why not (unreachable, tls_name, unknown_ca, tls, refused, protocol, identity, other).",
		}, []string{"result"}),
		polls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kas_receptive_list_polls_total",
			Help: "Times kas asked for the list of receptive agents, by result (ok, failed).",
		}, []string{"result"}),
	}
	for _, r := range []string{"connected", causeUnreachable, causeTLSName, causeUnknownCA, causeTLS, causeRefused, causeProtocol, causeIdentity, causeOther} {
		m.dials.WithLabelValues(r)
	}
	if reg == nil {
		return m, nil
	}
	collectors := []prometheus.Collector{m.listed, m.held, m.connected, m.dials, m.polls}
	if leases != nil {
		collectors = append(collectors, prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "kas_receptive_lease_redis_commands_total",
			Help: "Redis commands sent to share receptive agents among nodes (leases and node records).",
		}, func() float64 { return float64(leases.Commands()) }))
	}
	for _, c := range collectors {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register receptive agent metrics: %w", err)
		}
	}
	return m, nil
}
