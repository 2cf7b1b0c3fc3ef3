package registry

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/kasproject/kas/internal/redistest"
	"github.com/kasproject/kas/server/config"
)

func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func baseRedisConfig() *config.Redis {
	return &config.Redis{
		Network:      "tcp",
		KeyPrefix:    "gitlab-kas",
		DialTimeout:  config.Duration(time.Second),
		ReadTimeout:  config.Duration(time.Second),
		WriteTimeout: config.Duration(time.Second),
		IdleTimeout:  config.Duration(time.Minute),
	}
}

func TestNewRedisClientModes(t *testing.T) {
	tests := []struct {
		name      string
		configure func(*config.Redis)
		cluster   bool
	}{
		{"server", func(c *config.Redis) { c.Server = &config.RedisServer{Address: "127.0.0.1:6379"} }, false},
		{"sentinel", func(c *config.Redis) {
			c.Sentinel = &config.RedisSentinel{MasterName: "main", Addresses: []string{"127.0.0.1:26379", "127.0.0.2:26379"}}
		}, false},
		{"cluster of several", func(c *config.Redis) {
			c.Cluster = &config.RedisCluster{Addresses: []string{"127.0.0.1:7000", "127.0.0.1:7001"}}
		}, true},
		{"cluster from one seed", func(c *config.Redis) { c.Cluster = &config.RedisCluster{Addresses: []string{"127.0.0.1:7000"}} }, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := baseRedisConfig()
			tc.configure(cfg)
			c, err := NewRedisClient(cfg, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			_, isCluster := c.(*redis.ClusterClient)
			if isCluster != tc.cluster {
				t.Fatalf("got %T, want a cluster client: %t", c, tc.cluster)
			}
		})
	}
}

func TestNewRedisClientErrors(t *testing.T) {
	const password = "hunter2-not-to-be-shown"
	big := writeFile(t, "big", strings.Repeat(password, 1000))
	empty := writeFile(t, "empty", " \n")
	server := &config.RedisServer{Address: "127.0.0.1:6379"}
	tests := []struct {
		name      string
		configure func(*config.Redis)
		tls       *tls.Config
		want      string
	}{
		{"no mode", func(*config.Redis) {}, nil, "exactly one of"},
		{"two modes", func(c *config.Redis) {
			c.Server = server
			c.Cluster = &config.RedisCluster{Addresses: []string{"127.0.0.1:7000"}}
		}, nil, "exactly one of"},
		{"sentinel without master name", func(c *config.Redis) {
			c.Sentinel = &config.RedisSentinel{Addresses: []string{"127.0.0.1:26379"}}
		}, nil, "master_name"},
		{"cluster without addresses", func(c *config.Redis) { c.Cluster = &config.RedisCluster{} }, nil, "at least one address"},
		{"TLS enabled without a TLS configuration", func(c *config.Redis) { c.Server = server; c.TLS.Enabled = true }, nil, "redis.tls.enabled is true"},
		{"TLS configuration with TLS off", func(c *config.Redis) { c.Server = server }, &tls.Config{}, "redis.tls.enabled is false"},
		{"missing password file", func(c *config.Redis) { c.Server = server; c.PasswordFile = "/nonexistent/password" }, nil, "read redis.password_file"},
		{"empty password file", func(c *config.Redis) { c.Server = server; c.PasswordFile = empty }, nil, "is empty"},
		{"huge password file", func(c *config.Redis) { c.Server = server; c.PasswordFile = big }, nil, "not a password file"},
		{"empty sentinel password file", func(c *config.Redis) {
			c.Sentinel = &config.RedisSentinel{MasterName: "main", Addresses: []string{"127.0.0.1:26379"}, SentinelPasswordFile: empty}
		}, nil, "redis.sentinel.sentinel_password_file"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := baseRedisConfig()
			tc.configure(cfg)
			c, err := NewRedisClient(cfg, tc.tls)
			if err == nil {
				c.Close()
				t.Fatalf("no error, want one containing %q", tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q, want one containing %q", err, tc.want)
			}
			if strings.Contains(err.Error(), password) {
				t.Fatalf("error shows the password: %q", err)
			}
		})
	}
	if _, err := NewRedisClient(nil, nil); err == nil {
		t.Fatal("nil configuration accepted")
	}
}

