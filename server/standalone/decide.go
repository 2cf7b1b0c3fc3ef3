package standalone

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
	"net/http"
	"slices"
	"strings"

	"github.com/kasproject/kas/server/agentyaml"
	"github.com/kasproject/kas/server/gitlab"
)

// What each decision is called in errors, as the Rails client calls them.
const (
	opGetAgentInfo           = "get agent info"
	opAuthorizeProxyUser     = "authorize proxy user"
	opGetAllowedAgentsForJob = "get allowed agents for job"
)

// authorizedEntityLimit is how many projects, and how many groups, of one
// ci_access or user_access section GitLab takes into account.
const authorizedEntityLimit = 500

// GetAgentInfo identifies the agent that owns agentToken.
func (b *Backend) GetAgentInfo(ctx context.Context, agentToken string) (*gitlab.AgentInfo, error) {
	st, err := b.begin(ctx, opGetAgentInfo)
	if err != nil {
		return nil, err
	}
	a := st.agentsByToken[sha256.Sum256([]byte(agentToken))]
	if a == nil {
		return nil, b.refuse(opGetAgentInfo, http.StatusUnauthorized,
			"401 Unauthorized: no agent has this token (agents[].token_sha256 in "+b.file+")")
	}
	return &gitlab.AgentInfo{
		ProjectID:     a.project.id,
		AgentID:       a.id,
		AgentName:     a.name,
		DefaultBranch: a.project.defaultBranch,
	}, nil
}

// AuthorizeProxyUser decides whether a user, by personal access token or
// session cookie, may use an agent through the Kubernetes API proxy, and as whom.
func (b *Backend) AuthorizeProxyUser(ctx context.Context, req gitlab.AuthorizeProxyUserRequest) (*gitlab.AuthorizeProxyUserResponse, error) {
	const op = opAuthorizeProxyUser
	st, err := b.begin(ctx, op)
	if err != nil {
		return nil, err
	}
	// Rails resolves the user before the agent: a bad credential is 401 even
	// for an agent that does not exist.
	u, err := b.proxyUser(st, req)
	if err != nil {
		return nil, err
	}
	a := st.agentsByID[req.AgentID]
	if a == nil {
		return nil, b.refuse(op, http.StatusNotFound, fmt.Sprintf("404 Not found: no agent with id %d", req.AgentID))
	}
	cfg, err := b.agentConfig(op, a)
	if err != nil {
		return nil, err
	}
	access := cfg.UserAccess
	if access == nil {
		return nil, b.refuse(op, http.StatusForbidden, "`user_access` keyword is not found in agent config file.")
	}
	if access.AccessAs == nil || (access.AccessAs.Agent == nil && access.AccessAs.User == nil) {
		return nil, b.refuse(op, http.StatusForbidden, "`access_as` is not found under the `user_access` keyword.")
	}
	projects := authorizedProjects(st, a, u, access.Projects)
	groups := authorizedGroups(st, a, u, access.Groups)
	if len(projects)+len(groups) == 0 {
		return nil, b.refuse(op, http.StatusForbidden, "You must be a member of `projects` or `groups` under the `user_access` keyword.")
	}
	resp := &gitlab.AuthorizeProxyUserResponse{
		Agent: gitlab.AuthorizedAgent{ID: a.id, ConfigProject: gitlab.IDRef{ID: a.project.id}},
		User:  gitlab.User{ID: u.id, Username: u.username},
	}
	if access.AccessAs.Agent != nil {
		resp.AccessAs.Agent = &struct{}{}
	} else {
		resp.AccessAs.User = &gitlab.UserAccessUser{Projects: projects, Groups: groups}
	}
	return resp, nil
}

