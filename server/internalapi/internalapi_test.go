package internalapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/kasproject/kas/internal/reflectclient"
	"github.com/kasproject/kas/middleware"
	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/internalapi/gitlabpb"
	"github.com/kasproject/kas/server/kasjwt"
)

var (
	apiSecret        = []byte("0123456789abcdef0123456789abcdef")
	privateAPISecret = []byte("fedcba9876543210fedcba9876543210")
	connectedAt      = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	buildTime        = time.Date(2026, 2, 1, 8, 30, 0, 0, time.UTC)
)

// The fully-qualified methods GitLab Rails calls.
const (
	getServerInfo          = "/gitlab.agent.server_info.rpc.ServerInfo/GetServerInfo"
	byAgentIDs             = "/gitlab.agent.agent_tracker.rpc.AgentTracker/GetConnectedAgentsByAgentIDs"
	byProjectIDs           = "/gitlab.agent.agent_tracker.rpc.AgentTracker/GetConnectedAgentsByProjectIDs"
	agentksByAgentIDs      = "/gitlab.agent.agent_tracker.rpc.AgentTracker/GetConnectedAgentksByAgentIDs"
	gitPushEvent           = "/gitlab.agent.notifications.rpc.Notifications/GitPushEvent"
	listAgentConfigFiles   = "/gitlab.agent.configuration_project.rpc.ConfigurationProject/ListAgentConfigFiles"
	healthCheck            = "/grpc.health.v1.Health/Check"
	serverReflectionMethod = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
)

type fakeTunnel struct{ info registry.TunnelInfo }

func (t fakeTunnel) Info() registry.TunnelInfo { return t.info }
func (t fakeTunnel) RoundTrip(*http.Request) (*http.Response, error) {
	return nil, errors.New("fake tunnel carries no requests")
}

// testRegistry holds two connections of agent 1 (project 10) and one of
// agent 2 (project 20).
func testRegistry(t testing.TB) *registry.Memory {
	t.Helper()
	reg := registry.NewMemory()
	for _, info := range []registry.TunnelInfo{
		{AgentID: 1, ProjectID: 10, ConnectionID: 102, AgentVersion: "v18.0.0", AgentCommit: "abc123", PodName: "agentk-b", PodNamespace: "gitlab-agent", KubernetesVersion: "v1.31.2-gke.1000", ConnectedAt: connectedAt},
		{AgentID: 1, ProjectID: 10, ConnectionID: 101, AgentVersion: "v18.0.0", AgentCommit: "abc123", PodName: "agentk-a", PodNamespace: "gitlab-agent", KubernetesVersion: "v1.31.2-gke.1000", ConnectedAt: connectedAt},
		{AgentID: 2, ProjectID: 20, ConnectionID: 201, AgentVersion: "v17.11.0", ConnectedAt: connectedAt},
	} {
		if err := reg.Register(context.Background(), fakeTunnel{info}); err != nil {
			t.Fatal(err)
		}
	}
	return reg
}

type fakeLister struct {
	mu    sync.Mutex
	asked []ConfigProject
	files []AgentConfigFile
	err   error
	delay time.Duration
}

