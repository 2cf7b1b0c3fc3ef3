package peer

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/textproto"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/http/httpguts"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/correlation"
	"github.com/kasproject/kas/server/peer/peerpb"
	"github.com/kasproject/kas/tlsutil"
)

// RouterOptions configure a Router.
type RouterOptions struct {
	// Registry finds tunnels: this node's (FindLocal), other nodes'
	// (FindRemote), and wakes waiting requests (WaitForAgent).
	Registry registry.Registry
	// Secret is the private API secret (32 bytes) the calls' JWTs are
	// signed with; every node must have the same.
	Secret []byte
	// TLS is the client configuration for grpcs:// peers, normally
	// tlsutil.ClientConfig(SSL_CERT_DIR, private_api.listen.ca_certificate_file);
	// nil trusts the system pool.
	TLS *tls.Config
	// ServerName is the name every peer's certificate must carry
	// (OWN_PRIVATE_API_HOST); "" means the host of the URL dialled.
	ServerName string
	// AcceptTimeout bounds how long a node may take to be connected to and
	// to take a request (private_api.accept_timeout; zero means
	// DefaultAcceptTimeout). A node that has not taken the request by then
	// is skipped for a while, and the request goes to another node holding
	// the agent: a frozen or cut-off node must not hold requests until the
	// callers give up.
	AcceptTimeout time.Duration
	Logger        *slog.Logger
	// Registerer receives the router's metrics; nil means none.
	Registerer prometheus.Registerer
}

// Router finds a way to an agent: one of this node's tunnels if it has one,
// otherwise a node that holds one, reached over the private API. It
// implements k8sproxy.Router. Close it to close its peer connections.
type Router struct {
	opts    RouterOptions
	pool    *connPool
	breaker *breaker
	buffers *bufferPool
	// next rotates which node an agent's requests try first, spreading
	// them over the nodes holding its tunnels.
	next    atomic.Uint32
	metrics routerMetrics
}

// routerMetrics are the router's counters, resolved once.
type routerMetrics struct {
	ok, noTunnel, unreachable, failed, canceled                      prometheus.Counter
	failNoTunnel, failUnreachable, failRefused, failURL, failTimeout prometheus.Counter
}

// Reasons one peer could not take a request; each lets the router try the
// next URL (or, for noTunnel and timeout, the next node).
const (
	reasonNoTunnel    = "no_tunnel"
	reasonUnreachable = "unreachable"
	reasonRefused     = "refused"
	reasonBadURL      = "bad_url"
	reasonTimeout     = "timeout"
)

// DefaultAcceptTimeout is RouterOptions.AcceptTimeout's default: nodes on a
// private network take a request in milliseconds, so two seconds without an
// answer means the node is stuck, while a caller (kubectl has no timeout of
// its own; CI tools often 30 s or more) is still waiting.
const DefaultAcceptTimeout = 2 * time.Second

