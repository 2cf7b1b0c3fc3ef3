// Package k8sproxy is the Kubernetes API proxy: it authenticates a caller,
// finds a tunnel to the agent, and forwards the request through it with the
// identity the agent must impersonate, streaming both ways.
package k8sproxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httputil"
	"path"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/http/httpguts"

	"github.com/kasproject/kas/middleware"
	"github.com/kasproject/kas/protocol"
	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/correlation"
	"github.com/kasproject/kas/server/kubestatus"
	"github.com/kasproject/kas/server/proxyauth"
	"github.com/kasproject/kas/server/traffic"
)

// Authenticator decides who the caller is and whom the agent impersonates.
type Authenticator interface {
	Authenticate(ctx context.Context, r *http.Request) (*proxyauth.Result, error)
}

// Router finds a transport to an agent: a local tunnel or, with several
// nodes, a peer that holds one. It waits for the agent up to ctx's deadline.
type Router interface {
	Route(ctx context.Context, agentID int64) (http.RoundTripper, error)
}

// Options configure a Handler.
type Options struct {
	Auth   Authenticator
	Router Router
	Logger *slog.Logger
	// AgentWaitTimeout is how long a request waits for its agent to connect.
	AgentWaitTimeout time.Duration
	// OnAuthorized is told about every authorized request (usage metrics);
	// nil means nobody is told.
	OnAuthorized func(*proxyauth.Result)
	// Traffic, if set, counts every authorized request for its agent:
	// failures (kas's own 5xx answers and the cluster's), body bytes each
	// way, the last failure. A request is counted once, here, on the node
	// that received it, whether one of this node's tunnels or another
	// node's served it; the status page adds the nodes' counts up.
	Traffic *traffic.Recorder
}

// Handler serves the Kubernetes API proxy. Mount it with the URL prefix
// stripped: it forwards r.URL.Path as the Kubernetes API path.
type Handler struct {
	opts  Options
	proxy *httputil.ReverseProxy
}

type routeKey struct{}

// route is what ServeHTTP decided, handed to the ReverseProxy via the context.
type route struct {
	transport http.RoundTripper
	auth      *proxyauth.Result
	// identity is the encoded protocol.HeaderIdentity, "" for the agent itself.
	identity string
	// failure is why kas failed the request itself, for the agent's traffic.
	failure string
	// in counts the request body's bytes, for the agent's traffic.
	in countingBody
}

// NewHandler returns the proxy handler.
func NewHandler(opts Options) *Handler {
	h := &Handler{opts: opts}
	h.proxy = &httputil.ReverseProxy{
		Rewrite:   h.rewrite,
		Transport: roundTripperFunc(viaRoute),
		// No FlushInterval: ReverseProxy flushes every chunk of an answer of
		// unknown length (watches, logs -f) as it arrives anyway, and an
		// answer of known length is better written as its buffers fill.
		BufferPool:   &bufferPool{},
		ErrorHandler: h.proxyError,
		ErrorLog:     slog.NewLogLogger(opts.Logger.Handler(), slog.LevelWarn),
	}
	return h
}

// copyBufferSize is the size of the buffers that copy bodies: large enough
// that bulk transfers pay per-write costs rarely, small enough for the
// watches that hold one while they run.
const copyBufferSize = 32 << 10

// bufferPool lends the copy buffers of proxied bodies, which would otherwise
// be allocated for every request.
type bufferPool struct{ pool sync.Pool }

func (p *bufferPool) Get() []byte {
	if b, ok := p.pool.Get().(*[]byte); ok {
		return *b
	}
	return make([]byte, copyBufferSize)
}

func (p *bufferPool) Put(b []byte) {
	if cap(b) != copyBufferSize {
		return
	}
	b = b[:copyBufferSize]
	p.pool.Put(&b)
}

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	log := h.opts.Logger.With("correlation_id", correlation.FromContext(ctx))
	if strings.HasPrefix(path.Clean(r.URL.Path)+"/", protocol.InternalPathPrefix) {
		// agentk's own endpoints are for kas alone, never for proxy callers.
		kubestatus.Write(w, http.StatusNotFound, kubestatus.ReasonNotFound, "the server could not find the requested resource")
		return
	}
	res, err := h.opts.Auth.Authenticate(ctx, r)
	if err != nil {
		var ae *proxyauth.Error
		if errors.As(err, &ae) {
			if ae.Code >= 500 {
				log.Error("Authorize Kubernetes API proxy request", "error", err.Error())
			} else {
				log.Info("Kubernetes API proxy request refused", "status", ae.Code, "error", err.Error())
			}
			if ae.Code == http.StatusUnauthorized {
				// GitLab's UI tells kas's own 401s from the cluster's by this header.
				w.Header().Set("Gitlab-Unauthorized", "true")
			}
			kubestatus.Write(w, ae.Code, ae.Reason, ae.Message)
			return
		}
		log.Error("Authorize Kubernetes API proxy request", "error", err.Error())
		kubestatus.Write(w, http.StatusInternalServerError, kubestatus.ReasonInternalError, "kas could not authorize the request")
		return
	}
	var identity string
	if res.Identity != nil {
		if identity, err = protocol.EncodeIdentity(*res.Identity); err != nil {
			// Fail closed: never forward as the agent itself instead.
			log.Error("Encode identity for agent", "agent_id", res.AgentID, "error", err.Error())
			kubestatus.Write(w, http.StatusInternalServerError, kubestatus.ReasonInternalError, "kas could not encode the identity to impersonate")
			return
		}
	}
	if h.opts.OnAuthorized != nil {
		h.opts.OnAuthorized(res)
	}
	rt := &route{auth: res, identity: identity}
	if h.opts.Traffic != nil {
		var rec middleware.Recorded
		w, rec = middleware.Record(w)
		rt.in = countingBody{ReadCloser: r.Body, n: max(r.ContentLength, 0)}
		if r.ContentLength < 0 { // unknown length: count what is read
			r.Body = &rt.in
		}
		defer h.count(r, rt, rec)
	}
	wctx, cancel := context.WithTimeout(ctx, h.opts.AgentWaitTimeout)
	transport, err := h.opts.Router.Route(wctx, res.AgentID)
	cancel()
	if err != nil {
		if ctx.Err() != nil {
			return // the caller went away while we waited
		}
		log.Info("No tunnel for agent", "agent_id", res.AgentID, "error", err.Error())
		w.Header().Set("Retry-After", "5") // client-go retries on its own
		rt.failure = fmt.Sprintf("agent %d is not connected to kas (waited %s); check that agentk is running and can reach kas",
			res.AgentID, h.opts.AgentWaitTimeout)
		kubestatus.Write(w, http.StatusServiceUnavailable, kubestatus.ReasonServiceUnavailable, rt.failure)
		return
	}
	rt.transport = transport
	ctx = context.WithValue(ctx, routeKey{}, rt)
	h.proxy.ServeHTTP(w, r.WithContext(ctx))
}

