package standalone

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kasproject/kas/server/gitlab"
)

func TestHashToken(t *testing.T) {
	tests := []struct{ token, want string }{
		// printf %s '' | sha256sum
		{"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
		// printf %s glpat-demo-alice-4f8a2c91e7 | sha256sum
		{"glpat-demo-alice-4f8a2c91e7", "2ec31626db1f8bc1166bf487c1e27a4c6a916efa2a561355b50bc46b7a971d49"},
	}
	for _, tc := range tests {
		if got := HashToken(tc.token); got != tc.want {
			t.Errorf("HashToken(%q) = %s, want %s", tc.token, got, tc.want)
		}
	}
}

// brokenFile has one or more problems on most lines; the plain token on
// agents[0] must never be echoed.
const brokenFile = `groups:
  - {id: 10, path: acme}
  - {id: 10, path: acme2}
  - {id: 11, path: ghost/sub}
  - {id: 12, path: ACME}
  - {id: 13, path: acme/platform}
projects:
  - {id: 100, path: acme/infra, repository: repo}
  - {id: 101, path: app}
  - {id: 102, path: nowhere/app}
  - {id: 103, path: acme/platform}
  - {id: 104, path: acme/tools, repository: notadir}
  - {id: 105, path: acme/web, repository: missing}
  - {id: 106, path: acme/docs}
agents:
  - {id: 1, name: prod, project: acme/infra, token_sha256: glagent-plain-secret-pasted-by-mistake}
  - {id: 2, name: Prod_2, project: acme/infra, token_sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855}
  - {id: 3, name: docs, project: acme/docs, token_sha256: 1111111111111111111111111111111111111111111111111111111111111111}
  - {id: 4, name: prod, project: acme/infra, token_sha256: 2222222222222222222222222222222222222222222222222222222222222222}
  - {id: 5, name: other, project: acme/infra, token_sha256: 2222222222222222222222222222222222222222222222222222222222222222}
  - {id: 6, name: lost, project: acme/lost, token_sha256: 3333333333333333333333333333333333333333333333333333333333333333}
users:
  - id: 1001
    username: alice
    personal_access_tokens:
      - {token_sha256: 4444444444444444444444444444444444444444444444444444444444444444, scopes: []}
      - {token_sha256: 5555555555555555555555555555555555555555555555555555555555555555, scopes: [k8s-proxy]}
    memberships:
      projects: {acme/ap: developer, acme/infra: admin}
      groups: {acm: owner}
  - id: 1002
    username: Alice
    personal_access_tokens:
      - {token_sha256: 5555555555555555555555555555555555555555555555555555555555555555}
  - {id: 0, username: -bob}
sessions:
  - {cookie_sha256: 6666666666666666666666666666666666666666666666666666666666666666, csrf_token_sha256: xyz, user: carol}
ci_jobs:
  - token_sha256: 7777777777777777777777777777777777777777777777777777777777777777
    id: 5001
    project: acme/nope
    user: alice
    environment: {slug: production, tier: prod}
    stage: deploy
`

func TestOpenReportsEveryProblem(t *testing.T) {
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "repo"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "notadir"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(dir, "standalone.yaml")
	if err := os.WriteFile(file, []byte(brokenFile), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := Open(file)
	if err == nil {
		t.Fatal("Open succeeded, want the problems")
	}
	want := []string{
		`:3: groups[1].id: group id 10 is already used at line 2`,
		`:4: groups[2].path: its parent group ghost is not listed`,
		`:5: groups[3].path: path ACME is already used at line 2`,
		`:9: projects[1].path: "app" is not a full path with its group`,
		`:10: projects[2].path: its group nowhere is not listed`,
		`:11: projects[3].path: acme/platform is already a group's path`,
		`:12: projects[4].repository: ` + filepath.Join(dir, "notadir") + ` is not a directory`,
		`:13: projects[5].repository: stat ` + filepath.Join(dir, "missing"),
		`:16: agents[0].token_sha256: must be the SHA-256 of the agent token`,
		`:17: agents[1].name: "Prod_2" is not a GitLab agent name`,
		`:17: agents[1].token_sha256: is the SHA-256 of an empty string`,
		`:18: agents[2].project: project acme/docs holds the agent's configuration, so it needs a repository`,
		`:19: agents[3].name: agent name prod in project acme/infra is already used at line 16`,
		`:20: agents[4].token_sha256: agent token is already used at line 19`,
		`:21: agents[5].project: no project acme/lost under projects`,
		`:26: users[0].personal_access_tokens[0].scopes: a personal access token has at least one scope`,
		`:27: users[0].personal_access_tokens[1].scopes[0]: unknown scope "k8s-proxy"`,
		`:29: users[0].memberships.projects["acme/ap"]: no project acme/ap under projects`,
		`:29: users[0].memberships.projects["acme/infra"]: role "admin" is not one of GitLab's roles`,
		`:30: users[0].memberships.groups["acm"]: no group acm under groups`,
		`:32: users[1].username: username Alice is already used at line 24`,
		`:34: users[1].personal_access_tokens[0].token_sha256: personal access token is already used at line 27`,
		`:35: users[2].id: required`,
		`:35: users[2].username: "-bob" is not a GitLab username`,
		`:37: sessions[0].csrf_token_sha256: must be the SHA-256 of the CSRF token`,
		`:37: sessions[0].user: no user carol under users`,
		`:39: ci_jobs[0].pipeline_id: required`,
		`:41: ci_jobs[0].project: no project acme/nope under projects`,
		`:43: ci_jobs[0].environment: name is required`,
		`:43: ci_jobs[0].environment.tier: tier "prod" is not one of GitLab's tiers`,
		`:44: field stage not found`,
	}
	lines := strings.Split(err.Error(), "\n\t")
	if got := lines[0]; got != fmt.Sprintf("standalone file %s has %d problem(s):", file, len(want)) {
		t.Errorf("first line %q", got)
	}
	problems := lines[1:]
	for i := range max(len(problems), len(want)) {
		switch {
		case i >= len(problems):
			t.Errorf("missing problem %q", want[i])
		case i >= len(want):
			t.Errorf("unexpected problem %q", problems[i])
		case !strings.HasPrefix(problems[i], file+want[i]):
			t.Errorf("problem %d = %q, want prefix %q", i, problems[i], file+want[i])
		}
	}
	if strings.Contains(err.Error(), "glagent-plain-secret") {
		t.Errorf("the error repeats a plain token: %v", err)
	}
}

func TestOpen(t *testing.T) {
	tests := []struct {
		name    string
		content string
		err     string // "" when Open must succeed
	}{
		{name: "empty file: nothing known", content: ""},
		{name: "syntax error", content: "groups:\n\t- {id: 10, path: acme}\n", err: "standalone.yaml:2: found character that cannot start any token"},
		{name: "not a mapping", content: "- acme\n", err: "standalone.yaml:1: cannot unmarshal !!seq"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			file := filepath.Join(t.TempDir(), "standalone.yaml")
			if err := os.WriteFile(file, []byte(tc.content), 0o644); err != nil {
				t.Fatal(err)
			}
			b, err := Open(file)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("Open = %v, want an error containing %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			_, err = b.GetAgentInfo(context.Background(), "any")
			checkErr(t, err, &wantErr{status: 401})
		})
	}
	t.Run("missing file", func(t *testing.T) {
		file := filepath.Join(t.TempDir(), "absent.yaml")
		if _, err := Open(file); !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), file) {
			t.Errorf("Open = %v, want a not-exist error naming the file", err)
		}
	})
}