// NewRouter returns a router; it connects to peers when first needed.
func NewRouter(opts RouterOptions) (*Router, error) {
	if opts.Registry == nil || opts.Logger == nil {
		return nil, errors.New("private API router: Registry and Logger are required")
	}
	if len(opts.Secret) == 0 {
		return nil, errors.New("private API router: no secret; set private_api.listen.authentication_secret_file")
	}
	if opts.AcceptTimeout < 0 {
		return nil, fmt.Errorf("private API router: negative accept timeout %s", opts.AcceptTimeout)
	}
	if opts.AcceptTimeout == 0 {
		opts.AcceptTimeout = DefaultAcceptTimeout
	}
	forwards := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "kas_peer_forwards_total",
		Help: "Requests this node forwarded to another kas node, by result.",
	}, []string{"result"})
	failures := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "kas_peer_forward_failures_total",
		Help: "Attempts to forward a request to a kas node that failed before the request was handed over, by reason; the next node or URL is tried.",
	}, []string{"reason"})
	conns := prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "kas_peer_connections",
		Help: "Connections this node keeps open to other kas nodes' private APIs.",
	})
	if opts.Registerer != nil {
		for _, c := range []prometheus.Collector{forwards, failures, conns} {
			if err := opts.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("register private API router metrics: %w", err)
			}
		}
	}
	return &Router{
		opts:    opts,
		pool:    newConnPool(newTokenSource(opts.Secret), opts.TLS, opts.ServerName, conns),
		breaker: newBreaker(),
		buffers: newBufferPool(),
		metrics: routerMetrics{
			ok:              forwards.WithLabelValues("ok"),
			noTunnel:        forwards.WithLabelValues("no_tunnel"),
			unreachable:     forwards.WithLabelValues("unreachable"),
			failed:          forwards.WithLabelValues("error"),
			canceled:        forwards.WithLabelValues("canceled"),
			failNoTunnel:    failures.WithLabelValues(reasonNoTunnel),
			failUnreachable: failures.WithLabelValues(reasonUnreachable),
			failRefused:     failures.WithLabelValues(reasonRefused),
			failURL:         failures.WithLabelValues(reasonBadURL),
			failTimeout:     failures.WithLabelValues(reasonTimeout),
		},
	}, nil
}

// Close closes the connections to other nodes, failing requests in flight
// through them.
func (r *Router) Close() error { return r.pool.close() }

// Route returns a transport to the agent: a local tunnel, or one that
// forwards to the nodes holding the agent's tunnels. With neither, it waits
// for the agent to connect anywhere, up to ctx's deadline. When the
// registry cannot be read it routes to the nodes that last held the agent,
// if it knows any, and otherwise fails at once with an error wrapping
// registry.ErrUnavailable: waiting would not help.
func (r *Router) Route(ctx context.Context, agentID int64) (http.RoundTripper, error) {
	for {
		if t, ok := r.opts.Registry.FindLocal(agentID); ok {
			return t, nil
		}
		nodes, err := r.opts.Registry.FindRemote(ctx, agentID)
		for _, urls := range nodes {
			if len(urls) > 0 {
				return &remoteAgent{r: r, agentID: agentID, nodes: nodes, lookupErr: err}, nil
			}
		}
		if err != nil {
			return nil, fmt.Errorf("look up kas nodes with a tunnel for agent %d: %w", agentID, err)
		}
		if err := r.opts.Registry.WaitForAgent(ctx, agentID); err != nil {
			return nil, fmt.Errorf("wait for agent %d: %w", agentID, err)
		}
	}
}

// remoteAgent forwards requests for one agent to the nodes holding its
// tunnels.
type remoteAgent struct {
	r       *Router
	agentID int64
	nodes   [][]string
	// lookupErr is the registry's error when nodes are only the last ones
	// known to hold the agent.
	lookupErr error
}

func (ra *remoteAgent) RoundTrip(req *http.Request) (*http.Response, error) {
	return ra.r.forward(req, ra.agentID, ra.nodes, ra.lookupErr)
}

