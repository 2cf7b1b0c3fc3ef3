package standalone

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/kasproject/kas/server/gitlab"
)

func TestGetRepositoryFile(t *testing.T) {
	w := newWorld(t)
	// A file outside every repository, reachable by a symbolic link or ".."
	// from acme-infra, must stay out of reach.
	w.write(t, "secret.txt", "not in any repository")
	if err := os.Symlink(filepath.Join(w.dir, "secret.txt"), filepath.Join(w.dir, "repos/acme-infra/escape")); err != nil {
		t.Fatal(err)
	}
	b := w.open(t)
	const prodFile = ".gitlab/agents/prod/config.yaml"

	tests := []struct {
		name          string
		project       int64
		ref, path     string
		want          string // file content, when no error is expected
		wantErr       error
		notErr        error
		wantInMessage string
	}{
		{name: "found", project: 100, ref: "main", path: prodFile, want: worldConfigs["repos/acme-infra/"+prodFile]},
		{name: "other default branch", project: 200, ref: "trunk", path: ".gitlab/agents/foreign/config.yaml", want: worldConfigs["repos/other-infra/.gitlab/agents/foreign/config.yaml"]},
		{name: "missing file", project: 100, ref: "main", path: ".gitlab/agents/bare/config.yaml", wantErr: gitlab.ErrFileNotFound, wantInMessage: "404 File Not Found"},
		{name: "other branch", project: 100, ref: "feature", path: prodFile, wantErr: gitlab.ErrFileNotFound, wantInMessage: `only its default branch "main"`},
		{name: "project without repository", project: 101, ref: "main", path: prodFile, wantErr: gitlab.ErrFileNotFound, wantInMessage: "has no repository"},
		{name: "unknown project", project: 999, ref: "main", path: prodFile, wantErr: gitlab.ErrNotFound, notErr: gitlab.ErrFileNotFound, wantInMessage: "no project has id 999"},
		{name: "dot-dot stays inside", project: 100, ref: "main", path: "../../secret.txt", wantInMessage: "path escapes"},
		{name: "symbolic link stays inside", project: 100, ref: "main", path: "escape", wantInMessage: "path escapes"},
		{name: "directory", project: 100, ref: "main", path: ".gitlab/agents", wantInMessage: "is a directory"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := b.GetRepositoryFile(context.Background(), tt.project, tt.ref, tt.path)
			if tt.wantErr == nil && tt.wantInMessage == "" {
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
			if !strings.Contains(err.Error(), tt.wantInMessage) {
				t.Errorf("error %q does not contain %q", err, tt.wantInMessage)
			}
		})
	}
}

func TestListAgentConfigFiles(t *testing.T) {
	w := newWorld(t)
	// Listed whether or not an agent is registered; skipped when the
	// directory is not an agent name or holds no config.yaml.
	w.write(t, "repos/acme-infra/.gitlab/agents/unregistered/config.yaml", "")
	w.write(t, "repos/acme-infra/.gitlab/agents/Not_An_Agent/config.yaml", "")
	w.write(t, "repos/acme-infra/.gitlab/agents/empty-dir/README.md", "")
	w.write(t, "repos/acme-infra/.gitlab/agents/README.md", "")
	b := w.open(t)

	acme := []gitlab.AgentConfigFile{
		{AgentName: "noaccessas", Path: ".gitlab/agents/noaccessas/config.yaml"},
		{AgentName: "people", Path: ".gitlab/agents/people/config.yaml"},
		{AgentName: "prod", Path: ".gitlab/agents/prod/config.yaml"},
		{AgentName: "staging", Path: ".gitlab/agents/staging/config.yaml"},
		{AgentName: "unregistered", Path: ".gitlab/agents/unregistered/config.yaml"},
	}
	tests := []struct {
		name    string
		id      int64
		path    string
		want    []gitlab.AgentConfigFile
		wantErr error
	}{
		{name: "by id", id: 100, want: acme},
		{name: "by path, any case", path: "ACME/infra", want: acme},
		{name: "one file", id: 200, want: []gitlab.AgentConfigFile{{AgentName: "foreign", Path: ".gitlab/agents/foreign/config.yaml"}}},
		{name: "project without repository", id: 101},
		{name: "unknown id", id: 999, wantErr: gitlab.ErrNotFound},
		{name: "unknown path", path: "acme/nothing", wantErr: gitlab.ErrNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := b.ListAgentConfigFiles(context.Background(), tt.id, tt.path)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("error %v, want %v", err, tt.wantErr)
				}
				return
			}
			if err != nil || !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("got %+v, %v; want %+v", got, err, tt.want)
			}
		})
	}
}

func TestListAgentConfigFilesWithoutAgentsDir(t *testing.T) {
	w := newWorld(t)
	b := w.open(t)
	if err := os.RemoveAll(filepath.Join(w.dir, "repos/lab-infra/.gitlab")); err != nil {
		t.Fatal(err)
	}
	got, err := b.ListAgentConfigFiles(context.Background(), 300, "")
	if err != nil || len(got) != 0 {
		t.Fatalf("got %+v, %v; want none", got, err)
	}
}