// maxFailurePath bounds the request path quoted in a failure message.
const maxFailurePath = 200

// count adds the finished request to its agent's traffic. Only a failure
// costs an allocation (its message).
func (h *Handler) count(r *http.Request, rt *route, rec middleware.Recorded) {
	series := h.opts.Traffic.Agent(rt.auth.AgentID)
	status := rec.Status()
	failed := rt.failure != "" || status >= 500
	series.Observe(failed, rt.in.n, rec.BytesWritten())
	if !failed {
		return
	}
	msg := rt.failure
	if msg == "" {
		p := r.URL.Path
		if len(p) > maxFailurePath {
			p = p[:maxFailurePath] + "…"
		}
		msg = fmt.Sprintf("%s %s: the cluster answered %d %s", r.Method, p, status, http.StatusText(status))
	}
	series.Fail(traffic.Failure{Time: time.Now().UTC(), Message: msg, CorrelationID: correlation.FromContext(r.Context())})
}

// countingBody counts the bytes of a request body of unknown length.
type countingBody struct {
	io.ReadCloser
	n int64
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.n += int64(n)
	return n, err
}

// rewrite turns the caller's request into the tunnelled one: credentials and
// any identity the caller tried to choose are removed, kas's decision is set.
func (h *Handler) rewrite(pr *httputil.ProxyRequest) {
	rt := pr.Out.Context().Value(routeKey{}).(*route)
	out := pr.Out
	out.URL.Scheme = "http"
	out.URL.Host = "agent"
	out.Host = ""
	upgrade := ""
	if httpguts.HeaderValuesContainsToken(out.Header["Connection"], "Upgrade") {
		upgrade = out.Header.Get("Upgrade")
	}
	proxyauth.StripCredentials(out)
	if upgrade != "" {
		out.Header.Set("Connection", "Upgrade")
		out.Header.Set("Upgrade", upgrade)
	}
	if id := correlation.FromContext(out.Context()); id != "" {
		out.Header.Set(correlation.Header, id)
	}
	if rt.identity != "" {
		out.Header.Set(protocol.HeaderIdentity, rt.identity)
	}
}

func viaRoute(req *http.Request) (*http.Response, error) {
	return req.Context().Value(routeKey{}).(*route).transport.RoundTrip(req)
}

func (h *Handler) proxyError(w http.ResponseWriter, r *http.Request, err error) {
	ctx := r.Context()
	rt := ctx.Value(routeKey{}).(*route)
	log := h.opts.Logger.With("correlation_id", correlation.FromContext(ctx), "agent_id", rt.auth.AgentID)
	switch {
	case errors.Is(ctx.Err(), context.Canceled):
		log.Debug("Caller went away", "error", err.Error())
		return
	case errors.Is(err, registry.ErrNoTunnel):
		// Every node that held a tunnel lost it between routing and sending.
		log.Info("Agent's tunnels went away", "error", err.Error())
		w.Header().Set("Retry-After", "5")
		rt.failure = fmt.Sprintf("agent %d is not connected to kas any more; it is probably reconnecting", rt.auth.AgentID)
		kubestatus.Write(w, http.StatusServiceUnavailable, kubestatus.ReasonServiceUnavailable, rt.failure)
	case errors.Is(err, context.DeadlineExceeded):
		log.Warn("Kubernetes API request timed out", "error", err.Error())
		rt.failure = fmt.Sprintf("request to agent %d timed out", rt.auth.AgentID)
		kubestatus.Write(w, http.StatusGatewayTimeout, kubestatus.ReasonTimeout, rt.failure)
	default:
		log.Warn("Kubernetes API request through agent failed", "error", err.Error())
		rt.failure = fmt.Sprintf("agent %d failed to complete the request: %v", rt.auth.AgentID, err)
		kubestatus.Write(w, http.StatusBadGateway, kubestatus.ReasonInternalError, rt.failure)
	}
}

// LocalRouter routes to this node's tunnels, waiting for the agent to connect.
type LocalRouter struct {
	Registry registry.Registry
}

// Route returns one of the agent's tunnels on this node.
func (lr LocalRouter) Route(ctx context.Context, agentID int64) (http.RoundTripper, error) {
	for {
		if t, ok := lr.Registry.FindLocal(agentID); ok {
			return t, nil
		}
		if err := lr.Registry.WaitForAgent(ctx, agentID); err != nil {
			return nil, fmt.Errorf("wait for agent %d: %w", agentID, err)
		}
	}
}

type roundTripperFunc func(*http.Request) (*http.Response, error)

func (f roundTripperFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }
