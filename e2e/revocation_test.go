package e2e

import (
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kasproject/kas/server/config"
	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/gitlab/gitlabtest"
	"github.com/kasproject/kas/server/standalone"
)

// ttl is agent.info_cache_ttl in these tests: how long a revoked token may
// keep its tunnel (it is 300 s by default).
const ttl = time.Second

func shortInfoTTL(c *config.Config) { c.Agent.InfoCacheTTL = config.Duration(ttl) }

// waitTunnelGone waits until kas lists no tunnel for the agent and returns
// how long that took from since.
func waitTunnelGone(t *testing.T, e *env, agentID int64, since time.Time) time.Duration {
	t.Helper()
	waitTunnels(t, e.kas.observability, agentID, 0)
	return time.Since(since)
}

// TestRevokedTokenLosesItsTunnel: revoking a connected agent's token
// closes its tunnel within agent.info_cache_ttl (plus the standalone
// files' one-second reload), not at max_connection_age (2 h); kas logs why,
// and agentk's reconnection is refused.
func TestRevokedTokenLosesItsTunnel(t *testing.T) {
	t.Parallel()
	e := newEnv(t, shortInfoTTL)
	e.startAgent(t, asAgent)
	e.startAgent(t, asUser) // another agent, whose token stays valid

	// Revoke asAgent's token: the standalone file no longer knows it.
	s := newScenario()
	for i := range s.Agents {
		if s.Agents[i].ID == asAgent.id {
			s.Agents[i].TokenSHA256 = standalone.HashToken("a new token, after the old one was revoked")
		}
	}
	s.write(t, filepath.Dir(e.scenarioFile))
	revoked := time.Now()

	took := waitTunnelGone(t, e, asAgent.id, revoked)
	t.Logf("the revoked token kept its tunnel for %s (agent.info_cache_ttl %s, files reloaded within 1 s)", took.Round(10*time.Millisecond), ttl)
	if took > ttl+time.Second+2*time.Second {
		t.Errorf("the tunnel closed %s after the revocation, want within agent.info_cache_ttl (%s) plus the reload", took, ttl)
	}
	eventually(t, func() bool {
		return strings.Contains(e.logs.String(), "agentk refused") || strings.Contains(e.logs.String(), "agent token is not valid")
	},
		func() string { return "agentk's reconnection was not refused" })
	logs := e.logs.String()
	if !strings.Contains(logs, "Agent token no longer accepted") || !strings.Contains(logs, "its token is no longer accepted") {
		t.Error("kas did not log why it closed the tunnel")
	}
	if got, err := tunnels(e.kas.observability, asUser.id); err != nil || got != 1 {
		t.Errorf("the other agent has %d tunnels (%v), want its one", got, err)
	}
}

// TestTokenRevalidationThroughGitLab: a connected agent's token is asked
// about once per agent.info_cache_ttl however many replicas use it; GitLab
// failing (502) closes nothing; GitLab refusing the token (401) closes
// every replica's tunnel.
func TestTokenRevalidationThroughGitLab(t *testing.T) {
	t.Parallel()
	secret, secretFile := writeSecret(t)
	rails := fakeRails(t, secret)
	e := newEnv(t, func(c *config.Config) {
		viaGitLab(rails, secretFile)(c)
		shortInfoTTL(c)
	})
	e.startAgent(t, asAgent)
	e.startAgent(t, asAgent) // a second replica, same token
	waitTunnels(t, e.kas.observability, asAgent.id, 2)

	before, start := rails.Calls(gitlab.PathAgentInfo), time.Now()
	time.Sleep(4 * ttl)
	periods := time.Since(start).Seconds() / ttl.Seconds()
	calls := rails.Calls(gitlab.PathAgentInfo) - before
	t.Logf("two replicas, one token: %d agent_info calls in %.1f periods", calls, periods)
	if float64(calls) > periods/0.9+1 {
		t.Errorf("%d agent_info calls in %.1f periods, want at most one per period for the token", calls, periods)
	}
	if calls == 0 {
		t.Error("the token was never re-validated")
	}

	rails.Fail(gitlab.PathAgentInfo, gitlabtest.Failure{Status: http.StatusBadGateway})
	time.Sleep(3 * ttl)
	if got, err := tunnels(e.kas.observability, asAgent.id); err != nil || got != 2 {
		t.Fatalf("while GitLab failed, the agent kept %d tunnels (%v), want both", got, err)
	}

	rails.Fail(gitlab.PathAgentInfo, gitlabtest.Failure{Status: http.StatusUnauthorized})
	revoked := time.Now()
	took := waitTunnelGone(t, e, asAgent.id, revoked)
	t.Logf("after GitLab refused the token, its two tunnels closed in %s", took.Round(10*time.Millisecond))
	if took > 3*ttl {
		t.Errorf("the tunnels closed %s after GitLab refused the token, want within about %s", took, ttl)
	}
}
