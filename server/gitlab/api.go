// Package gitlab is kas's client for GitLab Rails' internal API: the
// Gitlab-Kas-Api-Request JWT, the agent, proxy-user and CI-job questions,
// configuration and usage reports, with caching of the answers.
package gitlab

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// API is what kas asks GitLab. The Rails client and the standalone backend
// (server/standalone) both implement it, so the rest of kas cannot tell them apart.
type API interface {
	// GetAgentInfo identifies the agent that owns agentToken.
	GetAgentInfo(ctx context.Context, agentToken string) (*AgentInfo, error)
	// AuthorizeProxyUser decides whether a user (by personal access token or
	// session cookie) may use an agent, and as whom.
	AuthorizeProxyUser(ctx context.Context, req AuthorizeProxyUserRequest) (*AuthorizeProxyUserResponse, error)
	// GetAllowedAgentsForJob lists the agents a CI job token may use.
	GetAllowedAgentsForJob(ctx context.Context, jobToken string) (*AllowedAgentsForJob, error)
}

// AgentInfo is the answer of GET /api/v4/internal/agents/agentk/agent_info.
type AgentInfo struct {
	ProjectID     int64  `json:"project_id"`
	AgentID       int64  `json:"agent_id"`
	AgentName     string `json:"agent_name"`
	DefaultBranch string `json:"default_branch"`
	// GitalyInfo and GitalyRepository are passed through untouched.
	GitalyInfo       map[string]any `json:"gitaly_info,omitempty"`
	GitalyRepository map[string]any `json:"gitaly_repository,omitempty"`

	// ValidatedAt is when GitLab accepted the token, as the GitLab client
	// answers from its cache; zero means just now (the standalone backend
	// reads its files afresh). A token re-validated periodically
	// (server/tokencheck) is next checked relative to it. Not part of the
	// contract.
	ValidatedAt time.Time `json:"-"`
}

// Access types of AuthorizeProxyUserRequest.
const (
	AccessTypePersonalAccessToken = "personal_access_token"
	AccessTypeSessionCookie       = "session_cookie"
)

// AuthorizeProxyUserRequest is the body of POST /api/v4/internal/kubernetes/authorize_proxy_user.
type AuthorizeProxyUserRequest struct {
	AgentID    int64  `json:"agent_id"`
	AccessType string `json:"access_type"`
	AccessKey  string `json:"access_key"`
	CSRFToken  string `json:"csrf_token,omitempty"`
}

// AuthorizeProxyUserResponse is its answer.
type AuthorizeProxyUserResponse struct {
	Agent    AuthorizedAgent `json:"agent"`
	User     User            `json:"user"`
	AccessAs UserAccessAs    `json:"access_as"`
}

// AuthorizedAgent names the agent and its configuration project.
type AuthorizedAgent struct {
	ID            int64 `json:"id"`
	ConfigProject IDRef `json:"config_project"`
}

// IDRef is a {"id": N} object.
type IDRef struct {
	ID int64 `json:"id"`
}

// User is a GitLab user.
type User struct {
	ID       int64  `json:"id"`
	Username string `json:"username"`
}

// UserAccessAs is exactly one of Agent and User.
type UserAccessAs struct {
	Agent *struct{}       `json:"agent,omitempty"`
	User  *UserAccessUser `json:"user,omitempty"`
}

// UserAccessUser lists where the user has roles that grant access.
type UserAccessUser struct {
	Projects []RoleRef `json:"projects"`
	Groups   []RoleRef `json:"groups"`
}

// RoleRef is a project or group and the user's roles in it.
type RoleRef struct {
	ID    int64    `json:"id"`
	Roles []string `json:"roles"`
}

// AllowedAgentsForJob is the answer of GET /api/v4/job/allowed_agents.
type AllowedAgentsForJob struct {
	AllowedAgents []AllowedAgent `json:"allowed_agents"`
	Job           IDRef          `json:"job"`
	Pipeline      IDRef          `json:"pipeline"`
	Project       JobProject     `json:"project"`
	User          User           `json:"user"`
	Environment   *Environment   `json:"environment,omitempty"`
}

