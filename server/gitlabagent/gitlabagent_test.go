package gitlabagent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding/gzip"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/kasproject/kas/protocol"
	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/agentconfig"
	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/gitlabagent/agentkpb"
	"github.com/kasproject/kas/server/gitlabagent/agentkpb/gitlabaccesspb"
	"github.com/kasproject/kas/server/gitlabagent/agentkpb/prototoolpb"
	"github.com/kasproject/kas/server/internalapi/gitlabpb"
	"github.com/kasproject/kas/server/tunnel"
)

const goodToken = "good-token"

// agents is a gitlab.API that knows agents by token.
type agents map[string]gitlab.AgentInfo

func (a agents) GetAgentInfo(_ context.Context, token string) (*gitlab.AgentInfo, error) {
	info, ok := a[token]
	if !ok {
		return nil, &gitlab.Error{Op: "get agent info", StatusCode: 401, Err: gitlab.ErrUnauthorized}
	}
	return &info, nil
}

func (a agents) AuthorizeProxyUser(context.Context, gitlab.AuthorizeProxyUserRequest) (*gitlab.AuthorizeProxyUserResponse, error) {
	return nil, errors.New("not used")
}

func (a agents) GetAllowedAgentsForJob(context.Context, string) (*gitlab.AllowedAgentsForJob, error) {
	return nil, errors.New("not used")
}

type fixture struct {
	srv  *Server
	reg  *registry.Memory
	addr string
}

// newFixture serves GitLab agentk connections on a loopback listener
// shared, as on kas's public listener, with an HTTP server answering
// "http".
func newFixture(t *testing.T, mutate func(*Options)) *fixture {
	t.Helper()
	log := slog.New(slog.DiscardHandler)
	reg := registry.NewMemory()
	ep, err := tunnel.NewEndpoint(tunnel.Options{
		API: agents{
			goodToken:     {AgentID: 1, ProjectID: 100, AgentName: "prod", GitalyRepository: map[string]any{"gl_project_path": "acme/infra"}},
			"other-token": {AgentID: 2, ProjectID: 100, AgentName: "stage"},
		},
		Registry: reg, Logger: log,
		PingInterval: time.Minute, PingTimeout: 10 * time.Second,
		MaxConnectionAge: time.Hour, GracePeriod: 5 * time.Second, ConnectionsPerTokenPerMinute: 100,
	})
	if err != nil {
		t.Fatal(err)
	}
	opts := Options{Lifecycle: ep, Logger: log, GitLabExternalURL: "https://gitlab.example.com", IdleTunnelWait: 2 * time.Second}
	if mutate != nil {
		mutate(&opts)
	}
	srv, err := NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "http") })}
	served := make(chan struct{})
	go func() { defer close(served); _ = hs.Serve(srv.SplitListener(ln)) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		_ = ep.Shutdown(ctx)
		_ = hs.Close()
		<-served
	})
	return &fixture{srv: srv, reg: reg, addr: ln.Addr().String()}
}

// dial connects like GitLab's agentk over grpc:// (gzip on every call).
func (f *fixture) dial(t *testing.T) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient("passthrough:///"+f.addr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.UseCompressor(gzip.Name)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	return cc
}

func withToken(ctx context.Context, token string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

var meta = &gitlabpb.AgentMeta{
	Version: "v16.5.0", CommitId: "8daa08cc", PodNamespace: "gitlab-agent", PodName: "agentk-0",
	KubernetesVersion: &gitlabpb.KubernetesVersion{GitVersion: "v1.31.2"},
}

func (f *fixture) waitTunnel(t *testing.T, agentID int64) *Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := f.reg.WaitForAgent(ctx, agentID); err != nil {
		t.Fatalf("agent %d never registered: %v", agentID, err)
	}
	tun, _ := f.reg.FindLocal(agentID)
	return tun.(*Conn)
}

