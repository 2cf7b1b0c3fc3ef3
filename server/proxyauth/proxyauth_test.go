package proxyauth

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"reflect"
	"strings"
	"testing"

	"github.com/kasproject/kas/protocol"
	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/kubestatus"
)

// fakeAPI answers with fixed values and records what it was asked.
type fakeAPI struct {
	job  *gitlab.AllowedAgentsForJob
	user *gitlab.AuthorizeProxyUserResponse
	err  error

	gotJobToken string
	gotUserReq  *gitlab.AuthorizeProxyUserRequest
}

func (f *fakeAPI) GetAgentInfo(context.Context, string) (*gitlab.AgentInfo, error) {
	return nil, errors.New("proxyauth must not ask for agent info")
}

func (f *fakeAPI) AuthorizeProxyUser(_ context.Context, req gitlab.AuthorizeProxyUserRequest) (*gitlab.AuthorizeProxyUserResponse, error) {
	f.gotUserReq = &req
	if f.err != nil {
		return nil, f.err
	}
	if f.user == nil {
		return nil, errors.New("fake: unexpected AuthorizeProxyUser")
	}
	return f.user, nil
}

func (f *fakeAPI) GetAllowedAgentsForJob(_ context.Context, jobToken string) (*gitlab.AllowedAgentsForJob, error) {
	f.gotJobToken = jobToken
	if f.err != nil {
		return nil, f.err
	}
	if f.job == nil {
		return nil, errors.New("fake: unexpected GetAllowedAgentsForJob")
	}
	return f.job, nil
}

const (
	jobToken     = "glcbt-s3cr3t-job"
	pat          = "glpat-s3cr3t-pat"
	sessionKey   = "s3cr3t-session"
	csrfToken    = "s3cr3t-csrf"
	agentID      = int64(5)
	otherAgentID = int64(6)
)

func ciRequest() *http.Request {
	return req("", "Authorization", fmt.Sprintf("Bearer ci:%d:%s", agentID, jobToken))
}
func patRequest() *http.Request {
	return req("", "Authorization", fmt.Sprintf("Bearer pat:%d:%s", agentID, pat))
}
func cookieRequest() *http.Request {
	return req("", "Cookie", CookieName+"="+sessionKey, HeaderAgentID, fmt.Sprint(agentID), HeaderCSRFToken, csrfToken)
}

// gitlabErr is how server/gitlab reports a refusal.
func gitlabErr(status int, sentinel error) error {
	return &gitlab.Error{Op: "authorize", URL: "https://gitlab.example.com/api/v4/x", StatusCode: status, Message: "refused", Err: sentinel}
}

