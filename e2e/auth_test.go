package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"reflect"
	"strings"
	"testing"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kasproject/kas/protocol"
)

// countRequests counts the requests to path that reached the cluster.
func countRequests(e *env, path string) int {
	n := 0
	for _, r := range e.kube.Requests() {
		if r.Path == path {
			n++
		}
	}
	return n
}

func TestEachWayInIsAllowedAndRefused(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.startAgent(t, asAgent)
	e.startAgent(t, asUser)

	for _, tc := range []struct {
		name string
		cred credential
		// wantCode is 200 for an allowed caller, else kas's refusal.
		wantCode   int
		wantReason metav1.StatusReason
	}{
		{"CI job", ciJob(asAgent.id, jobToken), http.StatusOK, ""},
		{"CI job with an unknown job token", ciJob(asAgent.id, "glcbt-e2e-unknown"), http.StatusUnauthorized, metav1.StatusReasonUnauthorized},
		{"CI job of a project the agent does not list", ciJob(asUser.id, jobToken), http.StatusForbidden, metav1.StatusReasonForbidden},
		{"personal access token", pat(asAgent.id, alicePAT), http.StatusOK, ""},
		{"unknown personal access token", pat(asAgent.id, "glpat-e2e-unknown"), http.StatusUnauthorized, metav1.StatusReasonUnauthorized},
		{"personal access token of a reporter", pat(asAgent.id, bobPAT), http.StatusForbidden, metav1.StatusReasonForbidden},
		{"browser session", browser(asAgent.id, aliceCookie, aliceCSRF), http.StatusOK, ""},
		{"browser session with a wrong CSRF token", browser(asAgent.id, aliceCookie, "e2e-csrf-forged"), http.StatusUnauthorized, metav1.StatusReasonUnauthorized},
		{"browser session without a CSRF token", browser(asAgent.id, aliceCookie, ""), http.StatusUnauthorized, metav1.StatusReasonUnauthorized},
		{"unknown browser session", browser(asAgent.id, "e2e-session-unknown", aliceCSRF), http.StatusUnauthorized, metav1.StatusReasonUnauthorized},
		{"no credentials", credential{}, http.StatusUnauthorized, metav1.StatusReasonUnauthorized},
		{"plain bearer token", credential{authorization: "Bearer " + alicePAT}, http.StatusUnauthorized, metav1.StatusReasonUnauthorized},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := countRequests(e, "/api/v1/namespaces")
			ctx, cancel := context.WithTimeout(context.Background(), waitFor)
			defer cancel()
			_, err := e.clientset(t, tc.cred).CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
			reached := countRequests(e, "/api/v1/namespaces") - before

			if tc.wantCode == http.StatusOK {
				if err != nil || reached != 1 {
					t.Fatalf("list: %v, %d requests reached the cluster; want success through the agent", err, reached)
				}
				return
			}
			var status apierrors.APIStatus
			if !errors.As(err, &status) || status.Status().Code != int32(tc.wantCode) || apierrors.ReasonForError(err) != tc.wantReason {
				t.Fatalf("client-go got %v, want a %d %s", err, tc.wantCode, tc.wantReason)
			}
			if reached != 0 {
				t.Fatalf("a refused request reached the cluster")
			}
			// The same refusal as a raw answer: a Status kas wrote, and for
			// 401 the header GitLab's UI tells kas's own 401s by.
			resp := e.do(t, http.MethodGet, "/api/v1/namespaces", tc.cred, nil, nil)
			expectStatus(t, resp, tc.wantCode, tc.wantReason)
			if got := resp.Header.Get("Gitlab-Unauthorized"); (tc.wantCode == http.StatusUnauthorized) != (got == "true") {
				t.Errorf("Gitlab-Unauthorized: %q on a %d", got, tc.wantCode)
			}
		})
	}
}

// impersonation returns the Impersonate-* headers of h.
func impersonation(h http.Header) http.Header {
	out := http.Header{}
	for k, vs := range h {
		if strings.HasPrefix(k, "Impersonate-") {
			out[k] = vs
		}
	}
	return out
}

// wantHeader builds the headers the cluster must see, with names as the
// agent writes them; net/http canonicalizes names on arrival, as
// kube-apiserver (which also unescapes the extra keys) does not mind.
func wantHeader(pairs ...string) http.Header {
	h := http.Header{}
	for i := 0; i+1 < len(pairs); i += 2 {
		h.Add(pairs[i], pairs[i+1])
	}
	return h
}