func (l *fakeLister) ListAgentConfigFiles(ctx context.Context, project ConfigProject) ([]AgentConfigFile, error) {
	l.mu.Lock()
	l.asked = append(l.asked, project)
	l.mu.Unlock()
	if l.delay > 0 {
		select {
		case <-time.After(l.delay):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return l.files, l.err
}

func (l *fakeLister) lastAsked() ConfigProject {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.asked[len(l.asked)-1]
}

type push struct {
	projectID int64
	path      string
}

// testOptions are a complete configuration; pushes receives what the
// notifier is told.
func testOptions(t testing.TB, pushes chan<- push) Options {
	t.Helper()
	metrics, err := middleware.NewMetrics(prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	return Options{
		Secret:   apiSecret,
		Registry: testRegistry(t),
		ConfigFiles: &fakeLister{files: []AgentConfigFile{
			{AgentName: "prod", Path: ".gitlab/agents/prod/config.yaml"},
			{AgentName: "dev", Path: ".gitlab/agents/dev/config.yaml"},
		}},
		OnGitPush: func(ctx context.Context, projectID int64, path string) {
			select {
			case pushes <- push{projectID, path}:
			case <-ctx.Done():
			}
		},
		Version:           "v18.1.0",
		Commit:            "0123abcd",
		BuildTime:         buildTime,
		GitLabExternalURL: "https://gitlab.example.com",
		Metrics:           metrics,
	}
}

// serve runs the internal API on a kernel-chosen 127.0.0.1 port, the way
// kas does (http.Server with ServerProtocols), and returns its address.
func serve(t testing.TB, opts Options) string {
	t.Helper()
	h, err := NewHandler(opts)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h, Protocols: ServerProtocols(), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() {
		_ = srv.Close()
		_ = h.Close()
	})
	return ln.Addr().String()
}

func dial(t testing.TB, addr string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// token mints what GitLab Rails sends: issuer is GitLab's host, audience gitlab-kas.
func token(t testing.TB, secret []byte, issuer, audience string) string {
	t.Helper()
	tok, err := kasjwt.Sign(secret, issuer, audience, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func goodToken(t testing.TB) string {
	return token(t, apiSecret, "gitlab.example.com", kasjwt.AudienceKAS)
}

func expiredToken(t *testing.T) string {
	t.Helper()
	now := time.Now()
	tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.RegisteredClaims{
		Issuer:    "gitlab.example.com",
		Audience:  jwt.ClaimStrings{kasjwt.AudienceKAS},
		IssuedAt:  jwt.NewNumericDate(now.Add(-time.Hour)),
		ExpiresAt: jwt.NewNumericDate(now.Add(-30 * time.Minute)),
	}).SignedString(apiSecret)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// longLivedToken is signed correctly but valid for ten years.
func longLivedToken(t *testing.T) string {
	t.Helper()
	now := time.Now()
	tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.RegisteredClaims{
		Issuer:    "gitlab.example.com",
		Audience:  jwt.ClaimStrings{kasjwt.AudienceKAS},
		IssuedAt:  jwt.NewNumericDate(now),
		ExpiresAt: jwt.NewNumericDate(now.Add(10 * 365 * 24 * time.Hour)),
	}).SignedString(apiSecret)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func withToken(ctx context.Context, tok string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "bearer "+tok)
}

func callCtx(t testing.TB) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second) // GitLab's default deadline
	t.Cleanup(cancel)
	return ctx
}

func TestGRPCMethods(t *testing.T) {
	pushes := make(chan push, 1)
	opts := testOptions(t, pushes)
	lister := opts.ConfigFiles.(*fakeLister)
	conn := dial(t, serve(t, opts))

	agent1 := []*gitlabpb.ConnectedAgentInfo{
		connectedAgentFixture(1, 10, 101, "agentk-a"),
		connectedAgentFixture(1, 10, 102, "agentk-b"),
	}
	agent2 := &gitlabpb.ConnectedAgentInfo{
		AgentMeta:    &gitlabpb.AgentMeta{Version: "v17.11.0"},
		ConnectedAt:  timestampFixture(),
		ConnectionId: 201, AgentId: 2, ProjectId: 20,
	}
	tests := []struct {
		name     string
		method   string
		req, out proto.Message
		want     proto.Message
	}{{
		name:   "server info",
		method: getServerInfo,
		req:    &gitlabpb.GetServerInfoRequest{},
		out:    &gitlabpb.GetServerInfoResponse{},
		want: &gitlabpb.GetServerInfoResponse{CurrentServerInfo: &gitlabpb.ServerInfo{
			Version: "v18.1.0", GitRef: "0123abcd", BuildTime: timestampOf(buildTime), GitlabExternalUrl: "https://gitlab.example.com",
		}},
	}, {
		name:   "agents by agent IDs, duplicates and unknown agents ignored",
		method: byAgentIDs,
		req:    &gitlabpb.GetConnectedAgentsByAgentIDsRequest{AgentIds: []int64{1, 3, 1}},
		out:    &gitlabpb.GetConnectedAgentsByAgentIDsResponse{},
		want:   &gitlabpb.GetConnectedAgentsByAgentIDsResponse{Agents: agent1},
	}, {
		name:   "agents by agent IDs, none asked",
		method: byAgentIDs,
		req:    &gitlabpb.GetConnectedAgentsByAgentIDsRequest{},
		out:    &gitlabpb.GetConnectedAgentsByAgentIDsResponse{},
		want:   &gitlabpb.GetConnectedAgentsByAgentIDsResponse{},
	}, {
		name:   "agents by agent IDs under newer GitLab's name",
		method: agentksByAgentIDs,
		req:    &gitlabpb.GetConnectedAgentksByAgentIDsRequest{AgentIds: []int64{2}},
		out:    &gitlabpb.GetConnectedAgentksByAgentIDsResponse{},
		want: &gitlabpb.GetConnectedAgentksByAgentIDsResponse{Agents: []*gitlabpb.ConnectedAgentk{{
			AgentMeta: agent2.AgentMeta, ConnectedAt: agent2.ConnectedAt,
			ConnectionId: agent2.ConnectionId, AgentId: agent2.AgentId, ProjectId: agent2.ProjectId,
		}}},
	}, {
		name:   "agents by project IDs",
		method: byProjectIDs,
		req:    &gitlabpb.GetConnectedAgentsByProjectIDsRequest{ProjectIds: []int64{20, 99}},
		out:    &gitlabpb.GetConnectedAgentsByProjectIDsResponse{},
		want:   &gitlabpb.GetConnectedAgentsByProjectIDsResponse{Agents: []*gitlabpb.ConnectedAgentInfo{agent2}},
	}, {
		name:   "git push event",
		method: gitPushEvent,
		req:    &gitlabpb.GitPushEventRequest{Event: &gitlabpb.GitPushEvent{Project: &gitlabpb.Project{Id: 10, FullPath: "group/config"}}},
		out:    &gitlabpb.GitPushEventResponse{},
		want:   &gitlabpb.GitPushEventResponse{},
	}, {
		name:   "agent config files",
		method: listAgentConfigFiles,
		req: &gitlabpb.ListAgentConfigFilesRequest{
			Repository: &gitlabpb.GitalyRepository{GlRepository: "project-10", GlProjectPath: "group/config"},
			GitalyInfo: &gitlabpb.GitalyInfo{Address: "tcp://gitaly:8075"},
		},
		out: &gitlabpb.ListAgentConfigFilesResponse{},
		want: &gitlabpb.ListAgentConfigFilesResponse{ConfigFiles: []*gitlabpb.AgentConfigFile{
			{Name: ".gitlab/agents/dev/config.yaml", AgentName: "dev"},
			{Name: ".gitlab/agents/prod/config.yaml", AgentName: "prod"},
		}},
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := conn.Invoke(withToken(callCtx(t), goodToken(t)), tt.method, tt.req, tt.out); err != nil {
				t.Fatalf("%s: %v", tt.method, err)
			}
			if !proto.Equal(tt.out, tt.want) {
				t.Errorf("%s answered\n%v\nwant\n%v", tt.method, tt.out, tt.want)
			}
		})
	}

	select {
	case got := <-pushes:
		if got != (push{10, "group/config"}) {
			t.Errorf("notifier got %+v, want project 10 group/config", got)
		}
	case <-time.After(5 * time.Second):
		t.Error("notifier was not told about the push")
	}
	if got, want := lister.lastAsked(), (ConfigProject{ID: 10, Path: "group/config"}); got != want {
		t.Errorf("lister asked for %+v, want %+v", got, want)
	}
}

func connectedAgentFixture(agentID, projectID, connID int64, pod string) *gitlabpb.ConnectedAgentInfo {
	return &gitlabpb.ConnectedAgentInfo{
		AgentMeta: &gitlabpb.AgentMeta{
			Version: "v18.0.0", CommitId: "abc123", PodNamespace: "gitlab-agent", PodName: pod,
			KubernetesVersion: &gitlabpb.KubernetesVersion{Major: "1", Minor: "31", GitVersion: "v1.31.2-gke.1000"},
		},
		ConnectedAt:  timestampFixture(),
		ConnectionId: connID, AgentId: agentID, ProjectId: projectID,
	}
}

func timestampFixture() *timestamppb.Timestamp { return timestampOf(connectedAt) }

func timestampOf(t time.Time) *timestamppb.Timestamp { return timestamppb.New(t) }

func TestGRPCInvalidRequests(t *testing.T) {
	conn := dial(t, serve(t, testOptions(t, make(chan push, 1))))
	tests := []struct {
		name     string
		method   string
		req, out proto.Message
		wantMsg  string
	}{
		{"non-positive agent ID", byAgentIDs, &gitlabpb.GetConnectedAgentsByAgentIDsRequest{AgentIds: []int64{1, 0}}, &gitlabpb.GetConnectedAgentsByAgentIDsResponse{}, "agent_ids[1] is 0"},
		{"non-positive project ID", byProjectIDs, &gitlabpb.GetConnectedAgentsByProjectIDsRequest{ProjectIds: []int64{-4}}, &gitlabpb.GetConnectedAgentsByProjectIDsResponse{}, "project_ids[0] is -4"},
		{"push without project", gitPushEvent, &gitlabpb.GitPushEventRequest{}, &gitlabpb.GitPushEventResponse{}, "event.project.id must be a positive project ID"},
		{"repository of a wiki", listAgentConfigFiles, &gitlabpb.ListAgentConfigFilesRequest{Repository: &gitlabpb.GitalyRepository{GlRepository: "wiki-3"}}, &gitlabpb.ListAgentConfigFilesResponse{}, `"wiki-3" is not a project's repository`},
		{"no repository", listAgentConfigFiles, &gitlabpb.ListAgentConfigFilesRequest{}, &gitlabpb.ListAgentConfigFilesResponse{}, "repository must name the project"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := conn.Invoke(withToken(callCtx(t), goodToken(t)), tt.method, tt.req, tt.out)
			if st := status.Convert(err); st.Code() != codes.InvalidArgument || !strings.Contains(st.Message(), tt.wantMsg) {
				t.Errorf("got %v, want InvalidArgument containing %q", err, tt.wantMsg)
			}
		})
	}
}

