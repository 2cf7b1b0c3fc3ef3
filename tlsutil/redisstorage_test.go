package tlsutil

import (
	"context"
	"errors"
	"io/fs"
	"reflect"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/redis/go-redis/v9"

	"github.com/kasproject/kas/internal/redistest"
)

func newRedisClient(t *testing.T, srv *redistest.Server) *redis.Client {
	t.Helper()
	client := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	t.Cleanup(func() { _ = client.Close() })
	return client
}

// newRedisStorage is one kas node's storage: its own client, like a node.
func newRedisStorage(t *testing.T, srv *redistest.Server, prefix string, lockTTL time.Duration) *RedisStorage {
	t.Helper()
	logger, _ := newTestLogger(t)
	s := NewRedisStorage(newRedisClient(t, srv), prefix, logger)
	s.lockTTL = lockTTL
	return s
}

// TestRedisStorageMatchesFileStorage runs the same operations on certmagic's
// FileStorage, the reference every certmagic storage imitates, and on
// RedisStorage, and wants the same answers.
func TestRedisStorageMatchesFileStorage(t *testing.T) {
	ctx := context.Background()
	srv := redistest.Start(t)
	file := &certmagic.FileStorage{Path: t.TempDir()}
	red := newRedisStorage(t, srv, "kas-test", DefaultLockTTL)
	storages := map[string]certmagic.Storage{"file": file, "redis": red}

	values := map[string]string{
		"certificates/acme-dir/kas.test/kas.test.crt":      "certificate",
		"certificates/acme-dir/kas.test/kas.test.key":      "key",
		"certificates/acme-dir/kas.test/kas.test.json":     "{}",
		"certificates/acme-dir/other.test/other.test.crt":  "other certificate",
		"acme/acme-dir/users/admin@example.com/admin.json": "account",
		"acme/acme-dir/users/admin@example.com/admin.key":  "account key",
		"last_clean.json": "clean",
		"glob/[a]*?.txt":  "glob characters",
		"glob/a.txt":      "plain",
		"certificates/acme-dir/kas.test.backup/kas.test.crt.copy": "sibling whose name extends kas.test",
	}
	for _, s := range storages {
		for k, v := range values {
			if err := s.Store(ctx, k, []byte(v)); err != nil {
				t.Fatal(err)
			}
		}
	}

	// answers runs op on both storages and compares.
	answers := func(name string, op func(certmagic.Storage) any) {
		t.Helper()
		got := map[string]any{}
		for sn, s := range storages {
			got[sn] = op(s)
		}
		if g, w := got["redis"], got["file"]; !reflect.DeepEqual(g, w) {
			t.Errorf("%s: redis answers %v, file storage answers %v", name, g, w)
		}
	}
	list := func(dir string, recursive bool) func(certmagic.Storage) any {
		return func(s certmagic.Storage) any {
			keys, err := s.List(ctx, dir, recursive)
			slices.Sort(keys)
			return []any{keys, errors.Is(err, fs.ErrNotExist), err == nil}
		}
	}
	stat := func(key string) func(certmagic.Storage) any {
		return func(s certmagic.Storage) any {
			info, err := s.Stat(ctx, key)
			if !info.IsTerminal {
				info.Size = 0 // a directory's size is the file system's business
			}
			return []any{info.Key, info.IsTerminal, info.Size, errors.Is(err, fs.ErrNotExist)}
		}
	}
	load := func(key string) func(certmagic.Storage) any {
		return func(s certmagic.Storage) any {
			v, err := s.Load(ctx, key)
			return []any{string(v), errors.Is(err, fs.ErrNotExist)}
		}
	}
	exists := func(key string) func(certmagic.Storage) any {
		return func(s certmagic.Storage) any { return s.Exists(ctx, key) }
	}
	check := func() {
		t.Helper()
		for k := range values {
			answers("Load "+k, load(k))
			answers("Exists "+k, exists(k))
			answers("Stat "+k, stat(k))
		}
		for _, k := range []string{"missing", "certificates/acme-dir/missing.crt", "glob/*", "certificates/acme-dir/kas"} {
			answers("Load "+k, load(k))
			answers("Exists "+k, exists(k))
			answers("Stat "+k, stat(k))
		}
		for _, dir := range []string{"certificates", "certificates/acme-dir", "certificates/acme-dir/kas.test", "acme", "glob", "missing", "certificates/acme-dir/kas"} {
			answers("Exists "+dir, exists(dir))
			answers("Stat "+dir, stat(dir))
			answers("List "+dir, list(dir, false))
			answers("List -r "+dir, list(dir, true))
		}
	}

	check()
	// Overwriting replaces the value.
	for _, s := range storages {
		if err := s.Store(ctx, "last_clean.json", []byte("cleaned again")); err != nil {
			t.Fatal(err)
		}
	}
	values["last_clean.json"] = "cleaned again"
	check()

	// Deleting a directory deletes what is below it and nothing beside it;
	// deleting what is missing is no error.
	for _, k := range []string{"certificates/acme-dir/kas.test", "glob/[a]*?.txt", "missing"} {
		answers("Delete "+k, func(s certmagic.Storage) any { return s.Delete(ctx, k) })
		for v := range values {
			if v == k || len(v) > len(k) && v[:len(k)+1] == k+"/" {
				delete(values, v)
			}
		}
		check()
	}
	if !red.Exists(ctx, "certificates/acme-dir/kas.test.backup/kas.test.crt.copy") {
		t.Error("deleting directory kas.test deleted kas.test.backup beside it")
	}
}

