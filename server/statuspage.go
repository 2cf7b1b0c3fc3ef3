package server

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/config"
	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/status"
	"github.com/kasproject/kas/server/traffic"
	"github.com/kasproject/kas/tlsutil"
	"github.com/kasproject/kas/web"
)

// statusParts are the status page's own state: per-agent traffic, the
// agents seen, and with several nodes the summaries shared through Redis.
type statusParts struct {
	traffic *traffic.Recorder
	seen    *status.Seen
	page    *status.Page
	cluster *status.Cluster
	// redis is the status page's own Redis client (nil on one node).
	redis redis.UniversalClient
}

// buildStatus gathers the status page's sources; call it once the API,
// routing and ACME are built.
func (s *Server) buildStatus() error {
	st := &s.statusParts
	o := status.Options{
		Version:       s.opts.Version,
		StartedAt:     s.startedAt,
		GitLabAddress: s.cfg.GitLab.Address,
		NodeURLs:      s.nodeURLs,
		Links: web.Links{
			Metrics:   s.cfg.Observability.Prometheus.URLPath,
			Liveness:  s.cfg.Observability.LivenessProbe.URLPath,
			Readiness: s.cfg.Observability.ReadinessProbe.URLPath,
			JSON:      "/debug/status",
		},
		Ready:        s.checkReady,
		Registry:     s.registry,
		Traffic:      st.traffic,
		Seen:         st.seen,
		Certificates: s.certificates,
		Recent:       s.opts.Recent,
	}
	if s.standaloneData != nil {
		o.Standalone, o.StandaloneFile = s.standaloneData.Agents, s.cfg.Standalone.File
	}
	if c := s.gitlabClient; c != nil {
		o.GitLab = func(now time.Time) gitlab.Health { return c.Health(now) }
	}
	if s.redisRegistry != nil {
		tlsConfig, err := tlsutil.RedisClientConfig(s.cfg.Redis.TLS, s.cfg.Env.SSLCertDir)
		if err != nil {
			return err
		}
		if st.redis, err = registry.NewRedisClient(s.cfg.Redis, tlsConfig); err != nil {
			return fmt.Errorf("redis (status page client): %w", err)
		}
		st.cluster = status.NewCluster(status.ClusterOptions{
			Client:    st.redis,
			KeyPrefix: s.cfg.Redis.KeyPrefix,
			Address:   redisAddress(s.cfg.Redis.Server, s.cfg.Redis.Sentinel, s.cfg.Redis.Cluster),
			Registry:  s.redisRegistry,
			Probe:     s.peerRouter.Probe,
			Version:   s.opts.Version,
			StartedAt: s.startedAt,
			NodeURLs:  s.nodeURLs,
		})
		o.Cluster = st.cluster
	}
	st.page = status.New(o)
	return nil
}

// runStatus closes each minute of the traffic counts and, with several
// nodes, publishes this node's summary, until ctx ends.
func (s *Server) runStatus(ctx context.Context) {
	st := &s.statusParts
	sample := func(boundary int64) {
		st.traffic.Sample(boundary)
		if s.gitlabClient != nil {
			s.gitlabClient.SampleHealth(boundary)
		}
	}
	if st.cluster == nil {
		traffic.RunSampler(ctx, sample)
		return
	}
	st.cluster.Run(ctx, st.traffic, st.seen, sample)
}

// closeStatus removes this node's summary from Redis and closes the status
// page's Redis client.
func (s *Server) closeStatus(ctx context.Context) {
	st := &s.statusParts
	if st.cluster != nil {
		if err := st.cluster.Remove(ctx); err != nil {
			s.log.Warn("Remove this node's status summary from Redis; it expires by itself", "error", err.Error())
		}
	}
	if st.redis != nil {
		_ = st.redis.Close()
	}
}

// certificates describes every certificate kas serves.
func (s *Server) certificates() []tlsutil.CertificateInfo {
	var out []tlsutil.CertificateInfo
	for _, l := range s.listeners {
		if l.certs != nil {
			out = append(out, l.certs.Info(l.name))
		}
	}
	if s.acme != nil {
		out = append(out, s.acme.Certificates()...)
	}
	return out
}

// redisAddress describes where Redis is, for the status page.
func redisAddress(server *config.RedisServer, sentinel *config.RedisSentinel, cluster *config.RedisCluster) string {
	switch {
	case server != nil:
		return server.Address
	case sentinel != nil:
		return "sentinel " + sentinel.MasterName + " via " + strings.Join(sentinel.Addresses, ", ")
	case cluster != nil:
		return "cluster " + strings.Join(cluster.Addresses, ", ")
	}
	return ""
}
