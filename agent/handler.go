package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httputil"
	"net/textproto"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/http/httpguts"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kasproject/kas/protocol"
	"github.com/kasproject/kas/server/correlation"
)

// ServeHTTP serves one request kas sent through the tunnel: requests kas marks
// with protocol.HeaderInternal under protocol.InternalPathPrefix are for
// agentk itself, every other one goes to the Kubernetes API server.
func (a *Agent) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !a.handlersRunning.add() {
		writeStatus(w, http.StatusServiceUnavailable, metav1.StatusReasonServiceUnavailable, "agentk is shutting down")
		return
	}
	defer a.handlersRunning.done()

	start := time.Now()
	rec := &statusRecorder{ResponseWriter: w}
	defer func() {
		code := rec.code()
		a.metrics.requests.WithLabelValues(strconv.Itoa(code)).Inc()
		attrs := []any{"method", r.Method, "path", r.URL.Path, "code", code, "duration", time.Since(start).String()}
		if id := r.Header.Get(correlation.Header); correlation.Valid(id) {
			attrs = append(attrs, "correlation_id", id)
		}
		a.logger.Debug("request served", attrs...)
	}()

	if r.Header.Get(protocol.HeaderInternal) == "1" && strings.HasPrefix(r.URL.Path, protocol.InternalPathPrefix) {
		a.serveInternal(rec, r)
		return
	}
	if err := protocol.CheckPath(r.URL); err != nil {
		// kas refuses such a path already; this guards an older or
		// misbehaving kas too.
		writeStatus(rec, http.StatusBadRequest, metav1.StatusReasonBadRequest, "agentk: "+err.Error())
		return
	}
	id, err := requestIdentity(r.Header)
	if err != nil {
		writeStatus(rec, http.StatusBadRequest, metav1.StatusReasonBadRequest, "agentk: "+err.Error())
		return
	}
	if upgrade := r.Header.Get(protocol.HeaderUpgrade); upgrade != "" {
		a.serveUpgrade(rec, r, id, upgrade)
		return
	}
	proxy := a.bulkProxy
	if openEnded(r) {
		proxy = a.streamProxy
	}
	r.Body = a.requestBodies.Wrap(r.Body, r.ContentLength)
	proxy.ServeHTTP(rec, r.WithContext(context.WithValue(r.Context(), identityKey{}, id)))
}

// openEnded reports whether r asks for a response that stays open (a watch or
// logs -f); such a response holds its copy buffer for as long as it runs.
func openEnded(r *http.Request) bool {
	if strings.Contains(r.URL.Path, "/watch/") {
		return true
	}
	q := r.URL.Query()
	for _, key := range [...]string{"watch", "follow"} {
		if v := q.Get(key); v == "true" || v == "1" {
			return true
		}
	}
	return false
}

func (a *Agent) serveInternal(w http.ResponseWriter, r *http.Request) {
	switch r.URL.Path {
	case protocol.ConfigurationPath:
		a.serveConfiguration(w, r)
	default:
		writeStatus(w, http.StatusNotFound, metav1.StatusReasonNotFound, fmt.Sprintf("agentk has no endpoint %q", r.URL.Path))
	}
}

// identityKey carries the identity to impersonate from ServeHTTP to the
// reverse proxy's Rewrite.
type identityKey struct{}

func newReverseProxy(a *Agent, buffers *bufferPool) *httputil.ReverseProxy {
	return &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(a.apiServer)
			id, _ := pr.In.Context().Value(identityKey{}).(*protocol.Identity)
			setUpstreamIdentity(pr.Out.Header, id, pr.In.Header.Values(protocol.HeaderForwardedFor))
		},
		ModifyResponse: func(resp *http.Response) error {
			deleteTunnelHeaders(resp.Header) // the API server's Kas-* must not pass for agentk's
			return nil
		},
		Transport: a.apiTransport,
		// No FlushInterval: ReverseProxy sends every chunk of an answer of
		// unknown length (watches, logs -f) as it arrives anyway, and an
		// answer of known length then leaves as one HEADERS and one DATA
		// frame with END_STREAM instead of three tunnel writes.
		BufferPool:   buffers,
		ErrorHandler: a.apiServerFailed,
	}
}

