// Package gitlabpb holds the protobuf messages and gRPC services of
// GitLab's KAS internal API (gitlab.agent.*), as kas declares them: the
// package, service, method, message and field names and numbers GitLab
// Rails' Gitlab::Kas::Client uses, limited to the fields kas reads or
// fills. The .proto files are kas's own; the Go code is generated from them.
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

//go:generate protoc --proto_path=../../.. --go_out=../../.. --go_opt=paths=source_relative --go-grpc_out=../../.. --go-grpc_opt=paths=source_relative server/internalapi/gitlabpb/entity.proto server/internalapi/gitlabpb/event.proto server/internalapi/gitlabpb/agent_tracker.proto server/internalapi/gitlabpb/agent_tracker_rpc.proto server/internalapi/gitlabpb/server_info_rpc.proto server/internalapi/gitlabpb/notifications_rpc.proto server/internalapi/gitlabpb/configuration_project_rpc.proto