// forward sends req to the first node that takes it. Each node's URLs are
// tried in turn until one answers; a node that answers it has no tunnel, or
// does not take the request within the accept timeout, sends the request on
// to the next node. Nodes and URLs that failed recently are tried last.
// Once a node has taken the request there is no retry: the agent may have
// acted on it. Until then nothing of the request's body has been read, so
// any request, upgrades included, can move to another node.
func (r *Router) forward(req *http.Request, agentID int64, nodes [][]string, lookupErr error) (*http.Response, error) {
	ctx := req.Context()
	upgrade := isUpgrade(req.Header)
	head, bufp, err := newRequestHead(req, agentID, upgrade, r.buffers)
	if bufp != nil {
		defer r.buffers.put(bufp) // head.Body is serialized by every attempt before forward returns
	}
	if err != nil {
		r.metrics.failed.Inc()
		return nil, err
	}
	// A body not sent inline waits until a node takes the request, so it is
	// still unread whenever a node is skipped.
	bodyPending := !head.EndOfBody
	var failures []*skipError
	start := int(r.next.Add(1))
	if r.breaker.failing.Load() != 0 {
		rotated := make([][]string, 0, len(nodes))
		for i := range nodes {
			rotated = append(rotated, nodes[(start+i)%len(nodes)])
		}
		nodes, start = r.breaker.order(rotated), 0
	}
	for i := range nodes {
		urls := nodes[(start+i)%len(nodes)]
		for _, u := range urls {
			resp, err := r.attempt(req, u, head, upgrade)
			if err == nil {
				r.metrics.ok.Inc()
				r.noteAnswer(u)
				return resp, nil
			}
			var skip *skipError
			if !errors.As(err, &skip) {
				if ctx.Err() != nil {
					r.metrics.canceled.Inc()
				} else {
					r.metrics.failed.Inc()
				}
				return nil, err
			}
			r.noteSkip(skip, agentID, head.CorrelationId)
			failures = append(failures, skip)
			if skip.reason == reasonNoTunnel || skip.reason == reasonTimeout {
				// The node answered, and its other URLs lead to the same
				// node; or it is stuck, and they would only cost as much
				// time again.
				break
			}
		}
		if ctx.Err() != nil {
			r.metrics.canceled.Inc()
			if bodyPending {
				_ = req.Body.Close()
			}
			return nil, fmt.Errorf("forward request to agent %d: %w", agentID, ctx.Err())
		}
	}
	// No node took it. The agent may have reconnected to this node since
	// Route looked.
	if t, ok := r.opts.Registry.FindLocal(agentID); ok {
		local := req
		if !bodyPending && len(head.Body) > 0 {
			local = req.Clone(ctx)
			// head.Body is a pooled buffer, reused once forward returns.
			local.Body = io.NopCloser(bytes.NewReader(bytes.Clone(head.Body)))
		}
		return t.RoundTrip(local)
	}
	if bodyPending {
		_ = req.Body.Close()
	}
	return nil, r.noNodeTookIt(agentID, failures, lookupErr)
}

// noNodeTookIt says why no node took a request: the nodes could not be
// reached (kas's failure: ErrNodeUnreachable), or they no longer hold the
// agent's tunnels (ErrNoTunnel: the agent is probably reconnecting), or, when
// the registry could not be read, the last nodes known to hold them do not
// any more (ErrUnavailable).
func (r *Router) noNodeTookIt(agentID int64, failures []*skipError, lookupErr error) error {
	var unreachable []*skipError
	for _, f := range failures {
		if f.reason != reasonNoTunnel {
			unreachable = append(unreachable, f)
		}
	}
	if len(unreachable) > 0 {
		r.metrics.unreachable.Inc()
		return &unreachableError{agentID: agentID, failures: unreachable, lookupErr: lookupErr}
	}
	r.metrics.noTunnel.Inc()
	if lookupErr != nil {
		return fmt.Errorf("forward request to agent %d: the nodes that last held its tunnels no longer do, and %w", agentID, lookupErr)
	}
	errs := make([]error, len(failures))
	for i, f := range failures {
		errs[i] = f
	}
	return fmt.Errorf("forward request to agent %d: %w: no kas node took the request (%w)",
		agentID, registry.ErrNoTunnel, errors.Join(errs...))
}

// unreachableError is the answer when the only nodes holding the agent's
// tunnels could not be reached. Its message is meant for the caller too:
// each node's URL and what failed, with the fix when known.
type unreachableError struct {
	agentID   int64
	failures  []*skipError
	lookupErr error
}

