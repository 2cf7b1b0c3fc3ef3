package gitlabagent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/textproto"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/http/httpguts"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/kasproject/kas/protocol"
	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/gitlabagent/agentkpb"
	"github.com/kasproject/kas/server/gitlabagent/agentkpb/prototoolpb"
)

// makeRequestMethod is the method kas routes through a reverse tunnel:
// agentk performs the HTTP request against the cluster's API server.
const makeRequestMethod = "/gitlab.agent.kubernetes_api.rpc.KubernetesApi/MakeRequest"

type connectStream = grpc.BidiStreamingServer[agentkpb.ConnectRequest, agentkpb.ConnectResponse]

// reverseTunnel is one idle ReverseTunnel/Connect stream agentk offered.
// It carries at most one call; agentk opens another for the next.
type reverseTunnel struct {
	stream connectStream
	// release is closed to end the stream without a call (draining).
	release chan struct{}
	// assigned receives the call that took the tunnel; it is buffered so
	// assigning never blocks.
	assigned chan *call
}

type reverseTunnelService struct {
	agentkpb.UnimplementedReverseTunnelServer
	c *Conn
}

func (s reverseTunnelService) Connect(stream connectStream) error { return s.c.connect(stream) }

// connect serves one Connect stream: it reads agentk's descriptor, offers
// the stream as an idle tunnel, and lives until a call through it ends.
func (c *Conn) connect(stream connectStream) error {
	var first agentkpb.ConnectRequest
	if err := stream.RecvMsg(&first); err != nil {
		return err
	}
	d := first.GetDescriptor_()
	if d == nil {
		return status.Error(codes.InvalidArgument, "the first message of ReverseTunnel/Connect must be the agent's descriptor")
	}
	if !serves(d.GetAgentDescriptor(), makeRequestMethod) {
		return status.Errorf(codes.FailedPrecondition, "kas routes Kubernetes API requests as %s, which this agentk does not serve", makeRequestMethod)
	}
	t := &reverseTunnel{stream: stream, release: make(chan struct{}), assigned: make(chan *call, 1)}
	if !c.offer(t) {
		return nil // draining: agentk opens its next tunnel on a new connection
	}
	ctx := stream.Context()
	select {
	case cl := <-t.assigned:
		return cl.wait(ctx)
	case <-t.release:
		return nil
	case <-ctx.Done():
		if c.withdraw(t) {
			return status.FromContextError(ctx.Err()).Err()
		}
		// Taken or released meanwhile: a call sees the stream end.
		select {
		case cl := <-t.assigned:
			return cl.wait(ctx)
		case <-t.release:
			return status.FromContextError(ctx.Err()).Err()
		}
	}
}

// serves reports whether an agent's descriptor lists the full method name.
func serves(d *agentkpb.AgentDescriptor, fullMethod string) bool {
	service, method, _ := strings.Cut(strings.TrimPrefix(fullMethod, "/"), "/")
	for _, s := range d.GetServices() {
		if s.GetName() != service {
			continue
		}
		for _, m := range s.GetMethods() {
			if m.GetName() == method {
				return true
			}
		}
	}
	return false
}

// offer adds an idle tunnel and wakes the requests waiting for one; false
// if the connection is draining.
func (c *Conn) offer(t *reverseTunnel) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.draining {
		return false
	}
	c.idle = append(c.idle, t)
	if c.idleReady != nil {
		close(c.idleReady)
		c.idleReady = nil
	}
	return true
}

// withdraw removes an idle tunnel; false if a call took it already.
func (c *Conn) withdraw(t *reverseTunnel) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	i := slices.Index(c.idle, t)
	if i < 0 {
		return false
	}
	c.idle = slices.Delete(c.idle, i, i+1)
	return true
}

