package e2e

import (
	"context"
	"encoding/base64"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kasproject/kas/server/config"
	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/gitlab/gitlabtest"
	"github.com/kasproject/kas/server/standalone"
)

// receptivePoll is agent.receptive.poll_period in these tests.
const receptivePoll = 200 * time.Millisecond

// receptiveWorld is a world whose kas dials receptive agents listed in its
// standalone file, which the test edits.
type receptiveWorld struct {
	*env
	sc *scenario
}

// newReceptiveWorld starts kas in standalone mode with receptive agents on;
// configure, if not nil, adjusts its configuration first.
func newReceptiveWorld(t *testing.T, configure func(*config.Config)) *receptiveWorld {
	t.Helper()
	w := &receptiveWorld{sc: newScenario()}
	w.env = newEnv(t, func(c *config.Config) {
		c.Agent.Receptive.Enabled = true
		c.Agent.Receptive.PollPeriod = config.Duration(receptivePoll)
		if configure != nil {
			configure(c)
		}
	})
	return w
}

// list writes the scenario with agent a receptive as r (nil: not listed).
func (w *receptiveWorld) list(t *testing.T, a testAgent, r *scenarioReceptive) {
	t.Helper()
	w.sc.setReceptive(a.id, r)
	w.sc.write(t, filepath.Dir(w.scenarioFile))
}

// startReceptive runs a receptive agentk for a set up as s and lists it.
func (w *receptiveWorld) startReceptive(t *testing.T, a testAgent, s receptiveSetup, clientCert, clientKey string) *agentNode {
	t.Helper()
	opts := w.receptiveAgentOptions(t, a, s, nil, w.kubeServer.URL)
	addr := opts.Receptive.Listener.Addr().String()
	n := runAgent(t, opts)
	w.mu.Lock()
	w.agents = append(w.agents, n)
	w.mu.Unlock()
	w.list(t, a, s.entry(addr, clientCert, clientKey))
	return n
}

// impersonatedUser lists pods through kas as cred and returns the
// Impersonate-User the cluster saw ("" for the agent's own account).
func impersonatedUser(t *testing.T, e *env, namespace string, cred credential) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	_, err := e.clientset(t, cred).CoreV1().Pods(namespace).List(ctx, metav1.ListOptions{})
	if !apierrors.IsNotFound(err) { // fakekube serves no pods: its own 404
		t.Fatalf("list pods in %s: %v; want the cluster's 404", namespace, err)
	}
	got, ok := e.kube.LastRequest("/api/v1/namespaces/" + namespace + "/pods")
	if !ok {
		t.Fatal("the request never reached the cluster")
	}
	if a := got.Header.Get("Authorization"); a != "Bearer "+agentSAToken {
		t.Errorf("the cluster saw Authorization %q, want the agent's own token", a)
	}
	return got.Header.Get("Impersonate-User")
}

// checkEveryIdentity lists pods through e's kas with every kind of identity,
// through the scenario's four agents, and checks whom the cluster saw.
func checkEveryIdentity(t *testing.T, e *env) {
	t.Helper()
	for _, tc := range []struct {
		name, namespace string
		cred            credential
		want            string
	}{
		{"agent, for a user", "as-agent-user", pat(asAgent.id, alicePAT), ""},
		{"agent, for a CI job", "as-agent-job", ciJob(asAgent.id, jobToken), ""},
		{"impersonate", "impersonate", ciJob(asImpersonate.id, jobToken), deployer.Username},
		{"ci_job", "ci-job", ciJob(asCIJob.id, jobToken), fmt.Sprintf("gitlab:ci_job:%d", jobID)},
		{"user", "user", pat(asUser.id, alicePAT), "gitlab:user:alice"},
	} {
		if got := impersonatedUser(t, e, tc.namespace, tc.cred); got != tc.want {
			t.Errorf("%s: the cluster saw Impersonate-User %q, want %q", tc.name, got, tc.want)
		}
	}
}

