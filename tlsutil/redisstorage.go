package tlsutil

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/redis/go-redis/v9"
)

// DefaultLockTTL is how long a lock outlives a node that took it and
// crashed: the holder extends it every third of that while it works, so only
// a dead holder lets it expire.
const DefaultLockTTL = 30 * time.Second

// RedisStorage is a certmagic.Storage in Redis: several kas nodes sharing it
// share one certificate per domain, one ACME account and the challenge
// tokens (any node can answer the CA), and its locks make one node order a
// certificate while the others wait and then load it.
//
// Keys, under the prefix p (redis.key_prefix):
//
//	<p>:acme:<certmagic key>   hash: v = the value, m = modified (Unix ms)
//	<p>:acme_lock:<name>       a random token of the holder, expiring
type RedisStorage struct {
	client     redis.UniversalClient
	dataPrefix string
	lockPrefix string
	lockTTL    time.Duration
	log        *slog.Logger

	mu   sync.Mutex
	held map[string]*heldLock // by lock name
}

var _ interface {
	certmagic.Storage
	certmagic.TryLocker
} = (*RedisStorage)(nil)

// heldLock is a lock this node holds and the goroutine extending it.
type heldLock struct {
	token string
	stop  context.CancelFunc
	done  chan struct{} // closed when the extending goroutine returned
}

// NewRedisStorage returns a storage on client with keys under keyPrefix. The
// caller owns client; every lock taken must be released with Unlock, which
// stops the goroutine keeping it.
func NewRedisStorage(client redis.UniversalClient, keyPrefix string, logger *slog.Logger) *RedisStorage {
	return &RedisStorage{
		client:     client,
		dataPrefix: keyPrefix + ":acme:",
		lockPrefix: keyPrefix + ":acme_lock:",
		lockTTL:    DefaultLockTTL,
		log:        logger,
		held:       make(map[string]*heldLock),
	}
}

func (s *RedisStorage) String() string {
	return "Redis storage " + strings.TrimSuffix(s.dataPrefix, ":")
}

// Store puts value at key.
func (s *RedisStorage) Store(ctx context.Context, key string, value []byte) error {
	err := s.client.HSet(ctx, s.dataPrefix+key, "v", value, "m", time.Now().UnixMilli()).Err()
	if err != nil {
		return fmt.Errorf("store %s in Redis: %w", key, err)
	}
	return nil
}

// Load returns the value at key, or an error wrapping fs.ErrNotExist.
func (s *RedisStorage) Load(ctx context.Context, key string) ([]byte, error) {
	v, err := s.client.HGet(ctx, s.dataPrefix+key, "v").Bytes()
	if errors.Is(err, redis.Nil) {
		return nil, fmt.Errorf("load %s from Redis: %w", key, fs.ErrNotExist)
	}
	if err != nil {
		return nil, fmt.Errorf("load %s from Redis: %w", key, err)
	}
	return v, nil
}

// Delete removes key and, if it is a directory, every key under it.
func (s *RedisStorage) Delete(ctx context.Context, key string) error {
	keys, err := s.scan(ctx, s.dataPrefix+key+"/")
	if err != nil {
		return fmt.Errorf("delete %s from Redis: %w", key, err)
	}
	keys = append(keys, s.dataPrefix+key)
	// One DEL per key: in a Redis Cluster the keys live in different slots.
	_, err = s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for _, k := range keys {
			p.Del(ctx, k)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("delete %s from Redis: %w", key, err)
	}
	return nil
}

// Exists reports whether key is a value or a directory of values.
func (s *RedisStorage) Exists(ctx context.Context, key string) bool {
	n, err := s.client.Exists(ctx, s.dataPrefix+key).Result()
	if err == nil && n > 0 {
		return true
	}
	children, err := s.scan(ctx, s.dataPrefix+key+"/")
	return err == nil && len(children) > 0
}

