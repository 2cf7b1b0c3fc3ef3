// Package gitlabpb holds the protobuf messages and gRPC services of
// GitLab's KAS internal API (gitlab.agent.*), as kas declares them: the
// package, service, method, message and field names and numbers GitLab
// Rails' Gitlab::Kas::Client uses, limited to the fields kas reads or
// fills. The .proto files are kas's own; the Go code is generated from them.
//
// Message names are GitLab's fully-qualified ones, so reflection clients
// and grpcurl describe what GitLab describes: GetServerInfoResponse's
// current_server_info is a gitlab.agent.server_info.ServerInfo, and
// GetConnectedAgentksByAgentIDs takes and returns
// gitlab.agent.agent_tracker.rpc.GetConnectedAgentksByAgentIDs{Request,Response}
// with gitlab.agent.agent_tracker.rpc.ConnectedAgentk elements (GitLab 18.6's
// names), while GetConnectedAgentsByAgentIDs and ...ByProjectIDs keep
// GitLab 17's GetConnectedAgentsBy{Agent,Project}IDs{Request,Response} with
// gitlab.agent.agent_tracker.ConnectedAgentInfo elements. One name could not
// be checked: the type of ConnectedAgentk.agent_meta, which newer GitLab
// moved to a package of its own; kas uses gitlab.agent.entity.AgentMeta,
// whose fields are numbered alike, so the wire format is the same.
//
// Field numbers checked against GitLab's protos, its kas-grpc gem and Rails'
// client: ConnectedAgentInfo and ConnectedAgentk (agent_meta 1,
// connected_at 2, connection_id 3, agent_id 4, project_id 5), AgentMeta
// (version 1, commit_id 2, pod_namespace 3, pod_name 4, kubernetes_version
// 5), KubernetesVersion (major 1, minor 2, git_version 3, platform 4), the
// Gitaly repository's gl_repository 6 and gl_project_path 8,
// event.GitPushEvent.project 1, event.Project (id 1, full_path 2),
// AgentConfigFile (name 1, agent_name 2),
// ListAgentConfigFilesResponse.config_files 1, agent_ids 1, project_ids 1,
// the agent tracker responses' agents 1, ServerInfo (version 1, git_ref 2),
// GitPushEventRequest.event 1 and ListAgentConfigFilesRequest.gitaly_info 2.
// Inferred, because GitLab's proto for it was not available to check:
// GetServerInfoResponse.current_server_info 1 (its only field).
// kas's own additions are numbered from 100, which GitLab's client skips.
//
// Regenerate after editing a .proto file (from this directory):
//
//	PATH="$PATH:$(go env GOPATH)/bin" go generate .
//
// with protoc 3.21.12 (Debian's protobuf-compiler), protoc-gen-go v1.36.12
// (go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12) and
// protoc-gen-go-grpc 1.6.2 (go install
// google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2). The import paths
// are relative to the module root so the registered file names
// (server/internalapi/gitlabpb/*.proto) cannot clash with other protos in
// the binary.
package gitlabpb

//go:generate protoc --proto_path=../../.. --go_out=../../.. --go_opt=paths=source_relative --go-grpc_out=../../.. --go-grpc_opt=paths=source_relative server/internalapi/gitlabpb/entity.proto server/internalapi/gitlabpb/server_info.proto server/internalapi/gitlabpb/event.proto server/internalapi/gitlabpb/agent_tracker.proto server/internalapi/gitlabpb/agent_tracker_rpc.proto server/internalapi/gitlabpb/server_info_rpc.proto server/internalapi/gitlabpb/notifications_rpc.proto server/internalapi/gitlabpb/configuration_project_rpc.proto
