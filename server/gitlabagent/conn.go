package gitlabagent

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/gitlabagent/agentkpb"
	"github.com/kasproject/kas/server/gitlabagent/agentkpb/gitlabaccesspb"
	"github.com/kasproject/kas/server/internalapi/gitlabpb"
	"github.com/kasproject/kas/server/tunnel"
)

// Conn is one GitLab agentk connection. Once an agent has authenticated on
// it, it is that agent's tunnel: it implements registry.Tunnel,
// tunnel.Managed and agentconfig.Receiver.
type Conn struct {
	srv  *Server
	nc   *notifyConn
	grpc *grpc.Server
	log  *slog.Logger // with the remote address; see logger

	// authMu makes a connection's concurrent first calls authenticate once.
	authMu sync.Mutex

	mu    sync.Mutex
	token string            // the agent token the connection authenticated with
	agent *gitlab.AgentInfo // nil until then
	info  registry.TunnelInfo
	// agentLog is log with the agent's ID once it is known.
	agentLog *slog.Logger
	// draining is set when the connection is being closed: no new call
	// gets an idle tunnel, and new tunnels and configuration streams end.
	draining bool
	drainCh  chan struct{} // closed when draining is set
	idle     []*reverseTunnel
	// idleReady, if not nil, is closed when a tunnel is offered, waking
	// requests waiting for one.
	idleReady chan struct{}
	// config is the configuration agentk gets, configChanged closed and
	// replaced when it changes.
	config        *configVersion
	configChanged chan struct{}
	// unservedSeen are the methods agentk called that kas does not
	// serve, logged once per connection.
	unservedSeen map[string]bool
}

var errDraining = fmt.Errorf("the agent's connection is closing: %w", registry.ErrNoTunnel)

func newConn(s *Server, nc net.Conn) *Conn {
	c := &Conn{
		srv:           s,
		nc:            newNotifyConn(nc),
		log:           s.log.With("remote_addr", nc.RemoteAddr().String()),
		drainCh:       make(chan struct{}),
		configChanged: make(chan struct{}),
		info: registry.TunnelInfo{
			ConnectionID: registry.NewConnectionID(),
			Flavor:       registry.FlavorGitLab,
			NodeURLs:     s.opts.NodeURLs,
		},
	}
	opts := append([]grpc.ServerOption{
		grpc.ChainUnaryInterceptor(c.authenticateUnary),
		grpc.ChainStreamInterceptor(c.authenticateStream),
		grpc.UnknownServiceHandler(c.unserved),
		grpc.ForceServerCodecV2(codec{}),
	}, s.grpcOpts...)
	c.grpc = grpc.NewServer(opts...)
	agentkpb.RegisterReverseTunnelServer(c.grpc, reverseTunnelService{c: c})
	agentkpb.RegisterAgentConfigurationServer(c.grpc, configurationService{c: c})
	agentkpb.RegisterAgentRegistrarServer(c.grpc, registrarService{c: c})
	gitlabaccesspb.RegisterGitlabAccessServer(c.grpc, gitlabAccessService{c: c})
	return c
}

// authenticationTimeout closes a connection on which no call has
// authenticated by then: agentk calls at once, so it is not an agent.
const authenticationTimeout = time.Minute

// serve runs the connection's gRPC server until the connection ends.
func (c *Conn) serve() {
	unauthenticated := time.AfterFunc(authenticationTimeout, func() {
		if !c.authenticated() {
			c.logger().Info("Closing a GitLab agentk connection on which no call authenticated within a minute")
			_ = c.Close()
		}
	})
	defer unauthenticated.Stop()
	_ = c.grpc.Serve(newOneConnListener(c.nc))
	// Serve returns once it has nothing more to accept; the connection
	// is over when it closes (agentk gone, or drained and closed by
	// GracefulStop). Stop then ends whatever still runs.
	<-c.nc.done
	c.startDrain()
	c.grpc.Stop()
}

// logger is the connection's logger, with the agent's ID once known.
func (c *Conn) logger() *slog.Logger {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.agentLog != nil {
		return c.agentLog
	}
	return c.log
}

// Info describes the connection; what the agent reported about itself
// fills in as its calls arrive.
func (c *Conn) Info() registry.TunnelInfo {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.info
}

// Done is closed once the connection has ended.
func (c *Conn) Done() <-chan struct{} { return c.nc.done }

// Shutdown drains the connection: idle tunnels and configuration streams
// end, agentk is told (GOAWAY) to open its next calls on a new connection,
// in-flight requests finish until ctx ends, then the connection closes.
func (c *Conn) Shutdown(ctx context.Context) error {
	c.startDrain()
	done := make(chan struct{})
	go func() {
		c.grpc.GracefulStop()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		c.grpc.Stop()
		<-done
		return fmt.Errorf("drain GitLab agentk connection: %w", ctx.Err())
	}
}

// Close closes the connection at once, failing in-flight requests.
func (c *Conn) Close() error {
	c.startDrain()
	c.grpc.Stop()
	return nil
}

// startDrain stops handing out tunnels and ends the idle ones.
func (c *Conn) startDrain() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.draining {
		return
	}
	c.draining = true
	close(c.drainCh)
	for _, t := range c.idle {
		close(t.release)
	}
	c.idle = nil
	if c.idleReady != nil {
		close(c.idleReady)
		c.idleReady = nil
	}
}

// metadataToken is the agent token of a call's "authorization: Bearer" metadata.
func metadataToken(ctx context.Context) (string, bool) {
	md, _ := metadata.FromIncomingContext(ctx)
	for _, v := range md.Get("authorization") {
		if token, ok := tunnel.BearerToken(v); ok {
			return token, true
		}
	}
	return "", false
}

func (c *Conn) authenticateUnary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if err := c.authenticate(ctx); err != nil {
		return nil, err
	}
	return handler(ctx, req)
}

func (c *Conn) authenticateStream(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if err := c.authenticate(ss.Context()); err != nil {
		return err
	}
	// agentk gzips what it sends; what kas sends stays uncompressed, which
	// costs kas no CPU and agentk none either.
	_ = grpc.SetSendCompressor(ss.Context(), encoding.Identity)
	return handler(srv, ss)
}

// authenticate checks a call's agent token. The first call of a
// connection identifies its agent (as for kas's agentk: same API, caches
// and rate limit) and makes the connection that agent's tunnel; later
// calls must carry the same token.
func (c *Conn) authenticate(ctx context.Context) error {
	token, ok := metadataToken(ctx)
	if !ok {
		return status.Error(codes.Unauthenticated, "missing agent token: agentk sends it as authorization: Bearer <agent token> metadata")
	}
	if err := c.sameAgent(token); err != nil || c.authenticated() {
		return err
	}
	c.authMu.Lock()
	defer c.authMu.Unlock()
	if c.authenticated() { // another call authenticated while this one waited
		return c.sameAgent(token)
	}
	agent, refusal := c.srv.opts.Lifecycle.Authenticate(ctx, remoteIP(c.nc), token)
	if refusal != nil {
		return status.Error(refusalCode(refusal.Code), refusal.Reason)
	}
	c.mu.Lock()
	c.token, c.agent = token, agent
	c.info.AgentID, c.info.ProjectID = agent.AgentID, agent.ProjectID
	c.info.ConnectedAt = time.Now().UTC()
	c.mu.Unlock()
	go c.srv.opts.Lifecycle.Serve(c.log, c, token, *agent) // adds agent_id to the log
	c.mu.Lock()
	c.agentLog = c.log.With("agent_id", agent.AgentID)
	c.mu.Unlock()
	return nil
}

func (c *Conn) authenticated() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.agent != nil
}

// sameAgent refuses a token other than the one the connection
// authenticated with; before that, every token passes.
func (c *Conn) sameAgent(token string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.agent != nil && token != c.token {
		return status.Error(codes.PermissionDenied, "this connection belongs to another agent: one agentk connection carries one agent token")
	}
	return nil
}

// refusalCode maps the endpoint's HTTP status for a refused agent to gRPC.
func refusalCode(httpCode int) codes.Code {
	switch httpCode {
	case http.StatusUnauthorized:
		return codes.Unauthenticated
	case http.StatusTooManyRequests:
		return codes.ResourceExhausted
	case http.StatusForbidden:
		return codes.PermissionDenied
	default:
		return codes.Unavailable
	}
}