func (e *unreachableError) Error() string {
	var b strings.Builder
	if len(e.failures) == 1 {
		b.WriteString("the kas node holding its tunnel is unreachable: ")
	} else {
		b.WriteString("the kas nodes holding its tunnels are unreachable: ")
	}
	for i, f := range e.failures {
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(f.url)
		b.WriteString(": ")
		b.WriteString(f.cause)
	}
	if e.lookupErr != nil {
		b.WriteString(" (they are the last known holders: ")
		b.WriteString(e.lookupErr.Error())
		b.WriteString(")")
	}
	return b.String()
}

func (e *unreachableError) Is(target error) bool {
	return target == registry.ErrNodeUnreachable || (e.lookupErr != nil && errors.Is(e.lookupErr, target))
}

// noteAnswer closes the URL's breaker: the node answered.
func (r *Router) noteAnswer(rawURL string) {
	if failures := r.breaker.succeeded(rawURL); failures > 0 {
		r.opts.Logger.Info("kas node answers over the private API again", "kas_url", rawURL, "failures", failures)
	}
}

// noteSkip counts a node that did not take a request and pauses its URL.
// Each cause is logged when it first appears for a URL (a TLS mistake or a
// frozen node would otherwise log a line per request), then at debug level.
func (r *Router) noteSkip(skip *skipError, agentID int64, correlationID string) {
	log := r.opts.Logger
	if skip.reason == reasonNoTunnel {
		r.metrics.failNoTunnel.Inc()
		r.noteAnswer(skip.url)
		if log.Enabled(context.Background(), slog.LevelDebug) {
			log.Debug("kas node has no tunnel for the agent; trying the next node",
				"agent_id", agentID, "correlation_id", correlationID, "kas_url", skip.url)
		}
		return
	}
	newCause, pause := r.breaker.failed(skip.url, skip.cause)
	level, msg := slog.LevelWarn, ""
	switch skip.reason {
	case reasonTimeout:
		r.metrics.failTimeout.Inc()
		msg = "kas node did not take the request in time; skipping it for a while"
	case reasonUnreachable:
		r.metrics.failUnreachable.Inc()
		msg = "kas node unreachable over the private API; skipping it for a while"
	case reasonRefused:
		r.metrics.failRefused.Inc()
		level, msg = slog.LevelError, "kas node refused the private API call; skipping it for a while"
	case reasonBadURL:
		r.metrics.failURL.Inc()
		level, msg = slog.LevelError, "kas node published an unusable private API URL"
	}
	if !newCause {
		level = slog.LevelDebug
	}
	if log.Enabled(context.Background(), level) {
		log.Log(context.Background(), level, msg, "agent_id", agentID, "correlation_id", correlationID,
			"kas_url", skip.url, "cause", skip.cause, "error", skip.err.Error(), "skipped_for", pause.String())
	}
}

// skipError is a failure that left the request unsent, so another URL or
// node can take it.
type skipError struct {
	url    string
	reason string
	// cause says briefly what failed, with the fix when known; it is logged
	// and shown to the caller when no node takes the request.
	cause string
	err   error
}

func newSkipError(rawURL, reason string, err error) *skipError {
	return &skipError{url: rawURL, reason: reason, cause: describeFailure(reason, err), err: err}
}

func (e *skipError) Error() string { return fmt.Sprintf("kas node %s: %v", e.url, e.err) }
func (e *skipError) Unwrap() error { return e.err }

