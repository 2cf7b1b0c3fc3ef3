package gitlab_test

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	"github.com/kasproject/kas/server/gitlab"
)

func TestDoModuleRequest(t *testing.T) {
	type seen struct {
		method, path, query, auth, contentType, body string
		header                                       http.Header
	}
	got := make(chan seen, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		got <- seen{r.Method, r.URL.EscapedPath(), r.URL.RawQuery, r.Header.Get("Authorization"), r.Header.Get("Content-Type"), string(body), r.Header.Clone()}
		w.Header().Set("X-Answer", "yes")
		w.WriteHeader(http.StatusAccepted)
		_, _ = io.WriteString(w, `{"stored":true}`)
	}))
	defer srv.Close()
	c := newClient(t, srv.URL+"/gitlab", nil) // a relative URL root is kept

	resp, err := c.DoModuleRequest(context.Background(), gitlab.ModuleRequest{
		AgentToken:    agentToken,
		Module:        "starboard_vulnerability",
		Method:        http.MethodPut,
		Path:          "/policies_configuration",
		Query:         url.Values{"a": {"b c"}},
		Header:        http.Header{"Content-Type": {"application/json"}},
		Body:          strings.NewReader(`{"x":1}`),
		ContentLength: 7,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	answer, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusAccepted || resp.Header.Get("X-Answer") != "yes" || string(answer) != `{"stored":true}` {
		t.Errorf("answer %d %v %q: want GitLab's, whatever its status", resp.StatusCode, resp.Header, answer)
	}
	s := <-got
	if s.method != http.MethodPut || s.path != "/gitlab/api/v4/internal/kubernetes/modules/starboard_vulnerability/policies_configuration" ||
		s.query != "a=b+c" || s.auth != "Bearer "+agentToken || s.contentType != "application/json" || s.body != `{"x":1}` {
		t.Errorf("GitLab got %+v", s)
	}
	checkJWT(t, s.header)
}
