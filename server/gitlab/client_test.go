package gitlab_test

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/pem"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/kasproject/kas/server/correlation"
	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/gitlab/gitlabtest"
	"github.com/kasproject/kas/server/kasjwt"
	"github.com/kasproject/kas/tlsutil"
)

var secret = []byte("0123456789abcdef0123456789abcdef")

// Credentials the backend knows. Each refusal token gets its sentinel.
const (
	agentToken     = "glagent-good"
	userKey        = "glpat-user"
	jobToken       = "glcbt-job"
	forbiddenToken = "token-forbidden"
	goneToken      = "token-gone"
	unknownToken   = "token-unknown"
)

var (
	agentInfo = &gitlab.AgentInfo{
		ProjectID: 20, AgentID: 7, AgentName: "prod", DefaultBranch: "main",
		GitalyInfo:       map[string]any{"address": "tcp://gitaly:8075"},
		GitalyRepository: map[string]any{"storage_name": "default", "relative_path": "group/agents.git"},
	}
	proxyUser = &gitlab.AuthorizeProxyUserResponse{
		Agent: gitlab.AuthorizedAgent{ID: 7, ConfigProject: gitlab.IDRef{ID: 20}},
		User:  gitlab.User{ID: 1, Username: "root"},
		AccessAs: gitlab.UserAccessAs{User: &gitlab.UserAccessUser{
			Projects: []gitlab.RoleRef{{ID: 20, Roles: []string{"developer"}}},
			Groups:   []gitlab.RoleRef{{ID: 5, Roles: []string{"maintainer"}}},
		}},
	}
	allowedAgents = &gitlab.AllowedAgentsForJob{
		AllowedAgents: []gitlab.AllowedAgent{{
			ID: 7, ConfigProject: gitlab.IDRef{ID: 20},
			Configuration: gitlab.AgentConfiguration{DefaultNamespace: "ci", AccessAs: &gitlab.CIAccessAs{CIJob: &struct{}{}}},
		}},
		Job: gitlab.IDRef{ID: 99}, Pipeline: gitlab.IDRef{ID: 98},
		Project:     gitlab.JobProject{ID: 21, Groups: []gitlab.IDRef{{ID: 5}}},
		User:        gitlab.User{ID: 1, Username: "root"},
		Environment: &gitlab.Environment{Slug: "prod", Tier: "production"},
	}
)

// backend answers for the fixed credentials above.
type backend struct{}

func refusal(token string) error {
	switch {
	case strings.HasPrefix(token, forbiddenToken):
		return gitlab.ErrForbidden
	case strings.HasPrefix(token, goneToken):
		return gitlab.ErrNotFound
	}
	return gitlab.ErrUnauthorized
}

func (backend) GetAgentInfo(_ context.Context, token string) (*gitlab.AgentInfo, error) {
	if token == agentToken {
		return agentInfo, nil
	}
	return nil, refusal(token)
}

func (backend) AuthorizeProxyUser(_ context.Context, req gitlab.AuthorizeProxyUserRequest) (*gitlab.AuthorizeProxyUserResponse, error) {
	if req.AccessKey == userKey && req.AgentID == 7 {
		return proxyUser, nil
	}
	return nil, refusal(req.AccessKey)
}

func (backend) GetAllowedAgentsForJob(_ context.Context, token string) (*gitlab.AllowedAgentsForJob, error) {
	if token == jobToken {
		return allowedAgents, nil
	}
	return nil, refusal(token)
}

// clock is a settable time source for cache expiry.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func newClock() *clock { return &clock{now: time.Unix(1_700_000_000, 0)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

func newClient(t *testing.T, baseURL string, modify func(*gitlab.ClientOptions)) *gitlab.Client {
	t.Helper()
	opts := gitlab.ClientOptions{BaseURL: baseURL, Secret: secret, Version: "1.2.3", Timeout: 5 * time.Second}
	if modify != nil {
		modify(&opts)
	}
	c, err := gitlab.NewClient(opts)
	if err != nil {
		t.Fatalf("NewClient: %v", err)
	}
	t.Cleanup(c.CloseIdleConnections)
	return c
}

// question is one of the client's cached questions, asked with a credential.
type question struct {
	name   string
	path   string
	good   string // the credential the backend accepts
	ttl    time.Duration
	errTTL time.Duration
	ask    func(ctx context.Context, c *gitlab.Client, credential string) (any, error)
	want   any
}

