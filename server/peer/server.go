package peer

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/http/httpguts"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	grpcpeer "google.golang.org/grpc/peer"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"

	"github.com/kasproject/kas/internal/healthreflection"
	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/peer/peerpb"
)

// ErrorDomain and the reasons form the google.rpc.ErrorInfo detail of the
// statuses a caller acts on: NOT_FOUND with ReasonNoTunnel when a node holds
// no tunnel for the agent (try another node), UNAVAILABLE with
// ReasonAgentFailed when the node's tunnel failed the request (the agent
// may have acted on it).
const (
	ErrorDomain       = "kas-private-api"
	ReasonNoTunnel    = "NO_TUNNEL"
	ReasonAgentFailed = "AGENT_FAILED"
)

// ServerOptions configure a Server.
type ServerOptions struct {
	// Registry holds this node's tunnels. Only FindLocal is used: a
	// forwarded request is served here or refused, never forwarded again,
	// so requests cannot go round in circles.
	Registry registry.Registry
	// Secret is the private API secret (32 bytes) callers sign their JWTs with.
	Secret []byte
	// TLS makes the server speak grpcs://; nil means grpc:// (HTTP/2
	// without TLS).
	TLS *tls.Config
	// MaxConnectionAge closes each peer's connection gracefully after this
	// long (in-flight streams finish) so connections follow changes in DNS
	// and load balancing; zero means never.
	MaxConnectionAge time.Duration
	Logger           *slog.Logger
	// Registerer receives the server's metrics; nil means none.
	Registerer prometheus.Registerer
}

// Server serves the private API: the Forward service, which carries a
// request to one of this node's tunnels; the standard gRPC health service
// (no token needed); and server reflection, so grpcurl with a private API
// token can list and describe the API.
type Server struct {
	opts    ServerOptions
	grpc    *grpc.Server
	health  *health.Server
	auth    *verifier
	buffers *bufferPool
	results serverResults

	// healthReflection describes the health service to callers without a
	// token (see internal/healthreflection).
	healthReflection *healthreflection.Reflection
}

// serverResults counts forwarded requests this node served, by result.
type serverResults struct {
	ok, noTunnel, unauthenticated, badRequest, agentError, canceled prometheus.Counter
}

// NewServer returns a server; call Serve with the private API listener and
// Shutdown to stop it.
func NewServer(opts ServerOptions) (*Server, error) {
	if opts.Registry == nil || opts.Logger == nil {
		return nil, errors.New("private API server: Registry and Logger are required")
	}
	if len(opts.Secret) == 0 {
		return nil, errors.New("private API server: no secret; set private_api.listen.authentication_secret_file")
	}
	served := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "kas_peer_served_requests_total",
		Help: "Requests other kas nodes forwarded to this node's tunnels, by result.",
	}, []string{"result"})
	if opts.Registerer != nil {
		if err := opts.Registerer.Register(served); err != nil {
			return nil, fmt.Errorf("register private API server metrics: %w", err)
		}
	}
	s := &Server{
		opts:    opts,
		health:  health.NewServer(),
		auth:    newVerifier(opts.Secret),
		buffers: newBufferPool(),
		results: serverResults{
			ok:              served.WithLabelValues("ok"),
			noTunnel:        served.WithLabelValues("no_tunnel"),
			unauthenticated: served.WithLabelValues("unauthenticated"),
			badRequest:      served.WithLabelValues("bad_request"),
			agentError:      served.WithLabelValues("agent_error"),
			canceled:        served.WithLabelValues("canceled"),
		},
		healthReflection: healthreflection.New(),
	}
	serverOpts := []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(s.authenticateUnary),
		grpc.ChainStreamInterceptor(s.authenticateStream),
		grpc.ForceServerCodecV2(newCodec()),
		grpc.MaxRecvMsgSize(maxMessageSize),
		grpc.MaxSendMsgSize(maxMessageSize),
		grpc.InitialWindowSize(streamWindow),
		grpc.InitialConnWindowSize(connWindow),
		grpc.ReadBufferSize(ioBufferSize),
		grpc.WriteBufferSize(ioBufferSize),
		// Reused goroutines keep their grown stacks; a new goroutine per
		// stream would grow its stack again for every request.
		grpc.NumStreamWorkers(uint32(runtime.GOMAXPROCS(0))),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{
			MinTime:             keepaliveMinTime,
			PermitWithoutStream: true,
		}),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			Time:             keepaliveTime,
			Timeout:          keepaliveTimeout,
			MaxConnectionAge: opts.MaxConnectionAge,
		}),
	}
	if opts.TLS != nil {
		serverOpts = append(serverOpts, grpc.Creds(credentials.NewTLS(opts.TLS)))
	}
	s.grpc = grpc.NewServer(serverOpts...)
	peerpb.RegisterForwardServer(s.grpc, forwardService{s: s})
	healthpb.RegisterHealthServer(s.grpc, s.health)
	reflection.Register(s.grpc)
	s.health.SetServingStatus(peerpb.Forward_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
	return s, nil
}

