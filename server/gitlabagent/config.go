package gitlabagent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/kasproject/kas/server/gitlabagent/agentkpb"
)

// configVersion is one configuration as agentk receives it.
type configVersion struct {
	commitID string
	msg      *agentkpb.ConfigurationResponse
}

type configurationService struct {
	agentkpb.UnimplementedAgentConfigurationServer
	c *Conn
}

// GetConfiguration streams the agent's configuration: the current one
// unless agentk already has it (same commit_id), then every new one,
// until the connection drains or agentk goes away. It also records what
// agentk says about itself.
func (s configurationService) GetConfiguration(req *agentkpb.ConfigurationRequest, stream grpc.ServerStreamingServer[agentkpb.ConfigurationResponse]) error {
	c := s.c
	c.setMeta(req.GetAgentMeta())
	last := req.GetCommitId()
	ctx := stream.Context()
	for {
		c.mu.Lock()
		cfg, changed := c.config, c.configChanged
		c.mu.Unlock()
		if cfg != nil && cfg.commitID != last {
			if err := stream.Send(cfg.msg); err != nil {
				return err
			}
			last = cfg.commitID
		}
		select {
		case <-changed:
		case <-c.drainCh:
			return nil // agentk asks again, on a new connection
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// ReceiveConfiguration takes a new configuration of the agent (from
// agentconfig.Manager) and hands it to the connection's GetConfiguration
// streams. A configuration agentk would refuse is logged and not sent:
// agentk keeps its last one.
func (c *Conn) ReceiveConfiguration(_ context.Context, _ []byte, doc json.RawMessage) error {
	c.mu.Lock()
	agent := c.agent
	c.mu.Unlock()
	if agent == nil {
		return errors.New("the connection has no agent yet")
	}
	projectPath, _ := agent.GitalyRepository["gl_project_path"].(string)
	msg, err := agentConfiguration(doc, agent.AgentID, agent.ProjectID, projectPath, c.srv.opts.GitLabExternalURL)
	if err != nil {
		c.logger().Warn("Config: failed to send to agent; GitLab's agentk keeps its last configuration", "error", err.Error())
		return nil // nothing to retry until the file changes
	}
	c.mu.Lock()
	if c.config == nil || c.config.commitID != msg.CommitId {
		c.config = &configVersion{commitID: msg.CommitId, msg: msg}
		close(c.configChanged)
		c.configChanged = make(chan struct{})
	}
	c.mu.Unlock()
	return nil
}

// agentConfiguration converts an agent's configuration file (as JSON) to
// what GitLab's agentk receives: the sections that concern agentk, who the
// agent is, and GitLab's external URL. Its commit_id is a digest of all
// that, so agentk resuming with it is sent nothing until something changes.
func agentConfiguration(doc json.RawMessage, agentID, projectID int64, projectPath, gitlabExternalURL string) (*agentkpb.ConfigurationResponse, error) {
	var file agentkpb.ConfigurationFile
	// Sections agentk does not know (user_access, kas's own) are not its business.
	if err := (protojson.UnmarshalOptions{DiscardUnknown: true}).Unmarshal(doc, &file); err != nil {
		return nil, fmt.Errorf("configuration file does not fit GitLab's agentk: %w", err)
	}
	if err := validateFile(&file); err != nil {
		return nil, fmt.Errorf("configuration GitLab's agentk would refuse: %w", err)
	}
	cfg := &agentkpb.AgentConfiguration{
		Gitops:            file.Gitops,
		Observability:     file.Observability,
		AgentId:           agentID,
		ProjectId:         projectID,
		CiAccess:          file.CiAccess,
		ContainerScanning: file.ContainerScanning,
		ProjectPath:       projectPath,
		RemoteDevelopment: file.RemoteDevelopment,
		Flux:              file.Flux,
		GitlabExternalUrl: gitlabExternalURL,
	}
	encoded, err := (protojson.MarshalOptions{}).Marshal(cfg)
	if err != nil {
		return nil, fmt.Errorf("encode configuration: %w", err)
	}
	digest := sha256.Sum256(encoded)
	return &agentkpb.ConfigurationResponse{Configuration: cfg, CommitId: hex.EncodeToString(digest[:20])}, nil
}

// validateFile checks the rules GitLab's agentk checks on the
// configuration it receives (its protoc-gen-validate annotations), so kas
// never sends one agentk would refuse. Every problem is reported, by path.
func validateFile(f *agentkpb.ConfigurationFile) error {
	var problems []string
	add := func(format string, args ...any) { problems = append(problems, fmt.Sprintf(format, args...)) }
	nonEmpty := func(path, v string) {
		if v == "" {
			add("%s must not be empty", path)
		}
	}
	oneOf := func(path, v string, allowed ...string) {
		if !slices.Contains(allowed, v) {
			add("%s is %q; want one of %q", path, v, allowed[1:])
		}
	}
	positive := func(path string, d *durationpb.Duration) {
		if d != nil && d.AsDuration() <= 0 {
			add("%s must be more than 0", path)
		}
	}
	for i, p := range f.GetGitops().GetManifestProjects() {
		path := fmt.Sprintf("gitops.manifest_projects[%d]", i)
		if p.Id != nil {
			nonEmpty(path+".id", p.GetId())
		}
		for j, g := range p.GetPaths() {
			nonEmpty(fmt.Sprintf("%s.paths[%d].glob", path, j), g.GetGlob())
		}
		oneOf(path+".dry_run_strategy", p.GetDryRunStrategy(), "", "none", "client", "server")
		oneOf(path+".prune_propagation_policy", p.GetPrunePropagationPolicy(), "", "orphan", "background", "foreground")
		oneOf(path+".inventory_policy", p.GetInventoryPolicy(), "", "must_match", "adopt_if_no_inventory", "adopt_all")
		if ref := p.GetRef(); ref != nil {
			switch r := ref.Ref.(type) {
			case nil:
				add("%s.ref must name a tag, a branch or a commit", path)
			case *agentkpb.GitRefCF_Tag:
				nonEmpty(path+".ref.tag", r.Tag)
			case *agentkpb.GitRefCF_Branch:
				nonEmpty(path+".ref.branch", r.Branch)
			case *agentkpb.GitRefCF_Commit:
				nonEmpty(path+".ref.commit", r.Commit)
			}
		}
	}
	type ciEntry interface {
		GetId() string
		GetAccessAs() *agentkpb.CiAccessAsCF
		GetEnvironments() []string
	}
	checkCI := func(path string, e ciEntry) {
		nonEmpty(path+".id", e.GetId())
		for j, env := range e.GetEnvironments() {
			nonEmpty(fmt.Sprintf("%s.environments[%d]", path, j), env)
		}
		as := e.GetAccessAs()
		if as == nil {
			return
		}
		switch a := as.As.(type) {
		case nil:
			add("%s.access_as must be one of agent, impersonate and ci_job", path)
		case *agentkpb.CiAccessAsCF_Impersonate:
			nonEmpty(path+".access_as.impersonate.username", a.Impersonate.GetUsername())
			for j, g := range a.Impersonate.GetGroups() {
				nonEmpty(fmt.Sprintf("%s.access_as.impersonate.groups[%d]", path, j), g)
			}
			for j, kv := range a.Impersonate.GetExtra() {
				kp := fmt.Sprintf("%s.access_as.impersonate.extra[%d]", path, j)
				nonEmpty(kp+".key", kv.GetKey())
				if len(kv.GetVal()) == 0 {
					add("%s.val must list at least one value", kp)
				}
				for k, v := range kv.GetVal() {
					nonEmpty(fmt.Sprintf("%s.val[%d]", kp, k), v)
				}
			}
		}
	}
	for i, p := range f.GetCiAccess().GetProjects() {
		checkCI(fmt.Sprintf("ci_access.projects[%d]", i), p)
	}
	for i, g := range f.GetCiAccess().GetGroups() {
		checkCI(fmt.Sprintf("ci_access.groups[%d]", i), g)
	}
	if cs := f.GetContainerScanning(); cs != nil {
		nonEmpty("container_scanning.cadence", cs.GetCadence())
	}
	if rd := f.GetRemoteDevelopment(); rd != nil {
		positive("remote_development.partial_sync_interval", rd.GetPartialSyncInterval())
		positive("remote_development.full_sync_interval", rd.GetFullSyncInterval())
	}
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "; "))
	}
	return nil
}
