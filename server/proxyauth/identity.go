package proxyauth

import (
	"errors"
	"fmt"
	"slices"
	"strconv"

	"github.com/kasproject/kas/protocol"
	"github.com/kasproject/kas/server/gitlab"
)

// Extra keys GitLab documents on impersonated identities ("Impersonate the
// CI/CD job that accesses the cluster" and "User impersonation workflow" in
// GitLab's agent documentation). RBAC rules and admission policies match on
// them, so the spelling is part of the contract.
const (
	extraAgentID         = "agent.gitlab.com/id"
	extraConfigProjectID = "agent.gitlab.com/config_project_id"
	extraProjectID       = "agent.gitlab.com/project_id"
	extraPipelineID      = "agent.gitlab.com/ci_pipeline_id"
	extraJobID           = "agent.gitlab.com/ci_job_id"
	extraUsername        = "agent.gitlab.com/username"
	extraEnvironmentSlug = "agent.gitlab.com/environment_slug"
	extraEnvironmentTier = "agent.gitlab.com/environment_tier"
	extraAccessType      = "agent.gitlab.com/access_type"
)

// jobIdentity is whom the agent impersonates for a CI job, from the
// access_as of the ci_access entry that let the job use agent; nil means the
// agent's own service account.
func jobIdentity(job *gitlab.AllowedAgentsForJob, agent *gitlab.AllowedAgent) (*protocol.Identity, error) {
	as := agent.Configuration.AccessAs
	if as == nil {
		return nil, nil
	}
	set := 0
	for _, isSet := range []bool{as.Agent != nil, as.Impersonate != nil, as.CIJob != nil} {
		if isSet {
			set++
		}
	}
	switch {
	case set > 1:
		return nil, fmt.Errorf("ci_access access_as of agent %d sets %d of agent, impersonate and ci_job; at most one is allowed", agent.ID, set)
	case as.Impersonate != nil:
		return staticIdentity(as.Impersonate, agent.ID)
	case as.CIJob != nil:
		return ciJobIdentity(job, agent), nil
	default: // agent: {} or an empty access_as
		return nil, nil
	}
}

// staticIdentity is access_as impersonate: the configured identity as is.
func staticIdentity(imp *gitlab.Impersonate, agentID int64) (*protocol.Identity, error) {
	if imp.Username == "" {
		return nil, fmt.Errorf("ci_access access_as impersonate of agent %d has no username; Kubernetes requires one", agentID)
	}
	id := &protocol.Identity{
		Username: imp.Username,
		UID:      imp.UID,
		// A copy: the identity must not share memory with the configuration.
		Groups: slices.Clone(imp.Groups),
	}
	for _, e := range imp.Extra {
		if len(e.Values) == 0 {
			continue
		}
		if id.Extra == nil {
			id.Extra = make(map[string][]string, len(imp.Extra))
		}
		id.Extra[e.Key] = append(id.Extra[e.Key], e.Values...)
	}
	return id, nil
}

// ciJobIdentity is access_as ci_job, in the order GitLab documents:
// gitlab:ci_job; per project group (outermost first, as GitLab lists them)
// gitlab:group:<id> and, in an environment, gitlab:group_env_tier:<id>:<tier>;
// then gitlab:project:<id>, gitlab:project_env:<id>:<slug> and
// gitlab:project_env_tier:<id>:<tier>. An environment's slug and tier each
// add their groups and extras only when GitLab gives them, so no group ends
// in an empty segment.
func ciJobIdentity(job *gitlab.AllowedAgentsForJob, agent *gitlab.AllowedAgent) *protocol.Identity {
	var slug, tier string
	if job.Environment != nil {
		slug, tier = job.Environment.Slug, job.Environment.Tier
	}
	project := job.Project.ID
	groups := make([]string, 0, 4+2*len(job.Project.Groups))
	groups = append(groups, "gitlab:ci_job")
	for _, g := range job.Project.Groups {
		groups = append(groups, fmt.Sprintf("gitlab:group:%d", g.ID))
		if tier != "" {
			groups = append(groups, fmt.Sprintf("gitlab:group_env_tier:%d:%s", g.ID, tier))
		}
	}
	groups = append(groups, fmt.Sprintf("gitlab:project:%d", project))
	if slug != "" {
		groups = append(groups, fmt.Sprintf("gitlab:project_env:%d:%s", project, slug))
	}
	if tier != "" {
		groups = append(groups, fmt.Sprintf("gitlab:project_env_tier:%d:%s", project, tier))
	}

	extra := map[string][]string{
		extraAgentID:         {itoa(agent.ID)},
		extraConfigProjectID: {itoa(agent.ConfigProject.ID)},
		extraProjectID:       {itoa(project)},
		extraPipelineID:      {itoa(job.Pipeline.ID)},
		extraJobID:           {itoa(job.Job.ID)},
		extraUsername:        {job.User.Username},
	}
	if slug != "" {
		extra[extraEnvironmentSlug] = []string{slug}
	}
	if tier != "" {
		extra[extraEnvironmentTier] = []string{tier}
	}
	return &protocol.Identity{
		Username: fmt.Sprintf("gitlab:ci_job:%d", job.Job.ID),
		Groups:   groups,
		Extra:    extra,
	}
}

// userIdentity is whom the agent impersonates for a user (personal access
// token or session): nil for access_as agent; for access_as user,
// gitlab:user:<username> in gitlab:user plus one
// gitlab:project_role:<id>:<role> per project role, then one
// gitlab:group_role:<id>:<role> per group role, in GitLab's order.
func userIdentity(resp *gitlab.AuthorizeProxyUserResponse, kind Kind) (*protocol.Identity, error) {
	as := resp.AccessAs
	switch {
	case as.Agent != nil && as.User != nil:
		return nil, errors.New("GitLab's access_as sets both agent and user; exactly one is allowed")
	case as.Agent != nil:
		return nil, nil
	case as.User == nil:
		return nil, errors.New("GitLab's access_as sets neither agent nor user")
	case resp.User.Username == "":
		return nil, errors.New("GitLab's answer for access_as user has no username")
	}
	groups := []string{"gitlab:user"}
	for _, p := range as.User.Projects {
		for _, role := range p.Roles {
			groups = append(groups, fmt.Sprintf("gitlab:project_role:%d:%s", p.ID, role))
		}
	}
	for _, g := range as.User.Groups {
		for _, role := range g.Roles {
			groups = append(groups, fmt.Sprintf("gitlab:group_role:%d:%s", g.ID, role))
		}
	}
	return &protocol.Identity{
		Username: "gitlab:user:" + resp.User.Username,
		Groups:   groups,
		Extra: map[string][]string{
			extraAgentID:         {itoa(resp.Agent.ID)},
			extraUsername:        {resp.User.Username},
			extraConfigProjectID: {itoa(resp.Agent.ConfigProject.ID)},
			extraAccessType:      {string(kind)},
		},
	}, nil
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }
