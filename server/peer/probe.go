package peer

import (
	"context"
	"fmt"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/kasproject/kas/server/peer/peerpb"
)

// Probe asks the kas node at rawURL whether its private API serves
// forwarded requests (the standard gRPC health check), over the pooled
// connection that requests to it use, so it tests exactly the path they
// take. ctx bounds the wait.
func (r *Router) Probe(ctx context.Context, rawURL string) error {
	pc, err := r.pool.get(rawURL)
	if err != nil {
		return err
	}
	defer r.pool.release(pc)
	resp, err := healthpb.NewHealthClient(pc.cc).Check(ctx, &healthpb.HealthCheckRequest{Service: peerpb.Forward_ServiceDesc.ServiceName})
	if err != nil {
		return fmt.Errorf("health check of kas node %s: %w", rawURL, err)
	}
	if resp.Status != healthpb.HealthCheckResponse_SERVING {
		return fmt.Errorf("kas node %s answers %s (shutting down?)", rawURL, resp.Status)
	}
	return nil
}