func TestRedisStorageStat(t *testing.T) {
	ctx := context.Background()
	s := newRedisStorage(t, redistest.Start(t), "kas-test", DefaultLockTTL)
	before := time.Now().Add(-time.Second)
	if err := s.Store(ctx, "a/b", []byte("12345")); err != nil {
		t.Fatal(err)
	}
	info, err := s.Stat(ctx, "a/b")
	if err != nil {
		t.Fatal(err)
	}
	if info.Key != "a/b" || !info.IsTerminal || info.Size != 5 || info.Modified.Before(before) || info.Modified.After(time.Now().Add(time.Second)) {
		t.Errorf("Stat = %+v, want a/b, terminal, 5 bytes, modified just now", info)
	}
}

func TestRedisStoragePrefixIsolation(t *testing.T) {
	ctx := context.Background()
	srv := redistest.Start(t)
	ab := newRedisStorage(t, srv, "ab", DefaultLockTTL)
	glob := newRedisStorage(t, srv, "a*", DefaultLockTTL) // a glob character in the prefix matches nothing else
	if err := ab.Store(ctx, "key", []byte("v")); err != nil {
		t.Fatal(err)
	}
	if _, err := glob.List(ctx, "", true); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("prefix a* lists another prefix's keys: err = %v", err)
	}
	if glob.Exists(ctx, "key") {
		t.Error("prefix a* sees prefix ab's key")
	}
	keys, err := ab.List(ctx, "", true)
	if err != nil || !slices.Equal(keys, []string{"key"}) {
		t.Errorf("List root = %v, %v; want [key]", keys, err)
	}
}