var questions = []question{
	{
		name: "agent info", path: gitlab.PathAgentInfo, good: agentToken,
		ttl: gitlab.DefaultAgentInfoTTL, errTTL: gitlab.DefaultAgentInfoErrorTTL,
		ask: func(ctx context.Context, c *gitlab.Client, cred string) (any, error) {
			return agentInfoAnswer(c.GetAgentInfo(ctx, cred))
		},
		want: agentInfo,
	},
	{
		name: "authorize proxy user", path: gitlab.PathAuthorizeProxyUser, good: userKey,
		ttl: gitlab.DefaultAllowedAgentTTL, errTTL: gitlab.DefaultAllowedAgentErrorTTL,
		ask: func(ctx context.Context, c *gitlab.Client, cred string) (any, error) {
			return c.AuthorizeProxyUser(ctx, gitlab.AuthorizeProxyUserRequest{AgentID: 7, AccessType: gitlab.AccessTypePersonalAccessToken, AccessKey: cred})
		},
		want: proxyUser,
	},
	{
		name: "allowed agents for job", path: gitlab.PathAllowedAgents, good: jobToken,
		ttl: gitlab.DefaultAllowedAgentTTL, errTTL: gitlab.DefaultAllowedAgentErrorTTL,
		ask: func(ctx context.Context, c *gitlab.Client, cred string) (any, error) {
			return c.GetAllowedAgentsForJob(ctx, cred)
		},
		want: allowedAgents,
	},
}

// agentInfoAnswer checks that an answer says when the token was validated
// and clears that time, so the answer compares equal to the contract's.
func agentInfoAnswer(info *gitlab.AgentInfo, err error) (*gitlab.AgentInfo, error) {
	if err != nil {
		return info, err
	}
	if info.ValidatedAt.IsZero() {
		return nil, errors.New("the answer does not say when GitLab validated the token")
	}
	info.ValidatedAt = time.Time{}
	return info, nil
}

// checkJWT verifies the Gitlab-Kas-Api-Request token against the contract
// as Rails would: HS256, the API secret, iss gitlab-kas, aud gitlab; and
// GitLab KAS's parameters: valid for 30 s, nbf 5 s before iat.
func checkJWT(t *testing.T, h http.Header) {
	t.Helper()
	token := h.Get("Gitlab-Kas-Api-Request")
	if err := kasjwt.Verify(secret, token, "gitlab", "gitlab-kas"); err != nil {
		t.Fatalf("Gitlab-Kas-Api-Request: %v", err)
	}
	var claims jwt.RegisteredClaims
	parsed, err := jwt.ParseWithClaims(token, &claims, func(*jwt.Token) (any, error) { return secret, nil })
	if err != nil {
		t.Fatal(err)
	}
	if alg := parsed.Header["alg"]; alg != "HS256" {
		t.Errorf("alg = %v, want HS256", alg)
	}
	if life := claims.ExpiresAt.Sub(claims.IssuedAt.Time); life != 30*time.Second {
		t.Errorf("JWT lifetime %s, want 30s", life)
	}
	if claims.NotBefore == nil || claims.IssuedAt.Sub(claims.NotBefore.Time) != 5*time.Second {
		t.Errorf("JWT nbf %v, want 5 s before iat %v", claims.NotBefore, claims.IssuedAt)
	}
}

// TestRailsClockBehind: Rails checks nbf to the second with no leeway, so
// kas's tokens must already be valid for a Rails whose clock is behind.
// With nbf = iat a Rails 300 ms behind refused about a third of the calls.
func TestRailsClockBehind(t *testing.T) {
	for _, offset := range []time.Duration{-300 * time.Millisecond, -3 * time.Second} {
		srv := gitlabtest.New(t, secret, backend{}, gitlabtest.WithClockOffset(offset))
		c := newClient(t, srv.URL, func(o *gitlab.ClientOptions) { o.AgentInfoTTL, o.AllowedAgentTTL = -1, -1 })
		ctx := context.Background()
		refused := 0
		for range 5 {
			for _, q := range questions {
				if _, err := q.ask(ctx, c, q.good); err != nil {
					t.Logf("%s: %v", q.name, err)
					refused++
				}
			}
			if err := c.PostAgentConfiguration(ctx, 7, json.RawMessage(`{}`)); err != nil {
				t.Logf("agent configuration: %v", err)
				refused++
			}
			if err := c.SendUsageMetrics(ctx, gitlab.UsageMetrics{Counters: map[string]int64{"x": 1}}); err != nil {
				t.Logf("usage metrics: %v", err)
				refused++
			}
			time.Sleep(200 * time.Millisecond) // land on other fractions of a second
		}
		if refused > 0 {
			t.Errorf("Rails %s off: %d of 25 calls refused, want none", offset, refused)
		}
	}
}