func TestEachIdentityReachesTheCluster(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	for _, a := range []testAgent{asAgent, asImpersonate, asCIJob, asUser} {
		e.startAgent(t, a)
	}
	userIdentity := func(accessType string) http.Header {
		return wantHeader(
			"Impersonate-User", "gitlab:user:alice",
			"Impersonate-Group", "gitlab:user",
			"Impersonate-Group", fmt.Sprintf("gitlab:project_role:%d:guest", appProjectID),
			"Impersonate-Group", fmt.Sprintf("gitlab:project_role:%d:planner", appProjectID),
			"Impersonate-Group", fmt.Sprintf("gitlab:project_role:%d:reporter", appProjectID),
			"Impersonate-Group", fmt.Sprintf("gitlab:project_role:%d:developer", appProjectID),
			"Impersonate-Extra-Agent.gitlab.com%2Fid", fmt.Sprint(asUser.id),
			"Impersonate-Extra-Agent.gitlab.com%2Fusername", "alice",
			"Impersonate-Extra-Agent.gitlab.com%2Fconfig_project_id", fmt.Sprint(infraProjectID),
			"Impersonate-Extra-Agent.gitlab.com%2Faccess_type", accessType,
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
			"Impersonate-Extra-Agent.gitlab.com%2Fid", fmt.Sprint(asCIJob.id),
			"Impersonate-Extra-Agent.gitlab.com%2Fconfig_project_id", fmt.Sprint(infraProjectID),
			"Impersonate-Extra-Agent.gitlab.com%2Fproject_id", fmt.Sprint(appProjectID),
			"Impersonate-Extra-Agent.gitlab.com%2Fci_pipeline_id", fmt.Sprint(pipelineID),
			"Impersonate-Extra-Agent.gitlab.com%2Fci_job_id", fmt.Sprint(jobID),
			"Impersonate-Extra-Agent.gitlab.com%2Fusername", "alice",
			"Impersonate-Extra-Agent.gitlab.com%2Fenvironment_slug", "production",
			"Impersonate-Extra-Agent.gitlab.com%2Fenvironment_tier", "production",
		)},
		{"user, with a personal access token", asUser, pat(asUser.id, alicePAT), userIdentity("personal_access_token")},
		{"user, with a browser session", asUser, browser(asUser.id, aliceCookie, aliceCSRF), userIdentity("session_cookie")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), waitFor)
			defer cancel()
			// A distinct name per case tells this request from the others'.
			name := strings.NewReplacer(" ", "-", ",", "", "_", "-").Replace(tc.name)
			_, err := e.clientset(t, tc.cred).CoreV1().Pods(name).List(ctx, metav1.ListOptions{})
			if !apierrors.IsNotFound(err) { // fakekube serves no pods: its own 404
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
}

func dump(h http.Header) string {
	b, _ := json.MarshalIndent(h, "", "  ")
	return string(b)
}