func TestAuthenticateErrors(t *testing.T) {
	transport := &gitlab.Error{Op: "authorize", URL: "https://gitlab.example.com/api/v4/x", Message: "dial tcp: connection refused", Err: errors.New("connection refused")}
	for _, tc := range []struct {
		name       string
		r          *http.Request
		api        *fakeAPI
		wantCode   int
		wantReason kubestatus.Reason
		wantMsg    string
		wantCause  error // errors.Is target; nil means no cause
	}{
		{"ci unauthorized", ciRequest(), &fakeAPI{err: gitlabErr(401, gitlab.ErrUnauthorized)},
			401, kubestatus.ReasonUnauthorized, "GitLab does not accept the CI job token", gitlab.ErrUnauthorized},
		{"ci forbidden", ciRequest(), &fakeAPI{err: gitlabErr(403, gitlab.ErrForbidden)},
			403, kubestatus.ReasonForbidden, "GitLab refuses the CI job token", gitlab.ErrForbidden},
		{"ci not found", ciRequest(), &fakeAPI{err: gitlabErr(404, gitlab.ErrNotFound)},
			404, kubestatus.ReasonNotFound, "GitLab knows no agents for this CI job token", gitlab.ErrNotFound},
		{"ci GitLab down", ciRequest(), &fakeAPI{err: transport},
			502, kubestatus.ReasonInternalError, "cannot reach GitLab to authorize the request", transport},
		{"ci agent not allowed", ciRequest(), &fakeAPI{job: &gitlab.AllowedAgentsForJob{AllowedAgents: []gitlab.AllowedAgent{{ID: otherAgentID}}}},
			403, kubestatus.ReasonForbidden, "the CI job is not allowed to use agent 5", nil},
		{"ci no allowed agents", ciRequest(), &fakeAPI{job: &gitlab.AllowedAgentsForJob{}},
			403, kubestatus.ReasonForbidden, "the CI job is not allowed to use agent 5", nil},

		{"pat unauthorized", patRequest(), &fakeAPI{err: gitlabErr(401, gitlab.ErrUnauthorized)},
			401, kubestatus.ReasonUnauthorized, "GitLab does not accept the personal access token", gitlab.ErrUnauthorized},
		{"pat forbidden", patRequest(), &fakeAPI{err: gitlabErr(403, gitlab.ErrForbidden)},
			403, kubestatus.ReasonForbidden, "the user may not use agent 5", gitlab.ErrForbidden},
		{"pat without the k8s_proxy scope", patRequest(), &fakeAPI{err: gitlabErr(403, gitlab.ErrInsufficientScope)},
			403, kubestatus.ReasonForbidden, "the personal access token lacks the k8s_proxy scope", gitlab.ErrForbidden},
		{"pat GitLab redirects", patRequest(), &fakeAPI{err: gitlabErr(307, gitlab.ErrRedirect)},
			502, kubestatus.ReasonInternalError, "GitLab redirected kas's authorization request", gitlab.ErrRedirect},
		{"pat GitLab contract error", patRequest(), &fakeAPI{err: gitlabErr(200, gitlab.ErrContract)},
			502, kubestatus.ReasonInternalError, "GitLab's authorization answer cannot be used", gitlab.ErrContract},
		{"ci GitLab contract error", ciRequest(), &fakeAPI{err: gitlabErr(200, gitlab.ErrContract)},
			502, kubestatus.ReasonInternalError, "GitLab's authorization answer cannot be used", gitlab.ErrContract},
		{"pat unknown agent", patRequest(), &fakeAPI{err: gitlabErr(404, gitlab.ErrNotFound)},
			404, kubestatus.ReasonNotFound, "agent 5 not found", gitlab.ErrNotFound},
		{"pat GitLab down", patRequest(), &fakeAPI{err: transport},
			502, kubestatus.ReasonInternalError, "cannot reach GitLab to authorize the request", transport},
		{"pat plain error", patRequest(), &fakeAPI{err: context.DeadlineExceeded},
			502, kubestatus.ReasonInternalError, "cannot reach GitLab to authorize the request", context.DeadlineExceeded},

		{"cookie unauthorized", cookieRequest(), &fakeAPI{err: gitlabErr(401, gitlab.ErrUnauthorized)},
			401, kubestatus.ReasonUnauthorized, "GitLab does not accept the session or its CSRF token", gitlab.ErrUnauthorized},
		{"cookie forbidden", cookieRequest(), &fakeAPI{err: gitlabErr(403, gitlab.ErrForbidden)},
			403, kubestatus.ReasonForbidden, "the user may not use agent 5", gitlab.ErrForbidden},
		{"cookie unknown agent", cookieRequest(), &fakeAPI{err: gitlabErr(404, gitlab.ErrNotFound)},
			404, kubestatus.ReasonNotFound, "agent 5 not found", gitlab.ErrNotFound},
		{"cookie GitLab down", cookieRequest(), &fakeAPI{err: transport},
			502, kubestatus.ReasonInternalError, "cannot reach GitLab to authorize the request", transport},

		{"user answer for another agent", patRequest(), &fakeAPI{user: &gitlab.AuthorizeProxyUserResponse{
			Agent: gitlab.AuthorizedAgent{ID: otherAgentID}, User: gitlab.User{Username: "u"}, AccessAs: gitlab.UserAccessAs{Agent: &struct{}{}}}},
			502, kubestatus.ReasonInternalError, "GitLab's authorization answer cannot be used", nil},

		{"malformed credentials never reach GitLab", req("", "Authorization", "Basic x"), &fakeAPI{},
			401, kubestatus.ReasonUnauthorized, formatBearer, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := &Authenticator{API: tc.api}
			res, err := a.Authenticate(context.Background(), tc.r)
			var perr *Error
			if !errors.As(err, &perr) {
				t.Fatalf("got %+v, %v; want a *Error", res, err)
			}
			if res != nil {
				t.Errorf("result %+v with an error", res)
			}
			if perr.Code != tc.wantCode || perr.Reason != tc.wantReason {
				t.Errorf("error %d %s, want %d %s", perr.Code, perr.Reason, tc.wantCode, tc.wantReason)
			}
			if !strings.HasPrefix(perr.Message, tc.wantMsg) {
				t.Errorf("message %q, want it to start with %q", perr.Message, tc.wantMsg)
			}
			if tc.wantCause != nil && !errors.Is(err, tc.wantCause) {
				t.Errorf("error %v does not wrap %v", err, tc.wantCause)
			}
			if tc.wantCause != nil && strings.Contains(perr.Message, "gitlab.example.com") {
				t.Errorf("message %q shows the caller GitLab's internals", perr.Message)
			}
			if strings.Contains(err.Error(), "s3cr3t") {
				t.Errorf("error %q contains a credential", err.Error())
			}
		})
	}
}