// take returns an idle tunnel, waiting for agentk to offer one (it keeps a
// few idle and opens more when they run low) up to IdleTunnelWait.
func (c *Conn) take(ctx context.Context) (*reverseTunnel, error) {
	var timeout <-chan time.Time
	for {
		c.mu.Lock()
		if c.draining {
			c.mu.Unlock()
			return nil, errDraining
		}
		if n := len(c.idle); n > 0 {
			// The most recent first: agentk closes tunnels left idle
			// for a minute, so the oldest ones may be about to go.
			t := c.idle[n-1]
			c.idle[n-1] = nil
			c.idle = c.idle[:n-1]
			c.mu.Unlock()
			return t, nil
		}
		if c.idleReady == nil {
			c.idleReady = make(chan struct{})
		}
		ready := c.idleReady
		c.mu.Unlock()
		if timeout == nil {
			timer := time.NewTimer(c.srv.opts.IdleTunnelWait)
			defer timer.Stop()
			timeout = timer.C
		}
		select {
		case <-ready:
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-timeout:
			return nil, fmt.Errorf("agentk offered no idle reverse tunnel on its connection within %s: %w", c.srv.opts.IdleTunnelWait, registry.ErrNoTunnel)
		}
	}
}

// call is one HTTP request routed through one reverse tunnel.
type call struct {
	t      *reverseTunnel
	sendMu sync.Mutex // one sender at a time: request body, upgrade data, close
	once   sync.Once
	done   chan struct{} // closed by finish: the Connect stream ends
	result error         // the Connect stream's status, set by finish
	// stopWatch stops watching the request's context.
	stopWatch func() bool
}

// finish ends the call: the Connect handler returns err (nil: the stream
// ends normally; otherwise agentk sees it reset and cancels its request).
func (cl *call) finish(err error) {
	cl.once.Do(func() {
		cl.result = err
		close(cl.done)
		if cl.stopWatch != nil {
			cl.stopWatch()
		}
	})
}

// wait is the Connect handler's part: it lives until the call is over.
func (cl *call) wait(ctx context.Context) error {
	select {
	case <-cl.done:
		return cl.result
	case <-ctx.Done(): // agentk went away or the connection was cut
		cl.finish(ctx.Err())
		return status.FromContextError(ctx.Err()).Err()
	}
}

func (cl *call) send(msg *agentkpb.ConnectResponse) error {
	cl.sendMu.Lock()
	defer cl.sendMu.Unlock()
	select {
	case <-cl.done:
		return errCallOver
	default:
	}
	return cl.t.stream.Send(msg)
}

// sendMessage sends one HTTP-over-gRPC message of the routed call.
func (cl *call) sendMessage(data []byte) error {
	return cl.send(&agentkpb.ConnectResponse{Msg: &agentkpb.ConnectResponse_Message{Message: &agentkpb.Message{Data: data}}})
}

var (
	errCallOver = errors.New("the request through the agent is over")

	requestInfo = &agentkpb.ConnectResponse{Msg: &agentkpb.ConnectResponse_RequestInfo{RequestInfo: &agentkpb.RequestInfo{MethodName: makeRequestMethod}}}
	closeSend   = &agentkpb.ConnectResponse{Msg: &agentkpb.ConnectResponse_CloseSend{CloseSend: &agentkpb.CloseSend{}}}
	// requestTrailer ends a request body.
	requestTrailer = mustMarshal(&agentkpb.HttpRequest{Message: &agentkpb.HttpRequest_Trailer_{Trailer: &agentkpb.HttpRequest_Trailer{}}})
)

func mustMarshal(m proto.Message) []byte {
	b, err := proto.Marshal(m)
	if err != nil {
		panic(err)
	}
	return b
}

// maxStartAttempts bounds how often a request tries another idle tunnel
// when the one it took turns out to be closed before anything was sent.
const maxStartAttempts = 3

