// Package reflectclient is a gRPC client that knows nothing of the services
// it calls until the server's reflection service describes them, as grpcurl
// does: it lists services, resolves a fully-qualified name to its
// descriptor (fetching the file that declares it and that file's imports),
// and invokes a method with a JSON request, returning the JSON answer.
// kas's tests use it to check that grpcurl commands work as the README
// writes them and that kas describes GitLab's own message names.
package reflectclient

import (
	"context"
	"fmt"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/dynamicpb"
)

// Client asks one server. It is not safe for concurrent use.
type Client struct {
	conn grpc.ClientConnInterface
	// md is sent with every call, reflection included (e.g. authorization).
	md metadata.MD
	// files are the descriptors learnt so far, by file name.
	files map[string]*descriptorpb.FileDescriptorProto
}

// New returns a client calling conn with the metadata pairs (key, value, …)
// on every call, reflection included; grpcurl's -H "key: value".
func New(conn grpc.ClientConnInterface, pairs ...string) *Client {
	return &Client{conn: conn, md: metadata.Pairs(pairs...), files: map[string]*descriptorpb.FileDescriptorProto{}}
}

// ListServices is grpcurl's "list".
func (c *Client) ListServices(ctx context.Context) ([]string, error) {
	resp, err := c.ask(ctx, &reflectionpb.ServerReflectionRequest{
		MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{},
	})
	if err != nil {
		return nil, err
	}
	var names []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		names = append(names, s.GetName())
	}
	return names, nil
}

// Describe resolves a fully-qualified name (a service, method or message)
// through reflection; grpcurl's "describe".
func (c *Client) Describe(ctx context.Context, symbol string) (protoreflect.Descriptor, error) {
	resp, err := c.ask(ctx, &reflectionpb.ServerReflectionRequest{
		MessageRequest: &reflectionpb.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: symbol},
	})
	if err != nil {
		return nil, err
	}
	if err := c.learn(ctx, resp); err != nil {
		return nil, err
	}
	files, err := c.registry()
	if err != nil {
		return nil, err
	}
	return files.FindDescriptorByName(protoreflect.FullName(symbol))
}

// Invoke calls method ("package.Service/Method" or with a leading slash)
// with the JSON request, as grpcurl -d does, and returns the answer as JSON.
func (c *Client) Invoke(ctx context.Context, method, request string) (string, error) {
	method = strings.TrimPrefix(method, "/")
	service, name, ok := strings.Cut(method, "/")
	if !ok {
		return "", fmt.Errorf("method %q: want package.Service/Method", method)
	}
	d, err := c.Describe(ctx, service)
	if err != nil {
		return "", fmt.Errorf("describe %s: %w", service, err)
	}
	sd, ok := d.(protoreflect.ServiceDescriptor)
	if !ok {
		return "", fmt.Errorf("%s is a %T, not a service", service, d)
	}
	md := sd.Methods().ByName(protoreflect.Name(name))
	if md == nil {
		return "", fmt.Errorf("service %s has no method %s", service, name)
	}
	in, out := dynamicpb.NewMessage(md.Input()), dynamicpb.NewMessage(md.Output())
	if request != "" {
		if err := protojson.Unmarshal([]byte(request), in); err != nil {
			return "", fmt.Errorf("request for %s: %w", md.Input().FullName(), err)
		}
	}
	if err := c.conn.Invoke(metadata.NewOutgoingContext(ctx, c.md), "/"+method, in, out); err != nil {
		return "", err
	}
	b, err := protojson.Marshal(out)
	return string(b), err
}

// ask sends one request on a reflection stream of its own.
func (c *Client) ask(ctx context.Context, req *reflectionpb.ServerReflectionRequest) (*reflectionpb.ServerReflectionResponse, error) {
	ctx, cancel := context.WithCancel(metadata.NewOutgoingContext(ctx, c.md))
	defer cancel()
	stream, err := reflectionpb.NewServerReflectionClient(c.conn).ServerReflectionInfo(ctx)
	if err != nil {
		return nil, err
	}
	if err := stream.Send(req); err != nil {
		// The server ended the stream; Recv says why.
		_, err = stream.Recv()
		return nil, err
	}
	resp, err := stream.Recv()
	if err != nil {
		return nil, err
	}
	if e := resp.GetErrorResponse(); e != nil {
		return nil, fmt.Errorf("reflection: %s (code %d)", e.GetErrorMessage(), e.GetErrorCode())
	}
	return resp, nil
}

// learn keeps the files of a reflection answer and fetches their imports.
func (c *Client) learn(ctx context.Context, resp *reflectionpb.ServerReflectionResponse) error {
	var missing []string
	for _, raw := range resp.GetFileDescriptorResponse().GetFileDescriptorProto() {
		fd := new(descriptorpb.FileDescriptorProto)
		if err := proto.Unmarshal(raw, fd); err != nil {
			return fmt.Errorf("decode a file descriptor: %w", err)
		}
		c.files[fd.GetName()] = fd
		missing = append(missing, fd.GetDependency()...)
	}
	for len(missing) > 0 {
		name := missing[0]
		missing = missing[1:]
		if _, ok := c.files[name]; ok {
			continue
		}
		resp, err := c.ask(ctx, &reflectionpb.ServerReflectionRequest{
			MessageRequest: &reflectionpb.ServerReflectionRequest_FileByFilename{FileByFilename: name},
		})
		if err != nil {
			return fmt.Errorf("fetch %s: %w", name, err)
		}
		raws := resp.GetFileDescriptorResponse().GetFileDescriptorProto()
		if len(raws) == 0 {
			return fmt.Errorf("fetch %s: empty answer", name)
		}
		for _, raw := range raws {
			fd := new(descriptorpb.FileDescriptorProto)
			if err := proto.Unmarshal(raw, fd); err != nil {
				return fmt.Errorf("decode %s: %w", name, err)
			}
			if _, ok := c.files[fd.GetName()]; !ok {
				c.files[fd.GetName()] = fd
				missing = append(missing, fd.GetDependency()...)
			}
		}
	}
	return nil
}

// registry links the files learnt so far.
func (c *Client) registry() (*protoregistry.Files, error) {
	set := &descriptorpb.FileDescriptorSet{}
	for _, fd := range c.files {
		set.File = append(set.File, fd)
	}
	files, err := protodesc.NewFiles(set)
	if err != nil {
		return nil, fmt.Errorf("link the descriptors reflection returned: %w", err)
	}
	return files, nil
}
