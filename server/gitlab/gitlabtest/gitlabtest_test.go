package gitlabtest

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/kasproject/kas/server/correlation"
	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/kasjwt"
)

var secret = []byte("0123456789abcdef0123456789abcdef")

// backend knows one agent token and records what reaches it.
type backend struct {
	err          error // returned for every lookup when set
	correlation  string
	configs      []int64
	usageReports int
}

func (b *backend) GetAgentInfo(ctx context.Context, token string) (*gitlab.AgentInfo, error) {
	b.correlation = correlation.FromContext(ctx)
	if b.err != nil {
		return nil, b.err
	}
	if token != "agent-token" {
		return nil, gitlab.ErrUnauthorized
	}
	return &gitlab.AgentInfo{AgentID: 7, ProjectID: 20, AgentName: "prod"}, nil
}

func (b *backend) AuthorizeProxyUser(context.Context, gitlab.AuthorizeProxyUserRequest) (*gitlab.AuthorizeProxyUserResponse, error) {
	return nil, gitlab.ErrForbidden
}

func (b *backend) GetAllowedAgentsForJob(context.Context, string) (*gitlab.AllowedAgentsForJob, error) {
	return nil, gitlab.ErrNotFound
}

func (b *backend) PostAgentConfiguration(_ context.Context, agentID int64, _ json.RawMessage) error {
	b.configs = append(b.configs, agentID)
	return nil
}

func (b *backend) SendUsageMetrics(context.Context, gitlab.UsageMetrics) error {
	b.usageReports++
	return nil
}

func validJWT(t *testing.T) string {
	t.Helper()
	token, err := kasjwt.Sign(secret, kasjwt.IssuerKAS, kasjwt.AudienceGitLab, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	return token
}

func signed(t *testing.T, key []byte, iss, aud string, exp time.Time) string {
	t.Helper()
	token, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.RegisteredClaims{
		Issuer: iss, Audience: jwt.ClaimStrings{aud}, ExpiresAt: jwt.NewNumericDate(exp),
	}).SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return token
}

