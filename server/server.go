// Package server is the kas process: it builds every part from the
// configuration, opens the listeners, serves, and shuts down gracefully.
package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/redis/go-redis/v9"
	"golang.org/x/net/http2"

	"github.com/kasproject/kas/middleware"
	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/routes"
	"github.com/kasproject/kas/server/agentconfig"
	"github.com/kasproject/kas/server/config"
	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/gitlabagent"
	"github.com/kasproject/kas/server/internalapi"
	"github.com/kasproject/kas/server/k8sproxy"
	"github.com/kasproject/kas/server/logging"
	"github.com/kasproject/kas/server/peer"
	"github.com/kasproject/kas/server/proxyauth"
	"github.com/kasproject/kas/server/standalone"
	"github.com/kasproject/kas/server/status"
	"github.com/kasproject/kas/server/tokencheck"
	"github.com/kasproject/kas/server/traffic"
	"github.com/kasproject/kas/server/tunnel"
	"github.com/kasproject/kas/server/usage"
	"github.com/kasproject/kas/tlsutil"
	"github.com/kasproject/kas/web"
)

// Options are what the process gives the server besides its configuration.
type Options struct {
	Logger *slog.Logger
	// Recent holds the recent warnings and errors for the status page; may be nil.
	Recent *logging.Recent
	// Version is kas's version, X.Y.Z[-suffix] (internal/buildinfo), and
	// Commit the commit it was built from ("" if unknown); GetServerInfo
	// reports both, the status page and GitLab's User-Agent the version.
	Version string
	Commit  string
}

// Server is one kas node.
type Server struct {
	cfg       *config.Config
	opts      Options
	log       *slog.Logger
	startedAt time.Time

	metrics *prometheus.Registry
	api     gitlab.API
	// gitlabClient is set when kas talks to GitLab, standaloneData when it
	// reads local files; both nil in standalone mode without a file.
	gitlabClient   *gitlab.Client
	standaloneData *standalone.Backend
	configs        *agentconfig.Manager
	usage          *usage.Tracker
	registry       registry.Registry
	endpoint       *tunnel.Endpoint
	// gitlabAgents serves GitLab's own agentk (gRPC), beside endpoint.
	gitlabAgents *gitlabagent.Server
	receptive    *receptiveAgents // nil unless agent.receptive.enabled
	internal     *internalapi.Handler
	// tokens re-validates connected agents' tokens (Run runs it).
	tokens *tokencheck.Checker
	// acme gets agent.listen's certificates when tls.acme is set.
	acme *tlsutil.ACME
	// redis is the node's Redis client once built (see redisClient).
	redis redis.UniversalClient
	// Several nodes: the Redis registry, the router to other nodes, and the
	// private API URLs this node publishes.
	redisRegistry *registry.Redis
	peerRouter    *peer.Router
	nodeURLs      []string

	statusParts statusParts

	listeners []*listener
	ready     atomic.Bool
	readyCh   chan struct{}
}

// listener is one configured socket and the server on it: HTTP, or the
// private API's gRPC server (peer).
type listener struct {
	name    string // the config key, e.g. agent.listen
	network string
	address string
	tls     *tls.Config
	// certs serves and reloads certificate_file and key_file; nil without them.
	certs   *tlsutil.CertReloader
	handler http.Handler
	// protocols overrides net/http's default (e.g. h2c for gRPC); nil keeps it.
	protocols *http.Protocols
	srv       *http.Server
	// peer serves the private API instead of srv; it does its own TLS.
	peer *peer.Server
	ln   net.Listener
}

