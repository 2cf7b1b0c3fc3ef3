package server

import (
	"context"
	"fmt"
	"sync"

	"github.com/redis/go-redis/v9"

	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/receptive"
	"github.com/kasproject/kas/tlsutil"
)

// receptiveAgents is this node's part in dialling receptive agents.
type receptiveAgents struct {
	manager *receptive.Manager
	// redis is the leases' own client (so the registry's command count
	// stays the registry's); nil on a single node.
	redis redis.UniversalClient

	cancel context.CancelFunc
	done   sync.WaitGroup
}

// buildReceptive sets up dialling receptive agents when
// agent.receptive.enabled; it needs the tunnel endpoint, the registry and,
// with several nodes, the Redis registry's node ID.
func (s *Server) buildReceptive() error {
	r := s.cfg.Agent.Receptive
	var source receptive.Source
	var manager receptive.Options
	switch {
	case s.gitlabClient != nil:
		source = s.gitlabClient
	case s.standaloneData != nil:
		source = s.standaloneData
		manager.AgentByID = s.standaloneData.AgentInfoByID
	}
	if !r.Enabled {
		if s.standaloneData != nil {
			if list, err := s.standaloneData.GetReceptiveAgents(context.Background()); err == nil && len(list) > 0 {
				s.log.Warn("The standalone file lists receptive agents, but agent.receptive.enabled is false: kas does not dial them", "receptive_agents", len(list))
			}
		}
		return nil
	}
	if source == nil {
		s.log.Warn("agent.receptive.enabled is true, but kas runs standalone without standalone.file: no receptive agent is known")
		return nil
	}
	tlsConfig, err := tlsutil.ClientConfig(s.cfg.Env.SSLCertDir)
	if err != nil {
		return fmt.Errorf("TLS for receptive agents: %w", err)
	}
	ra := &receptiveAgents{}
	if s.redisRegistry != nil {
		redisTLS, err := tlsutil.RedisClientConfig(s.cfg.Redis.TLS, s.cfg.Env.SSLCertDir)
		if err != nil {
			return fmt.Errorf("redis: %w", err)
		}
		if ra.redis, err = registry.NewRedisClient(s.cfg.Redis, redisTLS); err != nil {
			return fmt.Errorf("redis: %w", err)
		}
		s.receptive = ra // closed by closeReceptive if New fails later
		if manager.Leases, err = receptive.NewLeases(receptive.LeaseOptions{
			Client:    ra.redis,
			KeyPrefix: s.cfg.Redis.KeyPrefix,
			NodeID:    s.redisRegistry.NodeID(),
			PerAgent:  r.ConnectionsPerAgent,
			Period:    r.LeasePeriod.D(),
		}); err != nil {
			return err
		}
	}
	manager.Source = source
	manager.API = s.api
	manager.Server = s.endpoint
	manager.TLS = tlsConfig
	manager.PollPeriod = r.PollPeriod.D()
	manager.Version = s.opts.Version
	manager.Logger = s.log
	manager.Registerer = s.metrics
	if ra.manager, err = receptive.NewManager(manager); err != nil {
		return fmt.Errorf("receptive agents: %w", err)
	}
	s.receptive = ra
	return nil
}

// startReceptive starts dialling receptive agents, if enabled.
func (s *Server) startReceptive() {
	ra := s.receptive
	if ra == nil || ra.manager == nil {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	ra.cancel = cancel
	ra.done.Go(func() { ra.manager.Run(ctx) })
}

// stopReceptive closes the connections to receptive agents gracefully and
// gives up this node's leases, then closes the leases' Redis client.
func (s *Server) stopReceptive() {
	ra := s.receptive
	if ra == nil {
		return
	}
	if ra.cancel != nil {
		ra.cancel()
		ra.done.Wait()
	}
	if ra.redis != nil {
		if err := ra.redis.Close(); err != nil {
			s.log.Warn("Close the receptive agents' Redis client", "error", err.Error())
		}
	}
}
