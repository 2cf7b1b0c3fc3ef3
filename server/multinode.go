package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/config"
	"github.com/kasproject/kas/server/k8sproxy"
	"github.com/kasproject/kas/server/ownurl"
	"github.com/kasproject/kas/server/peer"
	"github.com/kasproject/kas/tlsutil"
)

// privateListener is the config key of the private API listener.
const privateListener = "private_api.listen"

// buildRouting chooses where tunnels are recorded and how requests reach
// them: in memory on a single node, or through Redis and the private API
// when redis is configured.
func (s *Server) buildRouting() (k8sproxy.Router, error) {
	if s.cfg.Redis == nil {
		s.registry = registry.NewMemory()
		return k8sproxy.LocalRouter{Registry: s.registry}, nil
	}
	return s.buildMultiNode()
}

// buildMultiNode sets up what several nodes share: the Redis registry, this
// node's private API, and the router that forwards requests to the node
// holding an agent's tunnel. The private API socket is opened here, not in
// Run, because the node publishes its URL — port included — in Redis.
func (s *Server) buildMultiNode() (k8sproxy.Router, error) {
	l := s.cfg.PrivateAPI.Listen
	secret, err := config.ReadSecretFile(l.AuthenticationSecretFile)
	if err != nil {
		return nil, fmt.Errorf("%s.authentication_secret_file: %w", privateListener, err)
	}
	client, err := s.redisClient()
	if err != nil {
		return nil, fmt.Errorf("redis: %w", err)
	}

	ln, err := net.Listen(l.Network, l.Address)
	if err != nil {
		return nil, fmt.Errorf("%s: listen on %s %s: %w", privateListener, l.Network, l.Address, err)
	}
	lst := &listener{name: privateListener, network: l.Network, address: l.Address, ln: ln}
	s.listeners = append(s.listeners, lst) // closed by closeListeners if New fails later

	boundPort := 0
	if a, ok := ln.Addr().(*net.TCPAddr); ok {
		boundPort = a.Port
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	own, err := ownurl.Discover(ctx, ownurl.Input{
		Env:           s.cfg.Env,
		ListenNetwork: l.Network,
		ListenAddress: l.Address,
		BoundPort:     boundPort,
		MultiNode:     true,
		AllowLoopback: s.cfg.Redis.AllowLoopback,
	}, ownurl.OS{})
	if err != nil {
		return nil, err
	}
	s.nodeURLs = own.URLs
	s.log.Info("Advertising this node's private API to other nodes", "urls", own.URLs, "source", own.Source, "scheme", own.Scheme)

	reg, err := registry.NewRedis(registry.RedisOptions{
		Client:         client,
		KeyPrefix:      s.cfg.Redis.KeyPrefix,
		NodeURLs:       own.URLs,
		TTL:            s.cfg.Agent.RedisConnInfoTTL.D(),
		RefreshPeriod:  s.cfg.Agent.RedisConnInfoRefresh.D(),
		GCPeriod:       s.cfg.Agent.RedisConnInfoGC.D(),
		LookupCacheTTL: s.cfg.Redis.CacheTTL.D(),
		Logger:         s.log,
		Registerer:     s.metrics,
	})
	if err != nil {
		return nil, fmt.Errorf("Redis registry: %w", err)
	}
	s.registry = reg
	s.redisRegistry = reg

	var serverTLS, clientTLS *tls.Config
	if l.CertificateFile != "" {
		certs, err := tlsutil.NewCertReloader(l.CertificateFile, l.KeyFile, s.log.With("listener", privateListener))
		if err != nil {
			return nil, fmt.Errorf("%s: %w", privateListener, err)
		}
		lst.certs = certs
		serverTLS = tlsutil.ServerConfig(certs.GetCertificate)
	}
	if own.Scheme == "grpcs" {
		if clientTLS, err = tlsutil.ClientConfig(s.cfg.Env.SSLCertDir, l.CACertificateFile); err != nil {
			return nil, fmt.Errorf("%s.ca_certificate_file: %w", privateListener, err)
		}
	}
	lst.peer, err = peer.NewServer(peer.ServerOptions{
		Registry:         reg,
		Secret:           secret,
		TLS:              serverTLS,
		MaxConnectionAge: l.MaxConnectionAge.D(),
		Logger:           s.log,
		Registerer:       s.metrics,
	})
	if err != nil {
		return nil, err
	}
	router, err := peer.NewRouter(peer.RouterOptions{
		Registry:      reg,
		Secret:        secret,
		TLS:           clientTLS,
		ServerName:    own.Host,
		AcceptTimeout: s.cfg.PrivateAPI.AcceptTimeout.D(),
		Logger:        s.log,
		Registerer:    s.metrics,
	})
	if err != nil {
		return nil, err
	}
	s.peerRouter = router
	return router, nil
}

// closeMultiNode removes this node from Redis and closes its peer
// connections; a no-op on a single node.
func (s *Server) closeMultiNode(ctx context.Context) {
	if s.redisRegistry != nil {
		if err := s.redisRegistry.Close(ctx); err != nil {
			s.log.Warn("Remove this node's tunnels from Redis; they expire by themselves", "error", err.Error())
		}
	}
	if s.peerRouter != nil {
		_ = s.peerRouter.Close()
	}
}

// checkRedis is part of readiness for several nodes: Redis must answer.
func (s *Server) checkRedis(ctx context.Context) error {
	if s.redisRegistry == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := s.redis.Ping(ctx).Err(); err != nil {
		return fmt.Errorf("Redis does not answer: %w", err)
	}
	return nil
}

// peers lists the other live nodes for the status page.
func (s *Server) peers(ctx context.Context) ([]registry.Node, error) {
	if s.redisRegistry == nil {
		return nil, nil
	}
	nodes, err := s.redisRegistry.Nodes(ctx)
	if err != nil {
		return nil, err
	}
	self := s.redisRegistry.NodeID()
	others := nodes[:0]
	for _, n := range nodes {
		if n.ID != self {
			others = append(others, n)
		}
	}
	return others, nil
}

var errNotServing = errors.New("listeners are not serving (starting or shutting down)")
