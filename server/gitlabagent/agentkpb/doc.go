// Package agentkpb holds the protobuf messages and gRPC services through
// which GitLab's own agentk talks to kas (gitlab.agent.*): reverse tunnel,
// Kubernetes API, configuration, registration, and HTTP over gRPC. The
// .proto files are kas's own, written from GitLab's public protocol: the
// package, service, method, message and field names and numbers are
// GitLab's, limited to what kas serves. prototoolpb and gitlabaccesspb
// hold the two GitLab packages whose message names clash with these
// (HttpRequest, HeaderExtra).
//
// Field numbers checked against GitLab's agent at commit 8daa08cc (v16.5):
// every field declared here. The rules GitLab's agentk checks on what kas
// sends (its protoc-gen-validate annotations) are not declared here: kas
// checks the configuration it sends in server/gitlabagent.
//
// Regenerate after editing a .proto file (from this directory):
//
//	PATH="$PATH:$(go env GOPATH)/bin" go generate .
//
// with protoc 3.21.12 (Debian's protobuf-compiler), protoc-gen-go v1.36.12
// and protoc-gen-go-grpc 1.6.2 (see server/internalapi/gitlabpb), and
// google/rpc/status.proto from Debian's golang-github-gogo-googleapis-dev
// (its declaration is the standard one; the Go code uses genproto's).
package agentkpb

//go:generate protoc --proto_path=../../.. --proto_path=/usr/share/gocode/src/github.com/gogo/googleapis --go_out=../../.. --go_opt=paths=source_relative --go_opt=Mgoogle/rpc/status.proto=google.golang.org/genproto/googleapis/rpc/status --go-grpc_out=../../.. --go-grpc_opt=paths=source_relative --go-grpc_opt=Mgoogle/rpc/status.proto=google.golang.org/genproto/googleapis/rpc/status server/gitlabagent/agentkpb/prototoolpb/prototool.proto server/gitlabagent/agentkpb/grpctool.proto server/gitlabagent/agentkpb/reverse_tunnel_info.proto server/gitlabagent/agentkpb/reverse_tunnel_rpc.proto server/gitlabagent/agentkpb/kubernetes_api_rpc.proto server/gitlabagent/agentkpb/agentcfg.proto server/gitlabagent/agentkpb/agent_configuration_rpc.proto server/gitlabagent/agentkpb/agent_registrar_rpc.proto server/gitlabagent/agentkpb/gitlabaccesspb/gitlab_access_rpc.proto
