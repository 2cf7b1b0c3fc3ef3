package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/kasproject/kas/server/agentyaml"
	"github.com/kasproject/kas/server/standalone"
)

// The world every test runs in, as GitLab would know it: group acme, the
// agents' configuration project acme/infra, and acme/app, whose developer
// alice and whose CI job 5001 use the agents.
const (
	groupID        = 10
	infraProjectID = 100
	appProjectID   = 101
	aliceID        = 1001
	bobID          = 1002
	jobID          = 5001
	pipelineID     = 401
)

// The plain credentials of the world; the standalone file stores their hashes.
const (
	alicePAT    = "glpat-e2e-alice-6c1f0a"
	bobPAT      = "glpat-e2e-bob-93d2e7" // bob is only a reporter: refused
	aliceCookie = "e2e-session-alice-1b7e"
	aliceCSRF   = "e2e-csrf-alice-4d09"
	jobToken    = "glcbt-e2e-job-5001-a83c"
	// agentSAToken is agentk's own credential towards the cluster (its
	// service account); the only Authorization the cluster may ever see.
	agentSAToken = "agentk-service-account-token"
)

// aliceReadAPIPAT is alice's token with the read_api scope only, not the
// k8s_proxy scope the proxy requires: refused.
const aliceReadAPIPAT = "glpat-e2e-alice-read-api-5e20"

// testAgent is one agent registered in the world.
type testAgent struct {
	id    int64
	name  string
	token string
}

// The world's agents, one per way of acting in the cluster.
var (
	// asAgent lets alice and job 5001 act as the agent's service account.
	asAgent = testAgent{1, "as-agent", "glagent-e2e-as-agent-0f3b"}
	// asImpersonate lets job 5001 act as a fixed identity.
	asImpersonate = testAgent{2, "as-impersonate", "glagent-e2e-as-impersonate-77aa"}
	// asCIJob lets job 5001 act as itself.
	asCIJob = testAgent{3, "as-ci-job", "glagent-e2e-as-ci-job-2e51"}
	// asUser lets alice act as herself; it grants CI jobs nothing.
	asUser = testAgent{4, "as-user", "glagent-e2e-as-user-c4d8"}
)

// secrets lists every plain credential of the world, which no log may contain.
var secrets = []string{
	alicePAT, bobPAT, aliceReadAPIPAT, aliceCookie, aliceCSRF, jobToken, agentSAToken,
	asAgent.token, asImpersonate.token, asCIJob.token, asUser.token,
}

// The static identity asImpersonate's CI jobs act as.
var deployer = agentyaml.Impersonate{
	Username: "deployer",
	Groups:   []string{"deployers", "release-managers"},
	UID:      "uid-42",
	Extra: []agentyaml.ImpersonateExtra{
		{Key: "example.com/team", Values: []string{"blue", "green"}},
		{Key: "reason", Values: []string{"release"}},
	},
}

// scenario is a standalone file (see server/standalone) with the agents'
// configuration files, built in Go and written to a directory.
type scenario struct {
	Groups   []scenarioGroup   `yaml:"groups"`
	Projects []scenarioProject `yaml:"projects"`
	Agents   []scenarioAgent   `yaml:"agents"`
	Users    []scenarioUser    `yaml:"users"`
	Sessions []scenarioSession `yaml:"sessions"`
	CIJobs   []scenarioCIJob   `yaml:"ci_jobs"`

	// configs are the agents' config.yaml files by agent name, all in the
	// repository of the configuration project acme/infra.
	configs map[string]agentyaml.Config
}

type scenarioGroup struct {
	ID   int64  `yaml:"id"`
	Path string `yaml:"path"`
}

type scenarioProject struct {
	ID         int64  `yaml:"id"`
	Path       string `yaml:"path"`
	Repository string `yaml:"repository,omitempty"`
}

type scenarioAgent struct {
	ID          int64              `yaml:"id"`
	Name        string             `yaml:"name"`
	Project     string             `yaml:"project"`
	TokenSHA256 string             `yaml:"token_sha256"`
	Receptive   *scenarioReceptive `yaml:"receptive,omitempty"`
}

// scenarioReceptive makes an agent receptive: kas dials it.
type scenarioReceptive struct {
	URL                   string `yaml:"url"`
	CACertificateFile     string `yaml:"ca_certificate_file,omitempty"`
	TLSHost               string `yaml:"tls_host,omitempty"`
	JWTPrivateKeyFile     string `yaml:"jwt_private_key_file,omitempty"`
	ClientCertificateFile string `yaml:"client_certificate_file,omitempty"`
	ClientKeyFile         string `yaml:"client_key_file,omitempty"`
}

type scenarioUser struct {
	ID                   int64               `yaml:"id"`
	Username             string              `yaml:"username"`
	PersonalAccessTokens []scenarioToken     `yaml:"personal_access_tokens"`
	Memberships          scenarioMemberships `yaml:"memberships"`
}

type scenarioToken struct {
	TokenSHA256 string   `yaml:"token_sha256"`
	Scopes      []string `yaml:"scopes,omitempty"`
}

