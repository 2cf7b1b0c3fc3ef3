// Package gitlabagent serves GitLab's own agentk, unchanged, beside kas's
// own: GitLab's agentk speaks gRPC, inside a WebSocket (subprotocol
// ws-tunnel, handed over by server/tunnel's endpoint) or directly (grpc://,
// handed over by the agent listener when a connection starts with the
// HTTP/2 preface).
//
// Each agentk connection gets its own gRPC server, so the connection can be
// drained on its own (GOAWAY, in-flight calls finish) when it reaches
// agent.listen.max_connection_age or kas shuts down. Every call carries the
// agent token; the first one is checked exactly as for kas's agentk
// (tunnel.Endpoint.Authenticate: the same GitLab or standalone path, caches
// and rate limit), and from then on the connection belongs to that agent
// and is one tunnel (registry.Tunnel, Flavor gitlab) whose life the endpoint
// runs. agentk keeps a pool of idle ReverseTunnel/Connect streams on it;
// RoundTrip takes one per request and speaks GitLab's HTTP-over-gRPC
// (KubernetesApi/MakeRequest) through it, so the proxy, routing and
// forwarding between nodes treat both kinds of agentk alike.
//
// Served: ReverseTunnel/Connect, AgentConfiguration/GetConfiguration (the
// agent's config.yaml, re-sent when it changes), AgentRegistrar/Register
// (what the agent reports about itself) and GitlabAccess/MakeRequest
// (forwarded to GitLab's module API with the agent's token). Every other
// method (gitops, flux, …) is answered UNIMPLEMENTED, which agentk retries
// with backoff.
package gitlabagent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"google.golang.org/grpc"
	_ "google.golang.org/grpc/encoding/gzip" // agentk compresses every call with gzip
	"google.golang.org/grpc/keepalive"

	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/tunnel"
)

// Lifecycle authenticates agents and runs each tunnel's life:
// *tunnel.Endpoint, shared with kas's own agentk.
type Lifecycle interface {
	Authenticate(ctx context.Context, clientAddr, token string) (*gitlab.AgentInfo, *tunnel.Refusal)
	Serve(log *slog.Logger, t tunnel.Managed, token string, agent gitlab.AgentInfo)
}

// ModuleRequester forwards agentk modules' requests to GitLab
// (GitlabAccess/MakeRequest): *gitlab.Client.
type ModuleRequester interface {
	DoModuleRequest(ctx context.Context, req gitlab.ModuleRequest) (*gitlab.ModuleResponse, error)
}

// Options configure a Server.
type Options struct {
	// Lifecycle authenticates each connection's agent and runs its life
	// as a tunnel; required.
	Lifecycle Lifecycle
	Logger    *slog.Logger
	// NodeURLs are this node's private API URLs, recorded with each tunnel.
	NodeURLs []string
	// Refresh, if set, republishes a tunnel whose description changed
	// after it was registered (registry.Refresher).
	Refresh func(t *Conn)
	// GitLab forwards GitlabAccess requests; nil in standalone mode, where
	// they are refused with a status saying so.
	GitLab ModuleRequester
	// GitLabExternalURL is sent to agentk with its configuration
	// (gitlab.external_url); agentk requires it to parse as a URL.
	GitLabExternalURL string
	// PingInterval and PingTimeout: a connection idle for PingInterval is
	// pinged and closed if the ping is not answered within PingTimeout.
	PingInterval, PingTimeout time.Duration
	// IdleTunnelWait bounds how long a request waits for the agent to
	// offer an idle reverse tunnel on a connection (default 20s).
	IdleTunnelWait time.Duration
	// KeepaliveMinTime is the shortest interval between agentk's pings
	// kas accepts, with or without calls in flight (default
	// DefaultKeepaliveMinTime); a client pinging more often is cut off.
	KeepaliveMinTime time.Duration
}

// DefaultKeepaliveMinTime accepts GitLab agentk's pings, which it sends
// every 55 s whether or not a call is open, as GitLab's KAS does.
const DefaultKeepaliveMinTime = 20 * time.Second

// Server serves GitLab agentk connections. Shutdown closes them.
type Server struct {
	opts     Options
	log      *slog.Logger
	grpcOpts []grpc.ServerOption

	mu      sync.Mutex
	closing bool
	conns   map[*Conn]struct{}
	wg      sync.WaitGroup
}

// NewServer returns a server for GitLab agentk connections.
func NewServer(opts Options) (*Server, error) {
	if opts.Lifecycle == nil || opts.Logger == nil {
		return nil, errors.New("GitLab agentk server: Lifecycle and Logger are required")
	}
	if opts.IdleTunnelWait <= 0 {
		opts.IdleTunnelWait = 20 * time.Second
	}
	if opts.KeepaliveMinTime <= 0 {
		opts.KeepaliveMinTime = DefaultKeepaliveMinTime
	}
	s := &Server{opts: opts, log: opts.Logger, conns: map[*Conn]struct{}{}}
	s.grpcOpts = []grpc.ServerOption{
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{
			MinTime:             opts.KeepaliveMinTime,
			PermitWithoutStream: true,
		}),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			Time:    opts.PingInterval,
			Timeout: opts.PingTimeout,
		}),
		// agentk reads at most 10 MiB per WebSocket message and kas writes
		// one per HTTP/2 write; gRPC's default frames stay far below.
		grpc.SharedWriteBuffer(true),
	}
	return s, nil
}

// ServeConn serves one GitLab agentk connection (a WebSocket byte stream
// or a TCP connection that started with the HTTP/2 preface) until it ends.
func (s *Server) ServeConn(nc net.Conn) {
	c := newConn(s, nc)
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		_ = nc.Close()
		return
	}
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		s.wg.Done()
	}()
	c.serve()
}

// Shutdown refuses new connections and drains every connection: idle
// tunnels end, in-flight requests finish until ctx ends, then the
// connections close.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closing = true
	conns := make([]*Conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Go(func() { _ = c.Shutdown(ctx) })
	}
	wg.Wait()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("wait for GitLab agentk connections to close: %w", ctx.Err())
	}
}
