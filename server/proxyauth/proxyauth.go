// Package proxyauth authenticates one Kubernetes API proxy request against
// GitLab and decides whom the agent impersonates for it. It reads GitLab's
// three credential forms (CI job token, personal access token, browser
// session cookie), asks gitlab.API, and builds the identity GitLab documents
// for the agent's access_as setting. StripCredentials then removes from the
// request everything the cluster must not see.
package proxyauth

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"github.com/kasproject/kas/protocol"
	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/kubestatus"
)

// Kind is how a request authenticated; the last two are also GitLab's
// access_type values.
type Kind string

const (
	KindCIJob               Kind = "ci_job"
	KindPersonalAccessToken Kind = gitlab.AccessTypePersonalAccessToken
	KindSessionCookie       Kind = gitlab.AccessTypeSessionCookie
)

// Result is an authenticated and authorized request.
type Result struct {
	AgentID int64
	Kind    Kind
	// UserID is the GitLab user behind the request (the CI job's user for a
	// job), for usage metrics; 0 if GitLab named none.
	UserID int64
	// Identity is whom the agent impersonates; nil means the agent's own
	// service account (access_as agent).
	Identity *protocol.Identity
}

// Error is a refused or failed authentication. Code, Reason and Message are
// the answer for the caller (kubestatus.Write(w, e.Code, e.Reason, e.Message))
// and never contain a credential. Err, when set, is the cause for the log: it
// may name GitLab's URL and answer, which the caller should not see.
type Error struct {
	Code    int
	Reason  kubestatus.Reason
	Message string
	Err     error
}

func (e *Error) Error() string {
	if e.Err == nil {
		return e.Message
	}
	return e.Message + ": " + e.Err.Error()
}

func (e *Error) Unwrap() error { return e.Err }

func unauthorized(format string, args ...any) *Error {
	return &Error{Code: http.StatusUnauthorized, Reason: kubestatus.ReasonUnauthorized, Message: fmt.Sprintf(format, args...)}
}

// unusableAnswer is GitLab answering something kas cannot act on: kas's or
// GitLab's bug, or a configuration that should have been rejected earlier.
func unusableAnswer(err error) *Error {
	return &Error{
		Code:    http.StatusBadGateway,
		Reason:  kubestatus.ReasonInternalError,
		Message: "GitLab's authorization answer cannot be used; the kas log has the details",
		Err:     err,
	}
}

// Authenticator checks proxy requests with GitLab (or the standalone backend).
type Authenticator struct {
	API gitlab.API
}

// Authenticate reads r's credentials (see StripCredentials for the headers
// involved; the Authorization header wins over the _gitlab_kas cookie), asks
// GitLab whether they may use the agent, and returns the identity to
// impersonate. Every error is a *Error:
//
//   - 401: missing or malformed credentials (the message gives the expected
//     format), or GitLab does not accept them;
//   - 403: GitLab refuses, or the CI job may not use this agent;
//   - 404: GitLab does not know the agent (or the job);
//   - 502: GitLab could not be reached or answered something unusable.
func (a *Authenticator) Authenticate(ctx context.Context, r *http.Request) (*Result, error) {
	c, err := parseCredentials(r)
	if err != nil {
		return nil, err
	}
	if c.kind == KindCIJob {
		return a.authenticateJob(ctx, c)
	}
	return a.authenticateUser(ctx, c)
}

func (a *Authenticator) authenticateJob(ctx context.Context, c credentials) (*Result, error) {
	job, err := a.API.GetAllowedAgentsForJob(ctx, c.key)
	if err != nil {
		return nil, gitlabError(err, refusals{
			unauthorized: "GitLab does not accept the CI job token (the job may have finished)",
			forbidden:    "GitLab refuses the CI job token",
			notFound:     "GitLab knows no agents for this CI job token",
		})
	}
	var agent *gitlab.AllowedAgent
	for i := range job.AllowedAgents {
		if job.AllowedAgents[i].ID == c.agentID {
			agent = &job.AllowedAgents[i]
			break
		}
	}
	if agent == nil {
		return nil, &Error{
			Code:    http.StatusForbidden,
			Reason:  kubestatus.ReasonForbidden,
			Message: fmt.Sprintf("the CI job is not allowed to use agent %d; the agent's configuration must list the job's project or group under ci_access", c.agentID),
		}
	}
	id, err := jobIdentity(job, agent)
	if err != nil {
		return nil, unusableAnswer(err)
	}
	return &Result{AgentID: c.agentID, Kind: c.kind, UserID: job.User.ID, Identity: id}, nil
}

func (a *Authenticator) authenticateUser(ctx context.Context, c credentials) (*Result, error) {
	resp, err := a.API.AuthorizeProxyUser(ctx, gitlab.AuthorizeProxyUserRequest{
		AgentID:    c.agentID,
		AccessType: string(c.kind),
		AccessKey:  c.key,
		CSRFToken:  c.csrfToken,
	})
	if err != nil {
		r := refusals{
			unauthorized: "GitLab does not accept the personal access token",
			forbidden:    fmt.Sprintf("the user may not use agent %d; the agent's configuration must grant it under user_access", c.agentID),
			notFound:     fmt.Sprintf("agent %d not found", c.agentID),
		}
		if c.kind == KindSessionCookie {
			r.unauthorized = "GitLab does not accept the session or its CSRF token; sign in to GitLab again"
		}
		if errors.Is(err, gitlab.ErrInsufficientScope) {
			r.forbidden = "the personal access token lacks the k8s_proxy scope, which the Kubernetes API proxy requires; " +
				"create a token with the k8s_proxy scope"
		}
		return nil, gitlabError(err, r)
	}
	if resp.Agent.ID != c.agentID {
		return nil, unusableAnswer(fmt.Errorf("GitLab authorized agent %d when asked about agent %d", resp.Agent.ID, c.agentID))
	}
	id, err := userIdentity(resp, c.kind)
	if err != nil {
		return nil, unusableAnswer(err)
	}
	return &Result{AgentID: c.agentID, Kind: c.kind, UserID: resp.User.ID, Identity: id}, nil
}

// refusals are the caller-facing messages for GitLab's three refusals.
type refusals struct {
	unauthorized, forbidden, notFound string
}

// gitlabError maps a gitlab.API error to the answer for the caller, keeping
// the full error as the cause for the log.
func gitlabError(err error, r refusals) *Error {
	switch {
	case errors.Is(err, gitlab.ErrUnauthorized):
		return &Error{Code: http.StatusUnauthorized, Reason: kubestatus.ReasonUnauthorized, Message: r.unauthorized, Err: err}
	case errors.Is(err, gitlab.ErrForbidden):
		return &Error{Code: http.StatusForbidden, Reason: kubestatus.ReasonForbidden, Message: r.forbidden, Err: err}
	case errors.Is(err, gitlab.ErrNotFound):
		return &Error{Code: http.StatusNotFound, Reason: kubestatus.ReasonNotFound, Message: r.notFound, Err: err}
	case errors.Is(err, gitlab.ErrContract):
		return unusableAnswer(err)
	case errors.Is(err, gitlab.ErrRedirect):
		return &Error{
			Code:    http.StatusBadGateway,
			Reason:  kubestatus.ReasonInternalError,
			Message: "GitLab redirected kas's authorization request, and kas does not follow GitLab's redirects; the kas log says where to",
			Err:     err,
		}
	default:
		return &Error{
			Code:    http.StatusBadGateway,
			Reason:  kubestatus.ReasonInternalError,
			Message: "cannot reach GitLab to authorize the request",
			Err:     err,
		}
	}
}