// TestRedirectsAreNotFollowed: kas must never re-send its JWT or a user's,
// job's or agent's token to wherever GitLab's Location points.
func TestRedirectsAreNotFollowed(t *testing.T) {
	var elsewhere atomic.Int32
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		elsewhere.Add(1)
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write([]byte(`{}`))
	}))
	t.Cleanup(other.Close)
	srv := gitlabtest.New(t, secret, backend{})
	var logs syncBuffer
	c := newClient(t, srv.URL, func(o *gitlab.ClientOptions) {
		o.Logger = slog.New(slog.NewJSONHandler(&logs, nil))
	})
	ctx := context.Background()
	calls := []struct {
		name, path string
		do         func() error
	}{
		{"agent info", gitlab.PathAgentInfo, func() error { _, err := c.GetAgentInfo(ctx, agentToken); return err }},
		{"authorize proxy user", gitlab.PathAuthorizeProxyUser, func() error {
			_, err := c.AuthorizeProxyUser(ctx, gitlab.AuthorizeProxyUserRequest{AgentID: 7, AccessType: gitlab.AccessTypeSessionCookie, AccessKey: userKey, CSRFToken: "csrf"})
			return err
		}},
		{"allowed agents", gitlab.PathAllowedAgents, func() error { _, err := c.GetAllowedAgentsForJob(ctx, jobToken); return err }},
		{"agent configuration", gitlab.PathAgentConfiguration, func() error { return c.PostAgentConfiguration(ctx, 7, json.RawMessage(`{}`)) }},
		{"usage metrics", gitlab.PathUsageMetrics, func() error {
			return c.SendUsageMetrics(ctx, gitlab.UsageMetrics{Counters: map[string]int64{"x": 1}})
		}},
	}
	for _, code := range []int{http.StatusMovedPermanently, http.StatusFound, http.StatusTemporaryRedirect, http.StatusPermanentRedirect} {
		for _, call := range calls {
			srv.Fail(call.path, gitlabtest.Failure{Status: code, Location: other.URL + call.path, Times: 1})
			err := call.do()
			var ge *gitlab.Error
			if !errors.As(err, &ge) || !errors.Is(err, gitlab.ErrRedirect) || ge.StatusCode != code {
				t.Fatalf("%d %s: err = %v, want a *gitlab.Error wrapping ErrRedirect with status %d", code, call.name, err, code)
			}
			if gitlab.Cacheable(err) {
				t.Errorf("%d %s: a redirect is cached", code, call.name)
			}
			for _, want := range []string{other.URL + call.path, "gitlab.address", "https://"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("%d %s: %q does not mention %q", code, call.name, err, want)
				}
			}
		}
	}
	if n := elsewhere.Load(); n != 0 {
		t.Fatalf("the redirect target got %d requests, want none", n)
	}
	if !strings.Contains(logs.String(), `"location":"`+other.URL) {
		t.Errorf("the log does not name the Location:\n%s", logs.String())
	}
	for _, secret := range []string{agentToken, userKey, jobToken} {
		if strings.Contains(logs.String(), secret) {
			t.Errorf("the log holds a credential")
		}
	}
}