// newRequestHead describes req for the peer. A body up to maxInlineBody is
// read into a buffer from buffers and sent inline (the caller returns the
// buffer); a larger or unknown one follows in data messages. An upgrade's
// body is the upgraded stream, sent after the 101.
func newRequestHead(req *http.Request, agentID int64, upgrade bool, buffers *bufferPool) (*peerpb.RequestHead, *[]byte, error) {
	head := &peerpb.RequestHead{
		AgentId:       agentID,
		Method:        req.Method,
		Path:          stringBytes(req.URL.Path),
		RawPath:       stringBytes(req.URL.RawPath),
		RawQuery:      stringBytes(req.URL.RawQuery),
		Headers:       headersToPB(req.Header),
		ContentLength: req.ContentLength,
		CorrelationId: correlation.FromContext(req.Context()),
	}
	if head.Method == "" {
		head.Method = http.MethodGet
	}
	if len(head.Path) == 0 {
		head.Path = stringBytes("/")
	}
	// A proto3 string must be UTF-8; an ID the correlation middleware did
	// not vet is checked here.
	if id := req.Header.Get(correlation.Header); head.CorrelationId == "" && correlation.Valid(id) {
		head.CorrelationId = id
	}
	switch {
	case req.Body == nil || req.Body == http.NoBody || upgrade:
		head.EndOfBody = true
		head.ContentLength = 0
		if req.Body != nil {
			_ = req.Body.Close()
		}
	case req.ContentLength > 0 && req.ContentLength <= maxInlineBody:
		bufp := buffers.get()
		n, err := io.ReadFull(req.Body, (*bufp)[:req.ContentLength])
		_ = req.Body.Close()
		if err != nil {
			return nil, bufp, fmt.Errorf("read request body (%d of %d bytes): %w", n, req.ContentLength, err)
		}
		head.EndOfBody = true
		head.Body = (*bufp)[:n]
		return head, bufp, nil
	case req.ContentLength == 0:
		head.ContentLength = -1 // a client request's body of length 0 is of unknown length
	}
	return head, nil, nil
}

func isUpgrade(h http.Header) bool {
	return httpguts.HeaderValuesContainsToken(h["Connection"], "Upgrade")
}

// errCallDone is the cancellation cause of a call that ended normally.
var errCallDone = errors.New("forwarded request finished")

// call is one request forwarded over one stream. It is also the response
// body: reading it receives data messages.
type call struct {
	r       *Router
	pc      *peerConn
	agentID int64
	reqCtx  context.Context
	ctx     context.Context
	cancel  context.CancelCauseFunc
	stream  grpc.BidiStreamingClient[peerpb.ClientMessage, peerpb.ServerMessage]
	once    sync.Once

	// Response body state, used by the reading goroutine only.
	in      received // receives into msg
	msg     peerpb.ServerMessage
	rest    []byte // body bytes not yet read that came in a message
	trailer http.Header
	done    bool // the head carried the whole body
	err     error
}

// attempt forwards req to the node at rawURL. A *skipError means the node
// did not take the request and it can go elsewhere.
//
// The node takes a request by sending the stream's response headers as soon
// as it has a tunnel for the agent, before it sends the request on (see
// Server.roundTrip). Connecting and that acknowledgement must come within
// the accept timeout; otherwise the stream is cancelled, which the node sees
// before it can act on the request, and the request is free to go to
// another node.
func (r *Router) attempt(req *http.Request, rawURL string, head *peerpb.RequestHead, upgrade bool) (*http.Response, error) {
	pc, err := r.pool.get(rawURL)
	if err != nil {
		return nil, newSkipError(rawURL, reasonBadURL, err)
	}
	bodySent := false
	// A request that fails here for good still owes its body a Close
	// (http.RoundTripper's contract) unless sendBody has it.
	fatal := func(err error) (*http.Response, error) {
		if !head.EndOfBody && !bodySent {
			_ = req.Body.Close()
		}
		return nil, err
	}
	c := &call{r: r, pc: pc, agentID: head.AgentId, reqCtx: req.Context()}
	c.in.msg = &c.msg
	c.ctx, c.cancel = context.WithCancelCause(c.reqCtx)
	accept := c.startAcceptTimer(r.opts.AcceptTimeout)
	c.stream, err = pc.client.RoundTrip(c.ctx)
	if err != nil {
		timedOut := !accept.taken()
		c.finish()
		switch {
		case c.reqCtx.Err() != nil:
			return fatal(c.failure(err))
		case timedOut:
			return nil, newSkipError(rawURL, reasonTimeout, accept.err)
		}
		return nil, newSkipError(rawURL, reasonUnreachable, err)
	}
	// An error here means the stream has ended; RecvMsg below says why.
	_ = c.stream.SendMsg(&peerpb.ClientMessage{Msg: &peerpb.ClientMessage_Head{Head: head}})
	if head.EndOfBody && !upgrade {
		_ = c.stream.CloseSend()
	}
	// The node's headers: it took the request. A status without headers
	// (no tunnel, refused) is an answer too; RecvMsg returns it.
	md, _ := c.stream.Header()
	if !accept.taken() {
		c.finish()
		if c.reqCtx.Err() != nil {
			return fatal(c.failure(accept.err))
		}
		return nil, newSkipError(rawURL, reasonTimeout, accept.err)
	}
	if !head.EndOfBody && md != nil {
		bodySent = true
		go c.sendBody(req.Body, req.ContentLength)
	}
	if err := c.stream.RecvMsg(&c.in); err != nil {
		c.finish()
		if !bodySent && c.reqCtx.Err() == nil {
			if reason := skipReason(err, idempotent(head.Method)); reason != "" {
				return nil, newSkipError(rawURL, reason, err)
			}
		}
		return fatal(c.failure(err))
	}
	rh := c.msg.GetHead()
	if c.in.isData || rh == nil || rh.StatusCode < 100 || rh.StatusCode > 999 {
		c.finish()
		return fatal(fmt.Errorf("forward request to agent %d via kas node %s: the node's answer does not start with a valid response head", c.agentID, rawURL))
	}
	return c.response(req, rh, upgrade), nil
}

