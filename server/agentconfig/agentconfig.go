// Package agentconfig keeps every connected agent's configuration current:
// it fetches .gitlab/agents/<agent name>/config.yaml from the agent's
// configuration project, validates it, sends it to each of the agent's
// connections (agentk replicas), and reports it to GitLab, which derives
// the agent's ci_access and user_access authorizations from it.
//
// An agent's file is fetched once however many replicas it has: when its
// first connection arrives, every poll period (with ±10% jitter so agents
// that connected together do not poll together), and at once when GitLab
// reports a push to its configuration project. A replica that connects
// later gets the configuration already known, without a fetch. A
// configuration that did not change is neither sent nor reported again.
//
// A missing file is an empty configuration, as in GitLab. A file that is
// too large or does not parse is refused: the agent keeps its last good
// configuration until the file is fixed. Both are logged as
// "Config: failed to fetch", with agent_id and the reason (and the line,
// for a parse error) in error, the text GitLab's troubleshooting guide shows.
package agentconfig

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/kasproject/kas/protocol"
	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/agentyaml"
	"github.com/kasproject/kas/server/gitlab"
)

// Defaults for the zero values of Options.
const (
	// DefaultPollPeriod is agent.configuration.poll_period's default.
	DefaultPollPeriod = 300 * time.Second
	// DefaultMaxConfigurationFileSize is
	// agent.configuration.max_configuration_file_size's default.
	DefaultMaxConfigurationFileSize = 128 << 10
	// DefaultFetchers is how many agents' configurations are fetched (and
	// sent and reported) at once.
	DefaultFetchers = 10
	// DefaultRetryPeriod is the wait after a failure before trying again;
	// it doubles with each further failure, up to the poll period.
	DefaultRetryPeriod = 10 * time.Second
	// DefaultTimeout bounds each fetch, each send to an agent connection
	// and each report to GitLab.
	DefaultTimeout = 30 * time.Second
)

// ConfigFilePath is where an agent's configuration file lives in its
// configuration project's repository.
func ConfigFilePath(agentName string) string {
	return ".gitlab/agents/" + agentName + "/config.yaml"
}

// Source reads files from configuration projects' repositories:
// *gitlab.Client (GitLab's repository files API) or *standalone.Backend
// (the standalone repository directories).
type Source interface {
	// GetRepositoryFile returns the content of filePath in the project's
	// repository at ref. A missing file is an error wrapping
	// gitlab.ErrFileNotFound.
	GetRepositoryFile(ctx context.Context, projectID int64, ref, filePath string) ([]byte, error)
}

// Options configure a Manager.
type Options struct {
	// Source reads configuration files; required.
	Source Source
	// Reporter receives each new configuration, as JSON, for GitLab's
	// authorizations: the *gitlab.Client. Nil in standalone mode, where
	// the backend reads the files itself.
	Reporter gitlab.ConfigurationReporter
	// Logger receives fetch failures and changes; nil discards them.
	Logger *slog.Logger

	// PollPeriod is agent.configuration.poll_period (DefaultPollPeriod).
	PollPeriod time.Duration
	// MaxConfigurationFileSize is
	// agent.configuration.max_configuration_file_size in bytes
	// (DefaultMaxConfigurationFileSize).
	MaxConfigurationFileSize int64
	// Fetchers bounds the agents processed at once (DefaultFetchers).
	Fetchers int
	// RetryPeriod is the first wait after a failed fetch, send or report
	// (DefaultRetryPeriod).
	RetryPeriod time.Duration
	// Timeout bounds each fetch, send and report (DefaultTimeout).
	Timeout time.Duration
}