// List returns the keys in the directory dir: its direct entries (values and
// subdirectories), or with recursive every value and directory below it.
func (s *RedisStorage) List(ctx context.Context, dir string, recursive bool) ([]string, error) {
	dir = strings.TrimSuffix(dir, "/")
	prefix := s.dataPrefix
	if dir != "" {
		prefix += dir + "/"
	}
	keys, err := s.scan(ctx, prefix)
	if err != nil {
		return nil, fmt.Errorf("list %s in Redis: %w", dir, err)
	}
	seen := make(map[string]bool)
	var out []string
	add := func(k string) {
		if !seen[k] {
			seen[k] = true
			out = append(out, k)
		}
	}
	for _, k := range keys {
		parts := strings.Split(strings.TrimPrefix(k, prefix), "/")
		if !recursive {
			parts = parts[:1]
		}
		for i := range parts {
			add(path.Join(dir, strings.Join(parts[:i+1], "/")))
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("list %s in Redis: %w", dir, fs.ErrNotExist)
	}
	slices.Sort(out)
	return out, nil
}

// Stat describes key: a value with its size and modification time, or a
// directory.
func (s *RedisStorage) Stat(ctx context.Context, key string) (certmagic.KeyInfo, error) {
	h, err := s.client.HGetAll(ctx, s.dataPrefix+key).Result()
	if err != nil {
		return certmagic.KeyInfo{}, fmt.Errorf("stat %s in Redis: %w", key, err)
	}
	if v, ok := h["v"]; ok {
		info := certmagic.KeyInfo{Key: key, Size: int64(len(v)), IsTerminal: true}
		if ms, err := strconv.ParseInt(h["m"], 10, 64); err == nil {
			info.Modified = time.UnixMilli(ms)
		}
		return info, nil
	}
	children, err := s.scan(ctx, s.dataPrefix+key+"/")
	if err != nil {
		return certmagic.KeyInfo{}, fmt.Errorf("stat %s in Redis: %w", key, err)
	}
	if len(children) == 0 {
		return certmagic.KeyInfo{}, fmt.Errorf("stat %s in Redis: %w", key, fs.ErrNotExist)
	}
	return certmagic.KeyInfo{Key: key, IsTerminal: false}, nil
}

// scan returns every Redis key starting with prefix, asking each primary of
// a Redis Cluster.
func (s *RedisStorage) scan(ctx context.Context, prefix string) ([]string, error) {
	match := globEscape(prefix) + "*"
	var mu sync.Mutex
	var keys []string
	scanOne := func(ctx context.Context, c redis.Cmdable) error {
		iter := c.Scan(ctx, 0, match, 1000).Iterator()
		for iter.Next(ctx) {
			mu.Lock()
			keys = append(keys, iter.Val())
			mu.Unlock()
		}
		return iter.Err()
	}
	var err error
	if cluster, ok := s.client.(*redis.ClusterClient); ok {
		err = cluster.ForEachMaster(ctx, func(ctx context.Context, c *redis.Client) error { return scanOne(ctx, c) })
	} else {
		err = scanOne(ctx, s.client)
	}
	return keys, err
}

// globEscape quotes the characters SCAN's MATCH pattern treats specially.
func globEscape(s string) string {
	var b strings.Builder
	for _, c := range s {
		if strings.ContainsRune(`*?[]\`, c) {
			b.WriteByte('\\')
		}
		b.WriteRune(c)
	}
	return b.String()
}

// Lock takes the named lock, waiting while another node (or another caller
// here) holds it, until ctx ends. A holder that crashed blocks others for at
// most the lock's TTL.
func (s *RedisStorage) Lock(ctx context.Context, name string) error {
	poll := min(time.Second, s.lockTTL/10)
	for {
		ok, err := s.TryLock(ctx, name)
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		t := time.NewTimer(poll)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("wait for lock %s in Redis, held by another kas node: %w", name, context.Cause(ctx))
		case <-t.C:
		}
	}
}

// TryLock takes the named lock if it is free, and reports whether it did.
func (s *RedisStorage) TryLock(ctx context.Context, name string) (bool, error) {
	token := rand.Text()
	ok, err := s.client.SetNX(ctx, s.lockPrefix+name, token, s.lockTTL).Result()
	if err != nil {
		return false, fmt.Errorf("take lock %s in Redis: %w", name, err)
	}
	if !ok {
		return false, nil
	}
	keepCtx, stop := context.WithCancel(context.WithoutCancel(ctx))
	l := &heldLock{token: token, stop: stop, done: make(chan struct{})}
	s.mu.Lock()
	// A lock of the same name still listed here has expired in Redis (or
	// SET NX could not have succeeded): its goroutine has nothing to keep.
	stale := s.held[name]
	s.held[name] = l
	s.mu.Unlock()
	if stale != nil {
		stale.stop()
		<-stale.done
	}
	go s.keepLock(keepCtx, name, l)
	return true, nil
}

// Unlock releases a lock taken by Lock or TryLock on this storage.
func (s *RedisStorage) Unlock(ctx context.Context, name string) error {
	s.mu.Lock()
	l := s.held[name]
	delete(s.held, name)
	s.mu.Unlock()
	if l == nil {
		return fmt.Errorf("unlock %s: this kas node does not hold that lock", name)
	}
	l.stop()
	<-l.done
	// Delete the key only if it still holds our token: after an expiry it
	// may be another node's lock now.
	if err := unlockScript.Run(ctx, s.client, []string{s.lockPrefix + name}, l.token).Err(); err != nil {
		return fmt.Errorf("release lock %s in Redis (it expires by itself within %s): %w", name, s.lockTTL, err)
	}
	return nil
}

// keepLock extends the lock every third of its TTL until stopped, so a slow
// ACME order does not lose it; it gives up when the lock is no longer ours.
func (s *RedisStorage) keepLock(ctx context.Context, name string, l *heldLock) {
	defer close(l.done)
	t := time.NewTicker(s.lockTTL / 3)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		kept, err := extendLockScript.Run(ctx, s.client, []string{s.lockPrefix + name}, l.token, s.lockTTL.Milliseconds()).Int()
		switch {
		case ctx.Err() != nil:
			return
		case err != nil:
			s.log.Warn("Could not extend an ACME lock in Redis; will retry", "lock", name, "error", err.Error())
		case kept == 0:
			s.log.Warn("Lost an ACME lock in Redis: it expired before it was extended, so another kas node may take it", "lock", name)
			return
		}
	}
}

var (
	extendLockScript = redis.NewScript(`
if redis.call("GET", KEYS[1]) == ARGV[1] then
	return redis.call("PEXPIRE", KEYS[1], ARGV[2])
end
return 0`)
	unlockScript = redis.NewScript(`
if redis.call("GET", KEYS[1]) == ARGV[1] then
	return redis.call("DEL", KEYS[1])
end
return 0`)
)