type scenarioMemberships struct {
	Projects map[string]string `yaml:"projects,omitempty"`
	Groups   map[string]string `yaml:"groups,omitempty"`
}

type scenarioSession struct {
	CookieSHA256    string `yaml:"cookie_sha256"`
	CSRFTokenSHA256 string `yaml:"csrf_token_sha256"`
	User            string `yaml:"user"`
}

type scenarioCIJob struct {
	TokenSHA256 string              `yaml:"token_sha256"`
	ID          int64               `yaml:"id"`
	PipelineID  int64               `yaml:"pipeline_id"`
	Project     string              `yaml:"project"`
	User        string              `yaml:"user"`
	Environment scenarioEnvironment `yaml:"environment"`
}

type scenarioEnvironment struct {
	Name string `yaml:"name"`
	Slug string `yaml:"slug"`
	Tier string `yaml:"tier"`
}

// The repository directory standing for acme/infra, relative to the file.
const infraRepository = "infra"

// newScenario returns the world described at the top of this file.
func newScenario() *scenario {
	s := &scenario{
		Groups: []scenarioGroup{{ID: groupID, Path: "acme"}},
		Projects: []scenarioProject{
			{ID: infraProjectID, Path: "acme/infra", Repository: infraRepository},
			{ID: appProjectID, Path: "acme/app"},
		},
		configs: map[string]agentyaml.Config{},
	}
	app := []agentyaml.Ref{{ID: "acme/app"}}
	ciAccess := func(as agentyaml.CIAccessAs) *agentyaml.CIAccess {
		return &agentyaml.CIAccess{Projects: []agentyaml.CIAccessEntry{{ID: "acme/app", AccessAs: &as}}}
	}
	s.addAgent(asAgent, agentyaml.Config{
		CIAccess:   ciAccess(agentyaml.CIAccessAs{Agent: &struct{}{}}),
		UserAccess: &agentyaml.UserAccess{AccessAs: &agentyaml.UserAccessAs{Agent: &struct{}{}}, Projects: app},
	})
	s.addAgent(asImpersonate, agentyaml.Config{CIAccess: ciAccess(agentyaml.CIAccessAs{Impersonate: &deployer})})
	s.addAgent(asCIJob, agentyaml.Config{CIAccess: ciAccess(agentyaml.CIAccessAs{CIJob: &struct{}{}})})
	s.addAgent(asUser, agentyaml.Config{
		UserAccess: &agentyaml.UserAccess{AccessAs: &agentyaml.UserAccessAs{User: &struct{}{}}, Projects: app},
	})
	s.Users = []scenarioUser{
		{
			ID: aliceID, Username: "alice",
			PersonalAccessTokens: []scenarioToken{
				{TokenSHA256: standalone.HashToken(alicePAT)},
				{TokenSHA256: standalone.HashToken(aliceReadAPIPAT), Scopes: []string{"read_api"}},
			},
			Memberships: scenarioMemberships{Projects: map[string]string{"acme/app": "developer"}},
		},
		{
			ID: bobID, Username: "bob",
			PersonalAccessTokens: []scenarioToken{{TokenSHA256: standalone.HashToken(bobPAT)}},
			Memberships:          scenarioMemberships{Groups: map[string]string{"acme": "reporter"}},
		},
	}
	s.Sessions = []scenarioSession{{
		CookieSHA256:    standalone.HashToken(aliceCookie),
		CSRFTokenSHA256: standalone.HashToken(aliceCSRF),
		User:            "alice",
	}}
	s.CIJobs = []scenarioCIJob{{
		TokenSHA256: standalone.HashToken(jobToken),
		ID:          jobID,
		PipelineID:  pipelineID,
		Project:     "acme/app",
		User:        "alice",
		Environment: scenarioEnvironment{Name: "production", Slug: "production", Tier: "production"},
	}}
	return s
}

// addAgent registers a in acme/infra with configuration cfg.
func (s *scenario) addAgent(a testAgent, cfg agentyaml.Config) {
	s.Agents = append(s.Agents, scenarioAgent{ID: a.id, Name: a.name, Project: "acme/infra", TokenSHA256: standalone.HashToken(a.token)})
	s.configs[a.name] = cfg
}

// setReceptive makes the agent receptive with r, or not with nil.
func (s *scenario) setReceptive(agentID int64, r *scenarioReceptive) {
	for i := range s.Agents {
		if s.Agents[i].ID == agentID {
			s.Agents[i].Receptive = r
			return
		}
	}
	panic(fmt.Sprintf("no agent %d in the scenario", agentID))
}

// write writes the standalone file and the agents' configuration files
// into dir and returns the standalone file's path.
func (s *scenario) write(t testing.TB, dir string) string {
	t.Helper()
	for name, cfg := range s.configs {
		writeYAML(t, filepath.Join(dir, infraRepository, ".gitlab", "agents", name, "config.yaml"), cfg)
	}
	file := filepath.Join(dir, "standalone.yaml")
	writeYAML(t, file, s)
	return file
}

func writeYAML(t testing.TB, path string, v any) {
	t.Helper()
	data, err := yaml.Marshal(v)
	if err != nil {
		t.Fatalf("encode %s: %v", path, err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}