// Manager tracks connected agents and keeps their configurations current.
// It is safe for concurrent use. NewManager starts its workers; Close stops
// them and every goroutine the manager started.
//
// Wire it to the tunnel endpoint (tunnel.Options.OnConnect = m.Connect,
// OnDisconnect = m.Disconnect) and to GitLab's push notifications
// (NotifyPush).
type Manager struct {
	source   Source
	reporter gitlab.ConfigurationReporter
	log      *slog.Logger
	poll     time.Duration
	retry    time.Duration
	timeout  time.Duration
	maxSize  int64

	// ctx is cancelled by Close; every fetch, send and report runs under it.
	ctx    context.Context
	cancel context.CancelFunc
	// wake tells an idle worker that the queue has work.
	wake chan struct{}
	wg   sync.WaitGroup

	mu     sync.Mutex
	closed bool
	agents map[int64]*agentState // connected agents by ID
	conns  map[registry.Tunnel]*connState
	queue  []*agentState // agents waiting for a worker, each at most once
}

// agentState is one connected agent. Fields are guarded by Manager.mu.
type agentState struct {
	info  gitlab.AgentInfo // from its latest connection
	conns map[*connState]struct{}
	timer *time.Timer // the next poll, or retry after a failure

	current *config // last good configuration; nil before the first
	posted  *config // last configuration GitLab accepted
	// failures counts consecutive rounds with a failure, for the backoff.
	failures int

	wanted bool // a fetch is due
	queued bool // in Manager.queue
	busy   bool // a worker is processing it
	gone   bool // its last connection went away; forgotten
}

// connState is one connection of an agent.
type connState struct {
	tunnel registry.Tunnel
	agent  *agentState
	gone   bool // guarded by Manager.mu

	// send serializes sends over this connection, so an older
	// configuration can never arrive after a newer one.
	send sync.Mutex
	sent *config // guarded by send: what the agent last accepted
}

// config is one version of an agent's configuration; never modified.
type config struct {
	yaml []byte // the file as written, which agentk receives
	// json is the same document as JSON (keys sorted): what GitLab
	// receives, and what tells versions apart, so a change to a comment
	// alone is not a new configuration.
	json json.RawMessage
}

// NewManager checks opts and starts the manager's workers.
func NewManager(opts Options) (*Manager, error) {
	if opts.Source == nil {
		return nil, errors.New("agent configuration manager: Options.Source is required")
	}
	if opts.PollPeriod < 0 || opts.RetryPeriod < 0 || opts.Timeout < 0 || opts.MaxConfigurationFileSize < 0 || opts.Fetchers < 0 {
		return nil, fmt.Errorf("agent configuration manager: negative option in poll period %s, retry period %s, timeout %s, max file size %d, fetchers %d",
			opts.PollPeriod, opts.RetryPeriod, opts.Timeout, opts.MaxConfigurationFileSize, opts.Fetchers)
	}
	logger := opts.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	m := &Manager{
		source:   opts.Source,
		reporter: opts.Reporter,
		log:      logger,
		poll:     orDefault(opts.PollPeriod, DefaultPollPeriod),
		retry:    orDefault(opts.RetryPeriod, DefaultRetryPeriod),
		timeout:  orDefault(opts.Timeout, DefaultTimeout),
		maxSize:  orDefault(opts.MaxConfigurationFileSize, DefaultMaxConfigurationFileSize),
		ctx:      ctx,
		cancel:   cancel,
		wake:     make(chan struct{}, 1),
		agents:   make(map[int64]*agentState),
		conns:    make(map[registry.Tunnel]*connState),
	}
	workers := orDefault(opts.Fetchers, DefaultFetchers)
	m.wg.Add(workers)
	for range workers {
		go m.work()
	}
	return m, nil
}

func orDefault[T time.Duration | int64 | int](v, def T) T {
	if v == 0 {
		return def
	}
	return v
}

// Close stops polling, cancels fetches and sends in flight, and waits for
// every goroutine of the manager. Later calls to the manager do nothing.
func (m *Manager) Close() {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return
	}
	m.closed = true
	for _, st := range m.agents {
		st.timer.Stop()
	}
	m.mu.Unlock()
	m.cancel()
	m.wg.Wait()
}