func TestAuthenticateAsksGitLab(t *testing.T) {
	t.Run("ci", func(t *testing.T) {
		api := &fakeAPI{job: &gitlab.AllowedAgentsForJob{AllowedAgents: []gitlab.AllowedAgent{{ID: agentID}}}}
		if _, err := (&Authenticator{API: api}).Authenticate(context.Background(), ciRequest()); err != nil {
			t.Fatal(err)
		}
		if api.gotJobToken != jobToken || api.gotUserReq != nil {
			t.Errorf("asked with job token %q, user request %+v", api.gotJobToken, api.gotUserReq)
		}
	})
	ok := &gitlab.AuthorizeProxyUserResponse{Agent: gitlab.AuthorizedAgent{ID: agentID}, AccessAs: gitlab.UserAccessAs{Agent: &struct{}{}}}
	for _, tc := range []struct {
		name string
		r    *http.Request
		want gitlab.AuthorizeProxyUserRequest
	}{
		{"pat", patRequest(), gitlab.AuthorizeProxyUserRequest{AgentID: agentID, AccessType: "personal_access_token", AccessKey: pat}},
		{"cookie", cookieRequest(), gitlab.AuthorizeProxyUserRequest{AgentID: agentID, AccessType: "session_cookie", AccessKey: sessionKey, CSRFToken: csrfToken}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			api := &fakeAPI{user: ok}
			if _, err := (&Authenticator{API: api}).Authenticate(context.Background(), tc.r); err != nil {
				t.Fatal(err)
			}
			if api.gotUserReq == nil || *api.gotUserReq != tc.want || api.gotJobToken != "" {
				t.Errorf("asked %+v (job token %q), want %+v", api.gotUserReq, api.gotJobToken, tc.want)
			}
		})
	}
}

