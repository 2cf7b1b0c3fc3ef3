package gitlab

import (
	"errors"
	"fmt"
	"strings"
)

// ErrContract is a 2xx answer that lacks a field the contract requires (an
// agent without a positive agent_id, a job without a job): kas cannot act
// on it, GitLab (or whatever answers in its place) is at fault, and the
// answer is not cached.
var ErrContract = errors.New("GitLab's answer breaks the contract")

// validator is an answer that can check its required fields; call runs it
// on every 2xx answer before anyone caches or uses it.
type validator interface {
	validate() error
}

// The required fields follow GitLab's own KAS, which validates the same
// answers (internal/gitlab/api/api.proto's validation rules), with IDs held
// to being positive: GitLab's IDs are. gitaly_info and gitaly_repository,
// which GitLab's KAS requires, are not: kas reads agents' configuration
// through the REST API, not Gitaly.

func (a *AgentInfo) validate() error {
	var errs []error
	if a.AgentID <= 0 {
		errs = append(errs, errors.New("agent_id is missing or not positive"))
	}
	if a.ProjectID <= 0 {
		errs = append(errs, errors.New("project_id is missing or not positive"))
	}
	if a.AgentName == "" {
		errs = append(errs, errors.New("agent_name is missing"))
	}
	if a.DefaultBranch == "" {
		errs = append(errs, errors.New("default_branch is missing"))
	}
	return joinProblems(errs)
}

func (r *AuthorizeProxyUserResponse) validate() error {
	var errs []error
	if r.Agent.ID <= 0 {
		errs = append(errs, errors.New("agent.id is missing or not positive"))
	}
	if r.Agent.ConfigProject.ID <= 0 {
		errs = append(errs, errors.New("agent.config_project.id is missing or not positive"))
	}
	errs = append(errs, r.User.validate("user"))
	if (r.AccessAs.Agent != nil) == (r.AccessAs.User != nil) {
		errs = append(errs, errors.New("access_as must hold exactly one of agent and user"))
	}
	return joinProblems(errs)
}

func (j *AllowedAgentsForJob) validate() error {
	var errs []error
	for i, a := range j.AllowedAgents {
		if a.ID <= 0 {
			errs = append(errs, fmt.Errorf("allowed_agents[%d].id is missing or not positive", i))
		}
		if a.ConfigProject.ID <= 0 {
			errs = append(errs, fmt.Errorf("allowed_agents[%d].config_project.id is missing or not positive", i))
		}
	}
	if j.Job.ID <= 0 {
		errs = append(errs, errors.New("job.id is missing or not positive"))
	}
	if j.Pipeline.ID <= 0 {
		errs = append(errs, errors.New("pipeline.id is missing or not positive"))
	}
	if j.Project.ID <= 0 {
		errs = append(errs, errors.New("project.id is missing or not positive"))
	}
	errs = append(errs, j.User.validate("user"))
	if e := j.Environment; e != nil && (e.Slug == "" || e.Tier == "") {
		errs = append(errs, errors.New("environment is present without both slug and tier"))
	}
	return joinProblems(errs)
}

func (u *User) validate(field string) error {
	var errs []error
	if u.ID <= 0 {
		errs = append(errs, fmt.Errorf("%s.id is missing or not positive", field))
	}
	if u.Username == "" {
		errs = append(errs, fmt.Errorf("%s.username is missing", field))
	}
	return joinProblems(errs)
}

// joinProblems joins the non-nil errors into one line, "; "-separated, for
// one log line per answer; nil if there are none.
func joinProblems(errs []error) error {
	var msgs []string
	for _, err := range errs {
		if err != nil {
			msgs = append(msgs, err.Error())
		}
	}
	if len(msgs) == 0 {
		return nil
	}
	return errors.New(strings.Join(msgs, "; "))
}