// unserved answers every method kas does not serve (gitops, flux, …).
// agentk retries such calls with backoff; the first one per connection
// and method is logged so an operator knows what is missing.
func (c *Conn) unserved(_ any, ss grpc.ServerStream) error {
	method, _ := grpc.MethodFromServerStream(ss)
	c.mu.Lock()
	first := !c.unservedSeen[method]
	if first {
		if c.unservedSeen == nil {
			c.unservedSeen = map[string]bool{}
		}
		c.unservedSeen[method] = true
	}
	c.mu.Unlock()
	if first {
		c.logger().Warn("GitLab agentk called a method kas does not serve; that agentk feature stays off (agentk retries with backoff)", "method", method)
	}
	return status.Errorf(codes.Unimplemented, "kas does not serve %s; see kas's README, section \"GitLab's agentk\", for the features it serves", method)
}

// setMeta records what agentk reported about itself and republishes the
// tunnel if that changed its description.
func (c *Conn) setMeta(meta *gitlabpb.AgentMeta) {
	if meta == nil {
		return
	}
	c.mu.Lock()
	before := c.info
	c.info.AgentVersion = clean(meta.GetVersion())
	c.info.AgentCommit = clean(meta.GetCommitId())
	c.info.PodNamespace = clean(meta.GetPodNamespace())
	c.info.PodName = clean(meta.GetPodName())
	if v := clean(meta.GetKubernetesVersion().GetGitVersion()); v != "" {
		c.info.KubernetesVersion = v
	}
	changed := c.info.AgentVersion != before.AgentVersion || c.info.AgentCommit != before.AgentCommit ||
		c.info.PodNamespace != before.PodNamespace || c.info.PodName != before.PodName ||
		c.info.KubernetesVersion != before.KubernetesVersion
	c.mu.Unlock()
	if changed && c.srv.opts.Refresh != nil {
		c.srv.opts.Refresh(c)
	}
}

// maxDescription bounds an agent-supplied description kept for logs, the
// status page and GitLab.
const maxDescription = 256

// clean keeps an agent-supplied description safe to log and show: valid
// UTF-8 without control characters, at most maxDescription bytes.
func clean(v string) string {
	v = strings.ToValidUTF8(v, "")
	v = strings.Map(func(r rune) rune {
		if r < ' ' || r == 0x7f {
			return -1
		}
		return r
	}, v)
	if len(v) > maxDescription {
		n := maxDescription
		for n > 0 && !isRuneStart(v[n]) {
			n--
		}
		v = v[:n]
	}
	return v
}

func isRuneStart(b byte) bool { return b&0xC0 != 0x80 }

// notifyConn closes done when the connection is closed.
type notifyConn struct {
	net.Conn
	once sync.Once
	done chan struct{}
}

func newNotifyConn(c net.Conn) *notifyConn { return &notifyConn{Conn: c, done: make(chan struct{})} }

func (c *notifyConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { close(c.done) })
	return err
}

// oneConnListener hands a gRPC server its one connection, then waits
// until that connection closes (or the server closes the listener), so
// Serve returns when the connection is over.
type oneConnListener struct {
	conn  *notifyConn
	mu    sync.Mutex
	taken bool
	once  sync.Once
	done  chan struct{}
}

func newOneConnListener(c *notifyConn) *oneConnListener {
	return &oneConnListener{conn: c, done: make(chan struct{})}
}

func (l *oneConnListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	if !l.taken {
		l.taken = true
		l.mu.Unlock()
		return l.conn, nil
	}
	l.mu.Unlock()
	select {
	case <-l.conn.done:
	case <-l.done:
	}
	return nil, net.ErrClosed
}

func (l *oneConnListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *oneConnListener) Addr() net.Addr { return l.conn.LocalAddr() }

// remoteIP is the connection's peer address without its port, for the
// limit on refused tokens per client address. Behind a load balancer it is
// the balancer's: GitLab's agentk's tunnel carries no X-Forwarded-For.
func remoteIP(c net.Conn) string {
	addr := c.RemoteAddr().String()
	if host, _, err := net.SplitHostPort(addr); err == nil {
		return host
	}
	return addr
}
