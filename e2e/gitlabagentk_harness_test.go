package e2e

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kasproject/kas/internal/fakekube"
)

// gitlabAgentkEnv names the variable that overrides where GitLab's agentk
// binary is.
const gitlabAgentkEnv = "KAS_GITLAB_AGENTK"

// gitlabAgentkBinary finds GitLab's real agentk: $KAS_GITLAB_AGENTK, or
// ../shared/bin/gitlab-agentk next to the repository. Without it the test
// is skipped, except under CI=true, where it fails.
func gitlabAgentkBinary(t *testing.T) string {
	t.Helper()
	bin := os.Getenv(gitlabAgentkEnv)
	if bin == "" {
		_, file, _, _ := runtime.Caller(0)
		bin = filepath.Join(filepath.Dir(file), "..", "..", "shared", "bin", "gitlab-agentk")
	}
	if _, err := os.Stat(bin); err != nil {
		msg := fmt.Sprintf("GitLab's agentk binary is not at %s (%v): it is GitLab's agentk (gitlab-org/cluster-integration/gitlab-agent, cmd/agentk) built unchanged; put it there or name it in %s", bin, err, gitlabAgentkEnv)
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return bin
}

// gitlabAgentk is GitLab's agentk running as a child process.
type gitlabAgentk struct {
	cmd    *exec.Cmd
	exited chan struct{}
	mu     sync.Mutex
	out    bytes.Buffer
}

// gitlabAgentkOptions say how to run GitLab's agentk.
type gitlabAgentkOptions struct {
	kasAddress string // ws://…, wss://…, grpc://…
	token      string
	// kube is the cluster; agentk reaches it over HTTPS, since client-go
	// sends a kubeconfig's token only over TLS.
	kube   *fakekube.Server
	pod    string // POD_NAME
	caFile string // --ca-cert-file, for wss://
	// tlsServerName is --kas-tls-server-name: the name kas's certificate
	// carries, which 127.0.0.1 is not.
	tlsServerName string
}

// startGitLabAgentk runs GitLab's agentk; it is killed when the test ends
// unless stopped before.
func startGitLabAgentk(t *testing.T, o gitlabAgentkOptions) *gitlabAgentk {
	t.Helper()
	bin := gitlabAgentkBinary(t)
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokenFile, []byte(o.token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	kubeURL, kubeCA := serveTLS(t, o.kube)
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(kubeconfig, fmt.Appendf(nil, `apiVersion: v1
kind: Config
clusters:
- name: c
  cluster:
    server: %q
    certificate-authority-data: %s
users:
- name: u
  user:
    token: %q
contexts:
- name: c
  context:
    cluster: c
    user: u
current-context: c
`, kubeURL, kubeCA, agentSAToken), 0o600); err != nil {
		t.Fatal(err)
	}
	if o.pod == "" {
		o.pod = "gitlab-agentk-0"
	}
	args := []string{"--kas-address", o.kasAddress, "--token-file", tokenFile, "--kubeconfig", kubeconfig,
		"--observability-listen-address", "127.0.0.1:0"}
	if o.caFile != "" {
		args = append(args, "--ca-cert-file", o.caFile)
	}
	if o.tlsServerName != "" {
		args = append(args, "--kas-tls-server-name", o.tlsServerName)
	}
	a := &gitlabAgentk{cmd: exec.Command(bin, args...), exited: make(chan struct{})}
	a.cmd.Env = append(os.Environ(), "POD_NAMESPACE=gitlab-agent", "POD_NAME="+o.pod)
	stderr, err := a.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	a.cmd.Stdout = a.cmd.Stderr
	if err := a.cmd.Start(); err != nil {
		t.Fatalf("start GitLab's agentk: %v", err)
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			a.mu.Lock()
			a.out.Write(sc.Bytes())
			a.out.WriteByte('\n')
			a.mu.Unlock()
		}
		_ = a.cmd.Wait()
		close(a.exited)
	}()
	t.Cleanup(func() {
		a.kill()
		if t.Failed() {
			t.Logf("logs of GitLab's agentk (%s):\n%s", o.pod, a.logs())
		}
	})
	return a
}

func (a *gitlabAgentk) logs() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.out.String()
}

// kill stops the process with SIGKILL: what kas sees when a pod dies.
func (a *gitlabAgentk) kill() {
	_ = a.cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-a.exited:
	case <-time.After(waitFor):
	}
}

// waitLog waits until agentk's log contains s.
func (a *gitlabAgentk) waitLog(t *testing.T, s string) {
	t.Helper()
	eventually(t, func() bool { return strings.Contains(a.logs(), s) },
		func() string { return fmt.Sprintf("GitLab's agentk never logged %q", s) })
}

// tlsTransport trusts the CA in caFile and expects serverName in the
// server's certificate.
func tlsTransport(t *testing.T, caFile, serverName string) *http.Transport {
	t.Helper()
	pem, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		t.Fatalf("no certificate in %s", caFile)
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, ServerName: serverName}, ForceAttemptHTTP2: true}
	t.Cleanup(tr.CloseIdleConnections)
	return tr
}

// serveTLS serves kube over HTTPS (HTTP/1.1, as API servers answer
// upgrades) until the test ends, and returns its URL and its certificate
// as base64 PEM for a kubeconfig.
func serveTLS(t *testing.T, kube *fakekube.Server) (string, string) {
	t.Helper()
	srv := httptest.NewTLSServer(kube)
	t.Cleanup(func() {
		srv.CloseClientConnections()
		srv.Close()
	})
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	return srv.URL, base64.StdEncoding.EncodeToString(ca)
}