func TestAuthenticateCIJobIdentity(t *testing.T) {
	job := func(env *gitlab.Environment, as *gitlab.CIAccessAs) *gitlab.AllowedAgentsForJob {
		return &gitlab.AllowedAgentsForJob{
			AllowedAgents: []gitlab.AllowedAgent{
				{ID: otherAgentID, ConfigProject: gitlab.IDRef{ID: 1}},
				{ID: agentID, ConfigProject: gitlab.IDRef{ID: 99}, Configuration: gitlab.AgentConfiguration{AccessAs: as}},
			},
			Job:         gitlab.IDRef{ID: 1074499489},
			Pipeline:    gitlab.IDRef{ID: 777},
			Project:     gitlab.JobProject{ID: 150, Groups: []gitlab.IDRef{{ID: 23}, {ID: 25}}},
			User:        gitlab.User{ID: 42, Username: "alice"},
			Environment: env,
		}
	}
	imp := &gitlab.Impersonate{
		Username: "system:serviceaccount:ci:deployer",
		UID:      "uid-1",
		Groups:   []string{"deployers", "auditors"},
		Extra: []gitlab.ImpersonateExtra{
			{Key: "example.com/team", Values: []string{"a"}},
			{Key: "example.com/empty"},
			{Key: "example.com/team", Values: []string{"b", "c"}},
		},
	}
	ciJobExtra := map[string][]string{
		"agent.gitlab.com/id":                {"5"},
		"agent.gitlab.com/config_project_id": {"99"},
		"agent.gitlab.com/project_id":        {"150"},
		"agent.gitlab.com/ci_pipeline_id":    {"777"},
		"agent.gitlab.com/ci_job_id":         {"1074499489"},
		"agent.gitlab.com/username":          {"alice"},
	}
	withEnv := func(m map[string][]string, kv ...string) map[string][]string {
		out := make(map[string][]string, len(m)+len(kv)/2)
		for k, v := range m {
			out[k] = v
		}
		for i := 0; i+1 < len(kv); i += 2 {
			out[kv[i]] = []string{kv[i+1]}
		}
		return out
	}
	prod := &gitlab.Environment{Slug: "prod", Tier: "production"}

	for _, tc := range []struct {
		name string
		job  *gitlab.AllowedAgentsForJob
		want *protocol.Identity
		// wantErr means a 502 for an unusable answer.
		wantErr string
	}{
		{name: "no access_as: agent", job: job(prod, nil)},
		{name: "empty access_as: agent", job: job(prod, &gitlab.CIAccessAs{})},
		{name: "access_as agent", job: job(prod, &gitlab.CIAccessAs{Agent: &struct{}{}})},
		{name: "access_as impersonate", job: job(prod, &gitlab.CIAccessAs{Impersonate: imp}), want: &protocol.Identity{
			Username: "system:serviceaccount:ci:deployer",
			UID:      "uid-1",
			Groups:   []string{"deployers", "auditors"},
			Extra:    map[string][]string{"example.com/team": {"a", "b", "c"}},
		}},
		{name: "access_as impersonate, username only", job: job(nil, &gitlab.CIAccessAs{Impersonate: &gitlab.Impersonate{Username: "bob"}}),
			want: &protocol.Identity{Username: "bob"}},
		{name: "access_as ci_job in an environment", job: job(prod, &gitlab.CIAccessAs{CIJob: &struct{}{}}), want: &protocol.Identity{
			// GitLab's documented example, in its order.
			Username: "gitlab:ci_job:1074499489",
			Groups: []string{
				"gitlab:ci_job",
				"gitlab:group:23", "gitlab:group_env_tier:23:production",
				"gitlab:group:25", "gitlab:group_env_tier:25:production",
				"gitlab:project:150", "gitlab:project_env:150:prod", "gitlab:project_env_tier:150:production",
			},
			Extra: withEnv(ciJobExtra, "agent.gitlab.com/environment_slug", "prod", "agent.gitlab.com/environment_tier", "production"),
		}},
		{name: "access_as ci_job without environment", job: job(nil, &gitlab.CIAccessAs{CIJob: &struct{}{}}), want: &protocol.Identity{
			Username: "gitlab:ci_job:1074499489",
			Groups:   []string{"gitlab:ci_job", "gitlab:group:23", "gitlab:group:25", "gitlab:project:150"},
			Extra:    ciJobExtra,
		}},
		{name: "access_as ci_job, environment without tier", job: job(&gitlab.Environment{Slug: "review-x"}, &gitlab.CIAccessAs{CIJob: &struct{}{}}), want: &protocol.Identity{
			Username: "gitlab:ci_job:1074499489",
			Groups:   []string{"gitlab:ci_job", "gitlab:group:23", "gitlab:group:25", "gitlab:project:150", "gitlab:project_env:150:review-x"},
			Extra:    withEnv(ciJobExtra, "agent.gitlab.com/environment_slug", "review-x"),
		}},
		{name: "two modes", job: job(nil, &gitlab.CIAccessAs{Agent: &struct{}{}, CIJob: &struct{}{}}), wantErr: "sets 2 of agent, impersonate and ci_job"},
		{name: "impersonate without username", job: job(nil, &gitlab.CIAccessAs{Impersonate: &gitlab.Impersonate{Groups: []string{"g"}}}), wantErr: "has no username"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res, err := (&Authenticator{API: &fakeAPI{job: tc.job}}).Authenticate(context.Background(), ciRequest())
			if tc.wantErr != "" {
				var perr *Error
				if !errors.As(err, &perr) || perr.Code != http.StatusBadGateway || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got %+v, %v; want a 502 *Error containing %q", res, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want := &Result{AgentID: agentID, Kind: KindCIJob, UserID: 42, Identity: tc.want}
			if !reflect.DeepEqual(res, want) {
				t.Errorf("result\n got %+v identity %+v\nwant %+v identity %+v", res, res.Identity, want, want.Identity)
			}
			if tc.want != nil {
				if _, err := protocol.EncodeIdentity(*res.Identity); err != nil {
					t.Errorf("identity cannot travel to the agent: %v", err)
				}
			}
		})
	}

	t.Run("identity does not share the configuration's memory", func(t *testing.T) {
		j := job(nil, &gitlab.CIAccessAs{Impersonate: imp})
		res, err := (&Authenticator{API: &fakeAPI{job: j}}).Authenticate(context.Background(), ciRequest())
		if err != nil {
			t.Fatal(err)
		}
		res.Identity.Groups[0] = "changed"
		if imp.Groups[0] != "deployers" {
			t.Errorf("changing the identity changed the configuration: %v", imp.Groups)
		}
	})
}

