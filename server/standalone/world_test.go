package standalone

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"text/template"
	"time"
)

// The test world: three top-level groups and agents whose configurations
// exercise every rule. Tokens are "tok-<name>"; the file stores their hashes.
//
//	acme (10)                      other (20)          lab (30)
//	├── infra (100): agents 1 prod, 2 staging,  ├── infra (200): agent 3   └── infra (300): agent 9 (broken config)
//	│     4 bare (no config), 5 people, 6 noaccessas  └── tool (201)          └── app (301)
//	├── app (101)
//	├── web (104)
//	└── platform (11)
//	    ├── api (102)
//	    └── k8s (12)
//	        └── operator (103)
const worldFile = `
groups:
  - {id: 10, path: acme}
  - {id: 11, path: acme/platform}
  - {id: 12, path: acme/platform/k8s}
  - {id: 20, path: other}
  - {id: 30, path: lab}
projects:
  - {id: 100, path: acme/infra, repository: repos/acme-infra}
  - {id: 101, path: acme/app}
  - {id: 102, path: acme/platform/api}
  - {id: 103, path: acme/platform/k8s/operator}
  - {id: 104, path: acme/web}
  - {id: 200, path: other/infra, default_branch: trunk, repository: repos/other-infra}
  - {id: 201, path: other/tool}
  - {id: 300, path: lab/infra, repository: repos/lab-infra}
  - {id: 301, path: lab/app}
agents:
  - {id: 1, name: prod, project: acme/infra, token_sha256: {{hash "agent-prod"}}}
  - {id: 2, name: staging, project: acme/infra, token_sha256: {{hash "agent-staging"}}}
  - {id: 3, name: foreign, project: other/infra, token_sha256: {{hash "agent-foreign"}}}
  - {id: 4, name: bare, project: acme/infra, token_sha256: {{hash "agent-bare"}}}
  - {id: 5, name: people, project: acme/infra, token_sha256: {{hash "agent-people"}}}
  - {id: 6, name: noaccessas, project: acme/infra, token_sha256: {{hash "agent-noaccessas"}}}
  - {id: 9, name: broken, project: lab/infra, token_sha256: {{hash "agent-broken"}}}
users:
  - id: 1001
    username: alice
    personal_access_tokens:
      - {token_sha256: {{hash "alice"}}}
      - {token_sha256: {{hash "alice-read-api"}}, scopes: [read_api, api]}
    memberships: {projects: {acme/app: developer}}
  - id: 1002
    username: bob
    personal_access_tokens: [{token_sha256: {{hash "bob"}}}]
    memberships: {groups: {acme: reporter}}
  - id: 1003
    username: carol
    personal_access_tokens: [{token_sha256: {{hash "carol"}}, scopes: [k8s_proxy, read_api]}]
    memberships: {groups: {acme/platform: maintainer}}
  - id: 1004
    username: dave
    personal_access_tokens: [{token_sha256: {{hash "dave"}}}]
    memberships: {groups: {acme/platform/k8s: owner}}
  - id: 1005
    username: erin
    personal_access_tokens: [{token_sha256: {{hash "erin"}}}]
    memberships: {groups: {acme: developer}}
  - id: 1006
    username: frank
    personal_access_tokens: [{token_sha256: {{hash "frank"}}}]
    memberships: {projects: {acme/app: reporter, other/tool: developer}}
sessions:
  - {cookie_sha256: {{hash "cookie-alice"}}, csrf_token_sha256: {{hash "csrf-alice"}}, user: alice}
ci_jobs:
  - {token_sha256: {{hash "job-app-prod"}}, id: 5001, pipeline_id: 401, project: acme/app, user: alice, protected_ref: true,
     environment: {name: production, slug: production, tier: production}}
  - {token_sha256: {{hash "job-app-noenv"}}, id: 5002, pipeline_id: 402, project: acme/app, user: alice}
  - {token_sha256: {{hash "job-web-prod"}}, id: 5003, pipeline_id: 403, project: acme/web, user: erin,
     environment: {name: production, slug: production, tier: production}}
  - {token_sha256: {{hash "job-web-review"}}, id: 5004, pipeline_id: 404, project: acme/web, user: erin,
     environment: {name: review/feature-1, slug: review-feature-1-x7k2p9, tier: development}}
  - {token_sha256: {{hash "job-web-staging"}}, id: 5005, pipeline_id: 405, project: acme/web, user: erin,
     environment: {name: staging, slug: staging, tier: staging}}
  - {token_sha256: {{hash "job-web-noenv"}}, id: 5006, pipeline_id: 406, project: acme/web, user: erin}
  - {token_sha256: {{hash "job-api-unprotected"}}, id: 5007, pipeline_id: 407, project: acme/platform/api, user: carol}
  - {token_sha256: {{hash "job-api-protected"}}, id: 5008, pipeline_id: 408, project: acme/platform/api, user: carol, protected_ref: true}
  - {token_sha256: {{hash "job-operator"}}, id: 5009, pipeline_id: 409, project: acme/platform/k8s/operator, user: dave}
  - {token_sha256: {{hash "job-infra-staging"}}, id: 5010, pipeline_id: 410, project: acme/infra, user: erin,
     environment: {name: staging, slug: staging, tier: staging}}
  - {token_sha256: {{hash "job-infra-noenv"}}, id: 5011, pipeline_id: 411, project: acme/infra, user: erin}
  - {token_sha256: {{hash "job-other-tool"}}, id: 5012, pipeline_id: 412, project: other/tool, user: frank}
  - {token_sha256: {{hash "job-lab"}}, id: 5013, pipeline_id: 413, project: lab/app, user: alice}
`

