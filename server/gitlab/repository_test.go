package gitlab_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/gitlab/gitlabtest"
)

func TestGetRepositoryFile(t *testing.T) {
	const token = "glpat-repository-reader"
	srv := gitlabtest.New(t, secret, backend{})
	srv.SetRepositoryToken(token)
	srv.SetRepositoryFile(20, "main", ".gitlab/agents/prod/config.yaml", []byte("ci_access: {}\n"))
	srv.SetRepositoryFile(20, "main", "dir with space/a+b?.yaml", []byte("odd: name\n"))

	dir := t.TempDir()
	writeToken := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	goodFile := writeToken("good", token+"\n")
	wrongFile := writeToken("wrong", "glpat-wrong")
	emptyFile := writeToken("empty", " \n")

	tests := []struct {
		name      string
		tokenFile string
		project   int64
		ref, path string
		want      string
		wantErr   error  // errors.Is target; nil for success
		notErr    error  // the error must not be this
		wantInErr string // part of the message
	}{
		{name: "found", tokenFile: goodFile, project: 20, ref: "main", path: ".gitlab/agents/prod/config.yaml", want: "ci_access: {}\n"},
		{name: "path is escaped as one segment", tokenFile: goodFile, project: 20, ref: "main", path: "dir with space/a+b?.yaml", want: "odd: name\n"},
		{name: "file missing", tokenFile: goodFile, project: 20, ref: "main", path: ".gitlab/agents/dev/config.yaml", wantErr: gitlab.ErrFileNotFound, wantInErr: "404 File Not Found"},
		{name: "ref missing", tokenFile: goodFile, project: 20, ref: "gone", path: ".gitlab/agents/prod/config.yaml", wantErr: gitlab.ErrFileNotFound, wantInErr: "404 Commit Not Found"},
		{name: "project missing", tokenFile: goodFile, project: 21, ref: "main", path: ".gitlab/agents/prod/config.yaml", wantErr: gitlab.ErrNotFound, notErr: gitlab.ErrFileNotFound, wantInErr: "read_repository access to project 21"},
		{name: "wrong token", tokenFile: wrongFile, project: 20, ref: "main", path: ".gitlab/agents/prod/config.yaml", wantErr: gitlab.ErrUnauthorized},
		{name: "no token", project: 20, ref: "main", path: ".gitlab/agents/prod/config.yaml", wantErr: gitlab.ErrUnauthorized},
		{name: "empty token file", tokenFile: emptyFile, project: 20, ref: "main", path: ".gitlab/agents/prod/config.yaml", wantInErr: "is empty"},
		{name: "unreadable token file", tokenFile: filepath.Join(dir, "absent"), project: 20, ref: "main", path: ".gitlab/agents/prod/config.yaml", wantInErr: "read gitlab.repository_token_file"},
		{name: "no ref", tokenFile: goodFile, project: 20, path: ".gitlab/agents/prod/config.yaml", wantInErr: "are all required"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newClient(t, srv.URL, func(o *gitlab.ClientOptions) { o.RepositoryTokenFile = tt.tokenFile })
			got, err := c.GetRepositoryFile(context.Background(), tt.project, tt.ref, tt.path)
			if tt.wantErr == nil && tt.wantInErr == "" {
				if err != nil || string(got) != tt.want {
					t.Fatalf("got %q, %v; want %q", got, err, tt.want)
				}
				return
			}
			if err == nil {
				t.Fatalf("got %q, want an error", got)
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Errorf("error %v is not %v", err, tt.wantErr)
			}
			if tt.notErr != nil && errors.Is(err, tt.notErr) {
				t.Errorf("error %v must not be %v", err, tt.notErr)
			}
			if !strings.Contains(err.Error(), tt.wantInErr) {
				t.Errorf("error %q does not contain %q", err, tt.wantInErr)
			}
			if strings.Contains(err.Error(), token) {
				t.Errorf("error %q reveals the token", err)
			}
		})
	}
}

func TestGetRepositoryFileRequest(t *testing.T) {
	srv := gitlabtest.New(t, secret, backend{})
	srv.SetRepositoryFile(20, "release/1.0", ".gitlab/agents/prod/config.yaml", []byte("x: 1\n"))
	c := newClient(t, srv.URL, nil)
	if _, err := c.GetRepositoryFile(context.Background(), 20, "release/1.0", ".gitlab/agents/prod/config.yaml"); err != nil {
		t.Fatal(err)
	}
	reqs := srv.Requests()
	if len(reqs) != 1 {
		t.Fatalf("%d requests, want 1", len(reqs))
	}
	r := reqs[0]
	if r.Method != "GET" || r.Path != "/api/v4/projects/20/repository/files/.gitlab/agents/prod/config.yaml/raw" {
		t.Errorf("request %s %s", r.Method, r.Path)
	}
	if r.Header.Get(gitlab.HeaderPrivateToken) != "" {
		t.Error("PRIVATE-TOKEN sent without gitlab.repository_token_file")
	}
	checkJWT(t, r.Header)
	if got, want := gitlab.RepositoryFileRawPath(20, ".gitlab/agents/prod/config.yaml"), "/api/v4/projects/20/repository/files/.gitlab%2Fagents%2Fprod%2Fconfig.yaml/raw"; got != want {
		t.Errorf("RepositoryFileRawPath = %q, want %q", got, want)
	}
}

func TestListAgentConfigFiles(t *testing.T) {
	fake := gitlabtest.New(t, secret, backend{})
	fake.SetRepositoryToken("repo-token")
	// 120 agents: more than one page of the tree API.
	for i := range 120 {
		fake.SetRepositoryFile(100, "main", fmt.Sprintf(".gitlab/agents/agent-%03d/config.yaml", i), []byte("{}"))
	}
	fake.SetRepositoryFile(100, "main", ".gitlab/agents/agent-000/README.md", []byte("not a config"))
	fake.SetRepositoryFile(100, "main", ".gitlab/agents/nested/deeper/config.yaml", []byte("{}"))
	fake.SetRepositoryFile(101, "main", "README.md", []byte("no agents here"))

	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte("repo-token\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c := newClient(t, fake.URL, func(o *gitlab.ClientOptions) { o.RepositoryTokenFile = tokenFile })

	tests := []struct {
		name      string
		project   int64
		wantCount int
		wantErr   error
	}{
		{"two pages, only config.yaml one level down", 100, 120, nil},
		{"project without .gitlab/agents", 101, 0, nil},
		{"unknown project", 999, 0, gitlab.ErrNotFound},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			files, err := c.ListAgentConfigFiles(context.Background(), tc.project)
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil && err != nil) {
				t.Fatalf("error %v, want %v", err, tc.wantErr)
			}
			if len(files) != tc.wantCount {
				t.Fatalf("%d files, want %d", len(files), tc.wantCount)
			}
			if tc.wantCount > 0 && (files[0].AgentName != "agent-000" || files[0].Path != ".gitlab/agents/agent-000/config.yaml") {
				t.Fatalf("first file %+v", files[0])
			}
		})
	}
}