func TestCallsAreAuthenticated(t *testing.T) {
	f := newFixture(t, nil)
	cc := f.dial(t)
	registrar := agentkpb.NewAgentRegistrarClient(cc)
	ctx := testContext(t)

	for _, tc := range []struct {
		name     string
		ctx      context.Context
		wantCode codes.Code
		wantMsg  string
	}{
		{"no token", ctx, codes.Unauthenticated, "missing agent token"},
		{"bad token", withToken(ctx, "wrong"), codes.Unauthenticated, "agent token is not valid"},
	} {
		_, err := registrar.Register(tc.ctx, &agentkpb.RegisterRequest{AgentMeta: meta})
		if st := status.Convert(err); st.Code() != tc.wantCode || !strings.Contains(st.Message(), tc.wantMsg) {
			t.Errorf("%s: got %v, want %s containing %q", tc.name, err, tc.wantCode, tc.wantMsg)
		}
	}
	if _, ok := f.reg.FindLocal(1); ok {
		t.Fatal("a connection became a tunnel without a valid token")
	}

	if _, err := registrar.Register(withToken(ctx, goodToken), &agentkpb.RegisterRequest{AgentMeta: meta, PodId: 7}); err != nil {
		t.Fatal(err)
	}
	info := f.waitTunnel(t, 1).Info()
	if info.Flavor != registry.FlavorGitLab || info.ProjectID != 100 || info.AgentVersion != "v16.5.0" || info.AgentCommit != "8daa08cc" ||
		info.PodName != "agentk-0" || info.PodNamespace != "gitlab-agent" || info.KubernetesVersion != "v1.31.2" || info.ConnectionID <= 0 {
		t.Errorf("tunnel %+v: want GitLab's agentk v16.5.0 in gitlab-agent/agentk-0 on v1.31.2", info)
	}

	// The connection now belongs to agent 1: another agent's token is refused.
	_, err := registrar.Register(withToken(ctx, "other-token"), &agentkpb.RegisterRequest{AgentMeta: meta})
	if status.Code(err) != codes.PermissionDenied {
		t.Errorf("another agent's token on the same connection: got %v, want PermissionDenied", err)
	}
	if _, ok := f.reg.FindLocal(2); ok {
		t.Error("agent 2 got a tunnel through agent 1's connection")
	}
}

func TestUnservedMethodsAreUnimplemented(t *testing.T) {
	f := newFixture(t, nil)
	cc := f.dial(t)
	ctx := withToken(testContext(t), goodToken)
	for _, method := range []string{
		"/gitlab.agent.gitops.rpc.Gitops/GetObjectsToSynchronize",
		"/gitlab.agent.flux.rpc.GitLabFlux/ReconcileProjects",
	} {
		stream, err := cc.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, method)
		if err == nil {
			_ = stream.SendMsg(&agentkpb.RegisterRequest{})
			_ = stream.CloseSend()
			err = stream.RecvMsg(&agentkpb.RegisterResponse{})
		}
		if st := status.Convert(err); st.Code() != codes.Unimplemented || !strings.Contains(st.Message(), method) {
			t.Errorf("%s: got %v, want Unimplemented naming the method", method, err)
		}
	}
}

func TestKeepalivePingsWithoutCalls(t *testing.T) {
	for _, tc := range []struct {
		name     string
		minTime  time.Duration
		wantKept bool
	}{
		{"pings as often as allowed keep the connection", 20 * time.Millisecond, true},
		{"pings more often than allowed end it", time.Second, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, func(o *Options) { o.KeepaliveMinTime = tc.minTime })
			// A client pinging every 40 ms with no call open, as GitLab's
			// agentk does every 55 s; kas answers every ping.
			c, err := net.Dial("tcp", f.addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			fr := newRawHTTP2(t, c)
			goaway := make(chan struct{})
			acks := make(chan struct{}, 100)
			go func() {
				for {
					frame, err := fr.ReadFrame()
					if err != nil {
						return
					}
					switch frame := frame.(type) {
					case *http2.GoAwayFrame:
						close(goaway)
						return
					case *http2.PingFrame:
						if frame.IsAck() {
							acks <- struct{}{}
						}
					case *http2.SettingsFrame:
						if !frame.IsAck() {
							fr.write(func(f *http2.Framer) error { return f.WriteSettingsAck() })
						}
					}
				}
			}()
			const pings = 10
			for i := range pings {
				select {
				case <-goaway:
					if tc.wantKept {
						t.Fatalf("kas sent GOAWAY after %d pings %s apart", i, 40*time.Millisecond)
					}
					return
				case <-time.After(40 * time.Millisecond):
				}
				if err := fr.write(func(f *http2.Framer) error { return f.WritePing(false, [8]byte{byte(i)}) }); err != nil {
					if tc.wantKept {
						t.Fatalf("ping %d: %v", i, err)
					}
					return
				}
			}
			if !tc.wantKept {
				select {
				case <-goaway:
				case <-time.After(2 * time.Second):
					t.Fatal("kas kept a connection pinging more often than it allows")
				}
				return
			}
			for i := range pings {
				select {
				case <-acks:
				case <-time.After(2 * time.Second):
					t.Fatalf("kas answered %d of %d pings", i, pings)
				}
			}
		})
	}
}

func TestSplitListenerSendsHTTPToTheHTTPServer(t *testing.T) {
	f := newFixture(t, nil)
	resp, err := http.Get("http://" + f.addr + "/anything")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "http" {
		t.Fatalf("an HTTP/1.1 request got %q, want the HTTP server's answer", body)
	}
}

// fakeAgentk offers reverse tunnels on a connection as GitLab's agentk does.
type fakeAgentk struct {
	t  *testing.T
	rt agentkpb.ReverseTunnelClient
}

func (a *fakeAgentk) offer(ctx context.Context) agentkpb.ReverseTunnel_ConnectClient {
	a.t.Helper()
	stream, err := a.rt.Connect(ctx)
	if err != nil {
		a.t.Fatal(err)
	}
	desc := &agentkpb.AgentDescriptor{Services: []*agentkpb.Service{{
		Name: "gitlab.agent.kubernetes_api.rpc.KubernetesApi", Methods: []*agentkpb.Method{{Name: "MakeRequest"}},
	}}}
	if err := stream.Send(&agentkpb.ConnectRequest{Msg: &agentkpb.ConnectRequest_Descriptor_{Descriptor_: &agentkpb.Descriptor{AgentDescriptor: desc}}}); err != nil {
		a.t.Fatal(err)
	}
	return stream
}

// receiveRequest reads a routed call up to close_send and returns the
// HTTP request head and body it carried.
func receiveRequest(t *testing.T, stream agentkpb.ReverseTunnel_ConnectClient) (*agentkpb.HttpRequest_Header, []byte) {
	t.Helper()
	first, err := stream.Recv()
	if err != nil {
		t.Fatalf("receive request info: %v", err)
	}
	if m := first.GetRequestInfo().GetMethodName(); m != makeRequestMethod {
		t.Fatalf("routed method %q, want %s", m, makeRequestMethod)
	}
	var head *agentkpb.HttpRequest_Header
	var body []byte
	for {
		msg, err := stream.Recv()
		if err != nil {
			t.Fatalf("receive request: %v", err)
		}
		if msg.GetCloseSend() != nil {
			return head, body
		}
		var hr agentkpb.HttpRequest
		if err := proto.Unmarshal(msg.GetMessage().GetData(), &hr); err != nil {
			t.Fatal(err)
		}
		switch {
		case hr.GetHeader() != nil:
			head = hr.GetHeader()
		case hr.GetData() != nil:
			body = append(body, hr.GetData().GetData()...)
		}
	}
}