func TestNewRedisClientConnects(t *testing.T) {
	srv := redistest.Start(t)
	ctx := context.Background()
	admin := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	defer admin.Close()
	if err := admin.ConfigSet(ctx, "requirepass", "s3cret").Err(); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name     string
		network  string
		username string
		password string
		wantErr  string
	}{
		{"password file, trimmed", "tcp", "", "  s3cret\n", ""},
		{"username and password", "tcp4", "default", "s3cret", ""},
		{"wrong password", "tcp", "", "wrong", "WRONGPASS"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := baseRedisConfig()
			cfg.Server = &config.RedisServer{Address: srv.Addr()}
			cfg.Network = tc.network
			cfg.Username = tc.username
			cfg.PasswordFile = writeFile(t, "password", tc.password)
			cfg.DatabaseIndex = 3
			c, err := NewRedisClient(cfg, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			err = c.Set(ctx, "probe", tc.name, 0).Err()
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("SET: %v, want %s", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			// The key went to database 3.
			db3 := redis.NewClient(&redis.Options{Addr: srv.Addr(), Password: "s3cret", DB: 3})
			defer db3.Close()
			if got, err := db3.Get(ctx, "probe").Result(); err != nil || got != tc.name {
				t.Fatalf("GET probe in database 3 = %q, %v", got, err)
			}
		})
	}
}

func TestDialerUsesTLS(t *testing.T) {
	srv := httptest.NewUnstartedServer(http.NotFoundHandler())
	srv.StartTLS()
	defer srv.Close()
	trusted := x509.NewCertPool()
	trusted.AddCert(srv.Certificate())
	addr := srv.Listener.Addr().String()

	tests := []struct {
		name    string
		tls     *tls.Config
		wantErr bool
	}{
		{"trusted certificate, server name from the address", &tls.Config{RootCAs: trusted}, false},
		{"unknown authority", &tls.Config{RootCAs: x509.NewCertPool()}, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			conn, err := dialer("tcp", time.Second, tc.tls)(context.Background(), "ignored", addr)
			if tc.wantErr {
				if err == nil {
					conn.Close()
					t.Fatal("handshake with an untrusted certificate succeeded")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if _, ok := conn.(*tls.Conn); !ok {
				t.Fatalf("got %T, want a TLS connection", conn)
			}
		})
	}
}

// replyError is an error reply from Redis, as go-redis reports it.
type replyError string

func (e replyError) Error() string { return string(e) }

// TestClusterFailoverReloads: errors a failover explains reload the slot
// map, at most once per debounce interval; others do not.
func TestClusterFailoverReloads(t *testing.T) {
	refused := &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}
	tests := []struct {
		name   string
		err    error
		reload bool
	}{
		{"no error", nil, false},
		{"connection refused", refused, true},
		{"connection closed", io.EOF, true},
		{"read timeout", &net.OpError{Op: "read", Net: "tcp", Err: os.ErrDeadlineExceeded}, true},
		{"cluster down", replyError("CLUSTERDOWN The cluster is down"), true},
		{"replica", replyError("READONLY You can't write against a read only replica."), true},
		{"wrong type", replyError("WRONGTYPE Operation against a key holding the wrong kind of value"), false},
		{"key missing", redis.Nil, false},
		{"caller gone", context.Canceled, false},
		{"client closed", redis.ErrClosed, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			reloads := 0
			f := &clusterFailover{reload: func(context.Context) { reloads++ }, every: time.Hour}
			f.note(tc.err)
			if got := reloads == 1; got != tc.reload {
				t.Fatalf("reloaded %d times, want a reload: %t", reloads, tc.reload)
			}
		})
	}
	reloads := 0
	f := &clusterFailover{reload: func(context.Context) { reloads++ }, every: time.Hour}
	for range 100 {
		f.note(refused)
	}
	if reloads != 1 {
		t.Fatalf("100 failures within the debounce interval reloaded %d times, want once", reloads)
	}
}