// TestReceptiveAgents runs receptive agentk in-process on 127.0.0.1: kas
// dials them, authenticates with a JWT or a client certificate, and then
// serves the proxy through them like through any agent.
func TestReceptiveAgents(t *testing.T) {
	t.Parallel()
	serverCA := newTestCA(t, "receptive agents CA")

	t.Run("every identity, JWT and mTLS", func(t *testing.T) {
		t.Parallel()
		w := newReceptiveWorld(t, nil)
		clientCA := newTestCA(t, "kas client CA")
		clientCert, clientKey := clientCA.issue(t, "kas", true)
		jwt := func() *jwtKeys { k := newJWTKeys(t); return &k }
		setups := map[int64]receptiveSetup{
			asAgent.id:       {serverCA: serverCA, jwt: jwt()},
			asImpersonate.id: {serverCA: serverCA, clientCA: clientCA},
			asCIJob.id:       {serverCA: serverCA, jwt: jwt()},
			asUser.id:        {serverCA: serverCA, clientCA: clientCA},
		}
		for _, a := range []testAgent{asAgent, asImpersonate, asCIJob, asUser} {
			s := setups[a.id]
			if s.clientCA != nil {
				w.startReceptive(t, a, s, clientCert, clientKey)
			} else {
				w.startReceptive(t, a, s, "", "")
			}
		}
		for _, a := range []testAgent{asAgent, asImpersonate, asCIJob, asUser} {
			waitTunnels(t, w.kas.observability, a.id, 1)
		}
		checkEveryIdentity(t, w.env)
		// Marked as receptive, with the agent's project from the file.
		st, err := fetchStatus(w.kas.observability)
		if err != nil {
			t.Fatal(err)
		}
		conns := connections(st)
		if len(conns) != 4 {
			t.Errorf("status page lists %d tunnels, want 4", len(conns))
		}
		for _, info := range conns {
			if !info.Receptive || info.ProjectID != infraProjectID || info.PodName == "" {
				t.Errorf("status page lists %+v, want a receptive tunnel of project %d with agentk's description", info, infraProjectID)
			}
		}
	})

	t.Run("kas refuses the agent's certificate", func(t *testing.T) {
		t.Parallel()
		w := newReceptiveWorld(t, nil)
		otherCA := newTestCA(t, "another CA")
		keys := newJWTKeys(t)
		s := receptiveSetup{serverCA: serverCA, jwt: &keys}
		n := w.startReceptive(t, asAgent, s, "", "")
		addr := w.sc.Agents[0].Receptive.URL

		// Signed by a CA the agent's configuration does not name.
		entry := s.entry(strings.TrimPrefix(addr, "grpcs://"), "", "")
		entry.CACertificateFile = otherCA.file
		w.list(t, asAgent, entry)
		waitLog(t, w.logs, `"msg":"Connect to receptive agent"`, "signed by an unknown authority", `"hint":"put the CA that issued agentk`)

		// The right CA, but a name the certificate does not hold.
		entry.CACertificateFile = serverCA.file
		entry.TLSHost = "other.receptive.test"
		w.list(t, asAgent, entry)
		waitLog(t, w.logs, `"msg":"Connect to receptive agent"`, `is not valid for \"other.receptive.test\"`, `"hint":"set the agent's TLS host`)

		if n.agent.IsConnected() {
			t.Error("agentk has a tunnel although kas must not have trusted it")
		}
		// Retries are not logged again (but at debug level): once per cause.
		time.Sleep(time.Second)
		warned := 0
		for line := range strings.Lines(w.logs.String()) {
			if strings.Contains(line, `"level":"WARN"`) && strings.Contains(line, `is not valid for \"other.receptive.test\"`) {
				warned++
			}
		}
		if warned != 1 {
			t.Errorf("the name mismatch was logged %d times as a warning, want once", warned)
		}
		// Fixed: kas connects.
		entry.TLSHost = receptiveName
		w.list(t, asAgent, entry)
		waitConnected(t, n.agent)
		waitLog(t, w.logs, `"msg":"Connected to receptive agent again"`)
	})

	t.Run("agentk refuses kas", func(t *testing.T) {
		t.Parallel()
		w := newReceptiveWorld(t, nil)
		keys, wrong := newJWTKeys(t), newJWTKeys(t)
		s := receptiveSetup{serverCA: serverCA, jwt: &keys}
		n := w.startReceptive(t, asAgent, s, "", "")
		addr := strings.TrimPrefix(w.sc.Agents[0].Receptive.URL, "grpcs://")
		waitConnected(t, n.agent)

		// kas signs with another key: agentk refuses and says why, and kas
		// logs agentk's reason with a hint.
		bad := s.entry(addr, "", "")
		bad.JWTPrivateKeyFile = wrong.privateFile
		w.list(t, asAgent, bad)
		waitLog(t, w.logs, `"msg":"refused a connection that did not authenticate as kas"`, "signature does not match the public key")
		waitLog(t, w.logs, `"msg":"Connect to receptive agent"`, "agentk at grpcs://", "refused kas (HTTP 401)", `"hint":"check that agentk's --receptive-jwt-public-key-file`)
	})

	t.Run("off: kas dials nobody", func(t *testing.T) {
		t.Parallel()
		e := newWorld(t)
		keys := newJWTKeys(t)
		s := receptiveSetup{serverCA: serverCA, jwt: &keys}
		opts := e.receptiveAgentOptions(t, asAgent, s, nil, e.kubeServer.URL)
		sc := newScenario()
		sc.setReceptive(asAgent.id, s.entry(opts.Receptive.Listener.Addr().String(), "", ""))
		sc.write(t, filepath.Dir(e.scenarioFile))
		n := runAgent(t, opts)
		cfg := kasConfig(t)
		cfg.Standalone.File = e.scenarioFile
		cfg.Agent.Receptive.PollPeriod = config.Duration(receptivePoll) // enabled: false, the default
		e.kas = startKAS(t, cfg, e.log.With("component", "kas"))
		waitLog(t, e.logs, "The standalone file lists receptive agents, but agent.receptive.enabled is false")
		time.Sleep(5 * receptivePoll)
		if n.agent.IsConnected() || strings.Contains(e.logs.String(), "kas connected (receptive mode)") {
			t.Error("kas dialled a receptive agent although agent.receptive.enabled is false")
		}
	})

	t.Run("standalone list changes", func(t *testing.T) {
		t.Parallel()
		w := newReceptiveWorld(t, nil)
		keys := newJWTKeys(t)
		s := receptiveSetup{serverCA: serverCA, jwt: &keys}
		opts := w.receptiveAgentOptions(t, asAgent, s, nil, w.kubeServer.URL)
		addr := opts.Receptive.Listener.Addr().String()
		n := runAgent(t, opts)

		// Added to the file: connected, and the proxy works, within one
		// poll period (plus the second standalone files take to reload).
		listed := time.Now()
		w.list(t, asAgent, s.entry(addr, "", ""))
		waitConnected(t, n.agent)
		if got := impersonatedUser(t, w.env, "added", pat(asAgent.id, alicePAT)); got != "" {
			t.Errorf("the cluster saw Impersonate-User %q, want none", got)
		}
		t.Logf("listed in the standalone file → first proxied request answered: %s (poll period %s, file recheck 1s)", time.Since(listed).Round(time.Millisecond), receptivePoll)
		if d := time.Since(listed); d > time.Second+receptivePoll+5*time.Second {
			t.Errorf("the first request through the added agent took %s", d)
		}

		// Removed: disconnected.
		removed := time.Now()
		w.list(t, asAgent, nil)
		waitTunnels(t, w.kas.observability, asAgent.id, 0)
		eventually(t, func() bool { return !n.agent.IsConnected() }, func() string { return "agentk still has its tunnel" })
		t.Logf("removed from the standalone file → disconnected: %s", time.Since(removed).Round(time.Millisecond))
	})

	t.Run("GitLab list changes", func(t *testing.T) {
		t.Parallel()
		secret, secretFile := writeSecret(t)
		backend, err := standalone.Open(newScenario().write(t, t.TempDir()))
		if err != nil {
			t.Fatal(err)
		}
		rails := gitlabtest.New(t, secret, backend)
		w := newReceptiveWorld(t, viaGitLab(rails, secretFile))
		keys := newJWTKeys(t)
		s := receptiveSetup{serverCA: serverCA, jwt: &keys, withToken: true}
		opts := w.receptiveAgentOptions(t, asCIJob, s, nil, w.kubeServer.URL)
		addr := opts.Receptive.Listener.Addr().String()
		n := runAgent(t, opts)

		// A GitLab without the feature answers 404: logged once, with the fix.
		waitLog(t, w.logs, `"msg":"Get the list of receptive agents"`, "needs GitLab EE Ultimate 17.4")

		ra := gitlab.ReceptiveAgent{
			ID: asCIJob.id, URL: receptiveURL(addr, s), CACert: pemFile(t, serverCA.file), TLSHost: receptiveName,
			JWT: &gitlab.ReceptiveAgentJWT{PrivateKey: base64Seed(keys)},
		}
		listed := time.Now()
		rails.SetReceptiveAgents([]gitlab.ReceptiveAgent{ra})
		waitConnected(t, n.agent)
		// agentk handed over its token: kas knows the project, and the
		// agent's ci_access applies.
		if got, want := impersonatedUser(t, w.env, "gitlab-added", ciJob(asCIJob.id, jobToken)), fmt.Sprintf("gitlab:ci_job:%d", jobID); got != want {
			t.Errorf("the cluster saw Impersonate-User %q, want %q", got, want)
		}
		t.Logf("listed by GitLab → first proxied request answered: %s (poll period %s)", time.Since(listed).Round(time.Millisecond), receptivePoll)
		st, err := fetchStatus(w.kas.observability)
		if err != nil {
			t.Fatal(err)
		}
		if conns := connections(st); len(conns) != 1 || conns[0].AgentID != asCIJob.id || conns[0].ProjectID != infraProjectID || !conns[0].Receptive {
			t.Errorf("status page lists %+v, want agent %d's receptive tunnel in project %d", conns, asCIJob.id, infraProjectID)
		}
		if rails.Calls(gitlab.PathAgentInfo) == 0 {
			t.Error("kas never asked GitLab who the agent is")
		}

		removed := time.Now()
		rails.SetReceptiveAgents(nil)
		waitTunnels(t, w.kas.observability, asCIJob.id, 0)
		eventually(t, func() bool { return !n.agent.IsConnected() }, func() string { return "agentk still has its tunnel" })
		if d := time.Since(removed); d > receptivePoll+5*time.Second {
			t.Errorf("removing the agent took %s to disconnect it", d)
		}
	})
}

// waitLog waits until the logs hold a line containing every one of parts.
func waitLog(t *testing.T, logs *logBuffer, parts ...string) {
	t.Helper()
	eventually(t, func() bool {
		for line := range strings.Lines(logs.String()) {
			found := true
			for _, p := range parts {
				if !strings.Contains(line, p) {
					found = false
					break
				}
			}
			if found {
				return true
			}
		}
		return false
	}, func() string { return fmt.Sprintf("no log line holds all of %q", parts) })
}

// pemFile is a PEM file's content, as GitLab's API carries certificates.
func pemFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// base64Seed is the private key as GitLab's receptive agents API gives it.
func base64Seed(k jwtKeys) string { return base64.StdEncoding.EncodeToString(k.private.Seed()) }
