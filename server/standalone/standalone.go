// Package standalone answers kas's questions to GitLab from local files, so
// kas runs without a GitLab: it reads agents and their tokens, users with
// their personal access tokens, roles and browser sessions, and CI job tokens
// from one YAML file, reads each agent's configuration from a local directory
// standing for its configuration project's repository, and makes the
// authorization decisions GitLab Rails would make. Backend implements
// gitlab.API with the same answers and the same errors as GitLab.
//
// # The standalone file
//
// One YAML file, testdata/standalone/example.yaml being a commented example.
// Secrets are never stored: every token, cookie and CSRF token is stored as the
// hex SHA-256 of its value, which `printf %s TOKEN | sha256sum` or HashToken
// computes. Paths are GitLab full paths, compared case-insensitively as GitLab
// does; a group's parent and a project's group follow from the path and must
// be listed too.
//
//	groups:            # GitLab groups; acme/platform is a subgroup of acme
//	  - id: 10
//	    path: acme
//	projects:
//	  - id: 100
//	    path: acme/infra
//	    default_branch: main     # optional, "main" when omitted, as in GitLab
//	    repository: acme-infra   # the project's repository, a local directory;
//	                             # relative to this file; required for projects with agents
//	agents:
//	  - id: 1
//	    name: prod               # GitLab agent name: lowercase letters, digits, '-'
//	    project: acme/infra      # configuration project
//	    token_sha256: <hex>      # the agent token (glagent-…); optional for a receptive agent
//	    receptive:               # optional: kas dials this agent (GitLab's URL configuration)
//	      url: grpcs://agentk.example.com:8182   # or grpc://, wss://, ws://
//	      ca_certificate_file: agentk-ca.pem     # optional: verifies agentk's certificate
//	      tls_host: agentk.example.com           # optional: the name checked in it
//	      jwt_private_key_file: agent-1.key      # Ed25519 (PEM PKCS#8, or base64 seed), or:
//	      client_certificate_file: kas.pem       # mTLS, with
//	      client_key_file: kas-key.pem
//	users:
//	  - id: 1001
//	    username: alice
//	    personal_access_tokens:
//	      - token_sha256: <hex>  # glpat-…
//	        scopes: [k8s_proxy]  # optional, [k8s_proxy] when omitted
//	    memberships:             # role per project and per group path:
//	      projects:              # guest, planner, reporter, developer, maintainer, owner
//	        acme/app: developer
//	      groups:
//	        acme: reporter
//	sessions:                    # signed-in browsers (the _gitlab_kas cookie)
//	  - cookie_sha256: <hex>
//	    csrf_token_sha256: <hex>
//	    user: alice
//	ci_jobs:                     # running CI jobs (CI_JOB_TOKEN)
//	  - token_sha256: <hex>
//	    id: 5001
//	    pipeline_id: 401
//	    project: acme/app
//	    user: alice              # who runs the job
//	    protected_ref: true      # optional: the pipeline runs on a protected branch or tag
//	    environment:             # optional
//	      name: production       # ci_access environments match this name
//	      slug: production
//	      tier: production       # production, staging, testing, development or other
//
// Loading reports every problem at once, each with its line. The file is
// checked for changes (modification time, size, identity) at most once per
// second (recheckInterval) and reloaded when it changed; while a changed file is invalid, calls fail with
// the problems rather than decide on stale data.
//
// # Agent configuration
//
// An agent's configuration is
// <repository of its configuration project>/.gitlab/agents/<agent name>/config.yaml,
// parsed by server/agentyaml. A missing file is an empty configuration. Files
// are read when a decision needs them and cached until they change on disk
// (checked as often as the standalone file), so edits take effect without a
// restart; a malformed file makes the
// decisions that need it fail with its line (never a silent refusal).
// GetRepositoryFile and ListAgentConfigFiles serve the repository directories
// as GitLab's repository files API does, for the configuration manager
// (server/agentconfig) and the internal API's ListAgentConfigFiles.
//
// # Decisions, as GitLab makes them
//
// GetAgentInfo finds the agent by its token (401 when none matches);
// AgentInfoByID by its id, for receptive agents (404 when none matches).
// GetReceptiveAgents lists the receptive agents in the shape of GitLab's
// receptive agents API, reading their key and certificate files at each call.
//
// AuthorizeProxyUser first resolves the user, then the agent, as Rails does:
// a personal access token must exist (401) and carry the k8s_proxy scope
// (403); a session must exist and the CSRF token must match (401). An unknown
// agent is then 404. The agent's user_access must exist and have an
// access_as (403 otherwise), and must list at least one project or group, in
// the same top-level group as the agent's configuration project, where the
// user has at least the Developer role (403 otherwise). A role in a group
// carries to its subgroups and projects, not to its parent. The answer is
// access_as agent, or user with each authorized project and group and every
// role up to the user's (["guest","planner","reporter","developer"] for a
// developer), as GitLab's API lists them. Where Rails answers 400 for a
// personal access token it does not know ("Unable to get user from request
// data"), standalone answers 401: to kas both mean a bad credential. Rails
// accepts any masked form of the session's CSRF token; standalone compares
// the token itself with its stored hash.
//
// GetAllowedAgentsForJob finds the job by its token (401) and lists the agents
// it may use, in GitLab's order and with GitLab's precedence: an entry for the
// job's project in an agent's ci_access.projects, then the implicit
// authorization of an agent's own configuration project (GitLab lets CI jobs
// of the configuration project use its agents without any ci_access; the
// configuration is then empty: access as the agent, no default namespace), then
// the entry for the closest of the project's groups in ci_access.groups; the
// first found for an agent wins. Only projects and groups in the same
// top-level group as the agent's configuration project count, as on
// GitLab.com and by default on self-managed GitLab. Entries with environments
// then apply only to jobs whose environment name matches (see
// agentyaml.CIAccessEntry.MatchesEnvironment), and entries with
// protected_branches_only only to jobs on protected refs. Only the first 500
// projects and 500 groups of a section count, as in GitLab.
package standalone

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/kasproject/kas/server/gitlab"
)

