package e2e

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/gitlab/gitlabtest"
	"github.com/kasproject/kas/server/standalone"
)

// TestGitLabRedirectIsNotFollowed: a redirect from gitlab.address must not
// carry kas's JWT, the caller's token or the agent's token anywhere else;
// the caller gets a 502 Status and kas logs where GitLab pointed.
func TestGitLabRedirectIsNotFollowed(t *testing.T) {
	t.Parallel()
	var elsewhere atomic.Int32
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		elsewhere.Add(1)
	}))
	t.Cleanup(other.Close)
	secret, secretFile := writeSecret(t)
	rails := fakeRails(t, secret)
	e := newEnv(t, viaGitLab(rails, secretFile))

	for _, tc := range []struct {
		name string
		path string
		cred credential
	}{
		{"personal access token", gitlab.PathAuthorizeProxyUser, pat(asAgent.id, alicePAT)},
		{"CI job", gitlab.PathAllowedAgents, ciJob(asAgent.id, jobToken)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rails.Fail(tc.path, gitlabtest.Failure{Status: http.StatusTemporaryRedirect, Location: other.URL + tc.path})
			defer rails.ClearFailures()
			resp := e.do(t, http.MethodGet, "/api/v1/namespaces", tc.cred, nil, nil)
			st := expectStatus(t, resp, http.StatusBadGateway, metav1.StatusReasonInternalError)
			if !strings.Contains(st.Message, "redirect") {
				t.Errorf("message %q does not say GitLab redirected", st.Message)
			}
		})
	}
	t.Run("agent", func(t *testing.T) {
		rails.Fail(gitlab.PathAgentInfo, gitlabtest.Failure{Status: http.StatusFound, Location: other.URL + "/elsewhere"})
		defer rails.ClearFailures()
		n := runAgent(t, e.agentOptions(asAgent, e.kas.public))
		eventually(t, func() bool { return rails.Calls(gitlab.PathAgentInfo) >= 2 },
			func() string { return "agentk did not try to connect twice" })
		if got, err := tunnels(e.kas.observability, asAgent.id); err != nil || got != 0 {
			t.Errorf("kas lists %d tunnels (%v) for an agent GitLab redirected", got, err)
		}
		_ = n.stop()
	})

	if n := elsewhere.Load(); n != 0 {
		t.Fatalf("the redirect target got %d requests, want none", n)
	}
	logs := e.logs.String()
	if !strings.Contains(logs, "GitLab redirected kas's call") || !strings.Contains(logs, other.URL) {
		t.Errorf("kas's log does not name the redirect and its Location")
	}
}

// noAgentID answers agent_info without an agent ID, as a broken GitLab (or
// something answering in its place) might.
type noAgentID struct{ *standalone.Backend }

func (b noAgentID) GetAgentInfo(ctx context.Context, token string) (*gitlab.AgentInfo, error) {
	info, err := b.Backend.GetAgentInfo(ctx, token)
	if err != nil {
		return nil, err
	}
	info.AgentID = 0
	return info, nil
}

// TestAgentInfoWithoutAgentIDIsRefused: a 200 from agent_info lacking a
// positive agent_id must not admit the agent (as agent 0); agentk gets a
// 502 and kas logs a GitLab contract error.
func TestAgentInfoWithoutAgentIDIsRefused(t *testing.T) {
	t.Parallel()
	backend, err := standalone.Open(newScenario().write(t, t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	secret, secretFile := writeSecret(t)
	rails := gitlabtest.New(t, secret, noAgentID{backend})
	e := newEnv(t, viaGitLab(rails, secretFile))

	n := runAgent(t, e.agentOptions(asAgent, e.kas.public))
	eventually(t, func() bool { return strings.Count(e.logs.String(), "GitLab contract error") >= 2 },
		func() string { return "kas did not log a GitLab contract error for each attempt" })
	select {
	case <-n.agent.Connected():
		t.Fatal("agentk connected")
	default:
	}
	if err := n.stop(); err != nil {
		t.Fatal(err)
	}
	logs := e.logs.String()
	if strings.Contains(logs, "Agent connected") {
		t.Error("kas logged an agent as connected")
	}
	if !strings.Contains(logs, "agent_id is missing or not positive") {
		t.Error("the log does not say which field is missing")
	}
	if !strings.Contains(logs, "502") {
		t.Error("agentk was not answered 502")
	}
}

// TestRailsClockBehindAcceptsKAS: Rails checks the nbf of kas's JWT with
// no leeway; with its clock 3 s behind kas's, every call must still pass.
func TestRailsClockBehindAcceptsKAS(t *testing.T) {
	t.Parallel()
	backend, err := standalone.Open(newScenario().write(t, t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	secret, secretFile := writeSecret(t)
	rails := gitlabtest.New(t, secret, backend, gitlabtest.WithClockOffset(-3*time.Second))
	e := newEnv(t, viaGitLab(rails, secretFile))
	e.startAgent(t, asAgent)
	for _, cred := range []credential{pat(asAgent.id, alicePAT), ciJob(asAgent.id, jobToken), browser(asAgent.id, aliceCookie, aliceCSRF)} {
		resp := e.do(t, http.MethodGet, "/api/v1/namespaces", cred, nil, nil)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("got %d, want 200", resp.StatusCode)
		}
	}
}

// TestPATWithoutK8sProxyScope: the caller learns the real reason, in
// standalone mode and through GitLab alike.
func TestPATWithoutK8sProxyScope(t *testing.T) {
	t.Parallel()
	secret, secretFile := writeSecret(t)
	for _, tc := range []struct {
		name      string
		configure func(*testing.T) *env
	}{
		{"standalone", func(t *testing.T) *env { return newEnv(t, nil) }},
		{"through GitLab", func(t *testing.T) *env { return newEnv(t, viaGitLab(fakeRails(t, secret), secretFile)) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := tc.configure(t)
			resp := e.do(t, http.MethodGet, "/api/v1/namespaces", pat(asAgent.id, aliceReadAPIPAT), nil, nil)
			st := expectStatus(t, resp, http.StatusForbidden, metav1.StatusReasonForbidden)
			if !strings.Contains(st.Message, "lacks the k8s_proxy scope") || strings.Contains(st.Message, "user_access") {
				t.Errorf("message %q, want the missing k8s_proxy scope as the reason", st.Message)
			}
		})
	}
}