func sendResponse(t *testing.T, stream agentkpb.ReverseTunnel_ConnectClient, msgs ...*agentkpb.HttpResponse) {
	t.Helper()
	for _, m := range msgs {
		data, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		if err := stream.Send(&agentkpb.ConnectRequest{Msg: &agentkpb.ConnectRequest_Message{Message: &agentkpb.Message{Data: data}}}); err != nil {
			t.Fatal(err)
		}
	}
}

func responseHead(code int32, header map[string]string) *agentkpb.HttpResponse {
	h := map[string]*prototoolpb.Values{}
	for k, v := range header {
		h[k] = &prototoolpb.Values{Value: []string{v}}
	}
	return &agentkpb.HttpResponse{Message: &agentkpb.HttpResponse_Header_{Header: &agentkpb.HttpResponse_Header{
		Response: &prototoolpb.HttpResponse{StatusCode: code, Status: http.StatusText(int(code)), Header: h}}}}
}

func dataMessage(s string) *agentkpb.HttpResponse {
	return &agentkpb.HttpResponse{Message: &agentkpb.HttpResponse_Data_{Data: &agentkpb.HttpResponse_Data{Data: []byte(s)}}}
}

var responseTrailer = &agentkpb.HttpResponse{Message: &agentkpb.HttpResponse_Trailer_{Trailer: &agentkpb.HttpResponse_Trailer{}}}

func TestRoundTripThroughReverseTunnel(t *testing.T) {
	f := newFixture(t, nil)
	agentk := &fakeAgentk{t: t, rt: agentkpb.NewReverseTunnelClient(f.dial(t))}
	ctx := withToken(testContext(t), goodToken)
	stream := agentk.offer(ctx)
	conn := f.waitTunnel(t, 1)

	id, err := protocol.EncodeIdentity(protocol.Identity{Username: "gitlab:user:alice", Groups: []string{"gitlab:user"},
		Extra: map[string][]string{"agent.gitlab.com/id": {"1"}}})
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest(http.MethodPost, "http://agent/api/v1/namespaces?limit=5&labelSelector=a%3Db", strings.NewReader("request body"))
	req.Header.Set(protocol.HeaderIdentity, id)
	req.Header.Set("Impersonate-User", "system:admin") // must never get through
	req.Header.Set("Connection", "X-Hop")
	req.Header.Set("X-Hop", "per connection")
	req.Header.Set("Accept", "application/json")

	type result struct {
		resp *http.Response
		err  error
	}
	done := make(chan result, 1)
	go func() {
		resp, err := conn.RoundTrip(req)
		done <- result{resp, err}
	}()

	head, body := receiveRequest(t, stream)
	r := head.GetRequest()
	if r.GetMethod() != http.MethodPost || r.GetUrlPath() != "/api/v1/namespaces" ||
		r.GetQuery()["limit"].GetValue()[0] != "5" || r.GetQuery()["labelSelector"].GetValue()[0] != "a=b" {
		t.Errorf("request head %v", r)
	}
	for name := range r.GetHeader() {
		if strings.HasPrefix(name, "Impersonate-") || strings.HasPrefix(name, "Kas-") || name == "Connection" || name == "X-Hop" {
			t.Errorf("agentk got header %s", name)
		}
	}
	if r.GetHeader()["Accept"].GetValue()[0] != "application/json" {
		t.Errorf("agentk lost the Accept header: %v", r.GetHeader())
	}
	var extra agentkpb.HeaderExtra
	if err := head.GetExtra().UnmarshalTo(&extra); err != nil {
		t.Fatal(err)
	}
	imp := extra.GetImpConfig()
	if imp.GetUsername() != "gitlab:user:alice" || len(imp.GetGroups()) != 1 || imp.GetExtra()[0].GetKey() != "agent.gitlab.com/id" {
		t.Errorf("impersonation %v, want kas's decision", imp)
	}
	if string(body) != "request body" || head.GetContentLength() != int64(len("request body")) {
		t.Errorf("body %q (length %d), want the request's", body, head.GetContentLength())
	}

	sendResponse(t, stream, responseHead(200, map[string]string{"Content-Type": "text/plain"}), dataMessage("hello "))
	res := <-done
	if res.err != nil {
		t.Fatal(res.err)
	}
	defer res.resp.Body.Close()
	if res.resp.StatusCode != 200 || res.resp.Header.Get("Content-Type") != "text/plain" {
		t.Fatalf("response %d %v", res.resp.StatusCode, res.resp.Header)
	}
	// The body streams: its first chunk is readable before the rest exists.
	buf := make([]byte, 6)
	if _, err := io.ReadFull(res.resp.Body, buf); err != nil || string(buf) != "hello " {
		t.Fatalf("first chunk %q, %v", buf, err)
	}
	sendResponse(t, stream, dataMessage("world"), responseTrailer)
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	rest, err := io.ReadAll(res.resp.Body)
	if err != nil || string(rest) != "world" {
		t.Fatalf("rest of the body %q, %v", rest, err)
	}
	if _, err := stream.Recv(); err != io.EOF {
		t.Fatalf("after the response the tunnel ended with %v, want a clean end", err)
	}
}

