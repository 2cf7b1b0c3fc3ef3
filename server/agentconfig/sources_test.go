package agentconfig_test

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"golang.org/x/net/http2"

	"github.com/kasproject/kas/protocol"
	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/agentconfig"
	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/gitlab/gitlabtest"
	"github.com/kasproject/kas/server/standalone"
	"github.com/kasproject/kas/server/tunnel"
)

const agentToken = "glagent-prod"

// agentBackend is a GitLab that knows the prod agent's token.
type agentBackend struct{}

func (agentBackend) GetAgentInfo(_ context.Context, token string) (*gitlab.AgentInfo, error) {
	if token != agentToken {
		return nil, gitlab.ErrUnauthorized
	}
	info := prod
	return &info, nil
}

func (agentBackend) AuthorizeProxyUser(context.Context, gitlab.AuthorizeProxyUserRequest) (*gitlab.AuthorizeProxyUserResponse, error) {
	return nil, gitlab.ErrUnauthorized
}

func (agentBackend) GetAllowedAgentsForJob(context.Context, string) (*gitlab.AllowedAgentsForJob, error) {
	return nil, gitlab.ErrUnauthorized
}

// pushedRequest is what the agent saw of one request from kas.
type pushedRequest struct {
	method, path, internal, contentType, body string
}

// dialAgent connects to the endpoint like agentk and serves HTTP/2 on the
// tunnel, reporting every request kas sends. Closing the returned
// connection disconnects the agent.
func dialAgent(t *testing.T, url string) (*websocket.Conn, <-chan pushedRequest) {
	t.Helper()
	requests := make(chan pushedRequest, 10)
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		requests <- pushedRequest{r.Method, r.URL.Path, r.Header.Get(protocol.HeaderInternal), r.Header.Get("Content-Type"), string(body)}
		w.WriteHeader(http.StatusNoContent)
	})
	d := websocket.Dialer{Subprotocols: []string{protocol.Subprotocol}}
	ws, resp, err := d.Dial(url, http.Header{"Authorization": {"Bearer " + agentToken}})
	if err != nil {
		t.Fatalf("dial the agent endpoint: %v", err)
	}
	resp.Body.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		(&http2.Server{}).ServeConn(protocol.NewConn(ws), &http2.ServeConnOpts{Handler: handler})
	}()
	t.Cleanup(func() { _ = ws.Close(); <-done })
	return ws, requests
}

func nextRequest(t *testing.T, requests <-chan pushedRequest) pushedRequest {
	t.Helper()
	select {
	case r := <-requests:
		return r
	case <-time.After(5 * time.Second):
		t.Fatal("the agent got no request")
		return pushedRequest{}
	}
}

// TestThroughTunnelEndpoint wires the manager to a real tunnel endpoint as
// the server does, with GitLab faked.
func TestThroughTunnelEndpoint(t *testing.T) {
	srv := gitlabtest.New(t, secret, agentBackend{})
	srv.SetRepositoryFile(prod.ProjectID, prod.DefaultBranch, prodFile, []byte(v1))
	client, err := gitlab.NewClient(gitlab.ClientOptions{BaseURL: srv.URL, Secret: secret})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(client.CloseIdleConnections)
	mgr, err := agentconfig.NewManager(agentconfig.Options{Source: client, Reporter: client, PollPeriod: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(mgr.Close)
	reg := registry.NewMemory()
	endpoint, err := tunnel.NewEndpoint(tunnel.Options{
		API:              client,
		Registry:         reg,
		Logger:           slog.New(slog.DiscardHandler),
		PingInterval:     time.Minute,
		PingTimeout:      10 * time.Second,
		MaxConnectionAge: time.Hour,
		GracePeriod:      5 * time.Second,
		OnConnect:        mgr.Connect,
		OnDisconnect:     mgr.Disconnect,
	})
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(endpoint)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = endpoint.Shutdown(ctx)
		hs.Close()
	})

	ws, requests := dialAgent(t, "ws"+strings.TrimPrefix(hs.URL, "http")+protocol.AgentPath)
	want := pushedRequest{http.MethodPost, protocol.ConfigurationPath, "1", "application/yaml", v1}
	if got := nextRequest(t, requests); got != want {
		t.Fatalf("agent got %+v, want %+v", got, want)
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(srv.Configurations()) == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if got := srv.Configurations(); len(got) != 1 || got[0].AgentID != prod.AgentID || string(got[0].AgentConfig) != j1 {
		t.Fatalf("GitLab received %+v, want agent 1's configuration once", got)
	}

	srv.SetRepositoryFile(prod.ProjectID, prod.DefaultBranch, prodFile, []byte(v2))
	mgr.NotifyPush(context.Background(), prod.ProjectID)
	if got := nextRequest(t, requests); got.body != v2 {
		t.Fatalf("agent got %q after the push, want v2", got.body)
	}

	_ = ws.Close()
	deadline = time.Now().Add(5 * time.Second)
	for {
		if _, ok := reg.FindLocal(prod.AgentID); !ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the agent stayed registered")
		}
		time.Sleep(5 * time.Millisecond)
	}
	fetches := srv.Calls(prodRawPath)
	mgr.NotifyPush(context.Background(), prod.ProjectID) // nobody to fetch for now
	mgr.Close()                                          // waits for any fetch it started
	if n := srv.Calls(prodRawPath); n != fetches {
		t.Fatalf("%d fetches after the agent left, want none", n-fetches)
	}
}

// TestStandaloneSource reads configurations from a standalone repository
// directory, with nothing to report to.
func TestStandaloneSource(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "standalone.yaml")
	write := func(name, content string) {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("standalone.yaml", `
groups: [{id: 10, path: acme}]
projects: [{id: 100, path: acme/infra, default_branch: trunk, repository: infra}]
agents: [{id: 1, name: prod, project: acme/infra, token_sha256: `+standalone.HashToken(agentToken)+`}]
`)
	write("infra/"+prodFile, v1)
	backend, err := standalone.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	info, err := backend.GetAgentInfo(context.Background(), agentToken)
	if err != nil {
		t.Fatal(err)
	}
	logs := &logSink{}
	mgr, err := agentconfig.NewManager(agentconfig.Options{
		Source:     backend,
		Logger:     slog.New(slog.NewJSONHandler(logs, nil)),
		PollPeriod: time.Hour,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(mgr.Close)
	agent := newFakeTunnel(t, info.AgentID, 1)

	mgr.Connect(*info, agent)
	if got := agent.next(t); got != v1 {
		t.Fatalf("agent received %q, want v1", got)
	}
	write("infra/"+prodFile, v2)
	mgr.NotifyPush(context.Background(), info.ProjectID)
	if got := agent.next(t); got != v2 {
		t.Fatalf("agent received %q, want v2", got)
	}
	if err := os.Remove(filepath.Join(dir, "infra", prodFile)); err != nil {
		t.Fatal(err)
	}
	mgr.NotifyPush(context.Background(), info.ProjectID)
	if got := agent.next(t); got != "" {
		t.Fatalf("agent received %q, want the empty configuration", got)
	}
	if errs := logs.fetchErrors(t); len(errs) != 1 || errs[0] != `configuration file not found: ".gitlab/agents/prod/config.yaml"` {
		t.Fatalf("fetch errors %q", errs)
	}
}