// Connect starts tracking a new connection of an agent. The agent's first
// connection triggers a fetch; a later one gets the configuration already
// known (and triggers a fetch only if the agent's project, name or default
// branch changed). It returns at once.
func (m *Manager) Connect(agent gitlab.AgentInfo, t registry.Tunnel) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return
	}
	if _, known := m.conns[t]; known {
		return
	}
	st := m.agents[agent.AgentID]
	switch {
	case st == nil:
		st = &agentState{info: agent, conns: make(map[*connState]struct{})}
		st.timer = time.AfterFunc(jitter(m.poll), func() { m.want(st) })
		m.agents[agent.AgentID] = st
		m.wantLocked(st)
	case st.info.ProjectID != agent.ProjectID || st.info.AgentName != agent.AgentName || st.info.DefaultBranch != agent.DefaultBranch:
		st.info = agent
		m.wantLocked(st)
	}
	c := &connState{tunnel: t, agent: st}
	st.conns[c] = struct{}{}
	m.conns[t] = c
	if st.current != nil {
		m.wg.Go(func() { m.sync(c) })
	}
}

// Disconnect stops tracking a connection. When an agent's last connection
// goes, the agent is forgotten: nothing is fetched for it until it
// connects again.
func (m *Manager) Disconnect(t registry.Tunnel) {
	m.mu.Lock()
	defer m.mu.Unlock()
	c := m.conns[t]
	if c == nil {
		return
	}
	delete(m.conns, t)
	c.gone = true
	st := c.agent
	delete(st.conns, c)
	if len(st.conns) == 0 {
		st.gone = true
		st.timer.Stop()
		delete(m.agents, st.info.AgentID)
	}
}

// NotifyPush schedules a fetch for every connected agent configured in the
// project, because something was pushed to its repository. It returns at
// once; fetches run on the manager's workers. Pushes that arrive while an
// agent's fetch runs lead to one more fetch after it, since that fetch may
// have read the repository before the push.
func (m *Manager) NotifyPush(ctx context.Context, projectID int64) {
	n := 0
	m.mu.Lock()
	if !m.closed {
		for _, st := range m.agents {
			if st.info.ProjectID == projectID {
				m.wantLocked(st)
				n++
			}
		}
	}
	m.mu.Unlock()
	if n > 0 {
		m.log.DebugContext(ctx, "Config: refetching after a git push", "project_id", projectID, "agents", n)
	}
}

// want schedules a fetch for st (its timer fired).
func (m *Manager) want(st *agentState) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.closed && !st.gone {
		m.wantLocked(st)
	}
}

// wantLocked marks a fetch due and queues st unless it is queued already
// or being processed (its worker queues it again when done).
func (m *Manager) wantLocked(st *agentState) {
	st.wanted = true
	if st.queued || st.busy {
		return
	}
	st.queued = true
	m.queue = append(m.queue, st)
	m.signal()
}