// do sends a request and returns the status and GitLab's message or error.
func do(t *testing.T, method, url string, header map[string]string, body string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range header {
		req.Header.Set(k, v)
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
	var m struct {
		Message string `json:"message"`
		Error   string `json:"error"`
	}
	_ = json.Unmarshal(raw, &m)
	return resp.StatusCode, m.Message + m.Error
}

func TestJWTCheck(t *testing.T) {
	srv := New(t, secret, &backend{})
	soon := time.Now().Add(time.Minute)
	tests := []struct {
		name   string
		token  string
		status int
	}{
		{"valid", validJWT(t), http.StatusOK},
		{"missing", "", http.StatusUnauthorized},
		{"another secret", signed(t, []byte("fedcba9876543210fedcba9876543210"), "gitlab-kas", "gitlab", soon), http.StatusUnauthorized},
		{"wrong issuer", signed(t, secret, "gitlab.example.com", "gitlab", soon), http.StatusUnauthorized},
		{"wrong audience", signed(t, secret, "gitlab-kas", "gitlab-kas", soon), http.StatusUnauthorized},
		{"expired", signed(t, secret, "gitlab-kas", "gitlab", time.Now().Add(-time.Minute)), http.StatusUnauthorized},
	}
	for _, tt := range tests {
		status, msg := do(t, "GET", srv.URL+gitlab.PathAgentInfo, map[string]string{
			gitlab.HeaderAPIRequest: tt.token,
			"Authorization":         "Bearer agent-token",
		}, "")
		if status != tt.status {
			t.Errorf("%s: status %d (%s), want %d", tt.name, status, msg, tt.status)
		}
	}
	if n := srv.Calls(gitlab.PathAgentInfo); n != len(tests) {
		t.Errorf("Calls = %d, want %d (refused requests count too)", n, len(tests))
	}
}

func TestRoutes(t *testing.T) {
	b := &backend{}
	srv := New(t, secret, b)
	legacy := New(t, secret, b, WithLegacyAgentInfoOnly())
	jwtHeader := func(extra map[string]string) map[string]string {
		h := map[string]string{gitlab.HeaderAPIRequest: validJWT(t)}
		for k, v := range extra {
			h[k] = v
		}
		return h
	}
	tests := []struct {
		name   string
		method string
		url    string
		header map[string]string
		body   string
		status int
	}{
		{"agent info", "GET", srv.URL + gitlab.PathAgentInfo, map[string]string{"Authorization": "Bearer agent-token"}, "", 200},
		{"agent info, legacy path", "GET", srv.URL + gitlab.PathAgentInfoLegacy, map[string]string{"Authorization": "Bearer agent-token"}, "", 200},
		{"agent info, bad token", "GET", srv.URL + gitlab.PathAgentInfo, map[string]string{"Authorization": "Bearer nope"}, "", 401},
		{"agent info, no Authorization", "GET", srv.URL + gitlab.PathAgentInfo, nil, "", 401},
		{"older GitLab, current path", "GET", legacy.URL + gitlab.PathAgentInfo, map[string]string{"Authorization": "Bearer agent-token"}, "", 404},
		{"older GitLab, legacy path", "GET", legacy.URL + gitlab.PathAgentInfoLegacy, map[string]string{"Authorization": "Bearer agent-token"}, "", 200},
		{"authorize proxy user", "POST", srv.URL + gitlab.PathAuthorizeProxyUser, nil, `{"agent_id":7,"access_type":"personal_access_token","access_key":"k"}`, 403},
		{"authorize proxy user, unknown field", "POST", srv.URL + gitlab.PathAuthorizeProxyUser, nil, `{"agent_id":7,"access_type":"personal_access_token","access_key":"k","extra":1}`, 400},
		{"authorize proxy user, no key", "POST", srv.URL + gitlab.PathAuthorizeProxyUser, nil, `{"agent_id":7,"access_type":"personal_access_token"}`, 400},
		{"allowed agents", "GET", srv.URL + gitlab.PathAllowedAgents, map[string]string{gitlab.HeaderJobToken: "job"}, "", 404},
		{"allowed agents, no Job-Token", "GET", srv.URL + gitlab.PathAllowedAgents, nil, "", 401},
		{"agent configuration", "POST", srv.URL + gitlab.PathAgentConfiguration, nil, `{"agent_id":7,"agent_config":{}}`, 204},
		{"agent configuration, no config", "POST", srv.URL + gitlab.PathAgentConfiguration, nil, `{"agent_id":7}`, 400},
		{"usage metrics", "POST", srv.URL + gitlab.PathUsageMetrics, nil, `{"counters":{"a":1},"unique_counters":{"b":[1]}}`, 204},
		{"usage metrics, wrong shape", "POST", srv.URL + gitlab.PathUsageMetrics, nil, `{"counters":{"a":"one"}}`, 400},
		{"unknown path", "GET", srv.URL + "/api/v4/nothing", nil, "", 404},
	}
	for _, tt := range tests {
		status, msg := do(t, tt.method, tt.url, jwtHeader(tt.header), tt.body)
		if status != tt.status {
			t.Errorf("%s: status %d (%s), want %d", tt.name, status, msg, tt.status)
		}
	}
	if len(b.configs) != 1 || b.configs[0] != 7 || b.usageReports != 1 {
		t.Errorf("backend reporters got configs %v and %d usage reports, want [7] and 1", b.configs, b.usageReports)
	}
	if got := srv.Configurations(); len(got) != 1 || string(got[0].AgentConfig) != "{}" {
		t.Errorf("Configurations = %+v", got)
	}
	if got := srv.UsageMetrics(); len(got) != 1 || got[0].Counters["a"] != 1 || got[0].UniqueCounters["b"][0] != 1 {
		t.Errorf("UsageMetrics = %+v", got)
	}
}

func TestBackendErrors(t *testing.T) {
	tests := []struct {
		err    error
		status int
		msg    string
	}{
		{gitlab.ErrUnauthorized, 401, "401 Unauthorized"},
		{&gitlab.Error{StatusCode: 403, Message: "no", Err: gitlab.ErrForbidden}, 403, "403 Forbidden"},
		{gitlab.ErrNotFound, 404, "404 Not Found"},
		{&gitlab.Error{StatusCode: 409, Message: "conflict"}, 409, "conflict"},
		{errors.New("database is down"), 500, "database is down"},
	}
	for _, tt := range tests {
		srv := New(t, secret, &backend{err: tt.err})
		status, msg := do(t, "GET", srv.URL+gitlab.PathAgentInfo, map[string]string{
			gitlab.HeaderAPIRequest: validJWT(t), "Authorization": "Bearer agent-token",
		}, "")
		if status != tt.status || msg != tt.msg {
			t.Errorf("backend error %v: %d %q, want %d %q", tt.err, status, msg, tt.status, tt.msg)
		}
	}
}

func TestNilBackendKnowsNoOne(t *testing.T) {
	srv := New(t, secret, nil)
	status, _ := do(t, "GET", srv.URL+gitlab.PathAgentInfo, map[string]string{
		gitlab.HeaderAPIRequest: validJWT(t), "Authorization": "Bearer agent-token",
	}, "")
	if status != http.StatusUnauthorized {
		t.Errorf("status %d, want 401", status)
	}
}

func TestRecording(t *testing.T) {
	b := &backend{}
	srv := New(t, secret, b)
	do(t, "POST", srv.URL+gitlab.PathUsageMetrics, map[string]string{
		gitlab.HeaderAPIRequest: validJWT(t), correlation.Header: "corr-7",
	}, `{"counters":{"a":1}}`)
	do(t, "GET", srv.URL+gitlab.PathAgentInfo, map[string]string{
		gitlab.HeaderAPIRequest: validJWT(t), correlation.Header: "corr-8", "Authorization": "Bearer agent-token",
	}, "")
	reqs := srv.Requests()
	if len(reqs) != 2 {
		t.Fatalf("%d requests recorded, want 2", len(reqs))
	}
	if r := reqs[0]; r.Method != "POST" || r.Path != gitlab.PathUsageMetrics || string(r.Body) != `{"counters":{"a":1}}` || r.Header.Get(correlation.Header) != "corr-7" {
		t.Errorf("recorded %+v", r)
	}
	if b.correlation != "corr-8" {
		t.Errorf("backend saw correlation ID %q, want corr-8", b.correlation)
	}
	reqs[0].Body[0] = 'X'
	if srv.Requests()[0].Body[0] != '{' {
		t.Error("Requests returns the server's own buffers")
	}
}

func TestFailures(t *testing.T) {
	srv := New(t, secret, &backend{})
	headers := map[string]string{gitlab.HeaderAPIRequest: validJWT(t), "Authorization": "Bearer agent-token"}
	get := func() int {
		status, _ := do(t, "GET", srv.URL+gitlab.PathAgentInfo, headers, "")
		return status
	}

	srv.Fail(gitlab.PathAgentInfo, Failure{Status: 503, Times: 2})
	if got := []int{get(), get(), get()}; got[0] != 503 || got[1] != 503 || got[2] != 200 {
		t.Errorf("with Times 2: statuses %v, want [503 503 200]", got)
	}

	srv.Fail(gitlab.PathAgentInfo, Failure{Status: 502})
	if get() != 502 || get() != 502 {
		t.Error("a failure without Times did not persist")
	}
	srv.ClearFailures()
	if get() != 200 {
		t.Error("ClearFailures left a failure")
	}

	srv.Fail(gitlab.PathAgentInfo, Failure{Delay: 150 * time.Millisecond, Times: 1})
	start := time.Now()
	if status := get(); status != 200 {
		t.Errorf("a pure delay answered %d", status)
	}
	if elapsed := time.Since(start); elapsed < 150*time.Millisecond {
		t.Errorf("answered after %s, want at least the 150ms delay", elapsed)
	}

	srv.Fail(gitlab.PathAgentInfo, Failure{Hangup: true, Times: 1})
	req, err := http.NewRequest("GET", srv.URL+gitlab.PathAgentInfo, nil)
	if err != nil {
		t.Fatal(err)
	}
	// A fresh connection: Go retries a GET that failed on a reused one.
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	if resp, err := client.Do(req); err == nil {
		resp.Body.Close()
		t.Error("Hangup answered")
	}
}