func TestRoundTripErrorsAndCancellation(t *testing.T) {
	f := newFixture(t, nil)
	agentk := &fakeAgentk{t: t, rt: agentkpb.NewReverseTunnelClient(f.dial(t))}
	ctx := withToken(testContext(t), goodToken)

	t.Run("agentk fails the request", func(t *testing.T) {
		stream := agentk.offer(ctx)
		conn := f.waitTunnel(t, 1)
		done := make(chan error, 1)
		go func() {
			req, _ := http.NewRequest(http.MethodGet, "http://agent/version", nil)
			_, err := conn.RoundTrip(req)
			done <- err
		}()
		receiveRequest(t, stream)
		st := status.New(codes.Unavailable, "gRPC -> HTTP: dial tcp 10.0.0.1:443: connection refused")
		if err := stream.Send(&agentkpb.ConnectRequest{Msg: &agentkpb.ConnectRequest_Error{Error: &agentkpb.Error{Status: st.Proto()}}}); err != nil {
			t.Fatal(err)
		}
		_ = stream.CloseSend()
		if err := <-done; err == nil || !strings.Contains(err.Error(), "connection refused") {
			t.Fatalf("RoundTrip: %v, want agentk's reason", err)
		}
	})

	t.Run("the caller cancels", func(t *testing.T) {
		stream := agentk.offer(ctx)
		conn := f.waitTunnel(t, 1)
		reqCtx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() {
			req, _ := http.NewRequestWithContext(reqCtx, http.MethodGet, "http://agent/api/v1/namespaces?watch=1", nil)
			resp, err := conn.RoundTrip(req)
			if err == nil {
				_, err = io.ReadAll(resp.Body)
			}
			done <- err
		}()
		receiveRequest(t, stream)
		sendResponse(t, stream, responseHead(200, nil), dataMessage("{}"))
		cancel()
		if err := <-done; err == nil {
			t.Fatal("a cancelled watch ended without an error")
		}
		// agentk sees its tunnel end with an error: it cancels its request.
		for {
			_, err := stream.Recv()
			if err == nil {
				continue
			}
			if status.Code(err) != codes.Canceled {
				t.Fatalf("agentk's tunnel ended with %v, want Canceled", err)
			}
			break
		}
	})

	t.Run("no idle tunnel", func(t *testing.T) {
		conn := f.waitTunnel(t, 1)
		req, _ := http.NewRequest(http.MethodGet, "http://agent/version", nil)
		start := time.Now()
		_, err := conn.RoundTrip(req)
		if !errors.Is(err, registry.ErrNoTunnel) || time.Since(start) < 2*time.Second {
			t.Fatalf("RoundTrip without idle tunnels: %v after %s; want ErrNoTunnel after IdleTunnelWait", err, time.Since(start))
		}
	})
}

func TestConfigurationStream(t *testing.T) {
	f := newFixture(t, nil)
	cc := f.dial(t)
	ctx := withToken(testContext(t), goodToken)
	stream, err := agentkpb.NewAgentConfigurationClient(cc).GetConfiguration(ctx, &agentkpb.ConfigurationRequest{AgentMeta: meta, SkipRegister: true})
	if err != nil {
		t.Fatal(err)
	}
	conn := f.waitTunnel(t, 1)
	var receiver agentconfig.Receiver = conn

	push := func(doc string) {
		t.Helper()
		if err := receiver.ReceiveConfiguration(ctx, nil, json.RawMessage(doc)); err != nil {
			t.Fatal(err)
		}
	}
	push(`{"observability":{"logging":{"level":"debug"}},"ci_access":{"projects":[{"id":"acme/app"}]},"user_access":{"access_as":{"agent":{}}}}`)
	first, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	cfg := first.GetConfiguration()
	if cfg.GetAgentId() != 1 || cfg.GetProjectId() != 100 || cfg.GetProjectPath() != "acme/infra" ||
		cfg.GetGitlabExternalUrl() != "https://gitlab.example.com" || cfg.GetObservability().GetLogging().GetLevel() != agentkpb.LogLevelEnum_debug ||
		cfg.GetCiAccess().GetProjects()[0].GetId() != "acme/app" || first.GetCommitId() == "" {
		t.Fatalf("first configuration %v", first)
	}
	push(`{"observability":{"logging":{"level":"debug"}},"ci_access":{"projects":[{"id":"acme/app"}]},"user_access":{"access_as":{"agent":{}}}}`) // the same again: not sent
	push(`{}`)
	second, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if second.GetCommitId() == first.GetCommitId() || second.GetConfiguration().GetObservability() != nil {
		t.Fatalf("second configuration %v, want the empty one with another commit", second)
	}

	// agentk resuming with the commit it has gets nothing until a change.
	resumed, err := agentkpb.NewAgentConfigurationClient(cc).GetConfiguration(ctx, &agentkpb.ConfigurationRequest{CommitId: second.GetCommitId()})
	if err != nil {
		t.Fatal(err)
	}
	push(`{"observability":{"logging":{"level":"warn"}}}`)
	third, err := resumed.Recv()
	if err != nil || third.GetConfiguration().GetObservability().GetLogging().GetLevel() != agentkpb.LogLevelEnum_warn {
		t.Fatalf("resumed stream got %v, %v; want the warn configuration first", third, err)
	}
}