func TestAuthentication(t *testing.T) {
	conn := dial(t, serve(t, testOptions(t, make(chan push, 1))))
	tests := []struct {
		name          string
		authorization string // "" sends no metadata
		wantMsg       string
	}{
		{"missing", "", "missing credentials"},
		{"not bearer", "Basic dXNlcjpwYXNz", `must be "bearer <JWT>"`},
		{"garbage", "bearer not-a-jwt", "token is malformed"},
		{"expired", "bearer " + expiredToken(t), "token has expired"},
		{"valid for years", "bearer " + longLivedToken(t), "token is valid for too long"},
		{"wrong audience", "bearer " + token(t, apiSecret, "gitlab.example.com", kasjwt.AudienceGitLab), "wrong audience"},
		{"signed with the private API secret", "bearer " + token(t, privateAPISecret, kasjwt.IssuerPrivateAPI, kasjwt.AudiencePrivateAPI), "signature is invalid"},
		{"private API token with the API secret", "bearer " + token(t, apiSecret, kasjwt.IssuerPrivateAPI, kasjwt.AudiencePrivateAPI), "wrong audience"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := callCtx(t)
			if tt.authorization != "" {
				ctx = metadata.AppendToOutgoingContext(ctx, "authorization", tt.authorization)
			}
			err := conn.Invoke(ctx, getServerInfo, &gitlabpb.GetServerInfoRequest{}, &gitlabpb.GetServerInfoResponse{})
			st := status.Convert(err)
			if st.Code() != codes.Unauthenticated || !strings.Contains(st.Message(), tt.wantMsg) {
				t.Fatalf("got %v, want Unauthenticated containing %q", err, tt.wantMsg)
			}
			if _, tok, _ := strings.Cut(tt.authorization, " "); len(tok) > 8 && strings.Contains(st.Message(), tok) {
				t.Errorf("message echoes the token: %s", st.Message())
			}
		})
	}

	t.Run("bearer scheme is case-insensitive", func(t *testing.T) {
		ctx := metadata.AppendToOutgoingContext(callCtx(t), "authorization", "Bearer "+goodToken(t))
		if err := conn.Invoke(ctx, getServerInfo, &gitlabpb.GetServerInfoRequest{}, &gitlabpb.GetServerInfoResponse{}); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("reflection without a token describes the health service only", func(t *testing.T) {
		services, err := reflectclient.New(conn).ListServices(callCtx(t))
		if err != nil || !slices.Equal(services, []string{"grpc.health.v1.Health"}) {
			t.Fatalf("reflection without a token lists %v (%v), want the health service alone", services, err)
		}
		if _, err := reflectclient.New(conn).Describe(callCtx(t), "gitlab.agent.server_info.rpc.ServerInfo"); err == nil {
			t.Fatal("reflection without a token describes the ServerInfo service")
		}
	})
	t.Run("reflection with a bad token is refused", func(t *testing.T) {
		_, err := reflectclient.New(conn, "authorization", "bearer "+expiredToken(t)).ListServices(callCtx(t))
		if status.Code(err) != codes.Unauthenticated {
			t.Fatalf("reflection with an expired token: %v, want Unauthenticated", err)
		}
	})
}

// TestReadmeGRPCurlCommands runs the README's grpcurl commands with a
// reflection client that, like grpcurl, learns every method from the
// server's reflection service before calling it.
func TestReadmeGRPCurlCommands(t *testing.T) {
	conn := dial(t, serve(t, testOptions(t, make(chan push, 1))))
	withToken := reflectclient.New(conn, "authorization", "bearer "+goodToken(t))

	// grpcurl -plaintext -H "authorization: bearer $TOKEN" 127.0.0.1:8153 list
	services, err := withToken.ListServices(callCtx(t))
	if err != nil || !slices.Contains(services, "gitlab.agent.server_info.rpc.ServerInfo") {
		t.Fatalf("list: %v, %v", services, err)
	}
	// grpcurl … gitlab.agent.server_info.rpc.ServerInfo/GetServerInfo
	out, err := withToken.Invoke(callCtx(t), "gitlab.agent.server_info.rpc.ServerInfo/GetServerInfo", "")
	if err != nil || !strings.Contains(out, `"version":"v18.1.0"`) {
		t.Fatalf("GetServerInfo: %s, %v", out, err)
	}
	// grpcurl … -d '{"agent_ids": [1]}' … AgentTracker/GetConnectedAgentsByAgentIDs
	out, err = withToken.Invoke(callCtx(t), "gitlab.agent.agent_tracker.rpc.AgentTracker/GetConnectedAgentsByAgentIDs", `{"agent_ids": [1]}`)
	if err != nil || !strings.Contains(out, `"connectionId":"101"`) {
		t.Fatalf("GetConnectedAgentsByAgentIDs: %s, %v", out, err)
	}
	// grpcurl -plaintext 127.0.0.1:8153 grpc.health.v1.Health/Check (no token)
	out, err = reflectclient.New(conn).Invoke(callCtx(t), "grpc.health.v1.Health/Check", "")
	if err != nil || out != `{"status":"SERVING"}` {
		t.Fatalf("health check without a token: %s, %v", out, err)
	}
}

// TestReflectionShowsGitLabMessageNames: a reflection client (grpcurl
// describe) sees GitLab's fully-qualified message names.
func TestReflectionShowsGitLabMessageNames(t *testing.T) {
	conn := dial(t, serve(t, testOptions(t, make(chan push, 1))))
	c := reflectclient.New(conn, "authorization", "bearer "+goodToken(t))
	method := func(service, name string) protoreflect.MethodDescriptor {
		t.Helper()
		d, err := c.Describe(callCtx(t), service)
		if err != nil {
			t.Fatalf("describe %s: %v", service, err)
		}
		m := d.(protoreflect.ServiceDescriptor).Methods().ByName(protoreflect.Name(name))
		if m == nil {
			t.Fatalf("%s has no method %s", service, name)
		}
		return m
	}
	fieldType := func(m protoreflect.MessageDescriptor, field string) string {
		t.Helper()
		f := m.Fields().ByName(protoreflect.Name(field))
		if f == nil || f.Message() == nil {
			t.Fatalf("%s has no message field %s", m.FullName(), field)
		}
		return string(f.Message().FullName())
	}
	info := method("gitlab.agent.server_info.rpc.ServerInfo", "GetServerInfo")
	if got := fieldType(info.Output(), "current_server_info"); got != "gitlab.agent.server_info.ServerInfo" {
		t.Errorf("current_server_info is a %s, want gitlab.agent.server_info.ServerInfo", got)
	}
	tracker := "gitlab.agent.agent_tracker.rpc.AgentTracker"
	for _, tc := range []struct{ method, in, out, element string }{
		{"GetConnectedAgentksByAgentIDs", "GetConnectedAgentksByAgentIDsRequest", "GetConnectedAgentksByAgentIDsResponse", "gitlab.agent.agent_tracker.rpc.ConnectedAgentk"},
		{"GetConnectedAgentsByAgentIDs", "GetConnectedAgentsByAgentIDsRequest", "GetConnectedAgentsByAgentIDsResponse", "gitlab.agent.agent_tracker.ConnectedAgentInfo"},
		{"GetConnectedAgentsByProjectIDs", "GetConnectedAgentsByProjectIDsRequest", "GetConnectedAgentsByProjectIDsResponse", "gitlab.agent.agent_tracker.ConnectedAgentInfo"},
	} {
		m := method(tracker, tc.method)
		if in, out := string(m.Input().FullName()), string(m.Output().FullName()); in != "gitlab.agent.agent_tracker.rpc."+tc.in || out != "gitlab.agent.agent_tracker.rpc."+tc.out {
			t.Errorf("%s takes %s and returns %s, want gitlab.agent.agent_tracker.rpc.%s and .%s", tc.method, in, out, tc.in, tc.out)
		}
		if got := fieldType(m.Output(), "agents"); got != tc.element {
			t.Errorf("%s lists %s, want %s", tc.method, got, tc.element)
		}
	}
	for _, tc := range []struct{ service, method, in, out string }{
		{"gitlab.agent.notifications.rpc.Notifications", "GitPushEvent", "gitlab.agent.notifications.rpc.GitPushEventRequest", "gitlab.agent.notifications.rpc.GitPushEventResponse"},
		{"gitlab.agent.configuration_project.rpc.ConfigurationProject", "ListAgentConfigFiles", "gitlab.agent.configuration_project.rpc.ListAgentConfigFilesRequest", "gitlab.agent.configuration_project.rpc.ListAgentConfigFilesResponse"},
	} {
		m := method(tc.service, tc.method)
		if string(m.Input().FullName()) != tc.in || string(m.Output().FullName()) != tc.out {
			t.Errorf("%s: %s -> %s, want %s -> %s", tc.method, m.Input().FullName(), m.Output().FullName(), tc.in, tc.out)
		}
	}
}

func TestNoSecretRefusesEverything(t *testing.T) {
	opts := testOptions(t, make(chan push, 1))
	opts.Secret = nil
	addr := serve(t, opts)
	conn := dial(t, addr)

	for _, method := range []string{getServerInfo, byAgentIDs, gitPushEvent} {
		err := conn.Invoke(withToken(callCtx(t), goodToken(t)), method, &gitlabpb.GetServerInfoRequest{}, &gitlabpb.GetServerInfoResponse{})
		if st := status.Convert(err); st.Code() != codes.Unauthenticated || !strings.Contains(st.Message(), "set api.listen.authentication_secret_file") {
			t.Errorf("%s: got %v, want Unauthenticated saying to set api.listen.authentication_secret_file", method, err)
		}
	}
	resp, err := healthpb.NewHealthClient(conn).Check(callCtx(t), &healthpb.HealthCheckRequest{})
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("health: %v, %v; want NOT_SERVING", resp, err)
	}
	code, body := getJSON(t, addr, "/api/v1/server_info", goodToken(t))
	if code != http.StatusUnauthorized || !strings.Contains(body["error"].(string), "api.listen.authentication_secret_file") {
		t.Errorf("JSON: %d %v; want 401 saying to set api.listen.authentication_secret_file", code, body)
	}
}

