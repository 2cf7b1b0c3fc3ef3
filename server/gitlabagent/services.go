package gitlabagent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/gitlabagent/agentkpb"
	"github.com/kasproject/kas/server/gitlabagent/agentkpb/gitlabaccesspb"
	"github.com/kasproject/kas/server/gitlabagent/agentkpb/prototoolpb"
)

type registrarService struct {
	agentkpb.UnimplementedAgentRegistrarServer
	c *Conn
}

// Register records what agentk reports about itself (version, pod,
// Kubernetes version), shown by GitLab's agent list and kas's status page.
func (s registrarService) Register(_ context.Context, req *agentkpb.RegisterRequest) (*agentkpb.RegisterResponse, error) {
	s.c.setMeta(req.GetAgentMeta())
	return &agentkpb.RegisterResponse{}, nil
}

type gitlabAccessService struct {
	gitlabaccesspb.UnimplementedGitlabAccessServer
	c *Conn
}

type httpStream = grpc.BidiStreamingServer[agentkpb.HttpRequest, agentkpb.HttpResponse]

// MakeRequest forwards an agentk module's HTTP request to GitLab's module
// API with the agent's token, and GitLab's answer back, both streamed.
func (s gitlabAccessService) MakeRequest(stream httpStream) error {
	c := s.c
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	h := first.GetHeader()
	if h == nil || h.GetRequest() == nil {
		return status.Error(codes.InvalidArgument, "the first message of GitlabAccess/MakeRequest must be the request header")
	}
	var extra gitlabaccesspb.HeaderExtra
	if err := h.GetExtra().UnmarshalTo(&extra); err != nil || extra.GetModuleName() == "" {
		return status.Error(codes.InvalidArgument, "GitlabAccess/MakeRequest needs the module's name in the header's extra")
	}
	req := h.GetRequest()
	if _, upgrade := req.GetHeader()["Upgrade"]; upgrade {
		return status.Error(codes.InvalidArgument, "GitlabAccess/MakeRequest cannot upgrade a connection")
	}
	if !strings.HasPrefix(req.GetUrlPath(), "/") || req.GetMethod() == "" {
		return status.Error(codes.InvalidArgument, "GitlabAccess/MakeRequest needs a method and an absolute path")
	}
	gl := c.srv.opts.GitLab
	if gl == nil {
		return status.Errorf(codes.Unimplemented, "kas runs without GitLab (standalone mode), so agentk module %q cannot reach GitLab's module API", extra.GetModuleName())
	}
	c.mu.Lock()
	token := c.token
	c.mu.Unlock()

	ctx := stream.Context()
	body, contentLength := requestBodyFrom(stream, h)
	resp, err := gl.DoModuleRequest(ctx, gitlab.ModuleRequest{
		AgentToken:    token,
		Module:        extra.GetModuleName(),
		Method:        req.GetMethod(),
		Path:          req.GetUrlPath(),
		Query:         queryOf(req.GetQuery()),
		Header:        moduleHeader(req.GetHeader()),
		Body:          body,
		ContentLength: contentLength,
	})
	if err != nil {
		if ctx.Err() != nil {
			return status.FromContextError(ctx.Err()).Err()
		}
		c.logger().Warn("Forward agentk module request to GitLab", "module", extra.GetModuleName(), "error", err.Error())
		return status.Errorf(codes.Unavailable, "forward module request to GitLab: %v", err)
	}
	defer resp.Body.Close()
	return sendHTTPResponse(stream, resp)
}

// requestBodyFrom returns the request body the stream carries after its
// header (nil for none) and its length.
func requestBodyFrom(stream httpStream, h *agentkpb.HttpRequest_Header) (io.Reader, int64) {
	if h.ContentLength != nil && h.GetContentLength() == 0 {
		return nil, 0
	}
	length := int64(-1)
	if h.ContentLength != nil {
		length = h.GetContentLength()
	}
	return &streamBody{stream: stream}, length
}

// streamBody reads a request body from HttpRequest data messages up to
// the trailer.
type streamBody struct {
	stream httpStream
	rest   []byte
	err    error
}

func (b *streamBody) Read(p []byte) (int, error) {
	for len(b.rest) == 0 {
		if b.err != nil {
			return 0, b.err
		}
		m, err := b.stream.Recv()
		switch {
		case errors.Is(err, io.EOF):
			b.err = io.ErrUnexpectedEOF // a body ends with a trailer
		case err != nil:
			b.err = fmt.Errorf("receive request body from agentk: %w", err)
		case m.GetTrailer() != nil:
			b.err = io.EOF
		case m.GetData() != nil:
			b.rest = m.GetData().GetData()
		default:
			b.err = fmt.Errorf("agentk sent %T in a request body", m.GetMessage())
		}
	}
	n := copy(p, b.rest)
	b.rest = b.rest[n:]
	return n, nil
}

// sendHTTPResponse streams resp to agentk: header, body chunks, trailer.
func sendHTTPResponse(stream httpStream, resp *http.Response) error {
	head := &prototoolpb.HttpResponse{
		StatusCode: int32(resp.StatusCode),
		Status:     resp.Status,
		Header:     make(map[string]*prototoolpb.Values, len(resp.Header)),
	}
	for k, v := range resp.Header {
		head.Header[k] = &prototoolpb.Values{Value: v}
	}
	if err := stream.Send(&agentkpb.HttpResponse{Message: &agentkpb.HttpResponse_Header_{Header: &agentkpb.HttpResponse_Header{Response: head}}}); err != nil {
		return err
	}
	bufp := chunkBuffers.Get().(*[]byte)
	defer chunkBuffers.Put(bufp)
	buf := *bufp
	data := &agentkpb.HttpResponse_Data{}
	msg := &agentkpb.HttpResponse{Message: &agentkpb.HttpResponse_Data_{Data: data}}
	for {
		n, err := resp.Body.Read(buf)
		if n > 0 {
			data.Data = buf[:n]
			if err := stream.Send(msg); err != nil {
				return err
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return status.Errorf(codes.Unavailable, "read GitLab's answer: %v", err)
		}
	}
	return stream.Send(&agentkpb.HttpResponse{Message: &agentkpb.HttpResponse_Trailer_{Trailer: &agentkpb.HttpResponse_Trailer{}}})
}

func queryOf(m map[string]*prototoolpb.Values) map[string][]string {
	out := make(map[string][]string, len(m))
	for k, v := range m {
		out[k] = v.GetValue()
	}
	return out
}

// moduleHeader is the module's request header without what kas sets
// itself (credentials) and hop-by-hop headers.
func moduleHeader(m map[string]*prototoolpb.Values) http.Header {
	h := make(http.Header, len(m))
	for k, v := range m {
		ck := http.CanonicalHeaderKey(k)
		switch ck {
		case "Authorization", "Cookie", "Host", "Content-Length", "Gitlab-Kas-Api-Request":
			continue
		}
		if isHop(ck) {
			continue
		}
		h[ck] = v.GetValue()
	}
	return h
}

func isHop(canonical string) bool {
	for _, h := range hopHeaders {
		if h == canonical {
			return true
		}
	}
	return false
}
