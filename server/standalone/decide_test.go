package standalone

import (
	"context"
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/kasproject/kas/server/gitlab"
)

// wantErr describes an expected error: a refusal has a status (and its
// sentinel, making it cacheable); a failure has status 0 or 400, is not
// cacheable, and its message contains text.
type wantErr struct {
	status int
	text   string
}

func checkErr(t *testing.T, err error, want *wantErr) {
	t.Helper()
	if want == nil {
		if err != nil {
			t.Fatalf("error %v, want none", err)
		}
		return
	}
	var gerr *gitlab.Error
	if !errors.As(err, &gerr) {
		t.Fatalf("error %T %v, want *gitlab.Error", err, err)
	}
	if gerr.StatusCode != want.status {
		t.Errorf("status %d (%v), want %d", gerr.StatusCode, err, want.status)
	}
	sentinel := map[int]error{401: gitlab.ErrUnauthorized, 403: gitlab.ErrForbidden, 404: gitlab.ErrNotFound}[want.status]
	if sentinel != nil && !errors.Is(err, sentinel) {
		t.Errorf("error %v does not wrap %v", err, sentinel)
	}
	if cacheable := sentinel != nil; gitlab.Cacheable(err) != cacheable {
		t.Errorf("Cacheable(%v) = %v, want %v", err, gitlab.Cacheable(err), cacheable)
	}
	if !strings.Contains(err.Error(), want.text) {
		t.Errorf("error %q does not contain %q", err, want.text)
	}
}

// checkAnswer compares answers, printing both as JSON when they differ.
func checkAnswer(t *testing.T, got, want any) {
	t.Helper()
	if !reflect.DeepEqual(got, want) {
		g, _ := json.Marshal(got)
		w, _ := json.Marshal(want)
		t.Errorf("answer\n%s\nwant\n%s", g, w)
	}
}

// agentInfoCase is one GetAgentInfo question and GitLab's answer.
type agentInfoCase struct {
	name  string
	token string
	want  *gitlab.AgentInfo
	err   *wantErr
}

var agentInfoCases = []agentInfoCase{
	{name: "agent", token: tok("agent-prod"), want: &gitlab.AgentInfo{ProjectID: 100, AgentID: 1, AgentName: "prod", DefaultBranch: "main"}},
	{name: "project's default branch", token: tok("agent-foreign"), want: &gitlab.AgentInfo{ProjectID: 200, AgentID: 3, AgentName: "foreign", DefaultBranch: "trunk"}},
	{name: "unknown token", token: "tok-nobody", err: &wantErr{status: 401, text: "no agent has this token"}},
	{name: "empty token", token: "", err: &wantErr{status: 401}},
	{name: "a user's token is not an agent's", token: tok("alice"), err: &wantErr{status: 401}},
}

func TestGetAgentInfo(t *testing.T) {
	b := newWorld(t).open(t)
	for _, tc := range agentInfoCases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := b.GetAgentInfo(context.Background(), tc.token)
			checkErr(t, err, tc.err)
			if tc.err == nil {
				checkAnswer(t, got, tc.want)
			}
		})
	}
}

// developerRoles and maintainerRoles are GitLab's role lists for a user at each level.
var (
	developerRoles  = []string{"guest", "planner", "reporter", "developer"}
	maintainerRoles = []string{"guest", "planner", "reporter", "developer", "maintainer"}
)

func pat(agentID int64, name string) gitlab.AuthorizeProxyUserRequest {
	return gitlab.AuthorizeProxyUserRequest{AgentID: agentID, AccessType: gitlab.AccessTypePersonalAccessToken, AccessKey: tok(name)}
}

func cookie(agentID int64, session, csrf string) gitlab.AuthorizeProxyUserRequest {
	return gitlab.AuthorizeProxyUserRequest{AgentID: agentID, AccessType: gitlab.AccessTypeSessionCookie, AccessKey: session, CSRFToken: csrf}
}

func asAgent(agentID int64, userID int64, username string) *gitlab.AuthorizeProxyUserResponse {
	return &gitlab.AuthorizeProxyUserResponse{
		Agent:    gitlab.AuthorizedAgent{ID: agentID, ConfigProject: gitlab.IDRef{ID: 100}},
		User:     gitlab.User{ID: userID, Username: username},
		AccessAs: gitlab.UserAccessAs{Agent: &struct{}{}},
	}
}

func asUser(userID int64, username string, projects, groups []gitlab.RoleRef) *gitlab.AuthorizeProxyUserResponse {
	return &gitlab.AuthorizeProxyUserResponse{
		Agent:    gitlab.AuthorizedAgent{ID: 5, ConfigProject: gitlab.IDRef{ID: 100}},
		User:     gitlab.User{ID: userID, Username: username},
		AccessAs: gitlab.UserAccessAs{User: &gitlab.UserAccessUser{Projects: projects, Groups: groups}},
	}
}