// syncBuffer is a bytes.Buffer safe for a logger's concurrent writes.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func TestContract(t *testing.T) {
	srv := gitlabtest.New(t, secret, backend{})
	c := newClient(t, srv.URL, nil)

	tests := []struct {
		name       string
		do         func(ctx context.Context) (any, error)
		want       any
		method     string
		path       string
		header     map[string]string // beyond the JWT, X-Request-Id and User-Agent
		body       string            // JSON, compared decoded; "" means none
		correlated bool
	}{
		{
			name:   "agent info",
			do:     func(ctx context.Context) (any, error) { return agentInfoAnswer(c.GetAgentInfo(ctx, agentToken)) },
			want:   agentInfo,
			method: "GET", path: "/api/v4/internal/agents/agentk/agent_info",
			header: map[string]string{"Authorization": "Bearer " + agentToken},
		},
		{
			name: "authorize proxy user",
			do: func(ctx context.Context) (any, error) {
				return c.AuthorizeProxyUser(ctx, gitlab.AuthorizeProxyUserRequest{AgentID: 7, AccessType: gitlab.AccessTypeSessionCookie, AccessKey: userKey, CSRFToken: "csrf-1"})
			},
			want:   proxyUser,
			method: "POST", path: "/api/v4/internal/kubernetes/authorize_proxy_user",
			header: map[string]string{"Content-Type": "application/json"},
			body:   `{"agent_id": 7, "access_type": "session_cookie", "access_key": "glpat-user", "csrf_token": "csrf-1"}`,
		},
		{
			name:   "allowed agents for job",
			do:     func(ctx context.Context) (any, error) { return c.GetAllowedAgentsForJob(ctx, jobToken) },
			want:   allowedAgents,
			method: "GET", path: "/api/v4/job/allowed_agents",
			header: map[string]string{"Job-Token": jobToken},
		},
		{
			name: "agent configuration",
			do: func(ctx context.Context) (any, error) {
				return nil, c.PostAgentConfiguration(ctx, 7, json.RawMessage(`{"ci_access":{"projects":[{"id":"group/app"}]}}`))
			},
			method: "POST", path: "/api/v4/internal/kubernetes/agent_configuration",
			header: map[string]string{"Content-Type": "application/json"},
			body:   `{"agent_id": 7, "agent_config": {"ci_access": {"projects": [{"id": "group/app"}]}}}`,
		},
		{
			name: "usage metrics",
			do: func(ctx context.Context) (any, error) {
				return nil, c.SendUsageMetrics(ctx, gitlab.UsageMetrics{
					Counters:       map[string]int64{"k8s_api_proxy_request": 3},
					UniqueCounters: map[string][]int64{"agent_users_using_ci_tunnel": {1, 2}},
				})
			},
			method: "POST", path: "/api/v4/internal/kubernetes/usage_metrics",
			header: map[string]string{"Content-Type": "application/json"},
			body:   `{"counters": {"k8s_api_proxy_request": 3}, "unique_counters": {"agent_users_using_ci_tunnel": [1, 2]}}`,
		},
	}
	for _, tt := range tests {
		for _, correlated := range []bool{true, false} {
			name := tt.name
			if !correlated {
				name += " without correlation ID"
			}
			t.Run(name, func(t *testing.T) {
				ctx := context.Background()
				if correlated {
					ctx = correlation.WithID(ctx, "corr-"+tt.name)
				}
				before := len(srv.Requests())
				got, err := tt.do(ctx)
				if err != nil {
					t.Fatalf("call: %v", err)
				}
				if tt.want != nil && !reflect.DeepEqual(got, tt.want) {
					t.Errorf("answer = %+v, want %+v", got, tt.want)
				}
				reqs := srv.Requests()[before:]
				if len(reqs) != 1 {
					t.Fatalf("%d requests reached GitLab, want 1 (the same question is cached, so run it once per credential)", len(reqs))
				}
				r := reqs[0]
				if r.Method != tt.method || r.Path != tt.path {
					t.Errorf("request %s %s, want %s %s", r.Method, r.Path, tt.method, tt.path)
				}
				checkJWT(t, r.Header)
				if got := r.Header.Get("User-Agent"); got != "kas/1.2.3" {
					t.Errorf("User-Agent = %q", got)
				}
				wantID := ""
				if correlated {
					wantID = "corr-" + tt.name
				}
				if got := r.Header.Get("X-Request-Id"); got != wantID {
					t.Errorf("X-Request-Id = %q, want %q", got, wantID)
				}
				for k, v := range tt.header {
					if got := r.Header.Get(k); got != v {
						t.Errorf("%s = %q, want %q", k, got, v)
					}
				}
				if tt.body == "" {
					if len(r.Body) != 0 {
						t.Errorf("unexpected body %s", r.Body)
					}
					return
				}
				var gotBody, wantBody any
				if err := json.Unmarshal(r.Body, &gotBody); err != nil {
					t.Fatalf("body %s: %v", r.Body, err)
				}
				if err := json.Unmarshal([]byte(tt.body), &wantBody); err != nil {
					t.Fatal(err)
				}
				if !reflect.DeepEqual(gotBody, wantBody) {
					t.Errorf("body = %s, want %s", r.Body, tt.body)
				}
			})
			if correlated {
				// The second round asks the same questions: a fresh client,
				// so they reach GitLab instead of the cache.
				c = newClient(t, srv.URL, nil)
			}
		}
	}
	if got := srv.Configurations(); len(got) != 2 || got[0].AgentID != 7 {
		t.Errorf("recorded configurations = %+v", got)
	}
	if got := srv.UsageMetrics(); len(got) != 2 || got[0].Counters["k8s_api_proxy_request"] != 3 {
		t.Errorf("recorded usage metrics = %+v", got)
	}
}

func TestWrongSecretIsRefused(t *testing.T) {
	srv := gitlabtest.New(t, secret, backend{})
	c := newClient(t, srv.URL, func(o *gitlab.ClientOptions) { o.Secret = []byte("another secret of 32 bytes......") })
	_, err := c.GetAgentInfo(context.Background(), agentToken)
	if !errors.Is(err, gitlab.ErrUnauthorized) {
		t.Fatalf("err = %v, want ErrUnauthorized", err)
	}
}

