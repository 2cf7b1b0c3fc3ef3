package registry

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/kasproject/kas/server/config"
)

// maxPasswordFileSize bounds how much of a password file is read: a larger
// file is the wrong file, not a password.
const maxPasswordFileSize = 4096

// NewRedisClient builds the go-redis client described by cfg: a single
// server (redis.server), a Sentinel-managed primary (redis.sentinel) or a
// Redis Cluster (redis.cluster). tlsConfig, built by the caller from
// redis.tls (see tlsutil), is required exactly when redis.tls.enabled is
// true. Passwords are read from their files here and go nowhere but to Redis.
// The caller owns the client and closes it after the registry.
func NewRedisClient(cfg *config.Redis, tlsConfig *tls.Config) (redis.UniversalClient, error) {
	if cfg == nil {
		return nil, errors.New("build Redis client: no redis configuration")
	}
	switch {
	case cfg.TLS.Enabled && tlsConfig == nil:
		return nil, errors.New("build Redis client: redis.tls.enabled is true but no TLS configuration was given")
	case !cfg.TLS.Enabled && tlsConfig != nil:
		return nil, errors.New("build Redis client: redis.tls.enabled is false but a TLS configuration was given")
	}
	opts := &redis.UniversalOptions{
		ClientName:      "kas",
		Username:        cfg.Username,
		DB:              cfg.DatabaseIndex,
		PoolSize:        cfg.PoolSize,
		DialTimeout:     cfg.DialTimeout.D(),
		ReadTimeout:     cfg.ReadTimeout.D(),
		WriteTimeout:    cfg.WriteTimeout.D(),
		ConnMaxIdleTime: cfg.IdleTimeout.D(),
		TLSConfig:       tlsConfig,
		Dialer:          dialer(cfg.Network, cfg.DialTimeout.D(), tlsConfig),
		// Fail fast while Redis is down: a request waiting on a lookup, and
		// GitLab's 5 s deadline on the internal API, must not sit through
		// go-redis's default 5 dial retries × 3 command retries. Local
		// tunnels keep working and the registry re-announces on recovery.
		DialerRetries: 1,
		MaxRetries:    1,
	}
	if cfg.PasswordFile != "" {
		p, err := readPasswordFile("redis.password_file", cfg.PasswordFile)
		if err != nil {
			return nil, err
		}
		opts.Password = p
	}
	switch {
	case cfg.Server != nil && cfg.Sentinel == nil && cfg.Cluster == nil:
		opts.Addrs = []string{cfg.Server.Address}
	case cfg.Sentinel != nil && cfg.Server == nil && cfg.Cluster == nil:
		s := cfg.Sentinel
		if s.MasterName == "" || len(s.Addresses) == 0 {
			return nil, errors.New("build Redis client: redis.sentinel needs master_name and at least one address")
		}
		opts.MasterName = s.MasterName
		opts.Addrs = s.Addresses
		if s.SentinelPasswordFile != "" {
			p, err := readPasswordFile("redis.sentinel.sentinel_password_file", s.SentinelPasswordFile)
			if err != nil {
				return nil, err
			}
			opts.SentinelPassword = p
		}
	case cfg.Cluster != nil && cfg.Server == nil && cfg.Sentinel == nil:
		if len(cfg.Cluster.Addresses) == 0 {
			return nil, errors.New("build Redis client: redis.cluster needs at least one address")
		}
		opts.Addrs = cfg.Cluster.Addresses
		return newClusterClient(opts.Cluster()), nil
	default:
		return nil, errors.New("build Redis client: set exactly one of redis.server, redis.sentinel and redis.cluster")
	}
	return redis.NewUniversalClient(opts), nil
}

// clusterStateReloadInterval bounds how long a Redis Cluster client uses a
// slot map without asking the cluster again, while it is sending commands
// (go-redis's default is a minute). Failovers are caught sooner, by the
// errors they cause (see clusterFailover).
const clusterStateReloadInterval = 10 * time.Second

