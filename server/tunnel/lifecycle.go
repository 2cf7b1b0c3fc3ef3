package tunnel

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/tokencheck"
)

// Managed is a tunnel whose life the endpoint manages, whatever carries it
// (kas's agentk over HTTP/2, GitLab's agentk over gRPC).
type Managed interface {
	registry.Tunnel
	// Done is closed once the connection has ended for any reason.
	Done() <-chan struct{}
	// Shutdown stops new requests, lets in-flight ones finish until ctx
	// ends, then closes the connection.
	Shutdown(ctx context.Context) error
	// Close closes the connection at once.
	Close() error
}

// Serve runs t's life as one of the endpoint's tunnels and returns when it
// is over: t is registered, OnConnect is told, and when t ends or reaches
// agent.listen.max_connection_age it is unregistered, OnDisconnect is told
// and t is drained. If the endpoint is shutting down, t is closed at once.
// token is the agent token the connection authenticated with: while t
// lives, Options.Tokens re-checks it and t is closed once GitLab no longer
// accepts it. log should carry the connection's correlation ID.
func (e *Endpoint) Serve(log *slog.Logger, t Managed, token string, agent gitlab.AgentInfo) {
	if !e.begin() {
		_ = t.Close()
		return
	}
	defer e.handlers.Done()
	_ = e.serve(context.Background(), log, t, token, agent)
}

// serve is Serve for a caller that has already called begin, and that may
// end the tunnel gracefully by cancelling ctx (a receptive agent removed
// from the list, or a lease lost). It returns why the tunnel ended: an
// error if the agent went away or could not be registered, nil if kas
// closed it (ctx, maximum age, revoked token), ErrClosing if the endpoint
// is shutting down.
func (e *Endpoint) serve(ctx context.Context, log *slog.Logger, t Managed, token string, agent gitlab.AgentInfo) error {
	info := t.Info()
	log = log.With("agent_id", info.AgentID, "connection_id", info.ConnectionID)
	if !e.track(t) {
		_ = t.Close()
		return ErrClosing
	}
	defer e.untrack(t)
	if err := e.opts.Registry.Register(context.Background(), t); err != nil {
		log.Error("Register agent tunnel", "error", err.Error())
		_ = t.Close()
		return fmt.Errorf("register the tunnel: %w", err)
	}
	e.attempts.WithLabelValues("connected").Inc()
	e.connected.Inc()
	log.Info("Agent connected", "agent_version", info.AgentVersion, "pod", info.PodNamespace+"/"+info.PodName, "flavor", flavorName(info.Flavor), "receptive", info.Receptive)
	if e.opts.OnConnect != nil {
		e.opts.OnConnect(agent, t)
	}

	var revoked <-chan struct{} // nil without a token checker: never ready
	var watch *tokencheck.Watch
	if e.opts.Tokens != nil && token != "" {
		watch = e.opts.Tokens.Watch(token, agent)
		defer watch.Stop()
		revoked = watch.Revoked()
	}
	maxAge := time.NewTimer(jitter(e.opts.MaxConnectionAge))
	defer maxAge.Stop()
	var ended error
	select {
	case <-t.Done():
		log.Info("Agent disconnected")
		ended = errors.New("the tunnel closed: the agent went away or stopped answering pings")
	case <-ctx.Done():
		log.Info("Closing the agent's connection gracefully", "reason", context.Cause(ctx).Error())
	case <-maxAge.C:
		log.Info("Agent connection reached agent.listen.max_connection_age; closing it gracefully so the agent reconnects")
	case <-revoked:
		log.Warn("Closing the agent's tunnel: its token is no longer accepted; register the agent again and give agentk the new token",
			"error", watch.Err().Error())
	}
	// Unregister first so no new request picks this tunnel while it drains.
	if err := e.opts.Registry.Unregister(context.Background(), t); err != nil {
		log.Error("Unregister agent tunnel", "error", err.Error())
	}
	if e.opts.OnDisconnect != nil {
		e.opts.OnDisconnect(t)
	}
	e.connected.Dec()
	e.drain(t)
	return ended
}

// flavorName names a TunnelInfo.Flavor for logs.
func flavorName(f string) string {
	if f == registry.FlavorKas {
		return "kas"
	}
	return f
}
