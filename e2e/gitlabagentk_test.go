package e2e

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kasproject/kas/internal/fakekube"
	"github.com/kasproject/kas/protocol"
	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/config"
	"github.com/kasproject/kas/server/internalapi/gitlabpb"
	"github.com/kasproject/kas/server/kasjwt"
)

// These tests run GitLab's own agentk, unchanged (../shared/bin/gitlab-agentk,
// see gitlabAgentkBinary), against kas.

// gitlabAgentkVersion is what the binary reports about itself.
const gitlabAgentkVersion = "v16.5.0-master.8daa08cc"

// startGitLabAgentkFor runs GitLab's agentk for a against the env's kas
// over ws:// and waits until kas lists it.
func (e *env) startGitLabAgentkFor(t *testing.T, a testAgent, pod string) *gitlabAgentk {
	t.Helper()
	g := startGitLabAgentk(t, gitlabAgentkOptions{
		kasAddress: "ws://" + e.kas.public + "/-/kubernetes-agent/",
		token:      a.token,
		kube:       e.kube,
		pod:        pod,
	})
	eventually(t, func() bool {
		got, err := tunnels(e.kas.observability, a.id)
		return err == nil && got > 0
	}, func() string { return fmt.Sprintf("kas never listed GitLab agentk's tunnel for agent %d", a.id) })
	return g
}

// gitlabTunnel returns the status page's entry of the agent's only
// connection once agentk has reported itself.
func gitlabTunnel(t *testing.T, observability string, agentID int64) registry.TunnelInfo {
	t.Helper()
	var got []registry.TunnelInfo
	eventually(t, func() bool {
		st, err := fetchStatus(observability)
		if err != nil {
			return false
		}
		got = nil
		for _, a := range st.Agents {
			if a.ID == agentID {
				got = append(got, a.Connections...)
			}
		}
		return len(got) == 1 && got[0].KubernetesVersion != ""
	}, func() string {
		return fmt.Sprintf("kas lists %+v for agent %d; want one connection with its Kubernetes version", got, agentID)
	})
	return got[0]
}

func TestGitLabAgentkConnects(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	cert := issueCertificate(t, dir, "kas.e2e.test")
	for _, tc := range []struct {
		name    string
		tls     bool
		address func(public string) string
	}{
		{"ws", false, func(p string) string { return "ws://" + p + "/-/kubernetes-agent/" }},
		{"ws-root", false, func(p string) string { return "ws://" + p }}, // kas on its own hostname
		{"wss", true, func(p string) string { return "wss://" + p + "/-/kubernetes-agent/" }},
		{"grpc", false, func(p string) string { return "grpc://" + p }},
		{"grpcs", true, func(p string) string { return "grpcs://" + p }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, func(c *config.Config) {
				if tc.tls {
					c.Agent.Listen.CertificateFile, c.Agent.Listen.KeyFile = cert.certFile, cert.keyFile
				}
			})
			o := gitlabAgentkOptions{kasAddress: tc.address(e.kas.public), token: asAgent.token, kube: e.kube, pod: "agentk-" + tc.name}
			if tc.tls {
				o.caFile, o.tlsServerName = cert.caFile, "kas.e2e.test"
			}
			startGitLabAgentk(t, o)
			info := gitlabTunnel(t, e.kas.observability, asAgent.id)
			if info.Flavor != registry.FlavorGitLab || info.AgentVersion != gitlabAgentkVersion || info.AgentCommit != "8daa08cc" ||
				info.PodName != "agentk-"+tc.name || info.PodNamespace != "gitlab-agent" || info.KubernetesVersion != "v1.33.0-fakekube" ||
				info.ConnectionID <= 0 {
				t.Errorf("kas lists %+v; want GitLab's agentk %s in pod gitlab-agent/agentk-%s on Kubernetes v1.33.0-fakekube", info, gitlabAgentkVersion, tc.name)
			}

			// The proxy over plain HTTP (or HTTPS) still works on the
			// listener GitLab's agentk shares.
			proxy := e.proxyURL()
			transport := e.transport
			if tc.tls {
				proxy = "https://" + e.kas.public + "/k8s-proxy"
				transport = tlsTransport(t, cert.caFile, "kas.e2e.test")
			}
			list, err := clientsetFor(t, proxy, transport, pat(asAgent.id, alicePAT)).CoreV1().Namespaces().List(context.Background(), metav1.ListOptions{})
			if err != nil || len(list.Items) != 2 {
				t.Fatalf("list namespaces through GitLab's agentk: %v, %d items", err, len(list.Items))
			}
		})
	}
}