func TestAgentInfoPathFallback(t *testing.T) {
	t.Run("older GitLab", func(t *testing.T) {
		srv := gitlabtest.New(t, secret, backend{}, gitlabtest.WithLegacyAgentInfoOnly())
		c := newClient(t, srv.URL, nil)
		// Distinct credentials so the cache does not hide the path choice.
		for _, token := range []string{agentToken, unknownToken, forbiddenToken} {
			_, _ = c.GetAgentInfo(context.Background(), token)
		}
		info, err := c.GetAgentInfo(context.Background(), agentToken)
		if err != nil || info.AgentID != 7 {
			t.Fatalf("GetAgentInfo = %+v, %v", info, err)
		}
		if n := srv.Calls(gitlab.PathAgentInfo); n != 1 {
			t.Errorf("current path asked %d times, want 1 (then remembered)", n)
		}
		if n := srv.Calls(gitlab.PathAgentInfoLegacy); n != 3 {
			t.Errorf("legacy path asked %d times, want 3", n)
		}
	})
	t.Run("current GitLab", func(t *testing.T) {
		srv := gitlabtest.New(t, secret, backend{})
		c := newClient(t, srv.URL, nil)
		// A 404 before the path is known: both paths asked, nothing learnt.
		if _, err := c.GetAgentInfo(context.Background(), goneToken); !errors.Is(err, gitlab.ErrNotFound) {
			t.Fatalf("err = %v, want ErrNotFound", err)
		}
		if n := srv.Calls(gitlab.PathAgentInfoLegacy); n != 1 {
			t.Fatalf("legacy path asked %d times, want 1", n)
		}
		if _, err := c.GetAgentInfo(context.Background(), unknownToken); !errors.Is(err, gitlab.ErrUnauthorized) {
			t.Fatalf("err = %v, want ErrUnauthorized", err)
		}
		// The current path answered; a later 404 is final.
		if _, err := c.GetAgentInfo(context.Background(), goneToken+"-2"); !errors.Is(err, gitlab.ErrNotFound) {
			t.Fatalf("err = %v, want ErrNotFound", err)
		}
		if n := srv.Calls(gitlab.PathAgentInfoLegacy); n != 1 {
			t.Errorf("legacy path asked %d times, want still 1", n)
		}
	})
}

func TestCaching(t *testing.T) {
	for _, q := range questions {
		t.Run(q.name, func(t *testing.T) {
			srv := gitlabtest.New(t, secret, backend{})
			clk := newClock()
			c := newClient(t, srv.URL, func(o *gitlab.ClientOptions) { o.Now = clk.Now })
			ctx := context.Background()

			ask := func(cred string, wantCalls int, wantErr error) {
				t.Helper()
				got, err := q.ask(ctx, c, cred)
				if wantErr == nil {
					if err != nil {
						t.Fatalf("ask: %v", err)
					}
					if !reflect.DeepEqual(got, q.want) {
						t.Fatalf("answer = %+v, want %+v", got, q.want)
					}
				} else {
					if !errors.Is(err, wantErr) {
						t.Fatalf("err = %v, want %v", err, wantErr)
					}
					if strings.Contains(err.Error(), cred) {
						t.Fatalf("error contains the credential: %v", err)
					}
				}
				if n := srv.Calls(q.path); n != wantCalls {
					t.Fatalf("GitLab asked %d times, want %d", n, wantCalls)
				}
			}

			ask(q.good, 1, nil)
			ask(q.good, 1, nil) // hit
			clk.Advance(q.ttl - time.Second)
			ask(q.good, 1, nil) // still fresh
			clk.Advance(time.Second)
			ask(q.good, 2, nil) // expired: asked again

			refusals := []struct {
				cred string
				err  error
			}{{unknownToken, gitlab.ErrUnauthorized}, {forbiddenToken, gitlab.ErrForbidden}, {goneToken, gitlab.ErrNotFound}}
			calls := 2
			for _, r := range refusals {
				calls++
				ask(r.cred, calls, r.err)
				ask(r.cred, calls, r.err) // negative hit
			}
			clk.Advance(q.errTTL - time.Second)
			for _, r := range refusals {
				ask(r.cred, calls, r.err) // still cached
			}
			clk.Advance(time.Second)
			for _, r := range refusals {
				calls++
				ask(r.cred, calls, r.err) // refusal expired: asked again
			}
			// The answer fetched together with the refusals outlives them.
			ask(q.good, calls, nil)
		})
	}
}

