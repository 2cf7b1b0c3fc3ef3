package e2e

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"net/http"
	"os"
	"path/filepath"
	"testing"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kasproject/kas/server/config"
	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/gitlab/gitlabtest"
	"github.com/kasproject/kas/server/kasjwt"
	"github.com/kasproject/kas/server/standalone"
)

// writeSecret writes a fresh API secret file and returns the secret and
// the file's path.
func writeSecret(t *testing.T) ([]byte, string) {
	t.Helper()
	secret := make([]byte, 32)
	_, _ = rand.Read(secret)
	path := filepath.Join(t.TempDir(), "api-secret")
	if err := os.WriteFile(path, []byte(base64.StdEncoding.EncodeToString(secret)), 0o600); err != nil {
		t.Fatal(err)
	}
	return secret, path
}

// fakeRails starts a fake GitLab Rails that knows the scenario (through the
// standalone backend) and checks kas's JWTs against secret.
func fakeRails(t *testing.T, secret []byte) *gitlabtest.Server {
	t.Helper()
	backend, err := standalone.Open(newScenario().write(t, t.TempDir()))
	if err != nil {
		t.Fatalf("open the scenario: %v", err)
	}
	return gitlabtest.New(t, secret, backend)
}

// viaGitLab makes kas ask rails instead of reading the scenario file,
// signing its calls with the secret in secretFile.
func viaGitLab(rails *gitlabtest.Server, secretFile string) func(*config.Config) {
	return func(c *config.Config) {
		c.Standalone.File = ""
		c.GitLab.Address = rails.URL
		c.GitLab.AuthenticationSecretFile = secretFile
	}
}

func TestThroughGitLab(t *testing.T) {
	t.Parallel()
	secret, secretFile := writeSecret(t)
	rails := fakeRails(t, secret)
	e := newEnv(t, viaGitLab(rails, secretFile))
	e.startAgent(t, asAgent)

	for _, tc := range []struct {
		name string
		cred credential
		// call is the GitLab API kas must ask.
		call string
	}{
		{"CI job", ciJob(asAgent.id, jobToken), gitlab.PathAllowedAgents},
		{"personal access token", pat(asAgent.id, alicePAT), gitlab.PathAuthorizeProxyUser},
		{"browser session", browser(asAgent.id, aliceCookie, aliceCSRF), gitlab.PathAuthorizeProxyUser},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := rails.Calls(tc.call)
			ctx, cancel := context.WithTimeout(context.Background(), waitFor)
			defer cancel()
			list, err := e.clientset(t, tc.cred).CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
			if err != nil {
				t.Fatalf("list namespaces: %v", err)
			}
			if len(list.Items) != 2 {
				t.Fatalf("got %d namespaces, want 2", len(list.Items))
			}
			if rails.Calls(tc.call) != before+1 {
				t.Fatalf("kas did not ask GitLab at %s", tc.call)
			}
		})
	}
	t.Run("refused by GitLab", func(t *testing.T) {
		resp := e.do(t, http.MethodGet, "/api/v1/namespaces", pat(asAgent.id, bobPAT), nil, nil)
		expectStatus(t, resp, http.StatusForbidden, metav1.StatusReasonForbidden)
	})

	// Every call carried a JWT GitLab accepts: kas's, for GitLab, signed
	// with the shared secret.
	if rails.Calls(gitlab.PathAgentInfo) == 0 {
		t.Error("the agent connected without kas asking GitLab for agent_info")
	}
	for _, r := range rails.Requests() {
		if err := kasjwt.Verify(secret, r.Header.Get(gitlab.HeaderAPIRequest), kasjwt.AudienceGitLab, kasjwt.IssuerKAS); err != nil {
			t.Errorf("%s %s: %s: %v", r.Method, r.Path, gitlab.HeaderAPIRequest, err)
		}
	}
}

func TestGitLabRefusesKASWithTheWrongSecret(t *testing.T) {
	t.Parallel()
	secret, _ := writeSecret(t)
	_, otherSecretFile := writeSecret(t)
	rails := fakeRails(t, secret)
	e := newEnv(t, viaGitLab(rails, otherSecretFile))

	// GitLab answers 401 to every call, so kas accepts no one.
	cs := e.clientset(t, pat(asAgent.id, alicePAT))
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	if _, err := cs.CoreV1().Namespaces().List(ctx, metav1.ListOptions{}); !apierrors.IsUnauthorized(err) {
		t.Fatalf("list namespaces: %v, want Unauthorized", err)
	}
	if rails.Calls(gitlab.PathAuthorizeProxyUser) == 0 {
		t.Fatal("kas did not ask GitLab")
	}
	if len(e.kube.Requests()) != 0 {
		t.Fatal("a request reached the cluster")
	}
}