func TestGitPushEventAnswersWhileNotifierBlocks(t *testing.T) {
	release := make(chan struct{})
	called := make(chan push, 10)
	opts := testOptions(t, nil)
	opts.OnGitPush = func(ctx context.Context, projectID int64, path string) {
		called <- push{projectID, path}
		select {
		case <-release:
		case <-ctx.Done():
		}
	}
	conn := dial(t, serve(t, opts))
	defer close(release)

	ctx := withToken(callCtx(t), goodToken(t))
	// Warm the connection so the figure is the call, not the dial.
	if err := conn.Invoke(ctx, getServerInfo, &gitlabpb.GetServerInfoRequest{}, &gitlabpb.GetServerInfoResponse{}); err != nil {
		t.Fatal(err)
	}
	for i := range int64(20) {
		req := &gitlabpb.GitPushEventRequest{Event: &gitlabpb.GitPushEvent{Project: &gitlabpb.Project{Id: 1 + i%5, FullPath: "group/p"}}}
		start := time.Now()
		if err := conn.Invoke(ctx, gitPushEvent, req, &gitlabpb.GitPushEventResponse{}); err != nil {
			t.Fatal(err)
		}
		if d := time.Since(start); d >= 100*time.Millisecond {
			t.Fatalf("push %d took %s while the notifier blocks; want < 100ms", i, d)
		}
	}
	select {
	case <-called:
	case <-time.After(5 * time.Second):
		t.Fatal("notifier never called")
	}
}