func TestNotCached(t *testing.T) {
	failures := []struct {
		name    string
		failure gitlabtest.Failure
		status  int
	}{
		{"500", gitlabtest.Failure{Status: http.StatusInternalServerError, Times: 1}, 500},
		{"502 with message", gitlabtest.Failure{Status: http.StatusBadGateway, Message: "upstream down", Times: 1}, 502},
		{"connection dropped", gitlabtest.Failure{Hangup: true, Times: 1}, 0},
	}
	for _, q := range questions {
		for _, f := range failures {
			t.Run(q.name+"/"+f.name, func(t *testing.T) {
				srv := gitlabtest.New(t, secret, backend{})
				c := newClient(t, srv.URL, nil)
				srv.Fail(q.path, f.failure)
				_, err := q.ask(context.Background(), c, q.good)
				var ge *gitlab.Error
				if !errors.As(err, &ge) || ge.StatusCode != f.status {
					t.Fatalf("err = %#v, want *gitlab.Error with status %d", err, f.status)
				}
				if gitlab.Cacheable(err) {
					t.Errorf("Cacheable(%v) = true", err)
				}
				if f.failure.Message != "" && !strings.Contains(err.Error(), f.failure.Message) {
					t.Errorf("error %q lacks GitLab's message %q", err, f.failure.Message)
				}
				if strings.Contains(err.Error(), q.good) {
					t.Errorf("error contains the credential: %v", err)
				}
				got, err := q.ask(context.Background(), c, q.good)
				if err != nil || !reflect.DeepEqual(got, q.want) {
					t.Fatalf("after the failure: %+v, %v", got, err)
				}
				if n := srv.Calls(q.path); n != 2 {
					t.Errorf("GitLab asked %d times, want 2 (failure not cached)", n)
				}
			})
		}
	}
}

func TestRefusalMessage(t *testing.T) {
	srv := gitlabtest.New(t, secret, backend{})
	c := newClient(t, srv.URL, nil)
	srv.Fail(gitlab.PathAllowedAgents, gitlabtest.Failure{Status: http.StatusForbidden, Message: "job is not running"})
	_, err := c.GetAllowedAgentsForJob(context.Background(), jobToken)
	var ge *gitlab.Error
	if !errors.As(err, &ge) || !errors.Is(err, gitlab.ErrForbidden) {
		t.Fatalf("err = %v, want *gitlab.Error wrapping ErrForbidden", err)
	}
	if ge.StatusCode != 403 || ge.Message != "job is not running" || ge.Op == "" || !strings.HasSuffix(ge.URL, gitlab.PathAllowedAgents) {
		t.Errorf("error fields = %+v", ge)
	}
}

// gatedBackend holds agent info calls until release is closed.
type gatedBackend struct {
	backend
	entered atomic.Int32
	first   chan struct{}
	release chan struct{}
}

func (b *gatedBackend) GetAgentInfo(ctx context.Context, token string) (*gitlab.AgentInfo, error) {
	if b.entered.Add(1) == 1 {
		close(b.first)
	}
	<-b.release
	return b.backend.GetAgentInfo(ctx, token)
}

func TestConcurrentCallsCoalesce(t *testing.T) {
	b := &gatedBackend{first: make(chan struct{}), release: make(chan struct{})}
	srv := gitlabtest.New(t, secret, b)
	c := newClient(t, srv.URL, nil)

	const callers = 8
	var wg sync.WaitGroup
	errs := make(chan error, callers)
	for range callers {
		wg.Go(func() {
			info, err := c.GetAgentInfo(context.Background(), agentToken)
			if err == nil && info.AgentID != 7 {
				err = errors.New("wrong agent")
			}
			errs <- err
		})
	}
	// One impatient caller gives up; the shared call must go on for the rest.
	impatient, cancel := context.WithCancel(context.Background())
	impatientErr := make(chan error, 1)
	go func() {
		_, err := c.GetAgentInfo(impatient, agentToken)
		impatientErr <- err
	}()

	<-b.first
	// Without coalescing the other callers would reach the backend now.
	time.Sleep(100 * time.Millisecond)
	cancel()
	if err := <-impatientErr; !errors.Is(err, context.Canceled) {
		t.Errorf("impatient caller: %v, want context.Canceled", err)
	}
	if n := b.entered.Load(); n != 1 {
		t.Errorf("backend entered %d times while the first call was in flight, want 1", n)
	}
	close(b.release)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("caller: %v", err)
		}
	}
	if n := srv.Calls(gitlab.PathAgentInfo); n != 1 {
		t.Errorf("GitLab asked %d times, want 1", n)
	}
}

func TestTimeout(t *testing.T) {
	srv := gitlabtest.New(t, secret, backend{})
	c := newClient(t, srv.URL, func(o *gitlab.ClientOptions) { o.Timeout = 200 * time.Millisecond })
	for _, q := range questions {
		t.Run(q.name, func(t *testing.T) {
			srv.Fail(q.path, gitlabtest.Failure{Delay: 10 * time.Second, Times: 1})
			start := time.Now()
			_, err := q.ask(context.Background(), c, q.good)
			if elapsed := time.Since(start); elapsed > 2*time.Second {
				t.Errorf("took %s with a 200ms timeout", elapsed)
			}
			if err == nil || !strings.Contains(err.Error(), "200ms timeout") {
				t.Fatalf("err = %v, want it to mention the 200ms timeout", err)
			}
			if gitlab.Cacheable(err) {
				t.Error("timeout is cacheable")
			}
			if _, err := q.ask(context.Background(), c, q.good); err != nil {
				t.Errorf("after the timeout: %v (was it cached?)", err)
			}
		})
	}
}