func TestAuthenticateUserIdentity(t *testing.T) {
	resp := func(as gitlab.UserAccessAs) *gitlab.AuthorizeProxyUserResponse {
		return &gitlab.AuthorizeProxyUserResponse{
			Agent:    gitlab.AuthorizedAgent{ID: agentID, ConfigProject: gitlab.IDRef{ID: 99}},
			User:     gitlab.User{ID: 42, Username: "alice"},
			AccessAs: as,
		}
	}
	asUser := gitlab.UserAccessAs{User: &gitlab.UserAccessUser{
		Projects: []gitlab.RoleRef{{ID: 1234, Roles: []string{"guest", "developer"}}, {ID: 7, Roles: []string{"maintainer"}}},
		Groups:   []gitlab.RoleRef{{ID: 2, Roles: []string{"reporter"}}, {ID: 3}},
	}}
	userIdentityFor := func(accessType string) *protocol.Identity {
		return &protocol.Identity{
			Username: "gitlab:user:alice",
			Groups: []string{
				"gitlab:user",
				"gitlab:project_role:1234:guest", "gitlab:project_role:1234:developer", "gitlab:project_role:7:maintainer",
				"gitlab:group_role:2:reporter",
			},
			Extra: map[string][]string{
				"agent.gitlab.com/id":                {"5"},
				"agent.gitlab.com/username":          {"alice"},
				"agent.gitlab.com/config_project_id": {"99"},
				"agent.gitlab.com/access_type":       {accessType},
			},
		}
	}
	for _, tc := range []struct {
		name    string
		r       *http.Request
		kind    Kind
		resp    *gitlab.AuthorizeProxyUserResponse
		want    *protocol.Identity
		wantErr string
	}{
		{name: "pat as agent", r: patRequest(), kind: KindPersonalAccessToken, resp: resp(gitlab.UserAccessAs{Agent: &struct{}{}})},
		{name: "cookie as agent", r: cookieRequest(), kind: KindSessionCookie, resp: resp(gitlab.UserAccessAs{Agent: &struct{}{}})},
		{name: "pat as user", r: patRequest(), kind: KindPersonalAccessToken, resp: resp(asUser), want: userIdentityFor("personal_access_token")},
		{name: "cookie as user", r: cookieRequest(), kind: KindSessionCookie, resp: resp(asUser), want: userIdentityFor("session_cookie")},
		{name: "user without roles", r: patRequest(), kind: KindPersonalAccessToken, resp: resp(gitlab.UserAccessAs{User: &gitlab.UserAccessUser{}}),
			want: &protocol.Identity{Username: "gitlab:user:alice", Groups: []string{"gitlab:user"}, Extra: userIdentityFor("personal_access_token").Extra}},
		{name: "both agent and user", r: patRequest(), resp: resp(gitlab.UserAccessAs{Agent: &struct{}{}, User: &gitlab.UserAccessUser{}}), wantErr: "both agent and user"},
		{name: "neither agent nor user", r: patRequest(), resp: resp(gitlab.UserAccessAs{}), wantErr: "neither agent nor user"},
		{name: "user without username", r: patRequest(), resp: &gitlab.AuthorizeProxyUserResponse{
			Agent: gitlab.AuthorizedAgent{ID: agentID}, AccessAs: asUser}, wantErr: "no username"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res, err := (&Authenticator{API: &fakeAPI{user: tc.resp}}).Authenticate(context.Background(), tc.r)
			if tc.wantErr != "" {
				var perr *Error
				if !errors.As(err, &perr) || perr.Code != http.StatusBadGateway || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got %+v, %v; want a 502 *Error containing %q", res, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want := &Result{AgentID: agentID, Kind: tc.kind, UserID: 42, Identity: tc.want}
			if !reflect.DeepEqual(res, want) {
				t.Errorf("result\n got %+v identity %+v\nwant %+v identity %+v", res, res.Identity, want, want.Identity)
			}
		})
	}
}