// TestGitLabAgentkIdentities sends a request as each kind of caller to an
// agent of each identity kind, each served by GitLab's agentk, and checks
// what reached the cluster. A caller's own Impersonate-* headers never get
// through, even where GitLab's agentk would honour them (access_as: agent).
func TestGitLabAgentkIdentities(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	for _, a := range []testAgent{asAgent, asImpersonate, asCIJob, asUser} {
		e.startGitLabAgentkFor(t, a, "agentk-"+a.name)
	}
	userIdentity := func(accessType string) http.Header {
		return wantHeader(
			"Impersonate-User", "gitlab:user:alice",
			"Impersonate-Group", "gitlab:user",
			"Impersonate-Group", fmt.Sprintf("gitlab:project_role:%d:guest", appProjectID),
			"Impersonate-Group", fmt.Sprintf("gitlab:project_role:%d:planner", appProjectID),
			"Impersonate-Group", fmt.Sprintf("gitlab:project_role:%d:reporter", appProjectID),
			"Impersonate-Group", fmt.Sprintf("gitlab:project_role:%d:developer", appProjectID),
			"Impersonate-Extra-Agent.gitlab.com%2Faccess_type", accessType,
			"Impersonate-Extra-Agent.gitlab.com%2Fconfig_project_id", fmt.Sprint(infraProjectID),
			"Impersonate-Extra-Agent.gitlab.com%2Fid", fmt.Sprint(asUser.id),
			"Impersonate-Extra-Agent.gitlab.com%2Fusername", "alice",
		)
	}
	for _, tc := range []struct {
		name  string
		agent testAgent
		cred  credential
		want  http.Header
	}{
		{"agent, for a user", asAgent, pat(asAgent.id, alicePAT), http.Header{}},
		{"agent, for a CI job", asAgent, ciJob(asAgent.id, jobToken), http.Header{}},
		{"agent, for a browser session", asAgent, browser(asAgent.id, aliceCookie, aliceCSRF), http.Header{}},
		{"impersonate", asImpersonate, ciJob(asImpersonate.id, jobToken), wantHeader(
			"Impersonate-User", "deployer",
			"Impersonate-Group", "deployers",
			"Impersonate-Group", "release-managers",
			"Impersonate-Uid", "uid-42",
			"Impersonate-Extra-Example.com%2Fteam", "blue",
			"Impersonate-Extra-Example.com%2Fteam", "green",
			"Impersonate-Extra-Reason", "release",
		)},
		{"ci_job", asCIJob, ciJob(asCIJob.id, jobToken), wantHeader(
			"Impersonate-User", fmt.Sprintf("gitlab:ci_job:%d", jobID),
			"Impersonate-Group", "gitlab:ci_job",
			"Impersonate-Group", fmt.Sprintf("gitlab:group:%d", groupID),
			"Impersonate-Group", fmt.Sprintf("gitlab:group_env_tier:%d:production", groupID),
			"Impersonate-Group", fmt.Sprintf("gitlab:project:%d", appProjectID),
			"Impersonate-Group", fmt.Sprintf("gitlab:project_env:%d:production", appProjectID),
			"Impersonate-Group", fmt.Sprintf("gitlab:project_env_tier:%d:production", appProjectID),
			"Impersonate-Extra-Agent.gitlab.com%2Fci_job_id", fmt.Sprint(jobID),
			"Impersonate-Extra-Agent.gitlab.com%2Fci_pipeline_id", fmt.Sprint(pipelineID),
			"Impersonate-Extra-Agent.gitlab.com%2Fconfig_project_id", fmt.Sprint(infraProjectID),
			"Impersonate-Extra-Agent.gitlab.com%2Fenvironment_slug", "production",
			"Impersonate-Extra-Agent.gitlab.com%2Fenvironment_tier", "production",
			"Impersonate-Extra-Agent.gitlab.com%2Fid", fmt.Sprint(asCIJob.id),
			"Impersonate-Extra-Agent.gitlab.com%2Fproject_id", fmt.Sprint(appProjectID),
			"Impersonate-Extra-Agent.gitlab.com%2Fusername", "alice",
		)},
		{"user, with a personal access token", asUser, pat(asUser.id, alicePAT), userIdentity("personal_access_token")},
		{"user, with a browser session", asUser, browser(asUser.id, aliceCookie, aliceCSRF), userIdentity("session_cookie")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), waitFor)
			defer cancel()
			name := strings.NewReplacer(" ", "-", ",", "", "_", "-").Replace(tc.name)
			_, err := e.clientset(t, tc.cred).CoreV1().Pods(name).List(ctx, metav1.ListOptions{})
			if !apierrors.IsNotFound(err) { // fakekube serves no pods: its own 404, through agentk
				t.Fatalf("list pods: %v; want the cluster's 404", err)
			}
			got, ok := e.kube.LastRequest("/api/v1/namespaces/" + name + "/pods")
			if !ok {
				t.Fatal("the request never reached the cluster")
			}
			if !reflect.DeepEqual(impersonation(got.Header), tc.want) {
				t.Errorf("the cluster saw\n%s\nwant\n%s", dump(impersonation(got.Header)), dump(tc.want))
			}
			if a := got.Header.Get("Authorization"); a != "Bearer "+agentSAToken {
				t.Errorf("the cluster saw Authorization %q, want the agent's own token", a)
			}
		})
	}

	t.Run("a forged identity does not escalate", func(t *testing.T) {
		admin, err := protocol.EncodeIdentity(protocol.Identity{Username: "system:admin", Groups: []string{"system:masters"}})
		if err != nil {
			t.Fatal(err)
		}
		forged := http.Header{
			"Impersonate-User":         {"system:admin"},
			"Impersonate-Group":        {"system:masters"},
			"Impersonate-Uid":          {"0"},
			"Impersonate-Extra-Scopes": {"everything"},
			protocol.HeaderIdentity:    {admin},
			"Cookie":                   {"_gitlab_session=e2e-gitlab-session"},
			"X-E2e-Trace":              {"kept"},
		}
		for _, tc := range []struct {
			name     string
			agent    testAgent
			cred     credential
			wantUser string
		}{
			{"as the agent", asAgent, pat(asAgent.id, alicePAT), ""},
			{"as the user", asUser, pat(asUser.id, alicePAT), "gitlab:user:alice"},
			{"as the CI job", asCIJob, ciJob(asCIJob.id, jobToken), fmt.Sprintf("gitlab:ci_job:%d", jobID)},
		} {
			path := "/api/v1/namespaces/forged-" + tc.agent.name + "/pods"
			resp := e.do(t, http.MethodGet, path, tc.cred, forged.Clone(), nil)
			expectStatus(t, resp, http.StatusNotFound, metav1.StatusReasonNotFound)
			got, ok := e.kube.LastRequest(path)
			if !ok {
				t.Fatalf("%s: the request never reached the cluster", tc.name)
			}
			if u := got.Header.Get("Impersonate-User"); u != tc.wantUser {
				t.Errorf("%s: the cluster saw Impersonate-User %q, want %q", tc.name, u, tc.wantUser)
			}
			for _, g := range got.Header.Values("Impersonate-Group") {
				if g == "system:masters" {
					t.Errorf("%s: the caller's Impersonate-Group reached the cluster", tc.name)
				}
			}
			for _, h := range []string{"Impersonate-Uid", "Impersonate-Extra-Scopes", protocol.HeaderIdentity, "Cookie"} {
				if v, ok := got.Header[h]; ok {
					t.Errorf("%s: the cluster saw the caller's %s: %q", tc.name, h, v)
				}
			}
			if got.Header.Get("X-E2e-Trace") != "kept" {
				t.Errorf("%s: an ordinary header was lost", tc.name)
			}
		}
	})
}