// acceptTimer cancels a call whose node has not taken the request in time.
// Exactly one of the timer and taken wins, so a node's acknowledgement that
// arrives as the time runs out either counts or the call is cancelled, never
// both.
type acceptTimer struct {
	timer *time.Timer
	state atomic.Int32 // 0 waiting, 1 taken, 2 timed out
	err   error
}

func (c *call) startAcceptTimer(d time.Duration) *acceptTimer {
	a := &acceptTimer{err: fmt.Errorf("the node did not take the request within %s (private_api.accept_timeout)", d)}
	a.timer = time.AfterFunc(d, func() {
		if a.state.CompareAndSwap(0, 2) {
			c.cancel(a.err)
		}
	})
	return a
}

// taken stops the timer and reports whether the node took the request in
// time.
func (a *acceptTimer) taken() bool {
	a.timer.Stop()
	return a.state.CompareAndSwap(0, 1) || a.state.Load() == 1
}

// skipReason says whether a call that failed before any response can go to
// another node: the node has no tunnel, or refused the call before looking
// at it (wrong secret, an older kas without this API). A connection that
// broke, or a tunnel that failed, leaves it unknown whether the agent acted
// on the request, so only idempotent requests are sent again, as net/http
// does.
func skipReason(err error, idempotent bool) string {
	st := status.Convert(err)
	switch st.Code() {
	case codes.NotFound:
		if errorReason(st) == ReasonNoTunnel {
			return reasonNoTunnel
		}
	case codes.Unauthenticated, codes.PermissionDenied, codes.Unimplemented:
		return reasonRefused
	case codes.Unavailable:
		// A node whose tunnel failed took the request: that failure is
		// the answer.
		if idempotent && errorReason(st) != ReasonAgentFailed {
			return reasonUnreachable
		}
	}
	return ""
}

// errorReason returns the reason of a private API ErrorInfo detail of st.
func errorReason(st *status.Status) string {
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok && info.Domain == ErrorDomain {
			return info.Reason
		}
	}
	return ""
}

func idempotent(method string) bool {
	switch method {
	case http.MethodGet, http.MethodHead, http.MethodOptions:
		return true
	}
	return false
}

