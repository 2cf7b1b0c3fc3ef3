// Package peerpb is the generated Go for the private API (forward.proto).
// Do not edit the *.pb.go files; change forward.proto and run go generate.
//
// Generated with protoc 3.21.12, protoc-gen-go v1.36.12 and
// protoc-gen-go-grpc 1.6.2; both plugins must be on PATH
// (go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
// google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2).
package peerpb

//go:generate protoc --proto_path=. --go_out=. --go_opt=paths=source_relative --go-grpc_out=. --go-grpc_opt=paths=source_relative forward.proto