// New builds a node from cfg. It opens no socket, except the private API's
// when Redis is configured: the node must know its URL to publish it.
func New(cfg *config.Config, opts Options) (_ *Server, err error) {
	s := &Server{
		cfg:       cfg,
		opts:      opts,
		log:       opts.Logger,
		startedAt: time.Now().UTC(),
		metrics:   prometheus.NewRegistry(),
		readyCh:   make(chan struct{}),
	}
	s.statusParts = statusParts{traffic: &traffic.Recorder{}, seen: status.NewSeen()}
	defer func() {
		if err != nil {
			s.closeBuilt()
		}
	}()
	s.metrics.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	httpMetrics, err := middleware.NewMetrics(s.metrics)
	if err != nil {
		return nil, err
	}
	if err := s.buildAPI(); err != nil {
		return nil, err
	}
	router, err := s.buildRouting()
	if err != nil {
		return nil, err
	}
	if err := s.buildConfigManager(); err != nil {
		return nil, err
	}
	s.usage = usage.New(usage.Options{
		Reporter: s.usageReporter(),
		Period:   cfg.Observability.UsageReportingPeriod.D(),
		Logger:   s.log,
	})

	if s.tokens, err = s.buildTokenChecker(); err != nil {
		return nil, err
	}

	seen := s.statusParts.seen
	onConnect := func(info gitlab.AgentInfo, t registry.Tunnel) {
		seen.Connect(info)
		if s.configs != nil {
			s.configs.Connect(info, t)
		}
	}
	onDisconnect := func(t registry.Tunnel) {
		seen.Disconnect(t.Info().AgentID)
		if s.configs != nil {
			s.configs.Disconnect(t)
		}
	}
	s.endpoint, err = tunnel.NewEndpoint(tunnel.Options{
		API:                          s.api,
		Registry:                     s.registry,
		Logger:                       s.log,
		PingInterval:                 cfg.Agent.Listen.PingInterval.D(),
		PingTimeout:                  cfg.Agent.Listen.PingTimeout.D(),
		MaxConnectionAge:             cfg.Agent.Listen.MaxConnectionAge.D(),
		GracePeriod:                  cfg.Agent.Listen.ListenGracePeriod.D(),
		ConnectionsPerTokenPerMinute: cfg.Agent.Listen.ConnectionsPerTokenPerMinute,
		NodeURLs:                     s.nodeURLs,
		Registerer:                   s.metrics,
		Tokens:                       s.tokens,
		OnConnect:                    onConnect,
		OnDisconnect:                 onDisconnect,
		GitLabAgentk:                 gitlabAgentkConns{s},
	})
	if err != nil {
		return nil, err
	}
	if err := s.buildGitLabAgents(); err != nil {
		return nil, err
	}
	if err := s.buildReceptive(); err != nil {
		return nil, err
	}
	proxy := k8sproxy.NewHandler(k8sproxy.Options{
		Auth:             &proxyauth.Authenticator{API: s.api},
		Router:           router,
		Logger:           s.log,
		AgentWaitTimeout: cfg.Agent.KubernetesAPI.AgentWaitTimeout.D(),
		LastSeen:         s.registry.LastSeen,
		OnAuthorized:     s.usage.Observe,
		Traffic:          s.statusParts.traffic,
	})

	common := routes.Common{Logger: s.log, Metrics: httpMetrics}
	public := routes.PublicHandlers{
		Agent:           s.endpoint,
		KubernetesProxy: proxy,
		AllowedOrigins:  cfg.Agent.KubernetesAPI.AllowedOrigins,
		TrustedProxies:  cfg.Agent.ParsedTrustedProxies(),
	}
	statusPage, statusJSON := web.Handlers(s.status, s.log)
	observability := routes.ObservabilityHandlers{
		Gatherer:      s.metrics,
		Ready:         s.checkReady,
		Status:        statusPage,
		StatusJSON:    statusJSON,
		MetricsPath:   cfg.Observability.Prometheus.URLPath,
		LivenessPath:  cfg.Observability.LivenessProbe.URLPath,
		ReadinessPath: cfg.Observability.ReadinessProbe.URLPath,
	}

	if err := s.addListener("agent.listen", cfg.Agent.Listen.Listen, routes.Public(common, public)); err != nil {
		return nil, err
	}
	if k := cfg.Agent.KubernetesAPI; k.Listen.Address != "" {
		if err := s.addListener("agent.kubernetes_api.listen", k.Listen, routes.KubernetesAPI(common, public, k.URLPathPrefix)); err != nil {
			return nil, err
		}
	}
	if err := s.addListener("observability.listen", cfg.Observability.Listen, routes.Observability(common, observability)); err != nil {
		return nil, err
	}
	if err := s.buildInternalAPI(httpMetrics); err != nil {
		return nil, err
	}
	// Last: it starts certmagic's maintenance goroutine, which Run stops.
	if err := s.buildACME(); err != nil {
		return nil, err
	}
	if err := s.buildStatus(); err != nil {
		return nil, err
	}
	return s, nil
}