// proxyUser resolves the credential of an AuthorizeProxyUser request.
func (b *Backend) proxyUser(st *state, req gitlab.AuthorizeProxyUserRequest) (*user, error) {
	const op = opAuthorizeProxyUser
	switch req.AccessType {
	case gitlab.AccessTypePersonalAccessToken:
		t := st.tokens[sha256.Sum256([]byte(req.AccessKey))]
		if t == nil {
			return nil, b.refuse(op, http.StatusUnauthorized,
				"401 Unauthorized: no user has this personal access token (users[].personal_access_tokens in "+b.file+")")
		}
		if !slices.Contains(t.scopes, k8sProxyScope) {
			return nil, &gitlab.Error{Op: op, URL: b.url, StatusCode: http.StatusForbidden, Err: gitlab.ErrInsufficientScope,
				Message: "insufficient_scope: the personal access token needs the " + k8sProxyScope + " scope"}
		}
		return t.user, nil
	case gitlab.AccessTypeSessionCookie:
		s := st.sessions[sha256.Sum256([]byte(req.AccessKey))]
		if s == nil {
			return nil, b.refuse(op, http.StatusUnauthorized, "Invalid session")
		}
		csrf := sha256.Sum256([]byte(req.CSRFToken))
		if req.CSRFToken == "" || subtle.ConstantTimeCompare(csrf[:], s.csrfTokenHash[:]) != 1 {
			return nil, b.refuse(op, http.StatusUnauthorized, "CSRF token does not match")
		}
		return s.user, nil
	default:
		return nil, &gitlab.Error{
			Op: op, URL: b.url, StatusCode: http.StatusBadRequest,
			Message: "access_type does not have a valid value",
			Err: fmt.Errorf("unknown access type %q: want %s or %s",
				req.AccessType, gitlab.AccessTypePersonalAccessToken, gitlab.AccessTypeSessionCookie),
		}
	}
}

// authorizedProjects lists the user_access projects that authorize u: those in
// the agent's top-level group where u has at least the Developer role.
func authorizedProjects(st *state, a *agent, u *user, refs []agentyaml.Ref) []gitlab.RoleRef {
	out := []gitlab.RoleRef{}
	seen := make(map[*project]bool)
	for _, ref := range refs[:min(len(refs), authorizedEntityLimit)] {
		p := st.projects[strings.ToLower(ref.ID)]
		if p == nil || seen[p] || p.group.topLevel() != a.project.group.topLevel() {
			continue
		}
		seen[p] = true
		if level := u.projectAccess(p); level >= developerAccess {
			out = append(out, gitlab.RoleRef{ID: p.id, Roles: rolesUpTo(level)})
		}
	}
	return out
}

// authorizedGroups lists the user_access groups that authorize u: those in the
// agent's top-level group where u has at least the Developer role.
func authorizedGroups(st *state, a *agent, u *user, refs []agentyaml.Ref) []gitlab.RoleRef {
	out := []gitlab.RoleRef{}
	seen := make(map[*group]bool)
	for _, ref := range refs[:min(len(refs), authorizedEntityLimit)] {
		g := st.groups[strings.ToLower(ref.ID)]
		if g == nil || seen[g] || g.topLevel() != a.project.group.topLevel() {
			continue
		}
		seen[g] = true
		if level := u.groupAccess(g); level >= developerAccess {
			out = append(out, gitlab.RoleRef{ID: g.id, Roles: rolesUpTo(level)})
		}
	}
	return out
}

// GetAllowedAgentsForJob lists the agents a CI job token may use.
func (b *Backend) GetAllowedAgentsForJob(ctx context.Context, jobToken string) (*gitlab.AllowedAgentsForJob, error) {
	st, err := b.begin(ctx, opGetAllowedAgentsForJob)
	if err != nil {
		return nil, err
	}
	job := st.jobs[sha256.Sum256([]byte(jobToken))]
	if job == nil {
		return nil, b.refuse(opGetAllowedAgentsForJob, http.StatusUnauthorized,
			"401 Unauthorized: no CI job has this token (ci_jobs[].token_sha256 in "+b.file+")")
	}
	allowed, err := b.allowedAgents(st, job)
	if err != nil {
		return nil, err
	}
	var groups []gitlab.IDRef
	for g := job.project.group; g != nil; g = g.parent {
		groups = append(groups, gitlab.IDRef{ID: g.id})
	}
	slices.Reverse(groups) // top-level group first, as GitLab lists them
	resp := &gitlab.AllowedAgentsForJob{
		AllowedAgents: allowed,
		Job:           gitlab.IDRef{ID: job.id},
		Pipeline:      gitlab.IDRef{ID: job.pipelineID},
		Project:       gitlab.JobProject{ID: job.project.id, Groups: groups},
		User:          gitlab.User{ID: job.user.id, Username: job.user.username},
	}
	if env := job.environment; env != nil {
		resp.Environment = &gitlab.Environment{Slug: env.Slug, Tier: env.Tier}
	}
	return resp, nil
}

