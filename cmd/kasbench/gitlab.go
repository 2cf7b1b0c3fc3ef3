package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
)

// The gitlab path: client → kas → (ws-tunnel WebSocket, gRPC reverse
// tunnel) → GitLab's own agentk → upstream. The agentk is GitLab's real
// binary, found as $KAS_GITLAB_AGENTK or -gitlab-agentk.

// gitlabAgentkEnv names the variable that says where GitLab's agentk is.
const gitlabAgentkEnv = "KAS_GITLAB_AGENTK"

// defaultGitLabAgentk is where the repository's tests find GitLab's agentk,
// relative to the repository's top folder (the nearest folder up from the
// working directory holding go.mod).
const defaultGitLabAgentk = "../shared/bin/gitlab-agentk"

// errNoGitLabAgentk: the gitlab path is skipped.
var errNoGitLabAgentk = errors.New("GitLab's agentk binary is missing")

// gitlabAgentkPath resolves -gitlab-agentk, $KAS_GITLAB_AGENTK or the default.
func gitlabAgentkPath(flagValue string) (string, error) {
	bin := flagValue
	if bin == "" {
		bin = os.Getenv(gitlabAgentkEnv)
	}
	if bin == "" {
		bin = filepath.Join(repositoryRoot(), defaultGitLabAgentk)
	}
	if _, err := os.Stat(bin); err != nil {
		return "", fmt.Errorf("%w at %s (%v): the gitlab path is not measured; build GitLab's agentk (gitlab-org/cluster-integration/gitlab-agent, cmd/agentk) and pass it with -gitlab-agentk or %s",
			errNoGitLabAgentk, bin, err, gitlabAgentkEnv)
	}
	return filepath.Abs(bin)
}

// startGitLabAgentk runs GitLab's agentk for the gitlab path's agent
// against kas (address host:port of its public listener), reaching the
// upstream as its Kubernetes API server. It is a child without kasbench's
// command protocol: it is stopped with SIGTERM.
func startGitLabAgentk(b *bench, bin, kasAddr, upstreamURL string) (*child, error) {
	kubeconfig := b.path("gitlab-agentk.kubeconfig")
	// No credentials: the upstream checks none, and client-go would send
	// them over TLS only anyway.
	if err := os.WriteFile(kubeconfig, fmt.Appendf(nil, `apiVersion: v1
kind: Config
clusters:
- name: upstream
  cluster:
    server: %s
contexts:
- name: upstream
  context:
    cluster: upstream
    user: none
users:
- name: none
  user: {}
current-context: upstream
`, upstreamURL), 0o600); err != nil {
		return nil, err
	}
	logPath := b.path("gitlab-agentk.stderr")
	out, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer out.Close()
	cmd := exec.Command(bin, "--kas-address", "ws://"+kasAddr+"/-/kubernetes-agent/", "--token-file", b.creds.gitlabTokenFile,
		"--kubeconfig", kubeconfig, "--observability-listen-address", "127.0.0.1:0")
	cmd.Env = append(os.Environ(), "POD_NAMESPACE=kasbench", "POD_NAME=gitlab-agentk-0")
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start GitLab's agentk %s: %w", bin, err)
	}
	c := &child{name: "gitlab-agentk", logPath: logPath, cmd: cmd, waited: make(chan struct{}), signal: syscall.SIGTERM}
	go func() { c.waitErr = cmd.Wait(); close(c.waited) }()
	b.children = append(b.children, c)
	return c, nil
}

// repositoryRoot is the nearest folder up from the working directory that
// holds go.mod, or the working directory.
func repositoryRoot() string {
	wd, err := os.Getwd()
	if err != nil {
		return "."
	}
	for dir := wd; ; dir = filepath.Dir(dir) {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		if filepath.Dir(dir) == dir {
			return wd
		}
	}
}
