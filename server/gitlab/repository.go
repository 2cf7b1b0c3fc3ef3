package gitlab

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
)

// HeaderPrivateToken carries gitlab.repository_token_file's token to
// GitLab's public REST API (the repository files API is not internal, so
// it does not accept kas's JWT alone).
const HeaderPrivateToken = "PRIVATE-TOKEN"

// ErrFileNotFound is a 404 for a file, or for the ref holding it (an empty
// repository has no default branch commit yet): the file does not exist.
// It wraps ErrNotFound, so such errors are also cacheable refusals.
var ErrFileNotFound = fmt.Errorf("file %w", ErrNotFound)

// RepositoryFileRawPath is the path of GitLab's raw repository file
// endpoint, GET /api/v4/projects/:id/repository/files/:file_path/raw, with
// filePath URL-encoded as one segment as the API requires.
func RepositoryFileRawPath(projectID int64, filePath string) string {
	return "/api/v4/projects/" + strconv.FormatInt(projectID, 10) + "/repository/files/" + url.PathEscape(filePath) + "/raw"
}

// GetRepositoryFile returns the content of filePath in the project's
// repository at ref (a branch, tag or commit), from GitLab's repository
// files API with the token of gitlab.repository_token_file. A missing file
// is an error wrapping ErrFileNotFound; a missing project (or one the token
// cannot read) wraps ErrNotFound only. Not cached.
func (c *Client) GetRepositoryFile(ctx context.Context, projectID int64, ref, filePath string) ([]byte, error) {
	const op = "get repository file"
	if projectID <= 0 || ref == "" || filePath == "" {
		return nil, &Error{Op: op, URL: c.base.Redacted(),
			Message: fmt.Sprintf("project ID (%d), ref (%q) and file path (%q) are all required", projectID, ref, filePath)}
	}
	token, err := c.repositoryToken()
	if err != nil {
		return nil, &Error{Op: op, URL: c.base.Redacted(), Message: err.Error(), Err: err}
	}
	path := RepositoryFileRawPath(projectID, filePath) + "?ref=" + url.QueryEscape(ref)
	body, err := c.call(ctx, op, http.MethodGet, path, func(h http.Header) {
		h.Set("Accept", "*/*") // the raw endpoint answers the file itself
		if token != "" {
			h.Set(HeaderPrivateToken, token)
		}
	}, nil, nil)
	var e *Error
	if errors.As(err, &e) && e.StatusCode == http.StatusNotFound {
		// Grape names what is missing: "404 File Not Found",
		// "404 Commit Not Found" or "404 Project Not Found".
		if strings.HasSuffix(e.Message, "File Not Found") || strings.HasSuffix(e.Message, "Commit Not Found") {
			e.Err = ErrFileNotFound
		} else {
			e.Message += fmt.Sprintf("; does the token in gitlab.repository_token_file have read_repository access to project %d?", projectID)
		}
	}
	return body, err
}

// repositoryToken reads gitlab.repository_token_file; "" when none is set.
func (c *Client) repositoryToken() (string, error) {
	if c.tokenFile == "" {
		return "", nil
	}
	data, err := os.ReadFile(c.tokenFile)
	if err != nil {
		return "", fmt.Errorf("read gitlab.repository_token_file: %w", err)
	}
	token := strings.TrimSpace(string(data))
	if token == "" {
		return "", fmt.Errorf("gitlab.repository_token_file %s is empty; put a token with read_repository scope in it", c.tokenFile)
	}
	return token, nil
}

// AgentConfigFile is one agent's configuration file in a project:
// .gitlab/agents/<AgentName>/config.yaml.
type AgentConfigFile struct {
	AgentName string
	Path      string
}

// agentConfigDir is where GitLab looks for agent configuration files.
const agentConfigDir = ".gitlab/agents"

// treePageSize is GitLab's largest page of the repository tree API.
const treePageSize = 100

// ListAgentConfigFiles lists the agent configuration files on the default
// branch of a project, from GitLab's repository tree API with the token of
// gitlab.repository_token_file. A project without .gitlab/agents has none; a
// missing project (or one the token cannot read) is an error wrapping ErrNotFound.
func (c *Client) ListAgentConfigFiles(ctx context.Context, projectID int64) ([]AgentConfigFile, error) {
	const op = "list agent configuration files"
	token, err := c.repositoryToken()
	if err != nil {
		return nil, &Error{Op: op, URL: c.base.Redacted(), Message: err.Error(), Err: err}
	}
	var files []AgentConfigFile
	for page := 1; ; page++ {
		path := fmt.Sprintf("/api/v4/projects/%d/repository/tree?path=%s&recursive=true&per_page=%d&page=%d",
			projectID, url.QueryEscape(agentConfigDir), treePageSize, page)
		var entries []struct {
			Type string `json:"type"`
			Path string `json:"path"`
		}
		_, err := c.call(ctx, op, http.MethodGet, path, func(h http.Header) {
			if token != "" {
				h.Set(HeaderPrivateToken, token)
			}
		}, nil, &entries)
		var e *Error
		if errors.As(err, &e) && e.StatusCode == http.StatusNotFound && strings.HasSuffix(e.Message, "Tree Not Found") {
			return nil, nil // no .gitlab/agents directory
		}
		if err != nil {
			return nil, err
		}
		for _, en := range entries {
			if name, ok := agentNameOf(en.Path); ok && en.Type == "blob" {
				files = append(files, AgentConfigFile{AgentName: name, Path: en.Path})
			}
		}
		if len(entries) < treePageSize {
			return files, nil
		}
	}
}

// agentNameOf returns <name> for ".gitlab/agents/<name>/config.yaml".
func agentNameOf(path string) (string, bool) {
	rest, ok := strings.CutPrefix(path, agentConfigDir+"/")
	if !ok {
		return "", false
	}
	name, file, ok := strings.Cut(rest, "/")
	return name, ok && name != "" && file == "config.yaml"
}