// newClusterClient builds the Redis Cluster client that follows failovers:
// go-redis refreshes its slot map on MOVED and ASK redirections, which a
// dead master never sends, so a client would otherwise keep dialling a
// dead master until its next periodic reload.
func newClusterClient(opts *redis.ClusterOptions) *redis.ClusterClient {
	opts.ClusterStateReloadInterval = clusterStateReloadInterval
	cc := redis.NewClusterClient(opts)
	follow := &clusterFailover{reload: cc.ReloadState, every: clusterReloadDebounce}
	// Every node's client, pub/sub connections included, reports the
	// failures that hint at a changed topology.
	cc.OnNewNode(func(node *redis.Client) { node.AddHook(follow) })
	return cc
}

// clusterReloadDebounce is the least time between two slot map reloads
// that errors trigger: during a failover every command fails until a
// replica is promoted, and the first reload after the promotion is the one
// that counts.
const clusterReloadDebounce = 250 * time.Millisecond

// clusterFailover is a go-redis hook on each node of a Redis Cluster that
// reloads the cluster's slot map (debounced) when talking to the node fails
// in a way a failover explains: it cannot be dialled, its connection broke,
// or the cluster says it is down.
type clusterFailover struct {
	reload func(context.Context)
	every  time.Duration
	last   atomic.Int64 // Unix nanoseconds of the last reload
}

func (f *clusterFailover) note(err error) {
	if !topologyHint(err) {
		return
	}
	now := time.Now().UnixNano()
	last := f.last.Load()
	if now-last < int64(f.every) || !f.last.CompareAndSwap(last, now) {
		return
	}
	// ReloadState reloads in the background; it needs no deadline of ours.
	f.reload(context.Background())
}

// topologyHint says whether err suggests the node's role may have changed.
func topologyHint(err error) bool {
	if err == nil || errors.Is(err, context.Canceled) || errors.Is(err, redis.ErrClosed) {
		return false
	}
	var netErr net.Error
	if errors.As(err, &netErr) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return true
	}
	msg := err.Error()
	return strings.HasPrefix(msg, "CLUSTERDOWN") || strings.HasPrefix(msg, "READONLY") || strings.Contains(msg, "connection refused")
}

func (f *clusterFailover) DialHook(next redis.DialHook) redis.DialHook {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		conn, err := next(ctx, network, addr)
		f.note(err)
		return conn, err
	}
}

func (f *clusterFailover) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		f.note(err)
		return err
	}
}

func (f *clusterFailover) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		err := next(ctx, cmds)
		f.note(err)
		return err
	}
}

// dialer connects over network (tcp, tcp4, tcp6 or unix; empty means tcp),
// which go-redis's UniversalOptions cannot express, adding TLS when set.
func dialer(network string, timeout time.Duration, tlsConfig *tls.Config) func(ctx context.Context, _, addr string) (net.Conn, error) {
	if network == "" {
		network = "tcp"
	}
	d := &net.Dialer{Timeout: timeout}
	if tlsConfig == nil {
		return func(ctx context.Context, _, addr string) (net.Conn, error) {
			return d.DialContext(ctx, network, addr)
		}
	}
	td := &tls.Dialer{NetDialer: d, Config: tlsConfig}
	return func(ctx context.Context, _, addr string) (net.Conn, error) {
		return td.DialContext(ctx, network, addr)
	}
}

// readPasswordFile returns the file's content without surrounding
// whitespace. Errors name the key and the file, never the content.
func readPasswordFile(key, path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("read %s: %w", key, err)
	}
	defer f.Close()
	raw, err := io.ReadAll(io.LimitReader(f, maxPasswordFileSize+1))
	if err != nil {
		return "", fmt.Errorf("read %s %s: %w", key, path, err)
	}
	if len(raw) > maxPasswordFileSize {
		return "", fmt.Errorf("%s %s is larger than %d bytes, so it is not a password file", key, path, maxPasswordFileSize)
	}
	p := bytes.TrimSpace(raw)
	if len(p) == 0 {
		return "", fmt.Errorf("%s %s is empty; write the Redis password into it, or remove %s if Redis needs none", key, path, key)
	}
	return string(p), nil
}