// TestGitLabAgentkStreams covers what streams through GitLab's agentk: a
// watch, 1 MiB bodies both ways, cancellation reaching the cluster, and an
// upgraded connection.
func TestGitLabAgentkStreams(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.startGitLabAgentkFor(t, asAgent, "agentk-streams")
	cred := pat(asAgent.id, alicePAT)

	t.Run("watch", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		w, err := e.clientset(t, cred).CoreV1().Namespaces().Watch(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatalf("watch namespaces: %v", err)
		}
		defer w.Stop()
		eventually(t, func() bool { return e.kube.Watchers() == 1 },
			func() string { return fmt.Sprintf("the cluster has %d watches open, want 1", e.kube.Watchers()) })
		for i, ev := range []fakekube.Event{{Type: "ADDED", Name: "team-a"}, {Type: "MODIFIED", Name: "team-a"}, {Type: "DELETED", Name: "team-a"}} {
			e.kube.Emit(ev)
			select {
			case got, ok := <-w.ResultChan():
				ns, isNS := got.Object.(*corev1.Namespace)
				if !ok || !isNS || string(got.Type) != ev.Type || ns.Name != ev.Name {
					t.Fatalf("event %d: got %v %#v, want %s of %s", i, got.Type, got.Object, ev.Type, ev.Name)
				}
			case <-time.After(waitFor):
				t.Fatalf("event %d did not arrive: something buffers the stream", i)
			}
		}
		// The caller gives up: the cluster's watch ends too.
		cancel()
		select {
		case path := <-e.kube.Cancelled():
			if path != "/api/v1/namespaces" {
				t.Fatalf("the cluster saw %s cancelled, want the watch", path)
			}
		case <-time.After(waitFor):
			t.Fatal("the cancellation never reached the cluster")
		}
	})

	t.Run("1 MiB each way", func(t *testing.T) {
		const size = 1 << 20
		resp := e.do(t, http.MethodGet, fmt.Sprintf("/bytes?size=%d", size), cred, nil, nil)
		n, err := io.Copy(io.Discard, resp.Body)
		if err != nil || n != size || resp.StatusCode != http.StatusOK {
			t.Fatalf("download: HTTP %d, %d bytes, %v; want %d bytes", resp.StatusCode, n, err, size)
		}
		resp = e.do(t, http.MethodPost, "/bytes", cred, nil, io.LimitReader(zeros{}, size))
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK || strings.TrimSpace(string(body)) != fmt.Sprintf(`{"bytes":%d}`, size) {
			t.Fatalf("upload: HTTP %d %s; want the cluster to count %d bytes", resp.StatusCode, body, size)
		}
	})

	t.Run("cancelled request", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, e.proxyURL()+"/slow", nil)
		cred.apply(req.Header)
		done := make(chan error, 1)
		go func() {
			resp, err := e.client.Do(req)
			if err == nil {
				resp.Body.Close()
			}
			done <- err
		}()
		eventually(t, func() bool { return e.kube.Slow() == 1 }, func() string { return "the request never reached the cluster" })
		cancel()
		select {
		case path := <-e.kube.Cancelled():
			if path != "/slow" {
				t.Fatalf("the cluster saw %s cancelled, want /slow", path)
			}
		case <-time.After(waitFor):
			t.Fatal("the cancellation never reached the cluster")
		}
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Fatalf("the caller got %v, want its own cancellation", err)
		}
	})

	t.Run("upgrade", func(t *testing.T) {
		conn, err := net.DialTimeout("tcp", e.kas.public, waitFor)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(waitFor))
		fmt.Fprintf(conn, "POST /k8s-proxy/api/v1/namespaces/default/pods/web/exec?command=sh&stdin=true HTTP/1.1\r\nHost: kas\r\nAuthorization: %s\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n",
			cred.authorization)
		br := bufio.NewReader(conn)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("read the answer to the upgrade: %v", err)
		}
		if resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("X-Fakekube-Upgrade") != "echo" {
			t.Fatalf("got %s %v, want the cluster's 101", resp.Status, resp.Header)
		}
		for _, line := range []string{"ls\n", "echo hello\n"} {
			if _, err := io.WriteString(conn, line); err != nil {
				t.Fatal(err)
			}
			got, err := br.ReadString('\n')
			if err != nil || got != line {
				t.Fatalf("echo: got %q, %v; want %q", got, err, line)
			}
		}
	})
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) { clear(p); return len(p), nil }