// ciAuthorization is one reason an agent may be used by a CI job: a
// ci_access entry, or nil for the implicit authorization of the agent's
// configuration project.
type ciAuthorization struct {
	agent *agent
	entry *agentyaml.CIAccessEntry
}

// allowedAgents follows GitLab's CiAccess::Finder and FilterService: per
// agent the most specific authorization wins (project entry, then the
// implicit one, then the closest group), and only then are environments and
// protected refs checked, so a winning entry that does not apply to this job
// hides the agent even if a less specific one would have.
func (b *Backend) allowedAgents(st *state, job *ciJob) ([]gitlab.AllowedAgent, error) {
	var byProject, implicit, byGroup []ciAuthorization
	for _, a := range st.agents {
		if a.project == job.project {
			implicit = append(implicit, ciAuthorization{agent: a})
		}
		if a.project.group.topLevel() != job.project.group.topLevel() {
			continue // GitLab ignores ci_access entries outside the agent's top-level group
		}
		cfg, err := b.agentConfig(opGetAllowedAgentsForJob, a)
		if err != nil {
			return nil, err
		}
		if cfg.CIAccess == nil {
			continue
		}
		if e := findEntry(cfg.CIAccess.Projects, job.project.path); e != nil {
			byProject = append(byProject, ciAuthorization{agent: a, entry: e})
		}
		for g := job.project.group; g != nil; g = g.parent {
			if e := findEntry(cfg.CIAccess.Groups, g.path); e != nil {
				byGroup = append(byGroup, ciAuthorization{agent: a, entry: e})
				break
			}
		}
	}
	envName := ""
	if job.environment != nil {
		envName = job.environment.Name
	}
	allowed := []gitlab.AllowedAgent{}
	decided := make(map[*agent]bool)
	for _, auth := range slices.Concat(byProject, implicit, byGroup) {
		if decided[auth.agent] {
			continue
		}
		decided[auth.agent] = true
		if e := auth.entry; e != nil && (!e.MatchesEnvironment(envName) || e.ProtectedBranchesOnly && !job.protectedRef) {
			continue
		}
		allowed = append(allowed, gitlab.AllowedAgent{
			ID:            auth.agent.id,
			ConfigProject: gitlab.IDRef{ID: auth.agent.project.id},
			Configuration: configuration(auth.entry),
		})
	}
	return allowed, nil
}

// findEntry returns the first of the entries GitLab considers that names p.
func findEntry(entries []agentyaml.CIAccessEntry, p string) *agentyaml.CIAccessEntry {
	for i := range entries[:min(len(entries), authorizedEntityLimit)] {
		if strings.EqualFold(entries[i].ID, p) {
			return &entries[i]
		}
	}
	return nil
}

// configuration is what GitLab returns of a ci_access entry: its
// default_namespace and access_as (copied: the entry is shared). The implicit
// authorization has an empty configuration.
func configuration(e *agentyaml.CIAccessEntry) gitlab.AgentConfiguration {
	if e == nil {
		return gitlab.AgentConfiguration{}
	}
	c := gitlab.AgentConfiguration{DefaultNamespace: e.DefaultNamespace}
	if as := e.AccessAs; as != nil {
		c.AccessAs = &gitlab.CIAccessAs{}
		if as.Agent != nil {
			c.AccessAs.Agent = &struct{}{}
		}
		if as.CIJob != nil {
			c.AccessAs.CIJob = &struct{}{}
		}
		if imp := as.Impersonate; imp != nil {
			c.AccessAs.Impersonate = &gitlab.Impersonate{
				Username: imp.Username,
				Groups:   slices.Clone(imp.Groups),
				UID:      imp.UID,
			}
			for _, extra := range imp.Extra {
				c.AccessAs.Impersonate.Extra = append(c.AccessAs.Impersonate.Extra,
					gitlab.ImpersonateExtra{Key: extra.Key, Values: slices.Clone(extra.Values)})
			}
		}
	}
	return c
}