func TestCallerDeadline(t *testing.T) {
	srv := gitlabtest.New(t, secret, backend{})
	c := newClient(t, srv.URL, nil)
	srv.Fail(gitlab.PathUsageMetrics, gitlabtest.Failure{Delay: 10 * time.Second})
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	err := c.SendUsageMetrics(ctx, gitlab.UsageMetrics{Counters: map[string]int64{"x": 1}})
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "gave up") {
		t.Fatalf("err = %v, want the caller's deadline", err)
	}
}

func TestConnectionRefused(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := "http://" + l.Addr().String()
	l.Close()
	c := newClient(t, addr, nil)
	_, err = c.GetAgentInfo(context.Background(), agentToken)
	var ge *gitlab.Error
	if !errors.As(err, &ge) || ge.StatusCode != 0 {
		t.Fatalf("err = %#v, want *gitlab.Error with status 0", err)
	}
	want := "is gitlab.address (" + addr + ") right and is GitLab running?"
	if !strings.Contains(err.Error(), want) {
		t.Errorf("err = %q, want hint %q", err, want)
	}
	if strings.Contains(err.Error(), agentToken) {
		t.Errorf("error contains the token: %v", err)
	}
}

func TestUnknownAuthority(t *testing.T) {
	srv := gitlabtest.New(t, secret, backend{}, gitlabtest.WithTLS())
	c := newClient(t, srv.URL, nil)
	_, err := c.GetAgentInfo(context.Background(), agentToken)
	if !tlsutil.IsUnknownAuthority(err) {
		t.Fatalf("err = %v, want an unknown authority", err)
	}
	if !strings.Contains(err.Error(), "add GitLab's CA certificate to gitlab.ca_certificate_file or to SSL_CERT_DIR") {
		t.Errorf("err = %q, want the CA hint", err)
	}

	caFile := filepath.Join(t.TempDir(), "gitlab-ca.pem")
	if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := tlsutil.ClientConfig("", caFile)
	if err != nil {
		t.Fatal(err)
	}
	trusting := newClient(t, srv.URL, func(o *gitlab.ClientOptions) { o.TLS = cfg })
	if _, err := trusting.GetAgentInfo(context.Background(), agentToken); err != nil {
		t.Errorf("with GitLab's CA: %v", err)
	}
}

func TestNewClientValidates(t *testing.T) {
	tests := []struct {
		name    string
		opts    gitlab.ClientOptions
		mention string
	}{
		{"no address", gitlab.ClientOptions{Secret: secret}, "gitlab.address"},
		{"no scheme", gitlab.ClientOptions{BaseURL: "gitlab.example.com", Secret: secret}, "gitlab.address"},
		{"grpc scheme", gitlab.ClientOptions{BaseURL: "grpc://gitlab.example.com", Secret: secret}, "gitlab.address"},
		{"credentials in address", gitlab.ClientOptions{BaseURL: "https://root:hunter2@gitlab.example.com", Secret: secret}, "gitlab.address"},
		{"unparsable address with password", gitlab.ClientOptions{BaseURL: "https://root:hunter2@gitlab example.com", Secret: secret}, "gitlab.address"},
		{"short secret", gitlab.ClientOptions{BaseURL: "https://gitlab.example.com", Secret: secret[:16]}, "got 16"},
		{"negative timeout", gitlab.ClientOptions{BaseURL: "https://gitlab.example.com", Secret: secret, Timeout: -time.Second}, "timeout"},
	}
	for _, tt := range tests {
		_, err := gitlab.NewClient(tt.opts)
		if err == nil || !strings.Contains(err.Error(), tt.mention) {
			t.Errorf("%s: err = %v, want it to mention %q", tt.name, err, tt.mention)
		}
		if err != nil && strings.Contains(err.Error(), "hunter2") {
			t.Errorf("%s: error shows the password: %v", tt.name, err)
		}
	}
}