// buildGitLabAgents serves GitLab's own agentk, through the same endpoint
// (authentication, tunnel life) as kas's agentk.
func (s *Server) buildGitLabAgents() error {
	opts := gitlabagent.Options{
		Lifecycle:         s.endpoint,
		Logger:            s.log,
		NodeURLs:          s.nodeURLs,
		GitLabExternalURL: s.cfg.GitLab.ExternalURL,
		PingInterval:      s.cfg.Agent.Listen.PingInterval.D(),
		PingTimeout:       s.cfg.Agent.Listen.PingTimeout.D(),
	}
	if r, ok := s.registry.(registry.Refresher); ok {
		opts.Refresh = func(t *gitlabagent.Conn) { r.Refresh(t) }
	}
	if s.gitlabClient != nil {
		opts.GitLab = s.gitlabClient
	}
	g, err := gitlabagent.NewServer(opts)
	if err != nil {
		return err
	}
	s.gitlabAgents = g
	return nil
}

// gitlabAgentkConns hands the endpoint's ws-tunnel WebSockets to the
// GitLab agentk server, built after the endpoint it uses.
type gitlabAgentkConns struct{ s *Server }

func (g gitlabAgentkConns) ServeConn(c net.Conn) { g.s.gitlabAgents.ServeConn(c) }

// buildAPI chooses GitLab or the standalone files.
func (s *Server) buildAPI() error {
	if s.cfg.GitLab.Address == "" {
		if s.cfg.Standalone.File == "" {
			s.log.Warn("Standalone mode without standalone.file: no agent or user is known, so every agent and proxy request is refused; list them in a standalone file (see testdata/standalone)")
			s.api = noStandaloneData{}
			return nil
		}
		b, err := standalone.Open(s.cfg.Standalone.File)
		if err != nil {
			return fmt.Errorf("standalone mode (no gitlab.address): %w", err)
		}
		s.api = b
		s.standaloneData = b
		return nil
	}
	secret, err := config.ReadSecretFile(s.cfg.GitLab.AuthenticationSecretFile)
	if err != nil {
		return fmt.Errorf("gitlab.authentication_secret_file: %w", err)
	}
	tlsConfig, err := tlsutil.ClientConfig(s.cfg.Env.SSLCertDir, s.cfg.GitLab.CACertificateFile)
	if err != nil {
		return fmt.Errorf("TLS for GitLab: %w", err)
	}
	c, err := gitlab.NewClient(gitlab.ClientOptions{
		BaseURL:              s.cfg.GitLab.Address,
		Secret:               secret,
		TLS:                  tlsConfig,
		Timeout:              s.cfg.GitLab.ClientTimeout.D(),
		AgentInfoTTL:         s.cfg.Agent.InfoCacheTTL.D(),
		AgentInfoErrorTTL:    s.cfg.Agent.InfoCacheErrorTTL.D(),
		AllowedAgentTTL:      s.cfg.Agent.KubernetesAPI.AllowedAgentCacheTTL.D(),
		AllowedAgentErrorTTL: s.cfg.Agent.KubernetesAPI.AllowedAgentCacheErrorTTL.D(),
		RepositoryTokenFile:  s.cfg.GitLab.RepositoryTokenFile,
		Logger:               s.log,
		Version:              s.opts.Version,
	})
	if err != nil {
		return fmt.Errorf("GitLab client for %s: %w", s.cfg.GitLab.Address, err)
	}
	s.api = c
	s.gitlabClient = c
	return nil
}

// buildTokenChecker re-validates connected agents' tokens every
// agent.info_cache_ttl: with GitLab past its answer cache, in standalone
// mode from the files (read afresh at most once a second anyway).
func (s *Server) buildTokenChecker() (*tokencheck.Checker, error) {
	check := s.api.GetAgentInfo
	if s.gitlabClient != nil {
		check = s.gitlabClient.CheckAgentToken
	}
	c, err := tokencheck.New(tokencheck.Options{
		Check:      check,
		Period:     s.cfg.Agent.InfoCacheTTL.D(),
		Logger:     s.log,
		Registerer: s.metrics,
	})
	if err != nil {
		return nil, fmt.Errorf("agent token checker: %w", err)
	}
	return c, nil
}

// closeAPI closes the GitLab client's idle connections; the standalone
// backend holds nothing open.
func (s *Server) closeAPI() {
	if s.gitlabClient != nil {
		s.gitlabClient.CloseIdleConnections()
	}
}

