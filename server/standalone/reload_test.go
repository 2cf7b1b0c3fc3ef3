package standalone

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kasproject/kas/server/gitlab"
)

// TestAgentConfigChangesApply edits agent "bare"'s configuration file between
// questions: each edit must count at once, without reopening.
func TestAgentConfigChangesApply(t *testing.T) {
	w := newWorld(t)
	b := w.open(t)
	const config = "repos/acme-infra/.gitlab/agents/bare/config.yaml"
	ask := func() error {
		_, err := b.AuthorizeProxyUser(context.Background(), pat(4, "alice"))
		return err
	}
	steps := []struct {
		name  string
		write string // "" removes the file
		err   *wantErr
	}{
		{name: "no file: empty configuration", err: &wantErr{status: 403, text: "`user_access` keyword is not found"}},
		{name: "user_access added", write: "user_access:\n  access_as: {agent: {}}\n  projects: [{id: acme/app}]\n"},
		{name: "malformed: fails with the line", write: "user_access:\n  access_as: {agent: {}}\n  projects: [{idd: acme/app}]\n",
			err: &wantErr{text: "bare/config.yaml: line 3: field idd not found"}},
		{name: "fixed, listing a project alice is not a developer of", write: "user_access:\n  access_as: {agent: {}}\n  projects: [{id: acme/web}]\n",
			err: &wantErr{status: 403, text: "You must be a member"}},
		{name: "removed again", err: &wantErr{status: 403, text: "`user_access` keyword is not found"}},
	}
	for _, step := range steps {
		t.Run(step.name, func(t *testing.T) {
			if step.write != "" {
				w.write(t, config, step.write)
			} else if err := os.Remove(filepath.Join(w.dir, config)); err != nil && !errors.Is(err, os.ErrNotExist) {
				t.Fatal(err)
			}
			checkErr(t, ask(), step.err)
		})
	}
}

// TestStandaloneFileChangesApply edits the standalone file between questions.
func TestStandaloneFileChangesApply(t *testing.T) {
	w := newWorld(t)
	b := w.open(t)
	ctx := context.Background()
	newAgent := "  - {id: 7, name: fresh, project: acme/infra, token_sha256: {{hash \"agent-fresh\"}}}\n"
	withFresh := strings.Replace(worldFile, "users:\n", newAgent+"users:\n", 1)

	_, err := b.GetAgentInfo(ctx, tok("agent-fresh"))
	checkErr(t, err, &wantErr{status: 401})

	w.write(t, "standalone.yaml", render(t, withFresh))
	info, err := b.GetAgentInfo(ctx, tok("agent-fresh"))
	checkErr(t, err, nil)
	checkAnswer(t, info, &gitlab.AgentInfo{ProjectID: 100, AgentID: 7, AgentName: "fresh", DefaultBranch: "main"})

	// While the file is invalid, every decision fails with its problems
	// (not cacheable) instead of using the previous version.
	w.write(t, "standalone.yaml", strings.Replace(render(t, withFresh), "name: fresh", "name: Fresh", 1))
	for range 2 { // still failing when asked again
		_, err = b.GetAgentInfo(ctx, tok("agent-prod"))
		checkErr(t, err, &wantErr{text: `agents[7].name: "Fresh" is not a GitLab agent name`})
		_, err = b.GetAllowedAgentsForJob(ctx, tok("job-app-prod"))
		checkErr(t, err, &wantErr{text: "reload changed file"})
	}

	w.write(t, "standalone.yaml", render(t, worldFile))
	_, err = b.GetAgentInfo(ctx, tok("agent-fresh"))
	checkErr(t, err, &wantErr{status: 401})
	_, err = b.GetAgentInfo(ctx, tok("agent-prod"))
	checkErr(t, err, nil)

	// A problem outside the file: fixing it counts without touching the file.
	withRepo := strings.Replace(worldFile, "  - {id: 301, path: lab/app}\n",
		"  - {id: 301, path: lab/app}\n  - {id: 302, path: lab/new, repository: repos/lab-new}\n", 1)
	w.write(t, "standalone.yaml", render(t, withRepo))
	_, err = b.GetAgentInfo(ctx, tok("agent-prod"))
	checkErr(t, err, &wantErr{text: "projects[9].repository: stat "})
	if err := os.Mkdir(filepath.Join(w.dir, "repos/lab-new"), 0o755); err != nil {
		t.Fatal(err)
	}
	_, err = b.GetAgentInfo(ctx, tok("agent-prod"))
	checkErr(t, err, nil)

	if err := os.Remove(w.file); err != nil {
		t.Fatal(err)
	}
	_, err = b.GetAgentInfo(ctx, tok("agent-prod"))
	checkErr(t, err, &wantErr{text: "check standalone file"})
}

// TestConcurrentUse asks questions from several goroutines while both files
// are replaced (written aside and renamed, as editors do); run with -race.
// Every answer must come from one complete version or the other.
func TestConcurrentUse(t *testing.T) {
	w := newWorld(t)
	b := w.open(t)
	const config = "repos/acme-infra/.gitlab/agents/bare/config.yaml"
	configs := []string{"# empty: no user_access\n", "user_access:\n  access_as: {agent: {}}\n  projects: [{id: acme/app}]\n"}
	files := []string{render(t, worldFile), render(t, strings.Replace(worldFile, "acme/app: developer", "acme/app: maintainer", 1))}

	replace := func(name, content string) {
		p := filepath.Join(w.dir, name)
		tmp := p + ".tmp"
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Error(err)
			return
		}
		if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
			t.Error(err)
			return
		}
		if err := os.Rename(tmp, p); err != nil {
			t.Error(err)
		}
	}

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for ctx.Err() == nil {
				if _, err := b.GetAllowedAgentsForJob(ctx, tok("job-app-prod")); err != nil && ctx.Err() == nil {
					t.Errorf("GetAllowedAgentsForJob: %v", err)
					return
				}
				_, err := b.AuthorizeProxyUser(ctx, pat(4, "alice"))
				if err != nil && !errors.Is(err, gitlab.ErrForbidden) && ctx.Err() == nil {
					t.Errorf("AuthorizeProxyUser: %v", err)
					return
				}
			}
		})
	}
	for i := range 50 {
		replace("standalone.yaml", files[i%2])
		replace(config, configs[i%2])
	}
	cancel()
	wg.Wait()
}

// TestChangesShowWithinRecheck uses Open's own interval: a change to either
// file counts within it.
func TestChangesShowWithinRecheck(t *testing.T) {
	w := newWorld(t)
	b, err := Open(w.file)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	newAgent := "  - {id: 7, name: fresh, project: acme/infra, token_sha256: {{hash \"agent-fresh\"}}}\n"
	w.write(t, "standalone.yaml", render(t, strings.Replace(worldFile, "users:\n", newAgent+"users:\n", 1)))
	const config = "repos/acme-infra/.gitlab/agents/bare/config.yaml"
	w.write(t, config, "user_access:\n  access_as: {agent: {}}\n  projects: [{id: acme/app}]\n")

	deadline := time.Now().Add(recheckInterval + 5*time.Second)
	for {
		_, agentErr := b.GetAgentInfo(ctx, tok("agent-fresh"))
		_, userErr := b.AuthorizeProxyUser(ctx, pat(4, "alice"))
		if agentErr == nil && userErr == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("changes not seen within %s: agent %v, user %v", recheckInterval, agentErr, userErr)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
