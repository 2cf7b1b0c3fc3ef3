package gitlab

import (
	"context"
	"io"
	"net/http"
	"net/url"
	"strings"

	"github.com/kasproject/kas/server/correlation"
	"github.com/kasproject/kas/server/kasjwt"
)

// PathModules prefixes the API agentk modules reach GitLab through kas
// (GitLab's agentk: GitlabAccess/MakeRequest), followed by the module's
// name and the module's own path.
const PathModules = "/api/v4/internal/kubernetes/modules/"

// ModuleRequest is one HTTP request an agentk module makes to GitLab.
type ModuleRequest struct {
	// AgentToken authenticates the agent (Authorization: Bearer).
	AgentToken string
	// Module names the agentk module, e.g. starboard_vulnerability.
	Module string
	Method string
	// Path is the module's path below PathModules<Module>, starting with a slash.
	Path   string
	Query  url.Values
	Header http.Header
	// Body may be nil; ContentLength is its length, -1 if unknown.
	Body          io.Reader
	ContentLength int64
}

// ModuleResponse is GitLab's answer; the caller closes Body.
type ModuleResponse = http.Response

// DoModuleRequest sends an agentk module's request to GitLab with the
// agent's token and kas's Gitlab-Kas-Api-Request JWT, and returns GitLab's
// answer whatever its status, streaming its body. Only a request that got
// no answer is an error.
func (c *Client) DoModuleRequest(ctx context.Context, r ModuleRequest) (*ModuleResponse, error) {
	const op = "agentk module request"
	target := c.base.JoinPath(PathModules, url.PathEscape(r.Module), strings.TrimPrefix(r.Path, "/"))
	target.RawQuery = r.Query.Encode()
	u := target.String()
	body := r.Body
	if body == nil {
		body = http.NoBody
	}
	req, err := http.NewRequestWithContext(ctx, r.Method, u, body)
	if err != nil {
		return nil, &Error{Op: op, URL: u, Message: err.Error(), Err: err}
	}
	if r.Body != nil {
		req.ContentLength = r.ContentLength
	}
	for k, v := range r.Header {
		req.Header[k] = v
	}
	token, err := kasjwt.Sign(c.secret, kasjwt.IssuerKAS, kasjwt.AudienceGitLab, jwtLifetime)
	if err != nil {
		return nil, &Error{Op: op, URL: u, Message: err.Error(), Err: err}
	}
	req.Header.Set(HeaderAPIRequest, token)
	req.Header.Set("Authorization", "Bearer "+r.AgentToken)
	req.Header.Set("User-Agent", c.userAgent)
	if id := correlation.FromContext(ctx); id != "" {
		req.Header.Set(correlation.Header, id)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, c.transportError(ctx, op, u, err)
	}
	return resp, nil
}