// RoundTrip sends req to the cluster through one of agentk's idle reverse
// tunnels, as GitLab's KubernetesApi/MakeRequest: the request head with
// the identity to impersonate (kas's decision, from the
// protocol.HeaderIdentity header k8sproxy sets; none means the agent's own
// service account), the body in chunks, a trailer; the response comes
// back the same way and is streamed as it arrives. An upgrade (exec,
// attach, port-forward) answered 101 has a Body that is an
// io.ReadWriteCloser carrying the raw bytes both ways.
func (c *Conn) RoundTrip(req *http.Request) (*http.Response, error) {
	upgrade := upgradeType(req.Header)
	head, err := requestHead(req, upgrade)
	if err != nil {
		closeBody(req)
		return nil, err
	}
	ctx := req.Context()
	var cl *call
	for attempt := 1; ; attempt++ {
		t, err := c.take(ctx)
		if err != nil {
			closeBody(req)
			return nil, err
		}
		cl = &call{t: t, done: make(chan struct{})}
		t.assigned <- cl
		if err = cl.send(requestInfo); err == nil {
			break
		}
		cl.finish(nil)
		if attempt == maxStartAttempts || ctx.Err() != nil {
			closeBody(req)
			return nil, fmt.Errorf("start request through the agent's reverse tunnel: %w", err)
		}
	}
	cl.stopWatch = context.AfterFunc(ctx, func() {
		cl.finish(status.Error(codes.Canceled, "the caller went away"))
	})
	if err := cl.sendMessage(head); err != nil {
		cl.finish(status.Error(codes.Canceled, "send request head"))
		closeBody(req)
		return nil, fmt.Errorf("send request head to the agent: %w", err)
	}
	switch {
	case upgrade != "":
		closeBody(req)
		err = cl.sendMessage(requestTrailer) // the upgraded stream follows after the 101
	case req.Body == nil || req.Body == http.NoBody:
		if err = cl.sendMessage(requestTrailer); err == nil {
			err = cl.send(closeSend)
		}
	default:
		go cl.sendBody(req.Body)
	}
	if err != nil {
		cl.finish(status.Error(codes.Canceled, "send request"))
		return nil, fmt.Errorf("send request to the agent: %w", err)
	}
	body := &responseBody{cl: cl}
	body.data.Data = &agentkpb.HttpResponse_Data{}
	resp, err := body.readHead(req)
	if err != nil {
		cl.finish(status.Error(codes.Canceled, "no response"))
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, err
	}
	return resp, nil
}

func closeBody(req *http.Request) {
	if req.Body != nil {
		_ = req.Body.Close()
	}
}