// buildInternalAPI serves GitLab Rails' gRPC calls and their JSON mirrors on api.listen.
func (s *Server) buildInternalAPI(httpMetrics *middleware.Metrics) error {
	var secret []byte
	if f := s.cfg.API.Listen.AuthenticationSecretFile; f != "" {
		var err error
		if secret, err = config.ReadSecretFile(f); err != nil {
			return fmt.Errorf("api.listen.authentication_secret_file: %w", err)
		}
	}
	h, err := internalapi.NewHandler(internalapi.Options{
		Secret:            secret,
		Registry:          s.registry,
		ConfigFiles:       s.configFileLister(),
		OnGitPush:         s.onGitPush,
		Version:           s.opts.Version,
		Commit:            s.opts.Commit,
		GitLabExternalURL: s.cfg.GitLab.ExternalURL,
		Logger:            s.log,
		Metrics:           httpMetrics,
	})
	if err != nil {
		return fmt.Errorf("internal API: %w", err)
	}
	s.internal = h
	if err := s.addListener("api.listen", s.cfg.API.Listen.Listen, h); err != nil {
		return err
	}
	s.listeners[len(s.listeners)-1].protocols = internalapi.ServerProtocols()
	return nil
}

// buildConfigManager keeps every connected agent's configuration current,
// from GitLab's repository files or the standalone project directories.
func (s *Server) buildConfigManager() error {
	var source agentconfig.Source
	var reporter gitlab.ConfigurationReporter
	switch {
	case s.gitlabClient != nil:
		source, reporter = s.gitlabClient, s.gitlabClient
	case s.standaloneData != nil:
		source = s.standaloneData // it reads the files itself: nothing to report
	default:
		return nil // no agent can connect, so there is nothing to configure
	}
	m, err := agentconfig.NewManager(agentconfig.Options{
		Source:                   source,
		Reporter:                 reporter,
		Logger:                   s.log,
		PollPeriod:               s.cfg.Agent.Configuration.PollPeriod.D(),
		MaxConfigurationFileSize: s.cfg.Agent.Configuration.MaxConfigurationFileSize,
	})
	if err != nil {
		return fmt.Errorf("agent configuration manager: %w", err)
	}
	s.configs = m
	return nil
}

// usageReporter is GitLab, or nobody in standalone mode.
func (s *Server) usageReporter() gitlab.UsageReporter {
	if s.gitlabClient == nil {
		return nil
	}
	return s.gitlabClient
}

// onGitPush refetches the configuration of agents configured in the pushed project.
func (s *Server) onGitPush(ctx context.Context, projectID int64, _ string) {
	if s.configs != nil {
		s.configs.NotifyPush(ctx, projectID)
	}
}

// configFileLister answers ListAgentConfigFiles from GitLab's repository
// tree or the standalone project directories.
func (s *Server) configFileLister() internalapi.ConfigFileLister {
	switch {
	case s.gitlabClient != nil:
		return configFileLister(func(ctx context.Context, p internalapi.ConfigProject) ([]gitlab.AgentConfigFile, error) {
			return s.gitlabClient.ListAgentConfigFiles(ctx, p.ID)
		})
	case s.standaloneData != nil:
		return configFileLister(func(ctx context.Context, p internalapi.ConfigProject) ([]gitlab.AgentConfigFile, error) {
			return s.standaloneData.ListAgentConfigFiles(ctx, p.ID, p.Path)
		})
	}
	return nil // nothing is configured anywhere: the method answers Unimplemented
}

// configFileLister adapts a backend's listing to the internal API's.
type configFileLister func(context.Context, internalapi.ConfigProject) ([]gitlab.AgentConfigFile, error)

func (l configFileLister) ListAgentConfigFiles(ctx context.Context, p internalapi.ConfigProject) ([]internalapi.AgentConfigFile, error) {
	files, err := l(ctx, p)
	if errors.Is(err, gitlab.ErrNotFound) {
		return nil, fmt.Errorf("%w: %w", internalapi.ErrProjectNotFound, err)
	}
	if err != nil {
		return nil, err
	}
	out := make([]internalapi.AgentConfigFile, len(files))
	for i, f := range files {
		out[i] = internalapi.AgentConfigFile{AgentName: f.AgentName, Path: f.Path}
	}
	return out, nil
}