// AllowedAgent is one agent a CI job may use, with its ci_access entry.
type AllowedAgent struct {
	ID            int64              `json:"id"`
	ConfigProject IDRef              `json:"config_project"`
	Configuration AgentConfiguration `json:"configuration"`
}

// AgentConfiguration is the ci_access entry that authorized the job.
type AgentConfiguration struct {
	DefaultNamespace string      `json:"default_namespace,omitempty"`
	AccessAs         *CIAccessAs `json:"access_as,omitempty"`
}

// CIAccessAs is at most one of Agent, Impersonate and CIJob; none means Agent.
type CIAccessAs struct {
	Agent       *struct{}    `json:"agent,omitempty"`
	Impersonate *Impersonate `json:"impersonate,omitempty"`
	CIJob       *struct{}    `json:"ci_job,omitempty"`
}

// Impersonate is a static identity from the agent's configuration.
type Impersonate struct {
	Username string             `json:"username" yaml:"username"`
	Groups   []string           `json:"groups,omitempty" yaml:"groups,omitempty"`
	UID      string             `json:"uid,omitempty" yaml:"uid,omitempty"`
	Extra    []ImpersonateExtra `json:"extra,omitempty" yaml:"extra,omitempty"`
}

// ImpersonateExtra is one Impersonate-Extra-<Key> header's values.
type ImpersonateExtra struct {
	Key    string   `json:"key" yaml:"key"`
	Values []string `json:"val" yaml:"val"`
}

// JobProject is the CI job's project and its ancestor groups.
type JobProject struct {
	ID     int64   `json:"id"`
	Groups []IDRef `json:"groups"`
}

// Environment is the CI job's deployment environment.
type Environment struct {
	Slug string `json:"slug"`
	Tier string `json:"tier"`
}

// Sentinel errors for the cacheable refusals; Error wraps one of them.
var (
	ErrUnauthorized = errors.New("unauthorized") // 401: the credential is not valid
	ErrForbidden    = errors.New("forbidden")    // 403: valid, but not allowed
	ErrNotFound     = errors.New("not found")    // 404: no such agent/resource
)

// ErrInsufficientScope is GitLab's 403 for a personal access token that
// lacks the scope the call needs (k8s_proxy for authorize_proxy_user): Rails
// answers {"error":"insufficient_scope", "scope": ...}. It wraps
// ErrForbidden, so it is cacheable like any 403.
var ErrInsufficientScope = fmt.Errorf("%w: the token lacks the scope the request needs", ErrForbidden)

// ErrRedirect is a 3xx answer, which kas never follows: the fix is
// gitlab.address. It is not cacheable.
var ErrRedirect = errors.New("GitLab answered with a redirect")

// Error is a refusal or failure from GitLab, naming what was asked.
type Error struct {
	// Op is what kas was doing, e.g. "get agent info".
	Op string
	// URL is the address called (no secrets: tokens travel in headers).
	URL string
	// StatusCode is the HTTP status, 0 for transport failures.
	StatusCode int
	// Message is GitLab's message or the transport error text plus a hint.
	Message string
	// Err is ErrUnauthorized, ErrForbidden, ErrNotFound or the transport error.
	Err error
}

func (e *Error) Error() string {
	if e.StatusCode != 0 {
		return fmt.Sprintf("%s: GitLab at %s answered %d: %s", e.Op, e.URL, e.StatusCode, e.Message)
	}
	return fmt.Sprintf("%s: call GitLab at %s: %s", e.Op, e.URL, e.Message)
}

func (e *Error) Unwrap() error { return e.Err }

// Cacheable reports whether the error is a definite refusal (401, 403, 404)
// that may be cached, as opposed to a network failure or a 5xx.
func Cacheable(err error) bool {
	return errors.Is(err, ErrUnauthorized) || errors.Is(err, ErrForbidden) || errors.Is(err, ErrNotFound)
}