// TestGitLabAgentkConfiguration checks that GitLab's agentk gets its
// agent's configuration and every change to it: here its log level, which
// makes agentk log at debug level once it is applied.
func TestGitLabAgentkConfiguration(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *config.Config) {
		c.Agent.Configuration.PollPeriod = config.Duration(200 * time.Millisecond)
	})
	file := filepath.Join(filepath.Dir(e.scenarioFile), infraRepository, ".gitlab", "agents", asAgent.name, "config.yaml")
	original, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	g := e.startGitLabAgentkFor(t, asAgent, "agentk-config")
	e.kas.waitLogged(t, e, "Agent configuration changed")
	if strings.Contains(g.logs(), `"level":"debug"`) {
		t.Fatal("agentk logs at debug level before its configuration asks for it")
	}

	updated := append(bytes.Clone(original), []byte("observability:\n  logging:\n    level: debug\n")...)
	if err := os.WriteFile(file, updated, 0o600); err != nil {
		t.Fatal(err)
	}
	// Every request through the tunnel makes agentk log at debug level
	// once the new level applies.
	eventually(t, func() bool {
		resp, err := get(context.Background(), e, &node{public: e.kas.public}, "/version", pat(asAgent.id, alicePAT))
		if err == nil {
			resp.Body.Close()
		}
		return strings.Contains(g.logs(), `"level":"debug"`)
	}, func() string { return "GitLab's agentk never applied the new log level" })

	// A configuration GitLab's agentk would refuse is not sent: it keeps
	// working with the last one.
	bad := append(bytes.Clone(original), []byte("gitops:\n  manifest_projects:\n  - id: acme/manifests\n    dry_run_strategy: sometimes\n")...)
	if err := os.WriteFile(file, bad, 0o600); err != nil {
		t.Fatal(err)
	}
	e.kas.waitLogged(t, e, "Config: failed to send to agent; GitLab's agentk keeps its last configuration")
	if !strings.Contains(e.logs.String(), `dry_run_strategy is \"sometimes\"`) {
		t.Error("kas's log does not say what is wrong with the configuration")
	}
	if err := listNamespacesVia(e, pat(asAgent.id, alicePAT)); err != nil {
		t.Fatal(err)
	}
}

