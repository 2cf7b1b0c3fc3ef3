package standalone

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/gitlab/gitlabtest"
)

// TestEquivalentThroughRails asks every question of the shared tables twice:
// of the backend directly, and through kas's GitLab client and the fake Rails
// answering from the same backend. kas must not be able to tell standalone
// mode from a GitLab: same answers, same refusals (status, sentinel,
// cacheability).
func TestEquivalentThroughRails(t *testing.T) {
	backend := newWorld(t).open(t)
	secret := []byte("0123456789abcdef0123456789abcdef")
	rails := gitlabtest.New(t, secret, backend)
	client, err := gitlab.NewClient(gitlab.ClientOptions{
		BaseURL: rails.URL,
		Secret:  secret,
		// No caching: every question must reach the backend through Rails.
		AgentInfoTTL: -1, AgentInfoErrorTTL: -1, AllowedAgentTTL: -1, AllowedAgentErrorTTL: -1,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(client.CloseIdleConnections)
	ctx := context.Background()

	for _, tc := range agentInfoCases {
		t.Run("agent info: "+tc.name, func(t *testing.T) {
			direct, directErr := backend.GetAgentInfo(ctx, tc.token)
			viaRails, railsErr := client.GetAgentInfo(ctx, tc.token)
			if viaRails != nil {
				viaRails.ValidatedAt = time.Time{} // when Rails answered: not part of the answer
			}
			checkSame(t, direct, directErr, viaRails, railsErr)
		})
	}
	for _, tc := range proxyUserCases {
		t.Run("proxy user: "+tc.name, func(t *testing.T) {
			direct, directErr := backend.AuthorizeProxyUser(ctx, tc.req)
			viaRails, railsErr := client.AuthorizeProxyUser(ctx, tc.req)
			checkSame(t, direct, directErr, viaRails, railsErr)
		})
	}
	for _, tc := range jobCases {
		t.Run("allowed agents: "+tc.name, func(t *testing.T) {
			direct, directErr := backend.GetAllowedAgentsForJob(ctx, tc.token)
			viaRails, railsErr := client.GetAllowedAgentsForJob(ctx, tc.token)
			checkSame(t, direct, directErr, viaRails, railsErr)
		})
	}
	calls := rails.Calls(gitlab.PathAgentInfo) + rails.Calls(gitlab.PathAuthorizeProxyUser) + rails.Calls(gitlab.PathAllowedAgents)
	if want := len(agentInfoCases) + len(proxyUserCases) + len(jobCases); calls != want {
		t.Errorf("the fake Rails answered %d questions, want %d: the client did not ask every one", calls, want)
	}
}

// checkSame compares a direct answer with the one through Rails.
func checkSame[T any](t *testing.T, direct T, directErr error, viaRails T, railsErr error) {
	t.Helper()
	if (directErr == nil) != (railsErr == nil) {
		t.Fatalf("directly: %v; through Rails: %v", directErr, railsErr)
	}
	if directErr == nil {
		checkAnswer(t, viaRails, direct)
		return
	}
	var d, r *gitlab.Error
	if !errors.As(directErr, &d) || !errors.As(railsErr, &r) {
		t.Fatalf("want *gitlab.Error both ways, got %T and %T", directErr, railsErr)
	}
	if d.Op != r.Op || d.StatusCode != r.StatusCode {
		t.Errorf("directly %q %d (%v); through Rails %q %d (%v)", d.Op, d.StatusCode, directErr, r.Op, r.StatusCode, railsErr)
	}
	for _, sentinel := range []error{gitlab.ErrUnauthorized, gitlab.ErrForbidden, gitlab.ErrNotFound} {
		if errors.Is(directErr, sentinel) != errors.Is(railsErr, sentinel) {
			t.Errorf("errors.Is(_, %v): directly %v, through Rails %v", sentinel, errors.Is(directErr, sentinel), errors.Is(railsErr, sentinel))
		}
	}
	if gitlab.Cacheable(directErr) != gitlab.Cacheable(railsErr) {
		t.Errorf("Cacheable: directly %v, through Rails %v", gitlab.Cacheable(directErr), gitlab.Cacheable(railsErr))
	}
}