func TestHealthAndReflection(t *testing.T) {
	conn := dial(t, serve(t, testOptions(t, make(chan push, 1))))

	health := healthpb.NewHealthClient(conn)
	for _, service := range []string{"", "gitlab.agent.server_info.rpc.ServerInfo", "gitlab.agent.agent_tracker.rpc.AgentTracker"} {
		// No token: probes cannot send one.
		resp, err := health.Check(callCtx(t), &healthpb.HealthCheckRequest{Service: service})
		if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Errorf("health of %q: %v, %v; want SERVING", service, resp, err)
		}
	}

	stream, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(withToken(callCtx(t), goodToken(t)))
	if err != nil {
		t.Fatal(err)
	}
	services, err := listServices(stream)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"gitlab.agent.server_info.rpc.ServerInfo",
		"gitlab.agent.agent_tracker.rpc.AgentTracker",
		"gitlab.agent.notifications.rpc.Notifications",
		"gitlab.agent.configuration_project.rpc.ConfigurationProject",
		"grpc.health.v1.Health",
	} {
		if !slices.Contains(services, want) {
			t.Errorf("reflection lists %v, missing %s", services, want)
		}
	}
}

func listServices(stream reflectionpb.ServerReflection_ServerReflectionInfoClient) ([]string, error) {
	if err := stream.Send(&reflectionpb.ServerReflectionRequest{
		MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{},
	}); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	// After io.EOF from Send, Recv returns the call's status.
	resp, err := stream.Recv()
	if err != nil {
		return nil, err
	}
	var names []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		names = append(names, s.GetName())
	}
	sort.Strings(names)
	return names, stream.CloseSend()
}

