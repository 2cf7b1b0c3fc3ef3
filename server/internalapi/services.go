package internalapi

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
	"k8s.io/apimachinery/pkg/util/version"

	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/internalapi/gitlabpb"
)

// services are the gRPC services; the JSON routes call the same methods.
type services struct {
	serverInfo *serverInfoService
	tracker    *agentTrackerService
	notify     *notificationsService
	configs    *configurationProjectService
}

type serverInfoService struct {
	gitlabpb.UnimplementedServerInfoServer
	info *gitlabpb.ServerInfo
}

func (s *serverInfoService) GetServerInfo(context.Context, *gitlabpb.GetServerInfoRequest) (*gitlabpb.GetServerInfoResponse, error) {
	return &gitlabpb.GetServerInfoResponse{CurrentServerInfo: proto.CloneOf(s.info)}, nil
}

type agentTrackerService struct {
	gitlabpb.UnimplementedAgentTrackerServer
	registry registry.Registry
	timeout  time.Duration
}

func (s *agentTrackerService) GetConnectedAgentsByAgentIDs(ctx context.Context, req *gitlabpb.GetConnectedAgentsByAgentIDsRequest) (*gitlabpb.GetConnectedAgentsByAgentIDsResponse, error) {
	agents, err := s.byAgentIDs(ctx, req.GetAgentIds())
	if err != nil {
		return nil, err
	}
	return &gitlabpb.GetConnectedAgentsByAgentIDsResponse{Agents: agents}, nil
}

// GetConnectedAgentksByAgentIDs is GetConnectedAgentsByAgentIDs under newer
// GitLab's names; the elements carry the same fields.
func (s *agentTrackerService) GetConnectedAgentksByAgentIDs(ctx context.Context, req *gitlabpb.GetConnectedAgentksByAgentIDsRequest) (*gitlabpb.GetConnectedAgentksByAgentIDsResponse, error) {
	agents, err := s.byAgentIDs(ctx, req.GetAgentIds())
	if err != nil {
		return nil, err
	}
	resp := &gitlabpb.GetConnectedAgentksByAgentIDsResponse{Agents: make([]*gitlabpb.ConnectedAgentk, len(agents))}
	for i, a := range agents {
		resp.Agents[i] = &gitlabpb.ConnectedAgentk{
			AgentMeta:    a.AgentMeta,
			ConnectedAt:  a.ConnectedAt,
			ConnectionId: a.ConnectionId,
			AgentId:      a.AgentId,
			ProjectId:    a.ProjectId,
		}
	}
	return resp, nil
}

func (s *agentTrackerService) GetConnectedAgentsByProjectIDs(ctx context.Context, req *gitlabpb.GetConnectedAgentsByProjectIDsRequest) (*gitlabpb.GetConnectedAgentsByProjectIDsResponse, error) {
	projects, err := idSet("project_ids", req.GetProjectIds())
	if err != nil {
		return nil, err
	}
	if len(projects) == 0 {
		return &gitlabpb.GetConnectedAgentsByProjectIDsResponse{}, nil
	}
	// The registry is keyed by agent, so every connection is listed and
	// filtered here; GitLab asks for a handful of projects at a time.
	tunnels, err := s.tunnels(ctx)
	if err != nil {
		return nil, err
	}
	return &gitlabpb.GetConnectedAgentsByProjectIDsResponse{
		Agents: connectedAgents(tunnels, func(t registry.TunnelInfo) bool { return projects[t.ProjectID] }),
	}, nil
}

func (s *agentTrackerService) byAgentIDs(ctx context.Context, ids []int64) ([]*gitlabpb.ConnectedAgentInfo, error) {
	agents, err := idSet("agent_ids", ids)
	if err != nil {
		return nil, err
	}
	if len(agents) == 0 {
		// Registry.Tunnels with no IDs lists every agent; no IDs asked
		// means none wanted.
		return nil, nil
	}
	tunnels, err := s.tunnels(ctx, slices.Collect(maps.Keys(agents))...)
	if err != nil {
		return nil, err
	}
	return connectedAgents(tunnels, func(t registry.TunnelInfo) bool { return agents[t.AgentID] }), nil
}

func (s *agentTrackerService) tunnels(ctx context.Context, agentIDs ...int64) ([]registry.TunnelInfo, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	tunnels, err := s.registry.Tunnels(ctx, agentIDs...)
	if err != nil {
		return nil, callError(ctx, codes.Unavailable, fmt.Errorf("list connected agents: %w", err))
	}
	return tunnels, nil
}

// idSet checks that every ID is positive and returns them as a set, which
// also drops duplicates.
func idSet(field string, ids []int64) (map[int64]bool, error) {
	set := make(map[int64]bool, len(ids))
	for i, id := range ids {
		if id <= 0 {
			return nil, status.Errorf(codes.InvalidArgument, "%s[%d] is %d; IDs are positive", field, i, id)
		}
		set[id] = true
	}
	return set, nil
}

// connectedAgents converts the tunnels keep accepts, ordered by agent
// and connection so answers are stable.
func connectedAgents(tunnels []registry.TunnelInfo, keep func(registry.TunnelInfo) bool) []*gitlabpb.ConnectedAgentInfo {
	var agents []*gitlabpb.ConnectedAgentInfo
	for _, t := range tunnels {
		if keep(t) {
			agents = append(agents, connectedAgent(t))
		}
	}
	slices.SortFunc(agents, func(a, b *gitlabpb.ConnectedAgentInfo) int {
		return cmp.Or(cmp.Compare(a.AgentId, b.AgentId), cmp.Compare(a.ConnectionId, b.ConnectionId))
	})
	return agents
}