// waitLogged waits until the env's logs hold a line with msg.
func (k *kasNode) waitLogged(t *testing.T, e *env, msg string) {
	t.Helper()
	eventually(t, func() bool { return strings.Contains(e.logs.String(), `"msg":"`+msg+`"`) },
		func() string { return fmt.Sprintf("kas never logged %q", msg) })
}

func listNamespacesVia(e *env, cred credential) error {
	resp, err := get(context.Background(), e, &node{public: e.kas.public}, "/api/v1/namespaces", cred)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("list namespaces: HTTP %d %s", resp.StatusCode, body)
	}
	return nil
}

// TestGitLabAgentkRestartsAndReplicas kills GitLab's agentk: callers get a
// clean 503 while it is gone and are served again as soon as it is back.
// Then several replicas of the agent share its traffic.
func TestGitLabAgentkRestartsAndReplicas(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *config.Config) {
		c.Agent.KubernetesAPI.AgentWaitTimeout = config.Duration(300 * time.Millisecond)
	})
	cred := pat(asAgent.id, alicePAT)
	g := e.startGitLabAgentkFor(t, asAgent, "agentk-0")
	if err := listNamespacesVia(e, cred); err != nil {
		t.Fatal(err)
	}

	g.kill()
	waitTunnels(t, e.kas.observability, asAgent.id, 0)
	resp := e.do(t, http.MethodGet, "/api/v1/namespaces", cred, nil, nil)
	expectStatus(t, resp, http.StatusServiceUnavailable, metav1.StatusReasonServiceUnavailable)

	restarted := time.Now()
	e.startGitLabAgentkFor(t, asAgent, "agentk-0")
	eventually(t, func() bool { return listNamespacesVia(e, cred) == nil }, func() string { return "not served after agentk came back" })
	if took := time.Since(restarted); took > 10*time.Second {
		t.Errorf("served again %s after agentk restarted, want within seconds", took)
	}

	// Two more replicas, each reaching its own copy of the cluster so the
	// test sees which one served a request: three connections, each
	// listed with its pod, and kas spreads requests over all of them.
	kubes := []*fakekube.Server{e.kube}
	for _, pod := range []string{"agentk-1", "agentk-2"} {
		k := newKube(t)
		kubes = append(kubes, k.Server)
		startGitLabAgentk(t, gitlabAgentkOptions{
			kasAddress: "ws://" + e.kas.public + "/-/kubernetes-agent/", token: asAgent.token, kube: k.Server, pod: pod,
		})
	}
	waitTunnels(t, e.kas.observability, asAgent.id, 3)
	st, err := fetchStatus(e.kas.observability)
	if err != nil {
		t.Fatal(err)
	}
	pods := map[string]bool{}
	for _, a := range st.Agents {
		for _, c := range a.Connections {
			if a.ID == asAgent.id && c.Flavor == registry.FlavorGitLab {
				pods[c.PodName] = true
			}
		}
	}
	if len(pods) != 3 {
		t.Errorf("kas lists pods %v, want agentk-0, agentk-1 and agentk-2", pods)
	}
	before := make([]int, len(kubes))
	for i, k := range kubes {
		before[i] = len(k.Requests())
	}
	for range 30 {
		if err := listNamespacesVia(e, cred); err != nil {
			t.Fatal(err)
		}
	}
	for i, k := range kubes {
		if len(k.Requests()) == before[i] {
			t.Errorf("replica agentk-%d served none of 30 requests", i)
		}
	}
}