// proxyUserCase is one AuthorizeProxyUser question and GitLab's answer.
type proxyUserCase struct {
	name string
	req  gitlab.AuthorizeProxyUserRequest
	want *gitlab.AuthorizeProxyUserResponse
	err  *wantErr
}

// proxyUserCases are the refusals and grants of the world, shared with the
// equivalence test.
var proxyUserCases = []proxyUserCase{
	// Personal access tokens.
	{name: "pat: developer of a listed project", req: pat(1, "alice"), want: asAgent(1, 1001, "alice")},
	{name: "pat: maintainer of a listed group", req: pat(1, "carol"), want: asAgent(1, 1003, "carol")},
	{name: "pat: developer of the top-level group covers listed project and subgroup", req: pat(1, "erin"), want: asAgent(1, 1005, "erin")},
	{name: "pat: reporter is below developer", req: pat(1, "bob"), err: &wantErr{status: 403, text: "You must be a member of `projects` or `groups`"}},
	{name: "pat: owner of a subgroup has no role in the listed parent group", req: pat(1, "dave"), err: &wantErr{status: 403}},
	{name: "pat: without the k8s_proxy scope", req: pat(1, "alice-read-api"), err: &wantErr{status: 403, text: "k8s_proxy scope"}},
	{name: "pat: unknown token", req: pat(1, "nobody"), err: &wantErr{status: 401, text: "no user has this personal access token"}},
	{name: "pat: an agent token is not a user's", req: pat(1, "agent-prod"), err: &wantErr{status: 401}},
	{name: "pat: unknown agent", req: pat(99, "alice"), err: &wantErr{status: 404, text: "no agent with id 99"}},
	{name: "pat: bad credential is checked before the agent", req: pat(99, "nobody"), err: &wantErr{status: 401}},
	// Browser sessions.
	{name: "session: developer", req: cookie(1, tok("cookie-alice"), tok("csrf-alice")), want: asAgent(1, 1001, "alice")},
	{name: "session: wrong CSRF token", req: cookie(1, tok("cookie-alice"), tok("csrf-bob")), err: &wantErr{status: 401, text: "CSRF token does not match"}},
	{name: "session: no CSRF token", req: cookie(1, tok("cookie-alice"), ""), err: &wantErr{status: 401, text: "CSRF token does not match"}},
	{name: "session: unknown cookie", req: cookie(1, tok("cookie-nobody"), tok("csrf-alice")), err: &wantErr{status: 401, text: "Invalid session"}},
	{name: "session: a personal access token is not a cookie", req: cookie(1, tok("alice"), tok("csrf-alice")), err: &wantErr{status: 401}},
	{name: "session: unknown agent", req: cookie(42, tok("cookie-alice"), tok("csrf-alice")), err: &wantErr{status: 404}},
	// The agent's user_access.
	{name: "no configuration file", req: pat(4, "alice"), err: &wantErr{status: 403, text: "`user_access` keyword is not found"}},
	{name: "configuration without user_access", req: pat(2, "alice"), err: &wantErr{status: 403, text: "`user_access` keyword is not found"}},
	{name: "user_access without access_as", req: pat(6, "alice"), err: &wantErr{status: 403, text: "`access_as` is not found"}},
	{name: "entries outside the agent's top-level group do not count", req: pat(3, "alice"), err: &wantErr{status: 403}},
	{name: "as user: project role", req: pat(5, "alice"),
		want: asUser(1001, "alice", []gitlab.RoleRef{{ID: 101, Roles: developerRoles}}, []gitlab.RoleRef{})},
	{name: "as user: group role carries to the group's projects, not its parent", req: pat(5, "carol"),
		want: asUser(1003, "carol", []gitlab.RoleRef{{ID: 102, Roles: maintainerRoles}}, []gitlab.RoleRef{{ID: 11, Roles: maintainerRoles}})},
	{name: "as user: top-level group role covers everything listed", req: pat(5, "erin"),
		want: asUser(1005, "erin",
			[]gitlab.RoleRef{{ID: 101, Roles: developerRoles}, {ID: 102, Roles: developerRoles}},
			[]gitlab.RoleRef{{ID: 11, Roles: developerRoles}, {ID: 10, Roles: developerRoles}})},
	{name: "as user: reporter, and developer only outside the top-level group", req: pat(5, "frank"), err: &wantErr{status: 403}},
	{name: "as user: by session", req: cookie(5, tok("cookie-alice"), tok("csrf-alice")),
		want: asUser(1001, "alice", []gitlab.RoleRef{{ID: 101, Roles: developerRoles}}, []gitlab.RoleRef{})},
}