func TestConfigFileErrors(t *testing.T) {
	tests := []struct {
		name     string
		lister   ConfigFileLister
		wantCode codes.Code
		wantMsg  string
	}{
		{"no lister", nil, codes.Unimplemented, "no source of agent configuration files"},
		{"no such project", &fakeLister{err: fmt.Errorf("get project 10: %w", ErrProjectNotFound)}, codes.NotFound, "project not found"},
		{"GitLab down", &fakeLister{err: errors.New("connect to GitLab: connection refused")}, codes.Unavailable, "connection refused"},
		{"slower than the call timeout", &fakeLister{delay: time.Minute}, codes.DeadlineExceeded, "list agent configuration files of project group/config (ID 10)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			opts := testOptions(t, make(chan push, 1))
			opts.ConfigFiles = tt.lister
			opts.CallTimeout = 50 * time.Millisecond
			conn := dial(t, serve(t, opts))
			err := conn.Invoke(withToken(callCtx(t), goodToken(t)), listAgentConfigFiles, &gitlabpb.ListAgentConfigFilesRequest{
				Repository: &gitlabpb.GitalyRepository{GlRepository: "project-10", GlProjectPath: "group/config"},
			}, &gitlabpb.ListAgentConfigFilesResponse{})
			if st := status.Convert(err); st.Code() != tt.wantCode || !strings.Contains(st.Message(), tt.wantMsg) {
				t.Errorf("got %v, want %s containing %q", err, tt.wantCode, tt.wantMsg)
			}
		})
	}
}