// TestGitLabAgentkAcrossNodes runs two kas processes sharing a
// redis-server, with GitLab's agentk connected to the first: a request
// entering the second is forwarded to it, identity included, and both
// nodes' internal APIs list the agent with what it reported about itself.
func TestGitLabAgentkAcrossNodes(t *testing.T) {
	t.Parallel()
	bin := buildKAS(t)
	e := newWorld(t)
	c := newCluster(t, bin, clusterOptions{standaloneFile: e.scenarioFile})
	a := c.startNode(t, "kas-a", nodeOptions{})
	b := c.startNode(t, "kas-b", nodeOptions{})
	for _, ag := range []testAgent{asAgent, asCIJob} {
		startGitLabAgentk(t, gitlabAgentkOptions{
			kasAddress: "ws://" + a.public + "/-/kubernetes-agent/", token: ag.token, kube: e.kube, pod: "agentk-" + ag.name,
		})
	}
	waitHolders(t, []*node{a, b}, asAgent.id, a)
	waitHolders(t, []*node{a, b}, asCIJob.id, a)
	if err := listNamespaces(t, e, b, pat(asAgent.id, alicePAT)); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	resp, err := get(ctx, e, b, "/api/v1/namespaces/across/pods", ciJob(asCIJob.id, jobToken))
	if err != nil {
		t.Fatal(err)
	}
	expectStatus(t, resp, http.StatusNotFound, metav1.StatusReasonNotFound) // the cluster's own
	got, ok := e.kube.LastRequest("/api/v1/namespaces/across/pods")
	if !ok || got.Header.Get("Impersonate-User") != fmt.Sprintf("gitlab:ci_job:%d", jobID) {
		t.Fatalf("the cluster saw %v, want the CI job's identity across the hop", got.Header)
	}
	if n, err := b.metric(`kas_peer_forwards_total{result="ok"}`); err != nil || n < 2 {
		t.Errorf("kas-b forwarded %v requests (%v), want both", n, err)
	}

	// GitLab Rails asks either node which agents are connected.
	token, err := kasjwt.Sign(c.opts.apiSecret, "gitlab", kasjwt.AudienceKAS, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []*node{a, b} {
		var meta *gitlabpb.AgentMeta
		eventually(t, func() bool {
			req, _ := http.NewRequest(http.MethodGet, "http://"+n.api+"/api/v1/connected_agents?agent_id="+fmt.Sprint(asAgent.id), nil)
			req.Header.Set("Authorization", "Bearer "+token)
			resp, err := e.client.Do(req)
			if err != nil {
				return false
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(resp.Body)
			var answer gitlabpb.GetConnectedAgentsByAgentIDsResponse
			if protojson.Unmarshal(body, &answer) != nil || len(answer.GetAgents()) != 1 {
				return false
			}
			meta = answer.GetAgents()[0].GetAgentMeta()
			return meta.GetKubernetesVersion().GetGitVersion() != ""
		}, func() string { return fmt.Sprintf("%s lists agent %d with %v", n.name, asAgent.id, meta) })
		if meta.GetVersion() != gitlabAgentkVersion || meta.GetPodName() != "agentk-"+asAgent.name ||
			meta.GetKubernetesVersion().GetGitVersion() != "v1.33.0-fakekube" {
			t.Errorf("%s lists the agent as %v; want GitLab's agentk %s in pod agentk-%s on v1.33.0-fakekube", n.name, meta, gitlabAgentkVersion, asAgent.name)
		}
	}
}

// TestGitLabAgentkMaxConnectionAge lets GitLab's agentk connections reach
// agent.listen.max_connection_age while requests keep coming: each is
// drained (GOAWAY, in-flight requests finish), agentk opens a new one at
// once, and no request fails.
func TestGitLabAgentkMaxConnectionAge(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *config.Config) { c.Agent.Listen.MaxConnectionAge = config.Duration(time.Second) })
	g := e.startGitLabAgentkFor(t, asAgent, "agentk-aging")
	cred := pat(asAgent.id, alicePAT)
	connections := map[int64]bool{}
	deadline := time.Now().Add(4 * time.Second)
	for n := 0; time.Now().Before(deadline); n++ {
		if err := listNamespacesVia(e, cred); err != nil {
			t.Fatalf("request %d: %v", n, err)
		}
		if st, err := fetchStatus(e.kas.observability); err == nil {
			for _, a := range st.Agents {
				for _, c := range a.Connections {
					connections[c.ConnectionID] = true
				}
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	if len(connections) < 3 {
		t.Errorf("kas listed %d connections over 4 s with a 1 s max_connection_age; want agentk to have reconnected", len(connections))
	}
	if strings.Contains(g.logs(), `"level":"error"`) && strings.Contains(g.logs(), "Error handling a connection") {
		t.Errorf("agentk logged errors for drained tunnels:\n%s", g.logs())
	}
}