func TestCallerCannotChooseIdentityOrLeakCredentials(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.startAgent(t, asAgent)
	e.startAgent(t, asUser)

	admin, err := protocol.EncodeIdentity(protocol.Identity{Username: "system:admin", Groups: []string{"system:masters"}})
	if err != nil {
		t.Fatal(err)
	}
	// Everything a caller might try to pass on to the cluster.
	spoofed := http.Header{
		"Impersonate-User":         {"system:admin"},
		"Impersonate-Group":        {"system:masters"},
		"Impersonate-Uid":          {"0"},
		"Impersonate-Extra-Scopes": {"everything"},
		protocol.HeaderIdentity:    {admin},
		"Cookie":                   {"_gitlab_session=e2e-gitlab-session; other=1"},
		"Proxy-Authorization":      {"Basic ZTJlOmUyZQ=="},
		"X-E2e-Trace":              {"kept"}, // an ordinary header: passes
		"Accept":                   {"application/json"},
		"X-Csrf-Token":             {"stray"},
		// Who the caller is, and where from, as fronts of the API server read it.
		"X-Real-Ip":             {"10.9.9.9"},
		"X-Forwarded-For":       {"10.9.9.9"},
		"Forwarded":             {"for=10.9.9.9"},
		"Impersonate_User":      {"system:admin"},
		"X-Remote-User":         {"system:admin"},
		"X-Remote-Group":        {"system:masters"},
		"X-Remote-Extra-Scopes": {"everything"},
	}
	for _, tc := range []struct {
		name  string
		agent testAgent
		cred  credential
		query string
		// wantUser is the Impersonate-User the cluster must see ("" for none).
		wantUser string
	}{
		{"as the agent", asAgent, pat(asAgent.id, alicePAT), "", ""},
		{"as the user", asUser, pat(asUser.id, alicePAT), "", "gitlab:user:alice"},
		{"browser session", asUser, browser(asUser.id, aliceCookie, aliceCSRF), "", "gitlab:user:alice"},
		{"browser session naming the agent in the query", asUser, credential{cookie: aliceCookie, csrf: aliceCSRF},
			fmt.Sprintf("gitlab-agent-id=%d&limit=5", asUser.id), "gitlab:user:alice"},
		// A browser WebSocket cannot send headers: agent and CSRF token in the query.
		{"browser session with everything in the query", asUser, credential{cookie: aliceCookie},
			fmt.Sprintf("gitlab-agent-id=%d&gitlab-csrf-token=%s&limit=5", asUser.id, aliceCSRF), "gitlab:user:alice"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := "/api/v1/namespaces/hygiene/pods"
			if tc.query != "" {
				path += "?" + tc.query
			}
			header := spoofed.Clone()
			if tc.cred.cookie != "" && tc.cred.csrf == "" {
				header.Del("X-Csrf-Token") // the CSRF token is in the query; a second, different one is refused
			}
			resp := e.do(t, http.MethodGet, path, tc.cred, header, nil)
			expectStatus(t, resp, http.StatusNotFound, metav1.StatusReasonNotFound) // fakekube's: no pods here

			got, ok := e.kube.LastRequest("/api/v1/namespaces/hygiene/pods")
			if !ok {
				t.Fatal("the request never reached the cluster")
			}
			h := got.Header
			if u := h.Get("Impersonate-User"); u != tc.wantUser {
				t.Errorf("the cluster saw Impersonate-User %q, want %q", u, tc.wantUser)
			}
			for _, g := range h.Values("Impersonate-Group") {
				if g == "system:masters" {
					t.Errorf("the caller's Impersonate-Group reached the cluster")
				}
			}
			for _, name := range []string{"Impersonate-Uid", "Impersonate-Extra-Scopes", protocol.HeaderIdentity,
				"Cookie", "Proxy-Authorization", "Gitlab-Agent-Id", "X-Csrf-Token"} {
				if v, ok := h[name]; ok {
					t.Errorf("the cluster saw the caller's %s: %q", name, v)
				}
			}
			if a := h.Get("Authorization"); a != "Bearer "+agentSAToken {
				t.Errorf("the cluster saw Authorization %q, want the agent's own token", a)
			}
			if strings.Contains(got.Query, "gitlab-") || (tc.query != "" && got.Query != "limit=5") {
				t.Errorf("the cluster saw query %q; want the caller's without gitlab-agent-id and gitlab-csrf-token", got.Query)
			}
			// The audit log's sourceIPs: the address kas saw, nothing the caller wrote.
			if ff := h.Values("X-Forwarded-For"); len(ff) != 1 || ff[0] != "127.0.0.1" {
				t.Errorf("the cluster saw X-Forwarded-For %q, want the caller's real address 127.0.0.1", ff)
			}
			for name, v := range h {
				if protocol.IsReservedHeader(name) && name != "X-Forwarded-For" && !strings.HasPrefix(name, "Impersonate-") {
					t.Errorf("the cluster saw the caller's %s: %q", name, v)
				}
			}
			if h.Get("X-E2e-Trace") != "kept" || h.Get("Accept") != "application/json" {
				t.Errorf("ordinary headers were lost: %v", h)
			}
		})
	}
}

func TestUnknownAgentIsNotFound(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.startAgent(t, asAgent)

	resp := e.do(t, http.MethodGet, "/api/v1/namespaces", pat(999, alicePAT), nil, nil)
	st := expectStatus(t, resp, http.StatusNotFound, metav1.StatusReasonNotFound)
	if !strings.Contains(st.Message, "agent 999") {
		t.Errorf("message %q does not name the agent", st.Message)
	}
	if n := len(e.kube.Requests()); n != 1 { // agentk's own /version at start-up
		t.Errorf("%d requests reached the cluster, want only agentk's start-up", n)
	}
}