// worldConfigs are the agents' config.yaml files, by repository and agent
// name; agent "bare" has none.
var worldConfigs = map[string]string{
	"repos/acme-infra/.gitlab/agents/prod/config.yaml": `
ci_access:
  projects:
    - id: acme/app
      default_namespace: app
      access_as:
        impersonate: {username: deployer, groups: [deployers], uid: "42", extra: [{key: team, val: [payments]}]}
    - id: ACME/Platform/API   # GitLab matches paths case-insensitively
      access_as: {ci_job: {}}
      protected_branches_only: true
  groups:
    - id: acme
      access_as: {agent: {}}
      environments: [production, review/*]
    - id: acme/platform
      default_namespace: platform
      access_as: {ci_job: {}}
user_access:
  access_as: {agent: {}}
  projects: [{id: acme/app}]
  groups: [{id: acme/platform}]
`,
	"repos/acme-infra/.gitlab/agents/staging/config.yaml": `
ci_access:
  projects:
    - id: acme/infra   # its own configuration project, narrowed to one environment
      access_as: {ci_job: {}}
      environments: [staging]
  groups:
    - id: acme/platform/k8s
`,
	"repos/acme-infra/.gitlab/agents/people/config.yaml": `
user_access:
  access_as: {user: {}}
  projects: [{id: acme/app}, {id: acme/platform/api}, {id: other/tool}]
  groups: [{id: acme/platform}, {id: acme}]
`,
	"repos/acme-infra/.gitlab/agents/noaccessas/config.yaml": `
user_access:
  projects: [{id: acme/app}]
`,
	"repos/other-infra/.gitlab/agents/foreign/config.yaml": `
ci_access:
  projects: [{id: acme/app}]       # another top-level group: GitLab ignores it
  groups: [{id: acme}, {id: other}]
user_access:
  access_as: {agent: {}}
  projects: [{id: acme/app}]
  groups: [{id: acme}]
`,
	"repos/lab-infra/.gitlab/agents/broken/config.yaml": `
ci_access:
  projects:
    - id: lab/app
      access_as: {agent: {}, ci_job: {}}
`,
}

// world is a standalone file and agent configurations in a temporary directory.
type world struct {
	dir  string
	file string
}

func newWorld(t *testing.T) *world {
	t.Helper()
	w := &world{dir: t.TempDir()}
	w.file = filepath.Join(w.dir, "standalone.yaml")
	for _, repo := range []string{"repos/acme-infra", "repos/other-infra", "repos/lab-infra"} {
		if err := os.MkdirAll(filepath.Join(w.dir, repo), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	w.write(t, "standalone.yaml", render(t, worldFile))
	for name, content := range worldConfigs {
		w.write(t, name, content)
	}
	return w
}

// open opens the world's standalone file.
// open opens the world's file looking at the disk on every question, so
// tests of what a change does need not wait; TestChangesShowWithinRecheck
// covers the interval itself.
func (w *world) open(t *testing.T) *Backend {
	t.Helper()
	b, err := Open(w.file)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	b.recheck, b.configs.recheck = 0, 0
	return b
}

// write writes a file of the world, then moves its modification time forward
// so that a rewrite within the file system's timestamp granularity still
// counts as a change.
func (w *world) write(t *testing.T, name, content string) {
	t.Helper()
	p := filepath.Join(w.dir, name)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	var mtime time.Time
	if info, err := os.Stat(p); err == nil {
		mtime = info.ModTime().Add(time.Second)
	}
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if !mtime.IsZero() {
		if err := os.Chtimes(p, mtime, mtime); err != nil {
			t.Fatal(err)
		}
	}
}

// render fills in {{hash "name"}} with the SHA-256 of "tok-name".
func render(t *testing.T, text string) string {
	t.Helper()
	tmpl := template.Must(template.New("").Funcs(template.FuncMap{"hash": func(name string) string { return HashToken(tok(name)) }}).Parse(text))
	var b strings.Builder
	if err := tmpl.Execute(&b, nil); err != nil {
		t.Fatal(err)
	}
	return b.String()
}

// tok is the plain token called name in the world.
func tok(name string) string { return "tok-" + name }