// TestContractErrors: a 2xx answer without the fields the contract
// requires is refused as a contract error, not used, not cached.
func TestContractErrors(t *testing.T) {
	tests := []struct {
		name, path, body, want string
		ask                    func(c *gitlab.Client) error
	}{
		{"agent_info without agent_id", gitlab.PathAgentInfo,
			`{"project_id":20,"agent_name":"prod","default_branch":"main"}`, "agent_id is missing",
			func(c *gitlab.Client) error { _, err := c.GetAgentInfo(context.Background(), agentToken); return err }},
		{"agent_info with agent_id 0 and no project", gitlab.PathAgentInfo,
			`{"agent_id":0,"agent_name":"prod","default_branch":"main"}`, "agent_id is missing or not positive; project_id",
			func(c *gitlab.Client) error { _, err := c.GetAgentInfo(context.Background(), agentToken); return err }},
		{"agent_info without name and branch", gitlab.PathAgentInfo,
			`{"agent_id":7,"project_id":20}`, "agent_name is missing; default_branch is missing",
			func(c *gitlab.Client) error { _, err := c.GetAgentInfo(context.Background(), agentToken); return err }},
		{"agent_info not JSON", gitlab.PathAgentInfo, `<html>`, "not the expected JSON",
			func(c *gitlab.Client) error { _, err := c.GetAgentInfo(context.Background(), agentToken); return err }},
		{"authorize_proxy_user without user", gitlab.PathAuthorizeProxyUser,
			`{"agent":{"id":7,"config_project":{"id":20}},"access_as":{"agent":{}}}`, "user.id is missing",
			func(c *gitlab.Client) error {
				_, err := c.AuthorizeProxyUser(context.Background(), gitlab.AuthorizeProxyUserRequest{AgentID: 7, AccessType: gitlab.AccessTypePersonalAccessToken, AccessKey: userKey})
				return err
			}},
		{"authorize_proxy_user with both access_as", gitlab.PathAuthorizeProxyUser,
			`{"agent":{"id":7,"config_project":{"id":20}},"user":{"id":1,"username":"root"},"access_as":{"agent":{},"user":{}}}`, "exactly one of agent and user",
			func(c *gitlab.Client) error {
				_, err := c.AuthorizeProxyUser(context.Background(), gitlab.AuthorizeProxyUserRequest{AgentID: 7, AccessType: gitlab.AccessTypePersonalAccessToken, AccessKey: userKey})
				return err
			}},
		{"authorize_proxy_user without agent", gitlab.PathAuthorizeProxyUser,
			`{"user":{"id":1,"username":"root"},"access_as":{"agent":{}}}`, "agent.id is missing",
			func(c *gitlab.Client) error {
				_, err := c.AuthorizeProxyUser(context.Background(), gitlab.AuthorizeProxyUserRequest{AgentID: 7, AccessType: gitlab.AccessTypePersonalAccessToken, AccessKey: userKey})
				return err
			}},
		{"allowed_agents without job", gitlab.PathAllowedAgents,
			`{"allowed_agents":[{"id":7,"config_project":{"id":20}}],"pipeline":{"id":98},"project":{"id":21},"user":{"id":1,"username":"root"}}`, "job.id is missing",
			func(c *gitlab.Client) error {
				_, err := c.GetAllowedAgentsForJob(context.Background(), jobToken)
				return err
			}},
		{"allowed_agents with an agent without id", gitlab.PathAllowedAgents,
			`{"allowed_agents":[{"config_project":{"id":20}}],"job":{"id":99},"pipeline":{"id":98},"project":{"id":21},"user":{"id":1,"username":"root"}}`, "allowed_agents[0].id",
			func(c *gitlab.Client) error {
				_, err := c.GetAllowedAgentsForJob(context.Background(), jobToken)
				return err
			}},
		{"allowed_agents with an empty environment", gitlab.PathAllowedAgents,
			`{"allowed_agents":[],"job":{"id":99},"pipeline":{"id":98},"project":{"id":21},"user":{"id":1,"username":"root"},"environment":{}}`, "environment",
			func(c *gitlab.Client) error {
				_, err := c.GetAllowedAgentsForJob(context.Background(), jobToken)
				return err
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var calls atomic.Int32
			rails := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				calls.Add(1)
				if r.URL.Path != tt.path {
					http.NotFound(w, r)
					return
				}
				w.Header().Set("Content-Type", "application/json")
				_, _ = w.Write([]byte(tt.body))
			}))
			t.Cleanup(rails.Close)
			var logs syncBuffer
			c := newClient(t, rails.URL, func(o *gitlab.ClientOptions) { o.Logger = slog.New(slog.NewJSONHandler(&logs, nil)) })
			for range 2 {
				err := tt.ask(c)
				var ge *gitlab.Error
				if !errors.As(err, &ge) || !errors.Is(err, gitlab.ErrContract) || !strings.Contains(err.Error(), tt.want) {
					t.Fatalf("err = %v, want a contract error mentioning %q", err, tt.want)
				}
				if gitlab.Cacheable(err) {
					t.Fatal("a contract error is cacheable")
				}
			}
			if n := calls.Load(); n != 2 {
				t.Errorf("GitLab asked %d times, want 2 (a contract error is not cached)", n)
			}
			if !strings.Contains(logs.String(), "GitLab contract error") {
				t.Errorf("not logged as a contract error:\n%s", logs.String())
			}
		})
	}
}
