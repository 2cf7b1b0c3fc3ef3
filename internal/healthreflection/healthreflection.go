// Package healthreflection answers gRPC reflection about the health service
// to callers without a token, so that
//
//	grpcurl -plaintext host:port grpc.health.v1.Health/Check
//
// works as written against kas's internal and private APIs: grpcurl asks
// the server's reflection service for the method's descriptors before it
// calls, and the health service itself answers without a token (Kubernetes
// probes cannot send one). Such a caller learns of the health service
// alone; the rest of the API is described to authenticated callers only,
// by the server's ordinary reflection service.
package healthreflection

import (
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/reflection"
	reflectionv1 "google.golang.org/grpc/reflection/grpc_reflection_v1"
	reflectionv1alpha "google.golang.org/grpc/reflection/grpc_reflection_v1alpha"
	"google.golang.org/protobuf/reflect/protoregistry"
)

// The reflection service's streaming methods; grpcurl tries v1 first and
// falls back to v1alpha.
const (
	methodV1      = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
	methodV1Alpha = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
)

// Reflection serves reflection that knows the health service only.
type Reflection struct {
	v1      reflectionv1.ServerReflectionServer
	v1alpha reflectionv1alpha.ServerReflectionServer
}

// New returns the health-only reflection.
func New() *Reflection {
	files := new(protoregistry.Files)
	// Cannot fail: one file, registered once, into an empty registry.
	_ = files.RegisterFile(healthpb.File_grpc_health_v1_health_proto)
	opts := reflection.ServerOptions{
		Services:           healthOnly{},
		DescriptorResolver: files,
		ExtensionResolver:  new(protoregistry.Types),
	}
	return &Reflection{v1: reflection.NewServerV1(opts), v1alpha: reflection.NewServer(opts)}
}

// healthOnly lists the health service alone to ListServices.
type healthOnly struct{}

func (healthOnly) GetServiceInfo() map[string]grpc.ServiceInfo {
	return map[string]grpc.ServiceInfo{healthpb.Health_ServiceDesc.ServiceName: {}}
}

// Serve serves the call on ss if it is a reflection call that carries no
// authorization metadata, and reports whether it did. Call it from a
// stream interceptor before authenticating: a call it does not serve goes
// on to authentication and the server's full reflection (a call with a
// wrong token is refused as usual).
func (r *Reflection) Serve(ss grpc.ServerStream, method string) (served bool, err error) {
	if method != methodV1 && method != methodV1Alpha {
		return false, nil
	}
	if md, _ := metadata.FromIncomingContext(ss.Context()); len(md.Get("authorization")) > 0 {
		return false, nil
	}
	if method == methodV1Alpha {
		return true, r.v1alpha.ServerReflectionInfo(&grpc.GenericServerStream[reflectionv1alpha.ServerReflectionRequest, reflectionv1alpha.ServerReflectionResponse]{ServerStream: ss})
	}
	return true, r.v1.ServerReflectionInfo(&grpc.GenericServerStream[reflectionv1.ServerReflectionRequest, reflectionv1.ServerReflectionResponse]{ServerStream: ss})
}
