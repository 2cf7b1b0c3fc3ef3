package main

import (
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/kasproject/kas/server/config"
	"github.com/kasproject/kas/server/standalone"
)

// credentials are the secrets the benchmark makes up for one run.
type credentials struct {
	agentToken  string   // the agent the tunnel path goes through (id benchAgentID)
	idleTokens  []string // agents that only connect (ids benchAgentID+1…)
	userPAT     string   // the personal access token of the user making requests
	tokensFile  string   // agentToken, for the agents process
	idleFile    string   // idleTokens, one a line
	kasConfig   string   // kas.yaml
	standalone  string   // the standalone file kas.yaml points at
	bearerValue string   // the Authorization header of proxied requests

	// The gitlab path's agent (id benchGitLabAgentID), served by GitLab's
	// own agentk, and the Authorization header of requests to it.
	gitlabToken       string
	gitlabTokenFile   string
	gitlabBearerValue string
}

const (
	benchAgentID = 1
	// benchGitLabAgentID is clear of the idle agents' IDs.
	benchGitLabAgentID = 1 << 40
)

// writeSetup writes kas's configuration and a standalone file for it: one
// group and project, the benchmark agent whose user_access lets the user in
// as the agent itself (access_as agent: no impersonation), idle agents, and
// the user with a personal access token. Every token is random and stored
// only hashed (standalone.HashToken) in the files kas reads.
func writeSetup(dir string, idleAgents int, kasLogLevel string) (*credentials, error) {
	c := &credentials{
		agentToken: "glagent-kasbench-" + rand.Text(),
		userPAT:    "glpat-kasbench-" + rand.Text(),
		tokensFile: filepath.Join(dir, "agent-token"),
		idleFile:   filepath.Join(dir, "idle-agent-tokens"),
		kasConfig:  filepath.Join(dir, "kas.yaml"),
		standalone: filepath.Join(dir, "standalone.yaml"),

		gitlabToken:     "glagent-kasbench-gitlab-" + rand.Text(),
		gitlabTokenFile: filepath.Join(dir, "gitlab-agent-token"),
	}
	c.bearerValue = fmt.Sprintf("Bearer pat:%d:%s", benchAgentID, c.userPAT)
	c.gitlabBearerValue = fmt.Sprintf("Bearer pat:%d:%s", benchGitLabAgentID, c.userPAT)
	for range idleAgents {
		c.idleTokens = append(c.idleTokens, "glagent-kasbench-"+rand.Text())
	}

	var sa strings.Builder
	fmt.Fprintf(&sa, `# Written by kasbench for one run; tokens are stored hashed.
groups:
  - id: 1
    path: kasbench
projects:
  - id: 10
    path: kasbench/cluster
    repository: repo
agents:
  - id: %d
    name: bench
    project: kasbench/cluster
    token_sha256: %s
  - id: %d
    name: gitlab-bench
    project: kasbench/cluster
    token_sha256: %s
`, benchAgentID, standalone.HashToken(c.agentToken), benchGitLabAgentID, standalone.HashToken(c.gitlabToken))
	for i, t := range c.idleTokens {
		fmt.Fprintf(&sa, "  - id: %d\n    name: idle-%d\n    project: kasbench/cluster\n    token_sha256: %s\n",
			benchAgentID+1+i, i+1, standalone.HashToken(t))
	}
	fmt.Fprintf(&sa, `users:
  - id: 100
    username: bencher
    personal_access_tokens:
      - token_sha256: %s
        scopes: [k8s_proxy]
    memberships:
      projects:
        kasbench/cluster: developer
`, standalone.HashToken(c.userPAT))

	agentConfig := `user_access:
  access_as:
    agent: {}
  projects:
    - id: kasbench/cluster
`
	files := []struct {
		path, content string
	}{
		{c.standalone, sa.String()},
		{filepath.Join(dir, "repo", ".gitlab", "agents", "bench", "config.yaml"), agentConfig},
		{filepath.Join(dir, "repo", ".gitlab", "agents", "gitlab-bench", "config.yaml"), agentConfig},
		{c.gitlabTokenFile, c.gitlabToken + "\n"},
		{c.kasConfig, kasConfig(kasLogLevel, "", "")},
		{c.tokensFile, c.agentToken + "\n"},
		{c.idleFile, strings.Join(c.idleTokens, "\n") + "\n"},
	}
	for _, f := range files {
		if err := os.MkdirAll(filepath.Dir(f.path), 0o700); err != nil {
			return nil, err
		}
		if err := os.WriteFile(f.path, []byte(f.content), 0o600); err != nil {
			return nil, fmt.Errorf("write %s: %w", f.path, err)
		}
	}
	return c, nil
}

// kasConfig is a kas configuration with every listener on a free loopback
// port: two kas run at once during the memory measurement, two nodes run
// beside the tunnel path's kas, and the machine may run another kas. With a
// redisAddr it is one of several nodes sharing that Redis, whose private
// API calls are signed with the secret in secretFile.
func kasConfig(logLevel, redisAddr, secretFile string) string {
	// connections_per_token_per_minute: the agents all connect at once, and
	// reconnect at once after kas restarts; the limit is not what is measured.
	var b strings.Builder
	fmt.Fprintf(&b, `# Written by kasbench for one run.
agent:
  listen:
    address: 127.0.0.1:0
    connections_per_token_per_minute: 1000000
    listen_grace_period: 2s
observability:
  listen:
    address: 127.0.0.1:0
  logging:
    level: %s
api:
  listen:
    address: 127.0.0.1:0
private_api:
  listen:
    address: 127.0.0.1:0
`, logLevel)
	if redisAddr != "" {
		// Both nodes listen on 127.0.0.1 of this one machine, which kas
		// refuses with Redis unless told that is intended.
		fmt.Fprintf(&b, `    authentication_secret_file: %s
redis:
  server:
    address: %s
  allow_loopback_private_api: true
`, secretFile, redisAddr)
	}
	b.WriteString(`standalone:
  file: standalone.yaml
`)
	return b.String()
}

// nodeConfigs are the configuration files of the two kas nodes.
type nodeConfigs struct {
	a, b string
}

// writeNodeConfigs writes the configuration of two kas nodes sharing the
// Redis at redisAddr and a fresh private API secret, beside (and reading
// the same standalone file as) the tunnel path's kas.yaml.
func writeNodeConfigs(dir, redisAddr, kasLogLevel string) (nodeConfigs, error) {
	secret := make([]byte, config.SecretLength)
	_, _ = rand.Read(secret) // never fails (crypto/rand)
	secretFile := filepath.Join(dir, "private-api-secret")
	c := nodeConfigs{a: filepath.Join(dir, nodeA+".yaml"), b: filepath.Join(dir, nodeB+".yaml")}
	cfg := kasConfig(kasLogLevel, redisAddr, secretFile)
	for _, f := range []struct{ path, content string }{
		{secretFile, base64.StdEncoding.EncodeToString(secret) + "\n"},
		{c.a, cfg},
		{c.b, cfg},
	} {
		if err := os.WriteFile(f.path, []byte(f.content), 0o600); err != nil {
			return c, fmt.Errorf("write %s: %w", f.path, err)
		}
	}
	return c, nil
}