// sendBody sends the request body in chunks, then the trailer and the
// end of the call's input. A failure to read it cancels the call.
func (cl *call) sendBody(body io.ReadCloser) {
	defer body.Close()
	bufp := chunkBuffers.Get().(*[]byte)
	defer chunkBuffers.Put(bufp)
	buf := *bufp
	msg := &agentkpb.HttpRequest{}
	data := &agentkpb.HttpRequest_Data{}
	msg.Message = &agentkpb.HttpRequest_Data_{Data: data}
	var encoded []byte
	for {
		n, err := body.Read(buf)
		if n > 0 {
			data.Data = buf[:n]
			var merr error
			if encoded, merr = (proto.MarshalOptions{}).MarshalAppend(encoded[:0], msg); merr != nil {
				cl.finish(status.Errorf(codes.Internal, "encode request body: %v", merr))
				return
			}
			if cl.sendMessage(encoded) != nil {
				return // the call is over; the response side reports why
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			cl.finish(status.Errorf(codes.Canceled, "read request body: %v", err))
			return
		}
	}
	if cl.sendMessage(requestTrailer) == nil {
		_ = cl.send(closeSend)
	}
}

// chunkSize is how much of a body one message carries, as in GitLab's agentk.
const chunkSize = 32 << 10

var chunkBuffers = sync.Pool{New: func() any { b := make([]byte, chunkSize); return &b }}

// requestHead encodes the HTTP request head agentk needs: method, path,
// query, the caller's headers less credentials, impersonation and
// hop-by-hop headers, and the identity to impersonate.
func requestHead(req *http.Request, upgrade string) ([]byte, error) {
	var imp *agentkpb.ImpersonationConfig
	if v := req.Header.Get(protocol.HeaderIdentity); v != "" {
		id, err := protocol.DecodeIdentity(v)
		if err != nil {
			return nil, fmt.Errorf("identity to impersonate: %w", err)
		}
		imp = &agentkpb.ImpersonationConfig{Username: id.Username, Uid: id.UID, Groups: id.Groups}
		keys := make([]string, 0, len(id.Extra))
		for k := range id.Extra {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range keys {
			imp.Extra = append(imp.Extra, &agentkpb.ExtraKeyVal{Key: k, Val: id.Extra[k]})
		}
	}
	extra, err := anypb.New(&agentkpb.HeaderExtra{ImpConfig: imp})
	if err != nil {
		return nil, fmt.Errorf("encode identity to impersonate: %w", err)
	}
	query, err := url.ParseQuery(req.URL.RawQuery)
	if err != nil {
		return nil, fmt.Errorf("request query: %w", err)
	}
	contentLength := req.ContentLength
	switch {
	case upgrade != "", req.Body == nil, req.Body == http.NoBody:
		contentLength = 0
	case contentLength <= 0:
		contentLength = -1
	}
	head := &agentkpb.HttpRequest_Header{
		Request: &prototoolpb.HttpRequest{
			Method:  req.Method,
			Header:  headerValues(req.Header, upgrade),
			UrlPath: req.URL.Path,
			Query:   valuesMap(query),
		},
		Extra:         extra,
		ContentLength: &contentLength,
	}
	return proto.Marshal(&agentkpb.HttpRequest{Message: &agentkpb.HttpRequest_Header_{Header: head}})
}

// hopHeaders are the hop-by-hop headers of RFC 9110, which apply to one
// connection only.
var hopHeaders = []string{"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade"}

// headerValues is the header agentk passes to the API server. GitLab's
// agentk honours Impersonate-* headers of the request whenever kas asks
// for no impersonation, so they are removed here too, not only by the
// proxy: whatever reaches a tunnel, a caller cannot choose an identity.
func headerValues(h http.Header, upgrade string) map[string]*prototoolpb.Values {
	out := make(map[string]*prototoolpb.Values, len(h))
	listed := h["Connection"]
	for k, v := range h {
		ck := textproto.CanonicalMIMEHeaderKey(k)
		switch {
		case slices.Contains(hopHeaders, ck),
			strings.HasPrefix(ck, "Impersonate-"),
			strings.HasPrefix(ck, "Kas-"),
			ck == "Host",
			len(listed) > 0 && httpguts.HeaderValuesContainsToken(listed, k):
			continue
		}
		out[k] = &prototoolpb.Values{Value: v}
	}
	if upgrade != "" {
		out["Upgrade"] = &prototoolpb.Values{Value: []string{upgrade}}
		out["Connection"] = &prototoolpb.Values{Value: []string{"Upgrade"}}
	}
	return out
}

func valuesMap(v url.Values) map[string]*prototoolpb.Values {
	if len(v) == 0 {
		return nil
	}
	out := make(map[string]*prototoolpb.Values, len(v))
	for k, vals := range v {
		out[k] = &prototoolpb.Values{Value: vals}
	}
	return out
}

// upgradeType returns the requested protocol if h asks for an HTTP/1.1 upgrade.
func upgradeType(h http.Header) string {
	if !httpguts.HeaderValuesContainsToken(h["Connection"], "Upgrade") {
		return ""
	}
	return strings.TrimSpace(h.Get("Upgrade"))
}

// responseBody reads the routed call's response messages: agentk sends the
// gRPC header, the HTTP response head, body chunks, the HTTP trailer and
// the gRPC trailer, or an error status instead of what is missing.
type responseBody struct {
	cl       *call
	in       agentkpb.ConnectRequest // reused for each message
	msg      agentkpb.HttpResponse
	data     agentkpb.HttpResponse_Data_ // a body chunk, pointing into in
	rest     []byte
	err      error
	complete bool // the HTTP trailer arrived: the body is whole
	upgraded bool // a 101: the rest is upgraded bytes
}

// readHead receives up to the HTTP response head and returns the
// response, whose Body is b (or, after a 101, a duplex around b).
func (b *responseBody) readHead(req *http.Request) (*http.Response, error) {
	for {
		m, err := b.next()
		if err != nil {
			return nil, err
		}
		h, ok := m.(*agentkpb.HttpResponse_Header_)
		if !ok {
			return nil, fmt.Errorf("agentk sent %T before the response head", m)
		}
		r := h.Header.GetResponse()
		resp := &http.Response{
			Status:        strconv.Itoa(int(r.GetStatusCode())) + " " + http.StatusText(int(r.GetStatusCode())),
			StatusCode:    int(r.GetStatusCode()),
			Proto:         "HTTP/1.1",
			ProtoMajor:    1,
			ProtoMinor:    1,
			Header:        make(http.Header, len(r.GetHeader())),
			ContentLength: -1,
			Body:          b,
			Request:       req,
		}
		if s := r.GetStatus(); s != "" {
			resp.Status = s
		}
		for k, v := range r.GetHeader() {
			resp.Header[k] = v.GetValue()
		}
		if n, err := strconv.ParseInt(resp.Header.Get("Content-Length"), 10, 64); err == nil && n >= 0 {
			resp.ContentLength = n
		}
		if resp.StatusCode == http.StatusSwitchingProtocols && upgradeType(req.Header) != "" {
			b.upgraded = true
			resp.Body = &duplexBody{responseBody: b}
		}
		return resp, nil
	}
}

// next receives the next HTTP-over-gRPC message of the response, skipping
// the gRPC header and trailer metadata. A body chunk is returned as
// *agentkpb.HttpResponse_Data_ pointing into the received message, which
// stays valid until the next call.
func (b *responseBody) next() (any, error) {
	for {
		if err := b.cl.t.stream.RecvMsg(&b.in); err != nil {
			if err == io.EOF {
				if b.complete {
					return nil, io.EOF
				}
				return nil, errors.New("agentk ended the response before its end")
			}
			if st, ok := status.FromError(err); ok && st.Code() == codes.Canceled {
				return nil, fmt.Errorf("request through the agent was cancelled: %s", st.Message())
			}
			return nil, fmt.Errorf("receive response from the agent: %w", err)
		}
		switch m := b.in.Msg.(type) {
		case *agentkpb.ConnectRequest_Message:
			if data, ok := responseData(m.Message.GetData()); ok { // most messages: no second copy
				b.data.Data.Data = data
				return &b.data, nil
			}
			if err := proto.Unmarshal(m.Message.GetData(), &b.msg); err != nil {
				return nil, fmt.Errorf("decode response message from the agent: %w", err)
			}
			return b.msg.Message, nil
		case *agentkpb.ConnectRequest_Header, *agentkpb.ConnectRequest_Trailer:
			continue // the gRPC call's own metadata: nothing for HTTP
		case *agentkpb.ConnectRequest_Error:
			st := status.FromProto(m.Error.GetStatus())
			return nil, fmt.Errorf("the agent failed the request: %s: %s", st.Code(), st.Message())
		default:
			return nil, fmt.Errorf("agentk sent an unexpected %T in a reverse tunnel", b.in.Msg)
		}
	}
}

// Read returns the body's bytes as agentk sends them.
func (b *responseBody) Read(p []byte) (int, error) {
	for len(b.rest) == 0 {
		if b.err != nil {
			return 0, b.err
		}
		b.rest, b.err = b.nextData()
		if b.err == io.EOF {
			b.cl.finish(nil)
		}
	}
	n := copy(p, b.rest)
	b.rest = b.rest[n:]
	return n, nil
}

// nextData returns the next chunk of the body (or of the upgraded stream).
func (b *responseBody) nextData() ([]byte, error) {
	for {
		m, err := b.next()
		if err != nil {
			return nil, err
		}
		switch m := m.(type) {
		case *agentkpb.HttpResponse_Data_:
			if !b.upgraded {
				return m.Data.GetData(), nil
			}
		case *agentkpb.HttpResponse_UpgradeData_:
			if b.upgraded {
				return m.UpgradeData.GetData(), nil
			}
		case *agentkpb.HttpResponse_Trailer_:
			b.complete = true
			if !b.upgraded {
				return nil, io.EOF
			}
			continue
		}
		return nil, fmt.Errorf("agentk sent an unexpected %T in the response", m)
	}
}

// Close ends the call: normally once the body was read to its end, or
// else cancels the request in the cluster.
func (b *responseBody) Close() error {
	if b.complete && b.err == io.EOF {
		b.cl.finish(nil)
	} else {
		b.cl.finish(status.Error(codes.Canceled, "the caller closed the response"))
	}
	return nil
}

// duplexBody is an upgraded (101) response: reads are the cluster's bytes,
// writes the caller's.
type duplexBody struct {
	*responseBody
	writeMsg agentkpb.HttpRequest
	data     agentkpb.HttpRequest_UpgradeData
	encoded  []byte
}

func (d *duplexBody) Write(p []byte) (int, error) {
	d.data.Data = p
	d.writeMsg.Message = &agentkpb.HttpRequest_UpgradeData_{UpgradeData: &d.data}
	var err error
	if d.encoded, err = (proto.MarshalOptions{}).MarshalAppend(d.encoded[:0], &d.writeMsg); err != nil {
		return 0, err
	}
	if err := d.cl.sendMessage(d.encoded); err != nil {
		return 0, fmt.Errorf("send upgraded stream to the agent: %w", err)
	}
	return len(p), nil
}

// Close ends the upgraded stream both ways.
func (d *duplexBody) Close() error {
	_ = d.cl.send(closeSend)
	d.cl.finish(nil)
	return nil
}