// failingRegistry is a registry whose shared store (Redis) is down.
type failingRegistry struct{ registry.Registry }

func (failingRegistry) Tunnels(context.Context, ...int64) ([]registry.TunnelInfo, error) {
	return nil, errors.New("redis: connection refused")
}

func TestRegistryDown(t *testing.T) {
	opts := testOptions(t, make(chan push, 1))
	opts.Registry = failingRegistry{opts.Registry}
	conn := dial(t, serve(t, opts))
	err := conn.Invoke(withToken(callCtx(t), goodToken(t)), byAgentIDs,
		&gitlabpb.GetConnectedAgentsByAgentIDsRequest{AgentIds: []int64{1}}, &gitlabpb.GetConnectedAgentsByAgentIDsResponse{})
	if st := status.Convert(err); st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "list connected agents: redis: connection refused") {
		t.Errorf("got %v, want Unavailable naming the registry error", err)
	}
}

func TestJSONRoutes(t *testing.T) {
	pushes := make(chan push, 1)
	opts := testOptions(t, pushes)
	lister := opts.ConfigFiles.(*fakeLister)
	addr := serve(t, opts)
	good := goodToken(t)

	tests := []struct {
		name       string
		method     string
		path       string
		token      string
		body       string
		wantStatus int
		// wantJSON are substrings of the compacted response body.
		wantJSON []string
	}{
		{"server info", "GET", "/api/v1/server_info", good, "", 200,
			[]string{`"current_server_info":{"version":"v18.1.0","git_ref":"0123abcd","build_time":"2026-02-01T08:30:00Z","gitlab_external_url":"https://gitlab.example.com"}`}},
		{"agents by ID", "GET", "/api/v1/connected_agents?agent_id=2", good, "", 200,
			[]string{`"agents":[{"agent_meta":{"version":"v17.11.0"`, `"connected_at":"2026-03-01T12:00:00Z","connection_id":"201","agent_id":"2","project_id":"20"}]`}},
		{"agents by comma-separated IDs", "GET", "/api/v1/connected_agents?agent_id=1,2", good, "", 200,
			[]string{`"connection_id":"101"`, `"connection_id":"102"`, `"connection_id":"201"`, `"kubernetes_version":{"major":"1","minor":"31","git_version":"v1.31.2-gke.1000","platform":""}`}},
		{"agents by project", "GET", "/api/v1/connected_agents?project_id=10", good, "", 200,
			[]string{`"connection_id":"101"`, `"connection_id":"102"`}},
		{"no agents connected", "GET", "/api/v1/connected_agents?agent_id=7", good, "", 200,
			[]string{`{"agents":[]}`}},
		{"agents: nothing asked", "GET", "/api/v1/connected_agents", good, "", 400,
			[]string{`"code":"InvalidArgument"`, "?agent_id=1&agent_id=2"}},
		{"agents: both kinds", "GET", "/api/v1/connected_agents?agent_id=1&project_id=2", good, "", 400,
			[]string{"not both"}},
		{"agents: not a number", "GET", "/api/v1/connected_agents?agent_id=x", good, "", 400,
			[]string{`agent_id \"x\" is not a number`}},
		{"push", "POST", "/api/v1/git_push_event", good, `{"event":{"project":{"id":10,"full_path":"group/config"}}}`, 202,
			[]string{`{}`}},
		{"push: bad body", "POST", "/api/v1/git_push_event", good, `{"project":10}`, 400,
			[]string{"decode request body"}},
		{"config files by ID", "GET", "/api/v1/projects/10/agent_config_files", good, "", 200,
			[]string{`{"config_files":[{"name":".gitlab/agents/dev/config.yaml","agent_name":"dev"},{"name":".gitlab/agents/prod/config.yaml","agent_name":"prod"}]}`}},
		{"config files by path", "GET", "/api/v1/projects/group%2Fconfig/agent_config_files", good, "", 200,
			[]string{`"agent_name":"dev"`}},
		{"no token", "GET", "/api/v1/server_info", "", "", 401,
			[]string{`"code":"Unauthenticated"`, "missing credentials", "kas token --secret-file"}},
		{"bad token", "GET", "/api/v1/server_info", "not-a-jwt", "", 401,
			[]string{"token is malformed"}},
		{"private API token", "GET", "/api/v1/connected_agents?agent_id=1", token(t, privateAPISecret, kasjwt.IssuerPrivateAPI, kasjwt.AudiencePrivateAPI), "", 401,
			[]string{"signature is invalid"}},
		{"unknown path", "GET", "/nope", good, "", 404,
			[]string{`"code":"NotFound"`}},
		{"wrong method", "DELETE", "/api/v1/server_info", good, "", 405,
			[]string{`"code":"MethodNotAllowed"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, err := http.NewRequestWithContext(callCtx(t), tt.method, "http://"+addr+tt.path, strings.NewReader(tt.body))
			if err != nil {
				t.Fatal(err)
			}
			if tt.token != "" {
				req.Header.Set("Authorization", "Bearer "+tt.token)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			raw, err := io.ReadAll(resp.Body)
			if err != nil {
				t.Fatal(err)
			}
			var compact bytes.Buffer
			if err := json.Compact(&compact, raw); err != nil {
				t.Fatalf("body is not JSON: %v\n%s", err, raw)
			}
			if resp.StatusCode != tt.wantStatus {
				t.Errorf("status %d, want %d; body %s", resp.StatusCode, tt.wantStatus, compact.String())
			}
			if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type %q, want application/json", ct)
			}
			for _, want := range tt.wantJSON {
				if !strings.Contains(compact.String(), want) {
					t.Errorf("body %s lacks %s", compact.String(), want)
				}
			}
			if tt.wantStatus == 401 && resp.Header.Get("WWW-Authenticate") == "" {
				t.Error("401 without WWW-Authenticate")
			}
		})
	}

	select {
	case got := <-pushes:
		if got != (push{10, "group/config"}) {
			t.Errorf("notifier got %+v, want project 10 group/config", got)
		}
	case <-time.After(5 * time.Second):
		t.Error("notifier was not told about the JSON push")
	}
	if got, want := lister.lastAsked(), (ConfigProject{Path: "group/config"}); got != want {
		t.Errorf("lister asked for %+v, want %+v", got, want)
	}
}

func getJSON(t *testing.T, addr, path, tok string) (int, map[string]any) {
	t.Helper()
	req, err := http.NewRequestWithContext(callCtx(t), http.MethodGet, "http://"+addr+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var body map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, body
}

func TestGRPCOverHTTP1IsExplained(t *testing.T) {
	addr := serve(t, testOptions(t, make(chan push, 1)))
	req, err := http.NewRequestWithContext(callCtx(t), http.MethodPost, "http://"+addr+getServerInfo, strings.NewReader(""))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/grpc")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusHTTPVersionNotSupported || !strings.Contains(string(body), "ServerProtocols") {
		t.Errorf("gRPC over HTTP/1.1: %d %s; want 505 naming ServerProtocols", resp.StatusCode, body)
	}
}

func TestCloseStopsNotifier(t *testing.T) {
	opts := testOptions(t, nil)
	started := make(chan struct{})
	returned := make(chan struct{})
	opts.OnGitPush = func(ctx context.Context, _ int64, _ string) {
		close(started)
		<-ctx.Done()
		close(returned)
	}
	h, err := NewHandler(opts)
	if err != nil {
		t.Fatal(err)
	}
	h.pushes.enqueue(1, "group/p")
	<-started
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-returned:
	default:
		t.Fatal("Close returned before the notifier call it cancelled")
	}
	if err := h.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	h.pushes.enqueue(2, "group/q") // after Close: ignored, not blocked
}