// signal wakes one idle worker, if any is waiting.
func (m *Manager) signal() {
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

func (m *Manager) work() {
	defer m.wg.Done()
	for {
		st, info, ok := m.next()
		if !ok {
			return
		}
		m.refresh(st, info)
	}
}

// next waits for a queued agent and marks it busy; ok is false once the
// manager is closed.
func (m *Manager) next() (st *agentState, info gitlab.AgentInfo, ok bool) {
	for {
		m.mu.Lock()
		if m.closed {
			m.mu.Unlock()
			return nil, gitlab.AgentInfo{}, false
		}
		for len(m.queue) > 0 {
			st = m.queue[0]
			m.queue[0] = nil
			m.queue = m.queue[1:]
			st.queued = false
			if st.gone {
				continue
			}
			if len(m.queue) > 0 {
				m.signal() // another idle worker may take the next one
			}
			st.busy = true
			st.wanted = false
			info = st.info
			m.mu.Unlock()
			return st, info, true
		}
		m.mu.Unlock()
		select {
		case <-m.ctx.Done():
			return nil, gitlab.AgentInfo{}, false
		case <-m.wake:
		}
	}
}

// refresh fetches st's configuration, sends it to the connections that do
// not have it, reports it to GitLab if GitLab does not have it, and
// schedules the next fetch.
func (m *Manager) refresh(st *agentState, info gitlab.AgentInfo) {
	cfg, problem, transient := m.load(info)
	if problem != nil && m.ctx.Err() == nil {
		m.log.Warn("Config: failed to fetch", "agent_id", info.AgentID, "error", problem.Error())
	}

	m.mu.Lock()
	changed := cfg != nil && (st.current == nil || !bytes.Equal(st.current.json, cfg.json))
	if changed {
		st.current = cfg
	}
	current := st.current
	conns := slices.Collect(maps.Keys(st.conns))
	report := m.reporter != nil && current != nil && current != st.posted && !st.gone
	m.mu.Unlock()
	if changed {
		m.log.Info("Agent configuration changed", "agent_id", info.AgentID, "size", len(current.yaml))
	}

	var wg sync.WaitGroup
	var failed atomic.Bool
	failed.Store(transient)
	for _, c := range conns {
		wg.Go(func() {
			if !m.sync(c) {
				failed.Store(true)
			}
		})
	}
	if report {
		wg.Go(func() {
			if !m.report(st, info.AgentID, current) {
				failed.Store(true)
			}
		})
	}
	wg.Wait()

	m.mu.Lock()
	defer m.mu.Unlock()
	st.busy = false
	if st.gone || m.closed {
		return
	}
	delay := m.poll
	if failed.Load() {
		st.failures++
		delay = m.retryDelay(st.failures)
	} else {
		st.failures = 0
	}
	st.timer.Reset(jitter(delay))
	if st.wanted {
		m.wantLocked(st)
	}
}

// load fetches and checks an agent's configuration file. cfg is the
// configuration to use, nil to keep the last good one; problem, if not
// nil, is what to log; transient says that trying again soon may help.
func (m *Manager) load(info gitlab.AgentInfo) (cfg *config, problem error, transient bool) {
	ctx, cancel := context.WithTimeout(m.ctx, m.timeout)
	defer cancel()
	file := ConfigFilePath(info.AgentName)
	data, err := m.source.GetRepositoryFile(ctx, info.ProjectID, info.DefaultBranch, file)
	switch {
	case errors.Is(err, gitlab.ErrFileNotFound):
		return &config{json: json.RawMessage("{}")}, fmt.Errorf("configuration file not found: %q", file), false
	case err != nil:
		return nil, fmt.Errorf("fetch configuration file %q of project %d at %q: %w", file, info.ProjectID, info.DefaultBranch, err), true
	}
	cfg, err = m.parse(file, data)
	if err != nil {
		return nil, err, false
	}
	return cfg, nil, false
}

// parse validates a configuration file as agentk and GitLab need it.
func (m *Manager) parse(file string, data []byte) (*config, error) {
	if int64(len(data)) > m.maxSize {
		return nil, fmt.Errorf("configuration file %q is %d bytes, more than agent.configuration.max_configuration_file_size (%d bytes); the agent keeps its last good configuration",
			file, len(data), m.maxSize)
	}
	if _, err := agentyaml.Parse(data); err != nil {
		return nil, fmt.Errorf("invalid configuration file %q: %w; the agent keeps its last good configuration", file, err)
	}
	doc, err := yaml.YAMLToJSON(data)
	if err != nil {
		return nil, fmt.Errorf("invalid configuration file %q: %w; the agent keeps its last good configuration", file, err)
	}
	if string(doc) == "null" { // empty, or only comments
		doc = json.RawMessage("{}")
	}
	return &config{yaml: bytes.Clone(data), json: doc}, nil
}

// sync sends the agent's current configuration over c unless the agent
// has it already. It reports false when the send failed and should be
// retried.
func (m *Manager) sync(c *connState) bool {
	c.send.Lock()
	defer c.send.Unlock()
	m.mu.Lock()
	cfg, gone := c.agent.current, c.gone
	m.mu.Unlock()
	if gone || cfg == nil || cfg == c.sent {
		return true
	}
	if err := m.push(c.tunnel, cfg); err != nil {
		m.mu.Lock()
		gone = c.gone
		m.mu.Unlock()
		if gone || m.ctx.Err() != nil {
			return true // nobody to retry for
		}
		info := c.tunnel.Info()
		m.log.Warn("Config: failed to send to agent", "agent_id", info.AgentID, "connection_id", info.ConnectionID, "error", err.Error())
		return false
	}
	c.sent = cfg
	return true
}

// Receiver is a tunnel that takes its agent's configuration itself
// instead of as a request through the tunnel: GitLab's agentk, which
// streams it from kas with a gRPC call.
type Receiver interface {
	// ReceiveConfiguration hands over a new configuration: the file as
	// written, and the same document as JSON. It returns once the tunnel
	// has it, not when the agent has applied it.
	ReceiveConfiguration(ctx context.Context, yaml []byte, json json.RawMessage) error
}

// push sends cfg to the agent over t: POSTed to agentk's configuration
// endpoint, or handed to a Receiver.
func (m *Manager) push(t registry.Tunnel, cfg *config) error {
	ctx, cancel := context.WithTimeout(m.ctx, m.timeout)
	defer cancel()
	if r, ok := t.(Receiver); ok {
		return r.ReceiveConfiguration(ctx, cfg.yaml, cfg.json)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://agent"+protocol.ConfigurationPath, bytes.NewReader(cfg.yaml))
	if err != nil {
		return fmt.Errorf("build configuration request: %w", err)
	}
	req.Header.Set(protocol.HeaderInternal, "1")
	req.Header.Set("Content-Type", "application/yaml")
	resp, err := t.RoundTrip(req)
	if err != nil {
		return fmt.Errorf("send configuration over the agent tunnel: %w", err)
	}
	defer resp.Body.Close()
	answer, _ := io.ReadAll(io.LimitReader(resp.Body, 1024)) // only for the message
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		msg := strings.TrimSpace(string(answer))
		if resp.StatusCode == http.StatusNotFound {
			msg += "; agentk may be too old to receive configurations: upgrade it"
		}
		return fmt.Errorf("agentk answered %s: %s", resp.Status, msg)
	}
	return nil
}

// report posts cfg to GitLab for st; false if GitLab did not take it.
func (m *Manager) report(st *agentState, agentID int64, cfg *config) bool {
	ctx, cancel := context.WithTimeout(m.ctx, m.timeout)
	defer cancel()
	if err := m.reporter.PostAgentConfiguration(ctx, agentID, cfg.json); err != nil {
		if m.ctx.Err() != nil {
			return true
		}
		m.log.Warn("Config: failed to send to GitLab", "agent_id", agentID, "error", err.Error())
		return false
	}
	m.mu.Lock()
	st.posted = cfg
	m.mu.Unlock()
	return true
}

// retryDelay is the wait after the given number of consecutive failed
// rounds: RetryPeriod, doubling, at most PollPeriod.
func (m *Manager) retryDelay(failures int) time.Duration {
	d := m.retry
	for i := 1; i < failures && d < m.poll; i++ {
		d *= 2
	}
	return min(d, m.poll)
}

// jitter spreads d by ±10%, so agents that connected together do not
// poll together forever.
func jitter(d time.Duration) time.Duration {
	spread := d / 5
	if spread <= 0 {
		return d
	}
	return d - spread/2 + rand.N(spread+1)
}