// describeFailure says briefly why a node did not take a request, with the
// fix an operator can make where there is one. gRPC keeps only the text of
// connection errors, so they are recognized by their stable wording.
func describeFailure(reason string, err error) string {
	msg := err.Error()
	if st, ok := status.FromError(err); ok {
		msg = st.Message()
	}
	switch {
	case reason == reasonTimeout:
		return msg
	case tlsutil.IsUnknownAuthority(err):
		return "TLS: the node's certificate is signed by an unknown authority (add the CA of the nodes' certificates to private_api.listen.ca_certificate_file or SSL_CERT_DIR)"
	case strings.Contains(msg, "certificate is valid for") || strings.Contains(msg, "certificate is not valid for"):
		return "TLS name mismatch: " + x509Detail(msg) + " (OWN_PRIVATE_API_HOST must be a name in the nodes' certificates)"
	case strings.Contains(msg, "x509: "):
		return "TLS: " + x509Detail(msg)
	case strings.Contains(msg, "error reading server preface"):
		return "the node did not answer in HTTP/2 (if its private API uses TLS, its URL must be grpcs://)"
	case strings.Contains(msg, "first record does not look like a TLS handshake"):
		return "the node's private API does not use TLS (its URL must be grpc://)"
	case strings.Contains(msg, "connection refused"):
		return "connection refused (is kas running there, listening on its private API?)"
	case status.Code(err) == codes.Unauthenticated:
		return "the node refused this node's token: " + msg
	case status.Code(err) == codes.Unimplemented:
		return "the node does not serve this private API (an older or different kas?): " + msg
	}
	return msg
}

// x509Detail returns the x509 part of a TLS error message, without the
// layers of wrapping around it.
func x509Detail(msg string) string {
	if i := strings.Index(msg, "x509: "); i >= 0 {
		msg = msg[i+len("x509: "):]
	}
	return strings.TrimRight(msg, `"`)
}

// response makes the *http.Response for head; its body reads the stream.
func (c *call) response(req *http.Request, head *peerpb.ResponseHead, upgrade bool) *http.Response {
	code := int(head.StatusCode)
	resp := &http.Response{
		Status:        strconv.Itoa(code) + " " + http.StatusText(code),
		StatusCode:    code,
		Proto:         "HTTP/2.0",
		ProtoMajor:    2,
		Header:        headersFromPB(head.Headers),
		ContentLength: head.ContentLength,
		Request:       req,
		Body:          c,
	}
	if len(head.TrailerNames) > 0 {
		resp.Trailer = make(http.Header, len(head.TrailerNames))
		for _, name := range head.TrailerNames {
			resp.Trailer[textproto.CanonicalMIMEHeaderKey(name)] = nil
		}
		c.trailer = resp.Trailer
	}
	if head.EndOfBody {
		c.done = true
		c.rest = head.Body
		c.setTrailers(head.Trailers)
	}
	if code == http.StatusSwitchingProtocols && upgrade {
		u := &upgradedBody{call: c}
		u.send.Msg = &u.data
		resp.Body = u
	}
	return resp
}

func (c *call) setTrailers(hs []*peerpb.Header) {
	if len(hs) == 0 {
		return
	}
	if c.trailer == nil {
		c.trailer = http.Header{} // not announced: nobody reads it, but keep it well-formed
	}
	for name, values := range headersFromPB(hs) {
		c.trailer[name] = values
	}
}

// Read returns the response body as it arrives.
func (c *call) Read(p []byte) (int, error) {
	for {
		switch {
		case len(c.rest) > 0:
			n := copy(p, c.rest)
			c.rest = c.rest[n:]
			return n, nil
		case c.in.data.Remaining() > 0:
			n, _ := c.in.data.Read(p)
			return n, nil
		case c.err != nil:
			return 0, c.err
		}
		c.receive()
	}
}