// HashToken returns the hex SHA-256 of a token, cookie or CSRF token: the
// form the standalone file stores it in (`printf %s TOKEN | sha256sum`).
func HashToken(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

// Backend answers gitlab.API from a standalone file. It is safe for
// concurrent use and owns no goroutines.
type Backend struct {
	file string // as given to Open, for messages
	abs  string // absolute path of the file
	url  string // file:// URL of the file, for gitlab.Error

	configs configCache

	// recheck is how long a look at the file on disk stays good: a request
	// costs no system call, and a change shows within this long.
	recheck time.Duration

	mu      sync.Mutex
	current *state
	checked time.Time // when the file was last looked at
}

// recheckInterval is how soon kas notices a changed standalone file or
// agent configuration file.
const recheckInterval = time.Second

var _ gitlab.API = (*Backend)(nil)

// Open loads the standalone file at path. The error lists every problem in
// the file, each with its line.
func Open(path string) (*Backend, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("open standalone file %s: %w", path, err)
	}
	st, err := load(path, abs)
	if err != nil {
		return nil, err
	}
	return &Backend{
		file:    path,
		abs:     abs,
		url:     fileURL(abs),
		configs: configCache{recheck: recheckInterval, entries: make(map[string]cachedConfig)},
		recheck: recheckInterval,
		checked: time.Now(),
		current: st,
	}, nil
}

// snapshot returns the current data, reloading the file first if it changed.
// A changed file that is invalid is loaded again on every call until it is
// fixed: a small file, and its problems may lie outside it (a repository
// directory not created yet).
func (b *Backend) snapshot() (*state, error) {
	now := time.Now()
	b.mu.Lock()
	if now.Sub(b.checked) < b.recheck {
		defer b.mu.Unlock()
		return b.current, nil
	}
	b.mu.Unlock()
	info, err := os.Stat(b.abs)
	if err != nil {
		return nil, fmt.Errorf("check standalone file %s for changes: %w", b.file, err)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if sameVersion(b.current.info, info) {
		b.checked = now
		return b.current, nil
	}
	st, err := load(b.file, b.abs)
	if err != nil {
		// Not marked checked: every call fails with the problems until fixed.
		return nil, fmt.Errorf("reload changed file: %w", err)
	}
	b.current = st
	b.checked = now
	return st, nil
}

// sameVersion reports whether two stats of a path show the same file content,
// as far as the file system can tell.
func sameVersion(a, b os.FileInfo) bool {
	return os.SameFile(a, b) && a.ModTime().Equal(b.ModTime()) && a.Size() == b.Size()
}

// refuse returns GitLab's refusal: status 401, 403 or 404 with the matching
// sentinel, which makes it cacheable.
func (b *Backend) refuse(op string, status int, message string) error {
	var sentinel error
	switch status {
	case 401:
		sentinel = gitlab.ErrUnauthorized
	case 403:
		sentinel = gitlab.ErrForbidden
	case 404:
		sentinel = gitlab.ErrNotFound
	}
	return &gitlab.Error{Op: op, URL: b.url, StatusCode: status, Message: message, Err: sentinel}
}

// fail returns a failure to decide (unreadable or invalid files, a cancelled
// context): not a refusal, so not cacheable, and fixed files are read again.
func (b *Backend) fail(op, u string, err error) error {
	return &gitlab.Error{Op: op, URL: u, Message: err.Error(), Err: err}
}

func fileURL(abs string) string {
	return (&url.URL{Scheme: "file", Path: filepath.ToSlash(abs)}).String()
}

// begin checks the context and takes a snapshot for one decision.
func (b *Backend) begin(ctx context.Context, op string) (*state, error) {
	if err := ctx.Err(); err != nil {
		return nil, b.fail(op, b.url, err)
	}
	st, err := b.snapshot()
	if err != nil {
		return nil, b.fail(op, b.url, err)
	}
	return st, nil
}