// TestExampleData checks testdata/standalone, which the README's quick start
// uses, with the plain demo tokens its README lists.
func TestExampleData(t *testing.T) {
	const (
		agentToken = "glagent-demo-prod-7b3f9c2e1a5d4f60"
		alicePAT   = "glpat-demo-alice-4f8a2c91e7"
		bobPAT     = "glpat-demo-bob-9d1e6b3a20"
		jobToken   = "glcbt-demo-app-job-5001-c3e8f1a2"
		cookie     = "demo-session-alice-8e2b7d41"
		csrf       = "demo-csrf-alice-5a9c3f70"
	)
	readme, err := os.ReadFile("../../testdata/standalone/README.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, token := range []string{agentToken, alicePAT, bobPAT, jobToken, cookie, csrf} {
		if !strings.Contains(string(readme), token) {
			t.Errorf("README.md does not list demo token %s", token)
		}
	}
	b, err := Open("../../testdata/standalone/example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()

	info, err := b.GetAgentInfo(ctx, agentToken)
	checkErr(t, err, nil)
	checkAnswer(t, info, &gitlab.AgentInfo{ProjectID: 100, AgentID: 1, AgentName: "prod", DefaultBranch: "main"})

	alice := &gitlab.AuthorizeProxyUserResponse{
		Agent:    gitlab.AuthorizedAgent{ID: 1, ConfigProject: gitlab.IDRef{ID: 100}},
		User:     gitlab.User{ID: 1001, Username: "alice"},
		AccessAs: gitlab.UserAccessAs{Agent: &struct{}{}},
	}
	resp, err := b.AuthorizeProxyUser(ctx, gitlab.AuthorizeProxyUserRequest{AgentID: 1, AccessType: gitlab.AccessTypePersonalAccessToken, AccessKey: alicePAT})
	checkErr(t, err, nil)
	checkAnswer(t, resp, alice)
	resp, err = b.AuthorizeProxyUser(ctx, gitlab.AuthorizeProxyUserRequest{AgentID: 1, AccessType: gitlab.AccessTypeSessionCookie, AccessKey: cookie, CSRFToken: csrf})
	checkErr(t, err, nil)
	checkAnswer(t, resp, alice)
	_, err = b.AuthorizeProxyUser(ctx, gitlab.AuthorizeProxyUserRequest{AgentID: 1, AccessType: gitlab.AccessTypePersonalAccessToken, AccessKey: bobPAT})
	checkErr(t, err, &wantErr{status: 403})

	job, err := b.GetAllowedAgentsForJob(ctx, jobToken)
	checkErr(t, err, nil)
	checkAnswer(t, job, &gitlab.AllowedAgentsForJob{
		AllowedAgents: []gitlab.AllowedAgent{{
			ID:            1,
			ConfigProject: gitlab.IDRef{ID: 100},
			Configuration: gitlab.AgentConfiguration{DefaultNamespace: "app", AccessAs: &gitlab.CIAccessAs{Agent: &struct{}{}}},
		}},
		Job:         gitlab.IDRef{ID: 5001},
		Pipeline:    gitlab.IDRef{ID: 401},
		Project:     gitlab.JobProject{ID: 101, Groups: []gitlab.IDRef{{ID: 10}}},
		User:        gitlab.User{ID: 1001, Username: "alice"},
		Environment: &gitlab.Environment{Slug: "production", Tier: "production"},
	})
}