// Serve accepts peers on l until Shutdown. It returns nil after Shutdown.
func (s *Server) Serve(l net.Listener) error {
	if err := s.grpc.Serve(l); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("serve private API on %s: %w", l.Addr(), err)
	}
	return nil
}

// Shutdown reports NOT_SERVING to health checks, stops accepting calls and
// waits for in-flight ones until ctx ends, then cuts those still running.
func (s *Server) Shutdown(ctx context.Context) error {
	s.health.Shutdown()
	done := make(chan struct{})
	go func() {
		s.grpc.GracefulStop()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		s.grpc.Stop()
		<-done
		return fmt.Errorf("wait for forwarded requests to finish: %w", ctx.Err())
	}
}

// healthMethodPrefix marks the health service, which answers without a
// token: probes (Kubernetes gRPC probes, grpc_health_probe) cannot send one,
// and it reveals nothing but whether the node serves.
const healthMethodPrefix = "/grpc.health.v1.Health/"

func (s *Server) authenticateUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if err := s.authenticate(ctx, info.FullMethod); err != nil {
		return nil, err
	}
	return handler(ctx, req)
}

func (s *Server) authenticateStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if served, err := s.healthReflection.Serve(ss, info.FullMethod); served {
		return err // grpcurl's reflection before a tokenless health check
	}
	if err := s.authenticate(ss.Context(), info.FullMethod); err != nil {
		return err
	}
	return handler(srv, ss)
}

func (s *Server) authenticate(ctx context.Context, method string) error {
	if strings.HasPrefix(method, healthMethodPrefix) {
		return nil
	}
	err := s.auth.check(ctx)
	if err != nil {
		s.results.unauthenticated.Inc()
		from := "unknown"
		if p, ok := grpcpeer.FromContext(ctx); ok {
			from = p.Addr.String()
		}
		s.opts.Logger.Warn("Private API call refused", "method", method, "peer", from, "error", status.Convert(err).Message())
	}
	return err
}

// forwardService is the Forward gRPC service; it keeps the generated
// interface's methods off Server's own API.
type forwardService struct {
	peerpb.UnimplementedForwardServer
	s *Server
}

type forwardStream = grpc.BidiStreamingServer[peerpb.ClientMessage, peerpb.ServerMessage]

func (f forwardService) RoundTrip(stream forwardStream) error { return f.s.roundTrip(stream) }