func TestAuthorizeProxyUser(t *testing.T) {
	b := newWorld(t).open(t)
	cases := append(proxyUserCases,
		// Rails (and gitlabtest, validating parameters as Grape does) answers
		// 400 for an empty access_key; asked directly, standalone calls it a
		// bad credential.
		proxyUserCase{name: "pat: empty token", req: gitlab.AuthorizeProxyUserRequest{AgentID: 1, AccessType: gitlab.AccessTypePersonalAccessToken},
			err: &wantErr{status: 401}},
		proxyUserCase{name: "malformed configuration fails, naming file and line", req: pat(9, "alice"),
			err: &wantErr{text: "broken/config.yaml: line 5: ci_access.projects[0].access_as: set exactly one"}},
		proxyUserCase{name: "unknown access type", req: gitlab.AuthorizeProxyUserRequest{AgentID: 1, AccessType: "oidc_id_token", AccessKey: "x"},
			err: &wantErr{status: 400, text: "access_type does not have a valid value"}},
	)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := b.AuthorizeProxyUser(context.Background(), tc.req)
			checkErr(t, err, tc.err)
			if tc.err == nil {
				checkAnswer(t, got, tc.want)
			}
		})
	}
}

func allowed(agents []gitlab.AllowedAgent, jobID, pipelineID, projectID int64, groups []int64, userID int64, username string, env *gitlab.Environment) *gitlab.AllowedAgentsForJob {
	refs := make([]gitlab.IDRef, len(groups))
	for i, id := range groups {
		refs[i] = gitlab.IDRef{ID: id}
	}
	return &gitlab.AllowedAgentsForJob{
		AllowedAgents: agents,
		Job:           gitlab.IDRef{ID: jobID},
		Pipeline:      gitlab.IDRef{ID: pipelineID},
		Project:       gitlab.JobProject{ID: projectID, Groups: refs},
		User:          gitlab.User{ID: userID, Username: username},
		Environment:   env,
	}
}

func allowedAgent(id, configProject int64, cfg gitlab.AgentConfiguration) gitlab.AllowedAgent {
	return gitlab.AllowedAgent{ID: id, ConfigProject: gitlab.IDRef{ID: configProject}, Configuration: cfg}
}

var (
	production = &gitlab.Environment{Slug: "production", Tier: "production"}
	// The configurations the world's agents give.
	prodForApp = gitlab.AgentConfiguration{DefaultNamespace: "app", AccessAs: &gitlab.CIAccessAs{Impersonate: &gitlab.Impersonate{
		Username: "deployer", Groups: []string{"deployers"}, UID: "42",
		Extra: []gitlab.ImpersonateExtra{{Key: "team", Values: []string{"payments"}}},
	}}}
	prodForAcme     = gitlab.AgentConfiguration{AccessAs: &gitlab.CIAccessAs{Agent: &struct{}{}}}
	prodForPlatform = gitlab.AgentConfiguration{DefaultNamespace: "platform", AccessAs: &gitlab.CIAccessAs{CIJob: &struct{}{}}}
	asCIJob         = gitlab.AgentConfiguration{AccessAs: &gitlab.CIAccessAs{CIJob: &struct{}{}}}
	implicit        = gitlab.AgentConfiguration{}
)

// jobCase is one GetAllowedAgentsForJob question and GitLab's answer.
type jobCase struct {
	name  string
	token string
	want  *gitlab.AllowedAgentsForJob
	err   *wantErr
}