// requestIdentity decodes protocol.HeaderIdentity. It returns nil without it,
// which means the agent's own service account.
func requestIdentity(h http.Header) (*protocol.Identity, error) {
	values := h.Values(protocol.HeaderIdentity)
	switch len(values) {
	case 0:
		return nil, nil
	case 1:
	default:
		return nil, fmt.Errorf("request has %d %s headers, want one", len(values), protocol.HeaderIdentity)
	}
	id, err := protocol.DecodeIdentity(values[0])
	if err != nil {
		return nil, err
	}
	// The values become Impersonate-* header values; one net/http refuses to
	// send would otherwise surface as an API server failure.
	check := func(what, v string) error {
		if !httpguts.ValidHeaderFieldValue(v) {
			return fmt.Errorf("identity %s %q contains characters not allowed in an HTTP header", what, v)
		}
		return nil
	}
	errs := []error{check("username", id.Username), check("uid", id.UID)}
	for _, g := range id.Groups {
		errs = append(errs, check("group", g))
	}
	for k, vals := range id.Extra {
		for _, v := range vals {
			errs = append(errs, check("extra "+k+" value", v))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return &id, nil
}

// setUpstreamIdentity makes h carry exactly the identity kas chose: the
// caller's credentials go, and so does every header that speaks for the
// caller's identity or address or for the tunnel (protocol.IsReservedHeader,
// in any spelling) except kas's X-Forwarded-For, forwardedFor, which is put
// back; the agent's own credentials are added by the transport, and id (if
// any) is impersonated.
func setUpstreamIdentity(h http.Header, id *protocol.Identity, forwardedFor []string) {
	h.Del("Authorization")
	protocol.DeleteReservedHeaders(h)
	if len(forwardedFor) > 0 {
		h[protocol.HeaderForwardedFor] = slices.Clone(forwardedFor)
	}
	if id != nil {
		protocol.SetImpersonationHeaders(h, *id)
	}
}

// deleteTunnelHeaders removes Kas-* headers from an API server's answer:
// only agentk speaks the tunnel protocol to kas.
func deleteTunnelHeaders(h http.Header) {
	for k := range h {
		if strings.HasPrefix(textproto.CanonicalMIMEHeaderKey(k), "Kas-") {
			delete(h, k)
		}
	}
}

// apiServerFailed answers when the API server could not be reached or broke
// off; it is the reverse proxy's ErrorHandler.
func (a *Agent) apiServerFailed(w http.ResponseWriter, r *http.Request, err error) {
	if r.Context().Err() != nil {
		// kas cancelled the stream; nobody reads this answer.
		a.logger.Debug("request cancelled by kas", "method", r.Method, "path", r.URL.Path)
	} else {
		a.logger.Warn("Kubernetes API server request failed", "method", r.Method, "path", r.URL.Path,
			"api_server", a.apiServer.Redacted(), "error", err.Error())
	}
	// Kubernetes has no reason for 502; InternalError is what kas gives its
	// own 502s (server/kubestatus), so the caller sees one answer for a
	// failure whichever of the two noticed it first.
	writeStatus(w, http.StatusBadGateway, metav1.StatusReasonInternalError,
		fmt.Sprintf("agentk: the Kubernetes API server failed: %v", err))
}

// writeStatus answers with a Kubernetes Status object so kubectl prints it.
func writeStatus(w http.ResponseWriter, code int, reason metav1.StatusReason, message string) {
	body, _ := json.Marshal(&metav1.Status{ // a Status always marshals
		TypeMeta: metav1.TypeMeta{Kind: "Status", APIVersion: "v1"},
		Status:   metav1.StatusFailure,
		Message:  message,
		Reason:   reason,
		Code:     int32(code),
	})
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(code)
	_, _ = w.Write(body)
}

// statusRecorder remembers the status code written, for metrics and logs.
type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (s *statusRecorder) WriteHeader(code int) {
	if s.status == 0 && code >= 200 {
		s.status = code
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusRecorder) Write(p []byte) (int, error) {
	if s.status == 0 {
		s.status = http.StatusOK
	}
	return s.ResponseWriter.Write(p)
}

// FlushError and Flush let streaming reach the tunnel's writer without a
// lookup through Unwrap on every chunk.
func (s *statusRecorder) FlushError() error {
	if s.status == 0 {
		s.status = http.StatusOK
	}
	return http.NewResponseController(s.ResponseWriter).Flush()
}

func (s *statusRecorder) Flush() { _ = s.FlushError() }

func (s *statusRecorder) Unwrap() http.ResponseWriter { return s.ResponseWriter }

// code is the status to report; an upgrade is reported as 101, what the API
// server answered, rather than the 200 that carries it through the tunnel.
func (s *statusRecorder) code() int {
	if s.status == http.StatusOK && s.Header().Get(protocol.HeaderUpgradeStatus) == "101" {
		return http.StatusSwitchingProtocols
	}
	if s.status == 0 {
		return http.StatusOK
	}
	return s.status
}

// handlerTracker lets Run wait for every request handler before it returns.
type handlerTracker struct {
	mu      sync.Mutex
	closed  bool
	running sync.WaitGroup
}

// add registers a handler; false once the agent has stopped.
func (t *handlerTracker) add() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return false
	}
	t.running.Add(1)
	return true
}

func (t *handlerTracker) done() { t.running.Done() }

func (t *handlerTracker) closeAndWait() {
	t.mu.Lock()
	t.closed = true
	t.mu.Unlock()
	t.running.Wait()
}

// Sizes of the buffers that copy bodies. Every read becomes one HTTP/2 DATA
// frame and one tunnel write, so bulk transfers want large reads (256 KiB
// copies run about 40% faster on loopback than 64 KiB ones); an open-ended
// stream holds its buffer for hours, so watches, logs -f and upgraded
// connections get small ones.
const (
	bulkBufferSize   = 256 << 10
	streamBufferSize = 32 << 10
)

// bufferPool lends the copy buffers of proxied bodies so streaming does not
// allocate per request.
type bufferPool struct {
	size int
	pool sync.Pool
}

func newBufferPool(size int) *bufferPool { return &bufferPool{size: size} }

func (p *bufferPool) Get() []byte {
	if b, ok := p.pool.Get().(*[]byte); ok {
		return *b
	}
	return make([]byte, p.size)
}

func (p *bufferPool) Put(b []byte) {
	if cap(b) != p.size {
		return
	}
	b = b[:p.size]
	p.pool.Put(&b)
}