// roundTrip serves one forwarded request through a local tunnel.
func (s *Server) roundTrip(stream forwardStream) error {
	ctx := stream.Context()
	var first peerpb.ClientMessage
	if err := stream.RecvMsg(&first); err != nil {
		s.results.canceled.Inc()
		return err
	}
	head := first.GetHead()
	if head == nil {
		s.results.badRequest.Inc()
		return status.Error(codes.InvalidArgument, "the first message of a RoundTrip must be a request head")
	}
	req, err := newTunnelRequest(ctx, head)
	if err != nil {
		s.results.badRequest.Inc()
		return status.Error(codes.InvalidArgument, err.Error())
	}
	tun, ok := s.opts.Registry.FindLocal(head.AgentId)
	if !ok {
		s.results.noTunnel.Inc()
		return noTunnelStatus(head.AgentId)
	}
	// Tell the caller this node takes the request: it stops its accept
	// timer and starts sending the body. Until now it could still take the
	// request to another node, and if it gave up on this one (the stream is
	// cancelled), the request must go no further here.
	if err := stream.SendHeader(nil); err != nil {
		s.results.canceled.Inc()
		return err
	}
	if ctx.Err() != nil {
		s.results.canceled.Inc()
		return status.FromContextError(ctx.Err()).Err()
	}
	if !head.EndOfBody {
		req.Body = newRequestBody(stream)
	}
	resp, err := tun.RoundTrip(req)
	if err != nil {
		return s.agentFailed(ctx, head, "send request to agent", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusSwitchingProtocols {
		rwc, ok := resp.Body.(io.ReadWriteCloser)
		if !ok {
			s.results.agentError.Inc()
			return status.Errorf(codes.Internal, "tunnel to agent %d switched protocols without a writable body", head.AgentId)
		}
		return s.serveUpgrade(ctx, stream, head, resp, rwc)
	}
	return s.sendResponse(ctx, stream, head, resp)
}

// noTunnelStatus is the answer the routing node recognizes as "try another
// node".
func noTunnelStatus(agentID int64) error {
	return statusWithReason(codes.NotFound, ReasonNoTunnel, agentID, fmt.Sprintf("no tunnel for agent %d on this node", agentID))
}

func statusWithReason(code codes.Code, reason string, agentID int64, msg string) error {
	st := status.New(code, msg)
	if withInfo, err := st.WithDetails(&errdetails.ErrorInfo{
		Reason:   reason,
		Domain:   ErrorDomain,
		Metadata: map[string]string{"agent_id": strconv.FormatInt(agentID, 10)},
	}); err == nil {
		st = withInfo
	}
	return st.Err()
}

// newTunnelRequest rebuilds the HTTP request a head describes, addressed to
// the agent the way k8sproxy addresses tunnelled requests.
func newTunnelRequest(ctx context.Context, head *peerpb.RequestHead) (*http.Request, error) {
	if head.AgentId <= 0 {
		return nil, fmt.Errorf("request head has agent ID %d; want a positive one", head.AgentId)
	}
	if !httpguts.ValidHeaderFieldName(head.Method) { // a method is a token, like a header name
		return nil, fmt.Errorf("request head has invalid method %q", clip(head.Method))
	}
	path := bytesString(head.Path)
	if !strings.HasPrefix(path, "/") {
		return nil, fmt.Errorf("request head has path %q; want an absolute path", clip(path))
	}
	req := &http.Request{
		Method: head.Method,
		URL: &url.URL{
			Scheme:   "http",
			Host:     "agent",
			Path:     path,
			RawPath:  bytesString(head.RawPath),
			RawQuery: bytesString(head.RawQuery),
		},
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        headersFromPB(head.Headers),
		ContentLength: head.ContentLength,
		Host:          "agent",
	}
	if head.EndOfBody {
		req.ContentLength = int64(len(head.Body))
		req.Body = http.NoBody
		if len(head.Body) > 0 {
			req.Body = io.NopCloser(bytes.NewReader(head.Body))
		}
	}
	return req.WithContext(ctx), nil
}

// clip bounds a peer-supplied value echoed into an error.
func clip(s string) string {
	const max = 64
	if len(s) > max {
		return s[:max] + "…"
	}
	return s
}

// requestBody reads the request body's data messages; the caller's
// half-close ends it.
type requestBody struct {
	stream forwardStream
	in     received // receives into msg
	msg    peerpb.ClientMessage
	rest   []byte
	err    error
}

func newRequestBody(stream forwardStream) *requestBody {
	b := &requestBody{stream: stream}
	b.in.msg = &b.msg
	return b
}

func (b *requestBody) Read(p []byte) (int, error) {
	for {
		switch {
		case len(b.rest) > 0:
			n := copy(p, b.rest)
			b.rest = b.rest[n:]
			return n, nil
		case b.in.data.Remaining() > 0:
			n, _ := b.in.data.Read(p)
			return n, nil
		case b.err != nil:
			return 0, b.err
		}
		b.receive()
	}
}

func (b *requestBody) receive() {
	if err := b.stream.RecvMsg(&b.in); err != nil {
		if err == io.EOF {
			b.err = io.EOF
		} else {
			b.err = fmt.Errorf("receive request body from peer: %w", err)
		}
		return
	}
	if b.in.isData {
		return
	}
	data, ok := b.msg.Msg.(*peerpb.ClientMessage_Data)
	if !ok {
		b.err = errors.New("peer sent something other than body data after the request head")
		return
	}
	b.rest = data.Data
}

// Close does nothing: the stream ends when the handler returns.
func (b *requestBody) Close() error { return nil }

// sendResponse streams resp to the caller. A small body of known length
// travels inside the head message, so a small response is one message.
func (s *Server) sendResponse(ctx context.Context, stream forwardStream, req *peerpb.RequestHead, resp *http.Response) error {
	bufp := s.buffers.forLength(resp.ContentLength)
	defer s.buffers.put(bufp)
	buf := *bufp
	head := &peerpb.ResponseHead{
		StatusCode:    int32(resp.StatusCode),
		Headers:       headersToPB(resp.Header),
		ContentLength: resp.ContentLength,
		TrailerNames:  trailerNames(resp.Trailer),
	}
	n := 0
	if resp.ContentLength >= 0 && resp.ContentLength <= maxInlineBody {
		var err error
		// One byte more than allowed leaves room to see EOF.
		n, err = readUntilFull(resp.Body, buf[:maxInlineBody+1])
		if err == io.EOF {
			head.EndOfBody = true
			head.Body = buf[:n]
			head.Trailers = headersToPB(resp.Trailer)
			if err := stream.SendMsg(&peerpb.ServerMessage{Msg: &peerpb.ServerMessage_Head{Head: head}}); err != nil {
				return s.callerGone(err)
			}
			s.results.ok.Inc()
			return nil
		}
		if err != nil {
			return s.agentFailed(ctx, req, "read response body from agent", err)
		}
	}
	if err := stream.SendMsg(&peerpb.ServerMessage{Msg: &peerpb.ServerMessage_Head{Head: head}}); err != nil {
		return s.callerGone(err)
	}
	data := &peerpb.ServerMessage_Data{}
	msg := &peerpb.ServerMessage{Msg: data}
	if n > 0 {
		data.Data = buf[:n]
		if err := stream.SendMsg(msg); err != nil {
			return s.callerGone(err)
		}
	}
	for {
		n, err := resp.Body.Read(buf)
		if n > 0 {
			data.Data = buf[:n]
			if err := stream.SendMsg(msg); err != nil {
				return s.callerGone(err)
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return s.agentFailed(ctx, req, "read response body from agent", err)
		}
	}
	if len(resp.Trailer) > 0 {
		trailer := &peerpb.ServerMessage{Msg: &peerpb.ServerMessage_Trailer{Trailer: &peerpb.Trailer{Headers: headersToPB(resp.Trailer)}}}
		if err := stream.SendMsg(trailer); err != nil {
			return s.callerGone(err)
		}
	}
	s.results.ok.Inc()
	return nil
}

// readUntilFull reads r into buf until EOF, an error, or buf is full; it
// returns io.EOF only when the body ended.
func readUntilFull(r io.Reader, buf []byte) (int, error) {
	n := 0
	for n < len(buf) {
		m, err := r.Read(buf[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

func trailerNames(h http.Header) []string {
	if len(h) == 0 {
		return nil
	}
	names := make([]string, 0, len(h))
	for name := range h {
		names = append(names, name)
	}
	return names
}

// serveUpgrade carries an upgraded connection: the agent's bytes as data
// messages to the caller, the caller's data messages to the agent. The
// caller half-closing means it is done; the agent closing ends the stream.
func (s *Server) serveUpgrade(ctx context.Context, stream forwardStream, req *peerpb.RequestHead, resp *http.Response, rwc io.ReadWriteCloser) error {
	head := &peerpb.ResponseHead{StatusCode: int32(resp.StatusCode), Headers: headersToPB(resp.Header), ContentLength: -1}
	if err := stream.SendMsg(&peerpb.ServerMessage{Msg: &peerpb.ServerMessage_Head{Head: head}}); err != nil {
		return s.callerGone(err)
	}
	var callerDone atomic.Bool
	// Caller → agent. gRPC unblocks RecvMsg once this handler returns, so
	// the goroutine ends with the stream at the latest.
	go func() {
		var msg peerpb.ClientMessage
		for {
			if err := stream.RecvMsg(&msg); err != nil {
				callerDone.Store(true)
				closeWrite(rwc)
				return
			}
			data, ok := msg.Msg.(*peerpb.ClientMessage_Data)
			if !ok {
				_ = rwc.Close()
				return
			}
			if _, err := rwc.Write(data.Data); err != nil {
				return // the agent's side is closed; the loop below sees it too
			}
		}
	}()
	bufp := s.buffers.get()
	defer s.buffers.put(bufp)
	buf := *bufp
	data := &peerpb.ServerMessage_Data{}
	msg := &peerpb.ServerMessage{Msg: data}
	for {
		n, err := rwc.Read(buf)
		if n > 0 {
			data.Data = buf[:n]
			if err := stream.SendMsg(msg); err != nil {
				return s.callerGone(err)
			}
		}
		if err == io.EOF || (err != nil && callerDone.Load() && ctx.Err() == nil) {
			s.results.ok.Inc()
			return nil
		}
		if err != nil {
			return s.agentFailed(ctx, req, "read upgraded stream from agent", err)
		}
	}
}

// closeWrite tells the agent the caller has finished sending. Without a
// way to half-close, it closes the whole connection, as an HTTP reverse
// proxy in front of the tunnel would.
func closeWrite(rwc io.ReadWriteCloser) {
	if cw, ok := rwc.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
		return
	}
	_ = rwc.Close()
}

// agentFailed turns a tunnel failure into the stream's status: the caller's
// own cancellation or deadline as such, anything else as UNAVAILABLE.
func (s *Server) agentFailed(ctx context.Context, req *peerpb.RequestHead, doing string, err error) error {
	if ctx.Err() != nil {
		s.results.canceled.Inc()
		return status.FromContextError(ctx.Err()).Err()
	}
	s.results.agentError.Inc()
	s.opts.Logger.Info("Forwarded request through agent failed", "agent_id", req.AgentId,
		"correlation_id", req.CorrelationId, "doing", doing, "error", err.Error())
	return statusWithReason(codes.Unavailable, ReasonAgentFailed, req.AgentId, fmt.Sprintf("agent %d: %s: %v", req.AgentId, doing, err))
}

// callerGone accounts for a send that failed because the stream ended.
func (s *Server) callerGone(err error) error {
	s.results.canceled.Inc()
	return err
}
