package standalone

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/kasproject/kas/server/gitlab"
)

const (
	opGetRepositoryFile     = "get repository file"
	opListAgentConfigFiles  = "list agent configuration files"
	agentConfigDir          = ".gitlab/agents"
	agentConfigFileBasename = "config.yaml"
)

// GetRepositoryFile returns filePath (slash-separated, relative to the
// repository's root) from the repository directory of the project with ID
// projectID, as GitLab's repository files API would. A standalone
// repository is one working tree, its project's default branch, so ref
// must be that branch. A missing file, a ref other than the default branch
// and a project without a repository directory wrap gitlab.ErrFileNotFound;
// an unknown project wraps gitlab.ErrNotFound. filePath cannot leave the
// repository directory, symbolic links included.
func (b *Backend) GetRepositoryFile(ctx context.Context, projectID int64, ref, filePath string) ([]byte, error) {
	const op = opGetRepositoryFile
	st, err := b.begin(ctx, op)
	if err != nil {
		return nil, err
	}
	p := st.projectByID(projectID)
	if p == nil {
		return nil, b.refuse(op, http.StatusNotFound, fmt.Sprintf("404 Project Not Found: no project has id %d (projects[].id in %s)", projectID, b.file))
	}
	if p.repository == "" {
		return nil, b.fileNotFound(b.url, fmt.Sprintf("404 Commit Not Found: project %s has no repository (projects[].repository in %s)", p.path, b.file))
	}
	u := fileURL(filepath.Join(p.repository, filepath.FromSlash(filePath)))
	if ref != p.defaultBranch {
		return nil, b.fileNotFound(u, fmt.Sprintf("404 Commit Not Found: the repository of project %s holds only its default branch %q, not %q", p.path, p.defaultBranch, ref))
	}
	data, err := readInRoot(p.repository, filePath)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, b.fileNotFound(u, "404 File Not Found")
	case err != nil:
		return nil, b.fail(op, u, fmt.Errorf("read %s from the repository of project %s: %w", filePath, p.path, err))
	}
	return data, nil
}

// readInRoot reads the regular file at the slash-separated rel inside dir.
func readInRoot(dir, rel string) ([]byte, error) {
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, err
	}
	defer root.Close()
	return root.ReadFile(filepath.FromSlash(rel))
}

func (b *Backend) fileNotFound(u, message string) error {
	return &gitlab.Error{Op: opGetRepositoryFile, URL: u, StatusCode: http.StatusNotFound, Message: message, Err: gitlab.ErrFileNotFound}
}

// ListAgentConfigFiles lists the agent configuration files,
// .gitlab/agents/<agent name>/config.yaml, in the repository directory of
// the project with ID projectID or, when projectID is 0, with full path
// projectPath; ordered by agent name. Like GitLab it lists every such file
// whose directory is a valid agent name, whether or not an agent of that
// name is registered. A project without a repository has none; an unknown
// project is an error wrapping gitlab.ErrNotFound.
func (b *Backend) ListAgentConfigFiles(ctx context.Context, projectID int64, projectPath string) ([]gitlab.AgentConfigFile, error) {
	const op = opListAgentConfigFiles
	st, err := b.begin(ctx, op)
	if err != nil {
		return nil, err
	}
	var p *project
	if projectID != 0 {
		p = st.projectByID(projectID)
	} else {
		p = st.projects[strings.ToLower(projectPath)]
	}
	if p == nil {
		return nil, b.refuse(op, http.StatusNotFound, fmt.Sprintf("404 Project Not Found: no project with id %d or path %q (projects in %s)", projectID, projectPath, b.file))
	}
	if p.repository == "" {
		return nil, nil
	}
	root, err := os.OpenRoot(p.repository)
	if err != nil {
		return nil, b.fail(op, fileURL(p.repository), fmt.Errorf("open the repository of project %s: %w", p.path, err))
	}
	defer root.Close()
	dir, err := root.Open(filepath.FromSlash(agentConfigDir))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, b.fail(op, fileURL(p.repository), fmt.Errorf("list %s in the repository of project %s: %w", agentConfigDir, p.path, err))
	}
	defer dir.Close()
	entries, err := dir.ReadDir(-1)
	if err != nil {
		return nil, b.fail(op, fileURL(p.repository), fmt.Errorf("list %s in the repository of project %s: %w", agentConfigDir, p.path, err))
	}
	var files []gitlab.AgentConfigFile
	slices.SortFunc(entries, func(a, b fs.DirEntry) int { return strings.Compare(a.Name(), b.Name()) })
	for _, e := range entries {
		name := e.Name()
		if len(name) > 63 || !agentName.MatchString(name) {
			continue
		}
		rel := agentConfigDir + "/" + name + "/" + agentConfigFileBasename
		if info, err := root.Stat(filepath.FromSlash(rel)); err == nil && info.Mode().IsRegular() {
			files = append(files, gitlab.AgentConfigFile{AgentName: name, Path: rel})
		}
	}
	return files, nil
}

// projectByID finds a project by its ID; nil if there is none.
func (st *state) projectByID(id int64) *project {
	for _, p := range st.projects {
		if p.id == id {
			return p
		}
	}
	return nil
}