func TestAgentConfigurationChecksWhatAgentkChecks(t *testing.T) {
	for _, tc := range []struct {
		name, doc, wantErr string
	}{
		{"empty", `{}`, ""},
		{"kas's own sections are left out", `{"user_access":{"access_as":{"user":{}}},"something_new":1}`, ""},
		{"gitops", `{"gitops":{"manifest_projects":[{"id":"acme/manifests","paths":[{"glob":"**/*.yaml"}],"reconcile_timeout":"3600s","prune":true,"ref":{"branch":"main"}}]}}`, ""},
		{"bad dry run strategy", `{"gitops":{"manifest_projects":[{"id":"x","dry_run_strategy":"sometimes"}]}}`, `gitops.manifest_projects[0].dry_run_strategy is "sometimes"`},
		{"empty glob", `{"gitops":{"manifest_projects":[{"id":"x","paths":[{"glob":""}]}]}}`, "gitops.manifest_projects[0].paths[0].glob must not be empty"},
		{"empty ref", `{"gitops":{"manifest_projects":[{"id":"x","ref":{}}]}}`, "ref must name a tag, a branch or a commit"},
		{"impersonate without username", `{"ci_access":{"groups":[{"id":"acme","access_as":{"impersonate":{"groups":["g"]}}}]}}`, "ci_access.groups[0].access_as.impersonate.username must not be empty"},
		{"extra without values", `{"ci_access":{"projects":[{"id":"a","access_as":{"impersonate":{"username":"u","extra":[{"key":"k"}]}}}]}}`, "extra[0].val must list at least one value"},
		{"container scanning without cadence", `{"container_scanning":{"vulnerability_report":{"namespaces":["default"]}}}`, "container_scanning.cadence must not be empty"},
		{"zero sync interval", `{"remote_development":{"enabled":true,"partial_sync_interval":"0s"}}`, "remote_development.partial_sync_interval must be more than 0"},
		{"wrong type", `{"gitops":{"manifest_projects":"acme"}}`, "does not fit GitLab's agentk"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := agentConfiguration(json.RawMessage(tc.doc), 1, 2, "acme/infra", "https://gitlab.example.com")
			if tc.wantErr == "" {
				if err != nil || resp.GetCommitId() == "" || resp.GetConfiguration().GetAgentId() != 1 {
					t.Fatalf("got %v, %v; want a configuration for agent 1", resp, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("got %v, want an error containing %q", err, tc.wantErr)
			}
		})
	}
}

// modules is a fake GitLab module API.
type modules struct {
	got  gitlab.ModuleRequest
	body []byte
}

func (m *modules) DoModuleRequest(_ context.Context, r gitlab.ModuleRequest) (*gitlab.ModuleResponse, error) {
	m.got = r
	if r.Body != nil {
		m.body, _ = io.ReadAll(r.Body)
	}
	return &http.Response{StatusCode: 201, Status: "201 Created", Header: http.Header{"X-Gitlab": {"yes"}},
		Body: io.NopCloser(strings.NewReader("stored"))}, nil
}

func TestGitlabAccessForwardsToGitLab(t *testing.T) {
	gl := &modules{}
	f := newFixture(t, func(o *Options) { o.GitLab = gl })
	call := func(t *testing.T, cc *grpc.ClientConn) (*agentkpb.HttpResponse_Header, string, error) {
		ctx := withToken(testContext(t), goodToken)
		stream, err := gitlabaccesspb.NewGitlabAccessClient(cc).MakeRequest(ctx)
		if err != nil {
			return nil, "", err
		}
		extra, _ := anypb.New(&gitlabaccesspb.HeaderExtra{ModuleName: "starboard_vulnerability"})
		length := int64(7)
		msgs := []*agentkpb.HttpRequest{
			{Message: &agentkpb.HttpRequest_Header_{Header: &agentkpb.HttpRequest_Header{
				Request: &prototoolpb.HttpRequest{Method: "PUT", UrlPath: "/policies_configuration", Query: map[string]*prototoolpb.Values{"a": {Value: []string{"b"}}},
					Header: map[string]*prototoolpb.Values{"Content-Type": {Value: []string{"application/json"}}, "Authorization": {Value: []string{"Bearer forged"}}}},
				Extra: extra, ContentLength: &length}}},
			{Message: &agentkpb.HttpRequest_Data_{Data: &agentkpb.HttpRequest_Data{Data: []byte("{\"x\":1}")}}},
			{Message: &agentkpb.HttpRequest_Trailer_{Trailer: &agentkpb.HttpRequest_Trailer{}}},
		}
		for _, m := range msgs {
			if err := stream.Send(m); err != nil {
				if err == io.EOF { // kas ended the call: Recv says why
					_, err = stream.Recv()
				}
				return nil, "", err
			}
		}
		_ = stream.CloseSend()
		var head *agentkpb.HttpResponse_Header
		var body bytes.Buffer
		for {
			m, err := stream.Recv()
			if err == io.EOF {
				return head, body.String(), nil
			}
			if err != nil {
				return nil, "", err
			}
			if h := m.GetHeader(); h != nil {
				head = h
			}
			body.Write(m.GetData().GetData())
		}
	}
	head, body, err := call(t, f.dial(t))
	if err != nil {
		t.Fatal(err)
	}
	if head.GetResponse().GetStatusCode() != 201 || head.GetResponse().GetHeader()["X-Gitlab"].GetValue()[0] != "yes" || body != "stored" {
		t.Errorf("agentk got %v %q", head, body)
	}
	r := gl.got
	if r.AgentToken != goodToken || r.Module != "starboard_vulnerability" || r.Method != "PUT" || r.Path != "/policies_configuration" ||
		r.Query.Get("a") != "b" || r.Header.Get("Authorization") != "" || r.Header.Get("Content-Type") != "application/json" ||
		string(gl.body) != `{"x":1}` || r.ContentLength != 7 {
		t.Errorf("GitLab got %+v with body %q", r, gl.body)
	}

	standalone := newFixture(t, nil)
	if _, _, err := call(t, standalone.dial(t)); status.Code(err) != codes.Unimplemented || !strings.Contains(err.Error(), "standalone") {
		t.Errorf("standalone mode: got %v, want Unimplemented saying why", err)
	}
}

func TestShutdownEndsIdleTunnels(t *testing.T) {
	f := newFixture(t, nil)
	agentk := &fakeAgentk{t: t, rt: agentkpb.NewReverseTunnelClient(f.dial(t))}
	stream := agentk.offer(withToken(testContext(t), goodToken))
	conn := f.waitTunnel(t, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := conn.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	// An idle tunnel ends cleanly: agentk opens its next one elsewhere.
	if _, err := stream.Recv(); err != io.EOF {
		t.Fatalf("idle tunnel ended with %v, want a clean end", err)
	}
	select {
	case <-conn.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the connection did not close")
	}
}

func TestHeaderValues(t *testing.T) {
	h := http.Header{
		"Accept":            {"application/json"},
		"Connection":        {"keep-alive, X-Listed"},
		"X-Listed":          {"hop"},
		"Keep-Alive":        {"timeout=5"},
		"Te":                {"trailers"},
		"Transfer-Encoding": {"chunked"},
		"Impersonate-User":  {"system:admin"},
		"impersonate-group": {"system:masters"},
		"Kas-Impersonate":   {"x"},
		"Upgrade":           {"SPDY/3.1"},
		"X-Kept":            {"1", "2"},
	}
	got := headerValues(h, "")
	want := map[string][]string{"Accept": {"application/json"}, "X-Kept": {"1", "2"}}
	if len(got) != len(want) {
		t.Fatalf("kept %v, want %v", got, want)
	}
	for k, v := range want {
		if strings.Join(got[k].GetValue(), ",") != strings.Join(v, ",") {
			t.Errorf("%s: %v, want %v", k, got[k].GetValue(), v)
		}
	}
	up := headerValues(http.Header{"Connection": {"Upgrade"}, "Upgrade": {"SPDY/3.1"}}, "SPDY/3.1")
	if up["Upgrade"].GetValue()[0] != "SPDY/3.1" || up["Connection"].GetValue()[0] != "Upgrade" {
		t.Errorf("upgrade headers %v", up)
	}
}

// rawHTTP2 is the client side of an HTTP/2 connection at the frame level.
type rawHTTP2 struct {
	*http2.Framer
	mu sync.Mutex // one writer at a time
}

func newRawHTTP2(t *testing.T, c net.Conn) *rawHTTP2 {
	t.Helper()
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	r := &rawHTTP2{Framer: http2.NewFramer(c, c)}
	if err := r.write(func(f *http2.Framer) error { return f.WriteSettings() }); err != nil {
		t.Fatal(err)
	}
	return r
}

func (r *rawHTTP2) write(f func(*http2.Framer) error) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return f(r.Framer)
}