// receive takes the next message off the stream.
func (c *call) receive() {
	if err := c.stream.RecvMsg(&c.in); err != nil {
		c.finish()
		if err == io.EOF {
			c.err = io.EOF
		} else {
			c.err = c.failure(err)
		}
		return
	}
	if c.in.isData {
		if c.done {
			c.fail("body data after a complete response")
		}
		return
	}
	switch m := c.msg.Msg.(type) {
	case *peerpb.ServerMessage_Data:
		if c.done {
			c.fail("body data after a complete response")
			return
		}
		c.rest = m.Data
	case *peerpb.ServerMessage_Trailer:
		c.setTrailers(m.Trailer.GetHeaders())
	default:
		c.fail("a second response head")
	}
}

// Close ends the call; if the response is not complete, the stream is
// cancelled, which cancels the request on the other node and the agent.
func (c *call) Close() error {
	c.finish()
	return nil
}

// finish releases the stream and the connection; it may run concurrently
// with Read and Write, which then fail.
func (c *call) finish() {
	c.once.Do(func() {
		c.cancel(errCallDone)
		c.r.pool.release(c.pc)
	})
}

func (c *call) fail(what string) {
	c.finish()
	_ = c.in.data.Close()
	c.rest = nil
	c.err = fmt.Errorf("forward request to agent %d via kas node %s: the node sent %s", c.agentID, c.pc.url, what)
}

// failure describes why the stream ended: the caller's own cancellation as
// its context error (so the proxy can tell timeouts from failures), a
// request body that could not be read, or the node's status.
func (c *call) failure(err error) error {
	if ctxErr := c.reqCtx.Err(); ctxErr != nil {
		return fmt.Errorf("forward request to agent %d via kas node %s: %w", c.agentID, c.pc.url, ctxErr)
	}
	if cause := context.Cause(c.ctx); cause != nil && cause != errCallDone && !errors.Is(cause, context.Canceled) {
		return fmt.Errorf("forward request to agent %d via kas node %s: %w", c.agentID, c.pc.url, cause)
	}
	return fmt.Errorf("forward request to agent %d via kas node %s: %w", c.agentID, c.pc.url, err)
}

// sendBody streams the request body after the node took the request.
func (c *call) sendBody(body io.ReadCloser, contentLength int64) {
	defer body.Close()
	bufp := c.r.buffers.forLength(contentLength)
	defer c.r.buffers.put(bufp)
	buf := *bufp
	data := &peerpb.ClientMessage_Data{}
	msg := &peerpb.ClientMessage{Msg: data}
	for {
		n, err := body.Read(buf)
		if n > 0 {
			data.Data = buf[:n]
			if c.stream.SendMsg(msg) != nil {
				return // the stream ended; the response side reports why
			}
		}
		if err == io.EOF {
			_ = c.stream.CloseSend()
			return
		}
		if err != nil {
			c.cancel(fmt.Errorf("read request body: %w", err))
			return
		}
	}
}

// upgradedBody is the body of a 101 response: reading returns the agent's
// bytes, writing sends the caller's, as httputil.ReverseProxy needs to
// splice the caller's connection.
type upgradedBody struct {
	*call
	mu          sync.Mutex // serializes Write and CloseWrite
	writeClosed bool
	data        peerpb.ClientMessage_Data
	send        peerpb.ClientMessage
}

// Write sends p to the agent.
func (u *upgradedBody) Write(p []byte) (int, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.writeClosed {
		return 0, errors.New("write to an upgraded connection after CloseWrite")
	}
	written := 0
	for len(p) > 0 {
		n := min(len(p), chunkSize)
		u.data.Data = p[:n]
		if err := u.stream.SendMsg(&u.send); err != nil {
			if err == io.EOF {
				err = io.ErrClosedPipe // the node ended the stream; Read says why
			}
			return written, err
		}
		written += n
		p = p[n:]
	}
	return written, nil
}

// CloseWrite tells the agent the caller has finished sending, after the
// bytes already written. httputil.ReverseProxy calls it when the caller
// half-closes.
func (u *upgradedBody) CloseWrite() error {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.writeClosed {
		return nil
	}
	u.writeClosed = true
	return u.stream.CloseSend()
}