func connectedAgent(t registry.TunnelInfo) *gitlabpb.ConnectedAgentInfo {
	info := &gitlabpb.ConnectedAgentInfo{
		AgentMeta: &gitlabpb.AgentMeta{
			Version:           t.AgentVersion,
			CommitId:          t.AgentCommit,
			PodNamespace:      t.PodNamespace,
			PodName:           t.PodName,
			KubernetesVersion: kubernetesVersion(t.KubernetesVersion),
		},
		ConnectionId: t.ConnectionID,
		AgentId:      t.AgentID,
		ProjectId:    t.ProjectID,
	}
	if !t.ConnectedAt.IsZero() {
		info.ConnectedAt = timestamppb.New(t.ConnectedAt)
	}
	return info
}

// kubernetesVersion splits the version agentk reports (the API server's
// gitVersion, e.g. v1.31.2-gke.1000) into the parts GitLab shows.
func kubernetesVersion(gitVersion string) *gitlabpb.KubernetesVersion {
	if gitVersion == "" {
		return nil
	}
	kv := &gitlabpb.KubernetesVersion{GitVersion: gitVersion}
	if v, err := version.ParseGeneric(gitVersion); err == nil {
		kv.Major = strconv.FormatUint(uint64(v.Major()), 10)
		kv.Minor = strconv.FormatUint(uint64(v.Minor()), 10)
	}
	return kv
}

type notificationsService struct {
	gitlabpb.UnimplementedNotificationsServer
	pushes *pushQueue // nil: nobody listens
}

func (s *notificationsService) GitPushEvent(_ context.Context, req *gitlabpb.GitPushEventRequest) (*gitlabpb.GitPushEventResponse, error) {
	project := req.GetEvent().GetProject()
	if project.GetId() <= 0 {
		return nil, status.Errorf(codes.InvalidArgument, "event.project.id must be a positive project ID, got %d", project.GetId())
	}
	if s.pushes != nil {
		s.pushes.enqueue(project.GetId(), project.GetFullPath())
	}
	return &gitlabpb.GitPushEventResponse{}, nil
}

type configurationProjectService struct {
	gitlabpb.UnimplementedConfigurationProjectServer
	lister  ConfigFileLister // nil: no source of configuration files
	timeout time.Duration
}

func (s *configurationProjectService) ListAgentConfigFiles(ctx context.Context, req *gitlabpb.ListAgentConfigFilesRequest) (*gitlabpb.ListAgentConfigFilesResponse, error) {
	project, err := configProject(req.GetRepository())
	if err != nil {
		return nil, err
	}
	return s.list(ctx, project)
}

func (s *configurationProjectService) list(ctx context.Context, project ConfigProject) (*gitlabpb.ListAgentConfigFilesResponse, error) {
	if s.lister == nil {
		return nil, status.Error(codes.Unimplemented, "this kas has no source of agent configuration files to list")
	}
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	files, err := s.lister.ListAgentConfigFiles(ctx, project)
	if err != nil {
		code := codes.Unavailable
		if errors.Is(err, ErrProjectNotFound) {
			code = codes.NotFound
		}
		return nil, callError(ctx, code, fmt.Errorf("list agent configuration files of project %s: %w", project, err))
	}
	resp := &gitlabpb.ListAgentConfigFilesResponse{}
	for _, f := range files {
		resp.ConfigFiles = append(resp.ConfigFiles, &gitlabpb.AgentConfigFile{Name: f.Path, AgentName: f.AgentName})
	}
	slices.SortFunc(resp.ConfigFiles, func(a, b *gitlabpb.AgentConfigFile) int {
		return strings.Compare(a.AgentName, b.AgentName)
	})
	return resp, nil
}

// String names the project in messages: its path, else its ID.
func (p ConfigProject) String() string {
	switch {
	case p.Path != "" && p.ID != 0:
		return fmt.Sprintf("%s (ID %d)", p.Path, p.ID)
	case p.Path != "":
		return p.Path
	default:
		return strconv.FormatInt(p.ID, 10)
	}
}

// configProject reads the project from the Gitaly repository GitLab sends:
// gl_repository is "project-<ID>" for a project's repository.
func configProject(repo *gitlabpb.GitalyRepository) (ConfigProject, error) {
	p := ConfigProject{Path: repo.GetGlProjectPath()}
	if gl := repo.GetGlRepository(); gl != "" {
		digits, ok := strings.CutPrefix(gl, "project-")
		id, err := strconv.ParseInt(digits, 10, 64)
		if !ok || err != nil || id <= 0 {
			return ConfigProject{}, status.Errorf(codes.InvalidArgument, "repository.gl_repository %.64q is not a project's repository (want project-<ID>)", gl)
		}
		p.ID = id
	}
	if p.ID == 0 && p.Path == "" {
		return ConfigProject{}, status.Error(codes.InvalidArgument, "repository must name the project: gl_repository (project-<ID>) or gl_project_path")
	}
	return p, nil
}

// callError turns a failure of the call's work into a status: the
// context's own code when the deadline passed or the caller went away,
// else code.
func callError(ctx context.Context, code codes.Code, err error) error {
	if ctxErr := ctx.Err(); ctxErr != nil {
		code = status.FromContextError(ctxErr).Code()
	}
	return status.Error(code, err.Error())
}