var jobCases = []jobCase{
	{name: "project entry with impersonate; an entry from another top-level group is ignored", token: tok("job-app-prod"),
		want: allowed([]gitlab.AllowedAgent{allowedAgent(1, 100, prodForApp)}, 5001, 401, 101, []int64{10}, 1001, "alice", production)},
	{name: "project entry without environments applies without an environment", token: tok("job-app-noenv"),
		want: allowed([]gitlab.AllowedAgent{allowedAgent(1, 100, prodForApp)}, 5002, 402, 101, []int64{10}, 1001, "alice", nil)},
	{name: "group entry, environment listed", token: tok("job-web-prod"),
		want: allowed([]gitlab.AllowedAgent{allowedAgent(1, 100, prodForAcme)}, 5003, 403, 104, []int64{10}, 1005, "erin", production)},
	{name: "group entry, environment matches a wildcard", token: tok("job-web-review"),
		want: allowed([]gitlab.AllowedAgent{allowedAgent(1, 100, prodForAcme)}, 5004, 404, 104, []int64{10}, 1005, "erin",
			&gitlab.Environment{Slug: "review-feature-1-x7k2p9", Tier: "development"})},
	{name: "group entry, environment not listed", token: tok("job-web-staging"),
		want: allowed([]gitlab.AllowedAgent{}, 5005, 405, 104, []int64{10}, 1005, "erin", &gitlab.Environment{Slug: "staging", Tier: "staging"})},
	{name: "group entry with environments, job without one", token: tok("job-web-noenv"),
		want: allowed([]gitlab.AllowedAgent{}, 5006, 406, 104, []int64{10}, 1005, "erin", nil)},
	{name: "protected_branches_only hides the agent on an unprotected ref, even where a group entry would allow it", token: tok("job-api-unprotected"),
		want: allowed([]gitlab.AllowedAgent{}, 5007, 407, 102, []int64{10, 11}, 1003, "carol", nil)},
	{name: "protected_branches_only on a protected ref; path matched case-insensitively", token: tok("job-api-protected"),
		want: allowed([]gitlab.AllowedAgent{allowedAgent(1, 100, asCIJob)}, 5008, 408, 102, []int64{10, 11}, 1003, "carol", nil)},
	{name: "closest group wins per agent; an entry without access_as has an empty configuration", token: tok("job-operator"),
		want: allowed([]gitlab.AllowedAgent{allowedAgent(1, 100, prodForPlatform), allowedAgent(2, 100, implicit)}, 5009, 409, 103, []int64{10, 11, 12}, 1004, "dave", nil)},
	{name: "configuration project: explicit entry first, then implicit authorizations", token: tok("job-infra-staging"),
		want: allowed([]gitlab.AllowedAgent{
			allowedAgent(2, 100, asCIJob),
			allowedAgent(1, 100, implicit), allowedAgent(4, 100, implicit), allowedAgent(5, 100, implicit), allowedAgent(6, 100, implicit),
		}, 5010, 410, 100, []int64{10}, 1005, "erin", &gitlab.Environment{Slug: "staging", Tier: "staging"})},
	{name: "configuration project: an explicit entry that does not apply hides the implicit one", token: tok("job-infra-noenv"),
		want: allowed([]gitlab.AllowedAgent{
			allowedAgent(1, 100, implicit), allowedAgent(4, 100, implicit), allowedAgent(5, 100, implicit), allowedAgent(6, 100, implicit),
		}, 5011, 411, 100, []int64{10}, 1005, "erin", nil)},
	{name: "group entry in the agent's own top-level group", token: tok("job-other-tool"),
		want: allowed([]gitlab.AllowedAgent{allowedAgent(3, 200, implicit)}, 5012, 412, 201, []int64{20}, 1006, "frank", nil)},
	{name: "unknown token", token: tok("job-nobody"), err: &wantErr{status: 401, text: "no CI job has this token"}},
	{name: "empty token", token: "", err: &wantErr{status: 401}},
	{name: "an agent token is not a job's", token: tok("agent-prod"), err: &wantErr{status: 401}},
}

func TestGetAllowedAgentsForJob(t *testing.T) {
	b := newWorld(t).open(t)
	cases := append(jobCases, jobCase{
		name: "malformed configuration of an agent in the job's top-level group fails", token: tok("job-lab"),
		err: &wantErr{text: "broken/config.yaml: line 5: "},
	})
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := b.GetAllowedAgentsForJob(context.Background(), tc.token)
			checkErr(t, err, tc.err)
			if tc.err == nil {
				checkAnswer(t, got, tc.want)
			}
		})
	}
}

func TestAnswersAreCopies(t *testing.T) {
	b := newWorld(t).open(t)
	first, err := b.GetAllowedAgentsForJob(context.Background(), tok("job-app-prod"))
	if err != nil {
		t.Fatal(err)
	}
	imp := first.AllowedAgents[0].Configuration.AccessAs.Impersonate
	imp.Groups[0] = "changed"
	imp.Extra[0].Values[0] = "changed"
	second, err := b.GetAllowedAgentsForJob(context.Background(), tok("job-app-prod"))
	if err != nil {
		t.Fatal(err)
	}
	checkAnswer(t, second.AllowedAgents[0].Configuration, prodForApp)
}

func TestCancelledContext(t *testing.T) {
	b := newWorld(t).open(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := b.GetAgentInfo(ctx, tok("agent-prod"))
	if !errors.Is(err, context.Canceled) || gitlab.Cacheable(err) {
		t.Errorf("GetAgentInfo with a cancelled context = %v, want a non-cacheable context.Canceled", err)
	}
}