func TestRedisStorageLock(t *testing.T) {
	const lock = "issue_cert_kas.test"
	const ttl = time.Second
	srv := redistest.Start(t)
	raw := newRedisClient(t, srv)
	ctx := context.Background()

	t.Run("contention between two nodes", func(t *testing.T) {
		a := newRedisStorage(t, srv, "contention", ttl)
		b := newRedisStorage(t, srv, "contention", ttl)
		if err := a.Lock(ctx, lock); err != nil {
			t.Fatal(err)
		}
		if ok, err := b.TryLock(ctx, lock); ok || err != nil {
			t.Fatalf("second node's TryLock = %v, %v while the first holds the lock", ok, err)
		}
		short, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
		err := b.Lock(short, lock)
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("second node's Lock while held: %v, want it to wait until its context ends", err)
		}
		// Held past its TTL, the lock is kept alive by its holder.
		time.Sleep(2 * ttl)
		if ok, err := b.TryLock(ctx, lock); ok || err != nil {
			t.Fatalf("second node's TryLock = %v, %v after the TTL, while the first still holds the lock", ok, err)
		}
		if err := a.Unlock(ctx, lock); err != nil {
			t.Fatal(err)
		}
		waitCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if err := b.Lock(waitCtx, lock); err != nil {
			t.Fatalf("second node's Lock after release: %v", err)
		}
		if err := b.Unlock(ctx, lock); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("mutual exclusion", func(t *testing.T) {
		nodes := []*RedisStorage{newRedisStorage(t, srv, "exclusion", ttl), newRedisStorage(t, srv, "exclusion", ttl)}
		var inside, overlaps, entered atomic.Int32
		var wg sync.WaitGroup
		for i := range 4 {
			s := nodes[i%2]
			wg.Go(func() {
				for range 5 {
					waitCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
					err := s.Lock(waitCtx, lock)
					cancel()
					if err != nil {
						t.Error(err)
						return
					}
					if inside.Add(1) != 1 {
						overlaps.Add(1)
					}
					entered.Add(1)
					time.Sleep(5 * time.Millisecond)
					inside.Add(-1)
					if err := s.Unlock(ctx, lock); err != nil {
						t.Error(err)
						return
					}
				}
			})
		}
		wg.Wait()
		if overlaps.Load() != 0 || entered.Load() != 20 {
			t.Errorf("%d of %d critical sections overlapped, want 20 without overlap", overlaps.Load(), entered.Load())
		}
	})

	t.Run("a crashed holder blocks for at most the TTL", func(t *testing.T) {
		s := newRedisStorage(t, srv, "crash", ttl)
		// A holder that died keeps nothing alive: only its key is left.
		if err := raw.Set(ctx, "crash:acme_lock:"+lock, "token of a dead node", 500*time.Millisecond).Err(); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		waitCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if err := s.Lock(waitCtx, lock); err != nil {
			t.Fatalf("Lock after the dead holder's lock expired: %v", err)
		}
		if waited := time.Since(start); waited < 300*time.Millisecond {
			t.Errorf("Lock took a held lock after %s", waited)
		}
		if err := s.Unlock(ctx, lock); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("unlock after losing the lock leaves the new holder's", func(t *testing.T) {
		a := newRedisStorage(t, srv, "lost", ttl)
		b := newRedisStorage(t, srv, "lost", ttl)
		if err := a.Lock(ctx, lock); err != nil {
			t.Fatal(err)
		}
		// The lock expires under a (say Redis lost it), and b takes it.
		if err := raw.Del(ctx, "lost:acme_lock:"+lock).Err(); err != nil {
			t.Fatal(err)
		}
		if ok, err := b.TryLock(ctx, lock); !ok || err != nil {
			t.Fatalf("TryLock of the freed lock = %v, %v", ok, err)
		}
		if err := a.Unlock(ctx, lock); err != nil {
			t.Fatal(err)
		}
		if n, err := raw.Exists(ctx, "lost:acme_lock:"+lock).Result(); n != 1 || err != nil {
			t.Fatalf("the old holder's Unlock deleted the new holder's lock (exists = %d, %v)", n, err)
		}
		if err := b.Unlock(ctx, lock); err != nil {
			t.Fatal(err)
		}
		if n, err := raw.Exists(ctx, "lost:acme_lock:"+lock).Result(); n != 0 || err != nil {
			t.Fatalf("Unlock left the lock (exists = %d, %v)", n, err)
		}
	})

	t.Run("unlock of a lock not held", func(t *testing.T) {
		s := newRedisStorage(t, srv, "unheld", ttl)
		if err := s.Unlock(ctx, lock); err == nil {
			t.Error("Unlock of a lock never taken: no error")
		}
	})
}