func (s *Server) addListener(name string, l config.Listen, h http.Handler) error {
	lst := &listener{name: name, network: l.Network, address: l.Address, handler: h}
	if l.CertificateFile != "" {
		certs, err := tlsutil.NewCertReloader(l.CertificateFile, l.KeyFile, s.log.With("listener", name))
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		lst.certs = certs
		lst.tls = tlsutil.ServerConfig(certs.GetCertificate)
	}
	s.listeners = append(s.listeners, lst)
	return nil
}

// Run opens the listeners and serves until ctx ends, then shuts down
// gracefully: listeners stop accepting, in-flight requests and agent tunnels
// get agent.listen.listen_grace_period to finish, everything is closed.
// It returns nil after a clean shutdown.
func (s *Server) Run(ctx context.Context) error {
	defer s.closeAPI()
	defer s.closeTLS()
	for _, l := range s.listeners {
		if l.peer != nil {
			continue // opened by New; gRPC does its own TLS
		}
		ln, err := net.Listen(l.network, l.address)
		if err != nil {
			s.closeListeners()
			return fmt.Errorf("%s: listen on %s %s: %w", l.name, l.network, l.address, err)
		}
		if l.tls != nil {
			ln = tls.NewListener(ln, l.tls)
		} else if l.name == publicListener {
			// GitLab's agentk over grpc:// shares the public listener.
			ln = s.gitlabAgents.SplitListener(ln)
		}
		l.ln = ln
		l.srv = &http.Server{
			Handler:           l.handler,
			ReadHeaderTimeout: 10 * time.Second,
			IdleTimeout:       2 * time.Minute,
			ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
			BaseContext:       func(net.Listener) context.Context { return context.WithoutCancel(ctx) },
		}
		if l.tls != nil {
			l.srv.TLSConfig = l.tls
		}
		if l.protocols != nil {
			l.srv.Protocols = l.protocols
		}
		if l.name == publicListener && l.tls != nil {
			// GitLab's agentk over grpcs:// shares the public listener:
			// HTTP/2 connections are told apart by their first request.
			l.srv.TLSNextProto = map[string]func(*http.Server, *tls.Conn, http.Handler){
				"h2": s.gitlabAgents.TLSNextProtoH2(&http2.Server{}),
			}
		}
	}

	serveErr := make(chan error, len(s.listeners)+1) // +1: manageCertificates
	var serving sync.WaitGroup
	usageCtx, stopUsage := context.WithCancel(context.WithoutCancel(ctx))
	var usageDone sync.WaitGroup
	usageDone.Go(func() { s.usage.Run(usageCtx) })
	checksCtx, stopChecks := context.WithCancel(context.WithoutCancel(ctx))
	var checksDone sync.WaitGroup
	checksDone.Go(func() { s.tokens.Run(checksCtx) })
	statusCtx, stopStatus := context.WithCancel(context.WithoutCancel(ctx))
	var statusDone sync.WaitGroup
	statusDone.Go(func() { s.runStatus(statusCtx) })
	for _, l := range s.listeners {
		s.log.Info("Listening", "listener", l.name, "network", l.network, "address", l.ln.Addr().String(), "tls", l.tls != nil || l.certs != nil)
		serving.Go(func() {
			if err := l.serve(); err != nil {
				serveErr <- fmt.Errorf("%s: serve on %s: %w", l.name, l.ln.Addr(), err)
			}
		})
	}
	stopWatching := s.watchCertificates()
	defer stopWatching()
	// The listeners serve before the ACME certificates exist: the CA's
	// challenges reach kas through them. kas is ready once it has them.
	if err := s.manageCertificates(ctx); err != nil {
		serveErr <- fmt.Errorf("%s: %w", publicListener, err)
	} else {
		s.ready.Store(true)
		close(s.readyCh)
		mode := "standalone"
		if s.cfg.GitLab.Address != "" {
			mode = "gitlab " + s.cfg.GitLab.Address
		}
		s.log.Info("kas is ready", "version", s.opts.Version, "mode", mode)
		s.startReceptive()
	}

	var runErr error
	select {
	case <-ctx.Done():
		s.log.Info("Shutting down", "grace_period", s.cfg.Agent.Listen.ListenGracePeriod.D().String())
	case runErr = <-serveErr:
		s.log.Error("Listener failed; shutting down", "error", runErr.Error())
	}
	stopStatus() // before shutdown removes this node's summary from Redis
	statusDone.Wait()
	s.shutdown()
	serving.Wait()
	stopChecks() // the tunnels are closed: nothing left to re-validate
	checksDone.Wait()
	stopUsage() // after the listeners, so the last report counts every request
	usageDone.Wait()
	return runErr
}

