package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kasproject/kas/server/config"
)

// TestDeadAgentAnswersAfterOneWait: a request for an agent that is not
// connected waits agent_wait_timeout, then gets a 503 that says so. Only an
// agent that was connected moments before gets Retry-After (it is probably
// reconnecting, so one retry soon may succeed): client-go and kubectl retry
// such answers up to ten times, and did so for a dead agent, so kubectl
// printed kas's message only after minutes.
func TestDeadAgentAnswersAfterOneWait(t *testing.T) {
	t.Parallel()
	const wait = 2 * time.Second
	e := newEnv(t, func(c *config.Config) { c.Agent.KubernetesAPI.AgentWaitTimeout = config.Duration(wait) })
	cred := pat(asAgent.id, alicePAT)

	// listNamespaces lists through kas with client-go's default retries,
	// as kubectl would, and returns how long until it gave up.
	listNamespaces := func(t *testing.T) (time.Duration, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		start := time.Now()
		_, err := e.clientset(t, cred).CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
		return time.Since(start), err
	}

	t.Run("never connected", func(t *testing.T) {
		resp := e.do(t, "GET", "/api/v1/namespaces", cred, nil, nil)
		st := expectStatus(t, resp, 503, metav1.StatusReasonServiceUnavailable)
		if ra := resp.Header.Get("Retry-After"); ra != "" {
			t.Errorf("Retry-After %q for an agent that has not been connected, want none", ra)
		}
		if want := fmt.Sprintf("agent %d is not connected to kas (waited %s); check that agentk is running", asAgent.id, wait); !strings.Contains(st.Message, want) {
			t.Errorf("message %q, want it to say %q", st.Message, want)
		}
		took, err := listNamespaces(t)
		if !apierrors.IsServiceUnavailable(err) {
			t.Fatalf("client-go got %v, want ServiceUnavailable", err)
		}
		t.Logf("client-go, agent never connected: gave up after %s (agent_wait_timeout %s): %v", took.Round(time.Millisecond), wait, err)
		if took > wait+time.Second {
			t.Errorf("client-go gave up after %s, want one wait (%s)", took, wait)
		}
		kubectlGet(t, e, wait, cred)
	})

	t.Run("gone moments ago", func(t *testing.T) {
		a := e.startAgent(t, asAgent)
		if err := a.stop(); err != nil {
			t.Fatal(err)
		}
		waitTunnels(t, e.kas.observability, asAgent.id, 0)
		resp := e.do(t, "GET", "/api/v1/namespaces", cred, nil, nil)
		st := expectStatus(t, resp, 503, metav1.StatusReasonServiceUnavailable)
		if ra := resp.Header.Get("Retry-After"); ra != "1" {
			t.Errorf("Retry-After %q for an agent that went away moments ago, want 1", ra)
		}
		if !strings.Contains(st.Message, "probably reconnecting") {
			t.Errorf("message %q, want it to say the agent is probably reconnecting", st.Message)
		}
		// A retry comes after the wait: the agent has been away too long
		// for another, so client-go retries once.
		took, err := listNamespaces(t)
		if !apierrors.IsServiceUnavailable(err) {
			t.Fatalf("client-go got %v, want ServiceUnavailable", err)
		}
		t.Logf("client-go, agent gone moments ago: gave up after %s (agent_wait_timeout %s): %v", took.Round(time.Millisecond), wait, err)
		if took > 2*wait+2*time.Second {
			t.Errorf("client-go gave up after %s, want at most two waits and a retry", took)
		}
	})
}

// kubectlGet runs kubectl get namespaces as cred through a kas serving e's
// scenario over TLS (kubectl sends tokens only over TLS), if kubectl is
// installed: once with a cold discovery cache, once with discovery cached
// (as it usually is), and checks that kubectl prints kas's message after one
// wait when it can.
func kubectlGet(t *testing.T, e *env, wait time.Duration, cred credential) {
	t.Helper()
	kubectl, err := exec.LookPath("kubectl")
	if err != nil {
		t.Log("kubectl is not installed; only client-go was measured")
		return
	}
	dir := t.TempDir()
	cert := issueCertificate(t, dir, "localhost")
	cfg := kasConfig(t)
	cfg.Standalone.File = e.scenarioFile
	cfg.Agent.KubernetesAPI.AgentWaitTimeout = config.Duration(wait)
	cfg.Agent.Listen.CertificateFile, cfg.Agent.Listen.KeyFile = cert.certFile, cert.keyFile
	kas := startKAS(t, cfg, e.log.With("component", "kas-tls"))
	_, port, _ := net.SplitHostPort(kas.public)
	// Another agent is connected, so that discovery can be cached.
	caPEM, err := os.ReadFile(cert.caFile)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	opts := e.agentOptions(asImpersonate, "")
	opts.KASAddress = "wss://localhost:" + port
	opts.TLS = &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
	waitConnected(t, runAgent(t, opts).agent)

	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(kubeconfig, []byte(fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: kas, cluster: {server: "https://localhost:%s/k8s-proxy", certificate-authority: %q}}]
users: [{name: dead, user: {token: %q}}, {name: live, user: {token: %q}}]
contexts: [{name: dead, context: {cluster: kas, user: dead}}, {name: live, context: {cluster: kas, user: live}}]
`, port, cert.caFile, strings.TrimPrefix(cred.authorization, "Bearer "),
		strings.TrimPrefix(ciJob(asImpersonate.id, jobToken).authorization, "Bearer "))), 0o600); err != nil {
		t.Fatal(err)
	}
	get := func(kubeContext, cacheDir string) (time.Duration, string) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		start := time.Now()
		out, _ := exec.CommandContext(ctx, kubectl, "--kubeconfig", kubeconfig, "--context", kubeContext,
			"--cache-dir", cacheDir, "get", "namespaces").CombinedOutput()
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		return time.Since(start), lines[len(lines)-1]
	}
	took, out := get("dead", filepath.Join(dir, "cold"))
	t.Logf("kubectl get namespaces, agent never connected, discovery not cached: printed %q after %s", out, took.Round(time.Millisecond))
	cached := filepath.Join(dir, "cached")
	if took, out := get("live", cached); !strings.Contains(out, "kube-system") {
		t.Fatalf("kubectl through the connected agent printed %q after %s", out, took)
	}
	took, out = get("dead", cached)
	t.Logf("kubectl get namespaces, agent never connected, discovery cached: printed %q after %s", out, took.Round(time.Millisecond))
	if !strings.Contains(out, "is not connected to kas") {
		t.Errorf("kubectl printed %q, want kas's message", out)
	}
	if took > wait+2*time.Second {
		t.Errorf("kubectl printed kas's message after %s, want after one wait (%s)", took, wait)
	}
}