// shutdown stops every listener and tunnel within the grace period, then
// closes whatever is left.
func (s *Server) shutdown() {
	s.ready.Store(false)
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.Agent.Listen.ListenGracePeriod.D())
	defer cancel()
	var wg sync.WaitGroup
	wg.Go(s.stopReceptive) // first, so kas dials no receptive agent while the tunnels close
	for _, l := range s.listeners {
		wg.Go(func() {
			if err := l.shutdown(ctx); err != nil {
				s.log.Warn("Requests still running at the end of the grace period were cut", "listener", l.name, "error", err.Error())
			}
		})
	}
	wg.Go(func() {
		if err := s.endpoint.Shutdown(ctx); err != nil {
			s.log.Warn("Agent tunnels still busy at the end of the grace period were closed", "error", err.Error())
		}
	})
	wg.Go(func() {
		if err := s.gitlabAgents.Shutdown(ctx); err != nil {
			s.log.Warn("GitLab agentk connections still busy at the end of the grace period were closed", "error", err.Error())
		}
	})
	wg.Wait()
	s.closeStatus(ctx)
	s.closeMultiNode(ctx)
	if s.configs != nil {
		s.configs.Close()
	}
	if err := s.internal.Close(); err != nil {
		s.log.Warn("Close the internal API", "error", err.Error())
	}
	s.log.Info("Shut down")
}

// closeBuilt stops what New started when New fails half-way.
func (s *Server) closeBuilt() {
	s.closeListeners()
	s.stopReceptive()
	if s.configs != nil {
		s.configs.Close()
	}
	if s.internal != nil {
		_ = s.internal.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s.closeStatus(ctx)
	s.closeMultiNode(ctx)
	s.closeTLS()
	s.closeAPI()
}

func (s *Server) closeListeners() {
	for _, l := range s.listeners {
		if l.ln != nil {
			_ = l.ln.Close()
		}
	}
}

// Ready is closed once every listener accepts connections.
func (s *Server) Ready() <-chan struct{} { return s.readyCh }

// Addr returns the bound address of the named listener (e.g. "agent.listen")
// once Ready is closed; useful when the configuration asked for port 0.
func (s *Server) Addr(name string) net.Addr {
	for _, l := range s.listeners {
		if l.name == name && l.ln != nil {
			return l.ln.Addr()
		}
	}
	return nil
}

func (s *Server) checkReady(ctx context.Context) error {
	if !s.ready.Load() {
		return errNotServing
	}
	return s.checkRedis(ctx)
}

// serve runs the listener's server until it is shut down; nil then.
func (l *listener) serve() error {
	if l.peer != nil {
		return l.peer.Serve(l.ln)
	}
	if err := l.srv.Serve(l.ln); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// shutdown stops accepting and waits for in-flight requests until ctx
// ends, then cuts the rest.
func (l *listener) shutdown(ctx context.Context) error {
	if l.peer != nil {
		return l.peer.Shutdown(ctx)
	}
	if l.srv == nil {
		return nil
	}
	err := l.srv.Shutdown(ctx)
	if err != nil {
		_ = l.srv.Close()
	}
	return err
}

// status is the status page's data.
func (s *Server) status(ctx context.Context) web.Status { return s.statusParts.page.Gather(ctx) }

// noStandaloneData answers for standalone mode without standalone.file:
// nobody is known, so every credential is refused with the reason.
type noStandaloneData struct{}

func (noStandaloneData) refuse(op string) error {
	return &gitlab.Error{Op: op, URL: "standalone mode", StatusCode: http.StatusUnauthorized, Err: gitlab.ErrUnauthorized,
		Message: "kas runs standalone without standalone.file, so it knows no agents, users or jobs"}
}

func (n noStandaloneData) GetAgentInfo(context.Context, string) (*gitlab.AgentInfo, error) {
	return nil, n.refuse("get agent info")
}

func (n noStandaloneData) AuthorizeProxyUser(context.Context, gitlab.AuthorizeProxyUserRequest) (*gitlab.AuthorizeProxyUserResponse, error) {
	return nil, n.refuse("authorize proxy user")
}

func (n noStandaloneData) GetAllowedAgentsForJob(context.Context, string) (*gitlab.AllowedAgentsForJob, error) {
	return nil, n.refuse("get allowed agents for job")
}
