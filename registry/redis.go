package registry

// The Redis registry's key layout. <p> is redis.key_prefix (default
// gitlab-kas); every key and the channel are under it.
//
//	<p>:tunnels:<agent ID>  hash, one per agent with a tunnel on some node.
//	    field: the ID of a node holding tunnels for the agent (random per process)
//	    value: JSON {"expires_at_ms": …, "node_urls": [private API URLs], "tunnels": [TunnelInfo…]}
//	<p>:nodes               hash of live nodes.
//	    field: node ID
//	    value: JSON {"expires_at_ms": …, "node_urls": [private API URLs]}
//	<p>:gc_lock             string: the node collecting garbage this GC period (SET NX PX).
//	<p>:tunnel_events       pub/sub channel: the decimal ID of an agent whose
//	                        tunnels changed on some node.
//
// A node writes its field of an agent's hash whenever its tunnels for that
// agent change and again every refresh period, writing its whole local state
// (so a Redis that restarted empty is refilled), and sets the key's expiry to
// the TTL: a key no node refreshes disappears on its own. Redis 7.0 cannot
// expire a hash field (HEXPIRE came in 7.4), so each value carries its own
// expiry: readers skip expired fields, and the garbage collector deletes them
// (the fields a crashed node left in hashes that live nodes keep refreshing),
// atomically in a Lua script so it never deletes a field refreshed meanwhile.
// Expiry times are wall-clock milliseconds of the writing node, so nodes'
// clocks must agree to well within the TTL.
//
// Registering or looking up an agent touches only that agent's key: O(1) per
// agent, one command per lookup and none while the answer is cached. Only
// the garbage collector and Tunnels for all agents SCAN.

import (
	"cmp"
	"context"
	cryptorand "crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
)

// Defaults of RedisOptions, which are GitLab KAS's.
const (
	DefaultRedisTTL            = 300 * time.Second // agent.redis_conn_info_ttl
	DefaultRedisRefreshPeriod  = 240 * time.Second // agent.redis_conn_info_refresh
	DefaultRedisGCPeriod       = 600 * time.Second // agent.redis_conn_info_gc
	DefaultRedisLookupCacheTTL = 5 * time.Second   // redis.lookup_cache_ttl
)

const (
	// writeBatch bounds the records written in one pipeline.
	writeBatch = 500
	// scanCount is the COUNT hint of SCAN.
	scanCount = 1000
	// minRetry and maxRetry bound the wait before retrying after a Redis error.
	minRetry = 100 * time.Millisecond
	maxRetry = 5 * time.Second
	// pubsubHealthInterval is how long the subscription may stay silent
	// before a PING checks it; no answer within as long again means the
	// connection is dead and is replaced.
	pubsubHealthInterval = 30 * time.Second
	// errorLogInterval is the least time between two logged Redis errors.
	errorLogInterval = 10 * time.Second
)

// RedisOptions configure NewRedis.
type RedisOptions struct {
	// Client reaches Redis (see NewRedisClient). The registry adds a hook to
	// it that counts commands, so give the registry a client of its own.
	// Close does not close it.
	Client redis.UniversalClient
	// KeyPrefix is redis.key_prefix; required.
	KeyPrefix string
	// NodeURLs are this node's private API URLs, which other nodes dial to
	// reach its tunnels; at least one is required.
	NodeURLs []string
	// TTL is how long a record lives unless refreshed (agent.redis_conn_info_ttl).
	TTL time.Duration
	// RefreshPeriod is how often the node rewrites its records
	// (agent.redis_conn_info_refresh); it must be shorter than TTL.
	RefreshPeriod time.Duration
	// GCPeriod is how often expired records are deleted (agent.redis_conn_info_gc).
	GCPeriod time.Duration
	// LookupCacheTTL is how long a FindRemote answer is reused (redis.lookup_cache_ttl).
	LookupCacheTTL time.Duration
	// Logger receives the registry's logs; nil discards them.
	Logger *slog.Logger
	// Registerer receives the registry's metrics; nil leaves them unregistered.
	Registerer prometheus.Registerer
}

// Node is a kas node recorded in Redis.
type Node struct {
	ID   string   `json:"id"`
	URLs []string `json:"urls"`
}

// Redis is the registry of several kas nodes sharing a Redis. It keeps this
// node's tunnels in an embedded Memory (FindLocal never touches Redis) and
// publishes them, with this node's private API URLs, for the other nodes.
// Writes to Redis happen in the background: a Redis outage does not stop the
// node from registering and serving its own tunnels, and once Redis is back
// the node writes its whole state again.
//
// NewRedis starts its goroutines; Close stops them and removes the node's
// records.
type Redis struct {
	local    *Memory
	client   redis.UniversalClient
	keys     redisKeys
	nodeID   string
	nodeURLs []string
	ttl      time.Duration
	refresh  time.Duration
	gcPeriod time.Duration
	log      *slog.Logger
	errLog   *errorLog
	metrics  redisMetrics
	commands *atomic.Uint64
	cache    *lookupCache

	mu      sync.Mutex
	closed  bool
	dirty   map[int64]bool // agents whose record is due → whether to announce the change
	nodeDue bool           // the node record is due
	waiters map[int64]*waitList
	wake    chan struct{} // tells the writer there is work; capacity 1

	// published holds the agents this node has (or may have) a record
	// for. Only the writer goroutine touches it, then Close after it ended.
	published map[int64]struct{}

	cancel context.CancelFunc
	done   sync.WaitGroup
}

var _ Registry = (*Redis)(nil)

// NewRedis returns a registry publishing this node's tunnels in Redis, and
// starts its background work: writing records, refreshing them, listening
// for other nodes' changes and collecting garbage.
func NewRedis(opts RedisOptions) (*Redis, error) {
	if opts.Client == nil {
		return nil, errors.New("new Redis registry: no Redis client")
	}
	if opts.KeyPrefix == "" {
		return nil, errors.New("new Redis registry: empty key prefix (redis.key_prefix)")
	}
	if len(opts.NodeURLs) == 0 {
		return nil, errors.New("new Redis registry: no private API URL for this node; other nodes could not reach its tunnels")
	}
	ttl := cmp.Or(opts.TTL, DefaultRedisTTL)
	refresh := cmp.Or(opts.RefreshPeriod, DefaultRedisRefreshPeriod)
	gcPeriod := cmp.Or(opts.GCPeriod, DefaultRedisGCPeriod)
	cacheTTL := cmp.Or(opts.LookupCacheTTL, DefaultRedisLookupCacheTTL)
	if ttl < 0 || refresh < 0 || gcPeriod < 0 || cacheTTL < 0 {
		return nil, fmt.Errorf("new Redis registry: negative duration (TTL %s, refresh %s, GC %s, lookup cache %s)", ttl, refresh, gcPeriod, cacheTTL)
	}
	if refresh >= ttl {
		return nil, fmt.Errorf("new Redis registry: refresh period %s must be shorter than the TTL %s, or records expire before they are refreshed", refresh, ttl)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	commands := &atomic.Uint64{}
	metrics, err := newRedisMetrics(opts.Registerer, commands)
	if err != nil {
		return nil, err
	}
	r := &Redis{
		local:     NewMemory(),
		client:    opts.Client,
		keys:      newRedisKeys(opts.KeyPrefix),
		nodeID:    cryptorand.Text(),
		nodeURLs:  slices.Clone(opts.NodeURLs),
		ttl:       ttl,
		refresh:   refresh,
		gcPeriod:  gcPeriod,
		log:       log,
		errLog:    &errorLog{log: log, msg: "Redis registry operation failed; this node keeps serving its own tunnels and retries", every: errorLogInterval},
		metrics:   metrics,
		commands:  commands,
		cache:     newLookupCache(cacheTTL),
		dirty:     map[int64]bool{},
		nodeDue:   true,
		waiters:   map[int64]*waitList{},
		wake:      make(chan struct{}, 1),
		published: map[int64]struct{}{},
	}
	r.client.AddHook(commandCounter{commands})
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	r.signal()
	r.done.Go(func() { r.runWriter(ctx) })
	r.done.Go(func() { r.runSubscriber(ctx) })
	r.done.Go(func() { r.runGC(ctx) })
	return r, nil
}

// NodeID is this node's random ID, its field name in Redis.
func (r *Redis) NodeID() string { return r.nodeID }

// RedisCommands is the number of Redis commands this registry's client has
// sent so far (pub/sub subscriptions aside), for measuring their cost per
// request.
func (r *Redis) RedisCommands() uint64 { return r.commands.Load() }

// Register records t locally and wakes requests waiting for its agent here;
// publishing it to Redis happens in the background (and is retried while
// Redis is unreachable), so it fails only once the registry is closed.
func (r *Redis) Register(ctx context.Context, t Tunnel) error {
	id := t.Info().AgentID
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return fmt.Errorf("register agent %d's tunnel: the Redis registry is closed (kas is shutting down)", id)
	}
	if err := r.local.Register(ctx, t); err != nil {
		return err
	}
	r.markLocked(id, true)
	r.wakeLocked(id)
	return nil
}

// Unregister forgets t locally; removing it from Redis happens in the background.
func (r *Redis) Unregister(ctx context.Context, t Tunnel) error {
	id := t.Info().AgentID
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.local.Unregister(ctx, t); err != nil {
		return err
	}
	if !r.closed {
		r.markLocked(id, true)
	}
	return nil
}

// FindLocal returns one of this node's tunnels for the agent; it never
// touches Redis.
func (r *Redis) FindLocal(agentID int64) (Tunnel, bool) { return r.local.FindLocal(agentID) }

// FindRemote returns, for each other node holding tunnels for the agent, that
// node's private API URLs, in random order so callers trying them in turn
// spread the load. The answer is cached for the lookup cache TTL and
// invalidated when any node announces a change for the agent. The inner
// slices are shared and must not be modified.
func (r *Redis) FindRemote(ctx context.Context, agentID int64) ([][]string, error) {
	nodes, err := r.cache.get(ctx, agentID, r.lookup)
	if err != nil {
		return nil, err
	}
	out := slices.Clone(nodes)
	rand.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
	return out, nil
}

// lookup reads the agent's hash: one HGETALL.
func (r *Redis) lookup(ctx context.Context, agentID int64) ([][]string, error) {
	key := r.keys.tunnels(agentID)
	fields, err := r.client.HGetAll(ctx, key).Result()
	if err != nil {
		err = fmt.Errorf("look up agent %d's tunnels in Redis (%s): %w", agentID, key, err)
		r.reportError("lookup", err)
		return nil, err
	}
	now := time.Now()
	var nodes [][]string
	for node, value := range fields {
		if node == r.nodeID {
			continue
		}
		if rec, ok := r.decode(key, node, value, now); ok && len(rec.NodeURLs) > 0 {
			nodes = append(nodes, rec.NodeURLs)
		}
	}
	return nodes, nil
}

// WaitForAgent returns when a tunnel for the agent is registered on any
// node, or with ctx's error. While Redis is unreachable it still returns as
// soon as the agent connects to this node.
func (r *Redis) WaitForAgent(ctx context.Context, agentID int64) error {
	for {
		// Join the wait list before looking, so a change announced
		// between the look and the wait still wakes us.
		w := r.addWaiter(agentID)
		if r.hasLocal(agentID) {
			r.removeWaiter(agentID, w)
			return nil
		}
		// A Redis error is not the caller's failure: keep waiting, as the
		// node announces its tunnels again once Redis is back.
		if nodes, err := r.FindRemote(ctx, agentID); err == nil && len(nodes) > 0 {
			r.removeWaiter(agentID, w)
			return nil
		}
		select {
		case <-w.ready:
			// Something changed for the agent: look again, as it may
			// have been a tunnel going away.
		case <-ctx.Done():
			r.removeWaiter(agentID, w)
			return ctx.Err()
		}
	}
}

func (r *Redis) hasLocal(agentID int64) bool {
	infos, _ := r.local.Tunnels(context.Background(), agentID)
	return len(infos) > 0
}

// Tunnels lists the connections on every node for the given agents (all
// agents when none are given), each with its node's private API URLs. This
// node's come from memory, the others' from Redis; listing all agents scans
// Redis, so it is for the agent tracker and the status page, not for requests.
func (r *Redis) Tunnels(ctx context.Context, agentIDs ...int64) ([]TunnelInfo, error) {
	out, _ := r.local.Tunnels(ctx, agentIDs...)
	for i := range out {
		out[i].NodeURLs = slices.Clone(r.nodeURLs)
	}
	var mu sync.Mutex
	collect := func(ctx context.Context, keys []string) error {
		infos, err := r.readTunnels(ctx, keys)
		if err != nil {
			return err
		}
		mu.Lock()
		out = append(out, infos...)
		mu.Unlock()
		return nil
	}
	var err error
	if len(agentIDs) == 0 {
		err = r.scan(ctx, r.keys.tunnelsPattern(), collect)
	} else {
		keys := make([]string, len(agentIDs))
		for i, id := range agentIDs {
			keys[i] = r.keys.tunnels(id)
		}
		err = collect(ctx, keys)
	}
	if err != nil {
		err = fmt.Errorf("list agent tunnels in Redis: %w", err)
		r.reportError("list", err)
		return nil, err
	}
	slices.SortFunc(out, func(a, b TunnelInfo) int {
		return cmp.Or(
			cmp.Compare(a.AgentID, b.AgentID),
			slices.Compare(a.NodeURLs, b.NodeURLs),
			cmp.Compare(a.ConnectionID, b.ConnectionID),
		)
	})
	return out, nil
}

// LocalTunnels lists this node's own connections from memory, without
// Redis: what the status page still shows while Redis is unreachable.
func (r *Redis) LocalTunnels() []TunnelInfo {
	out, _ := r.local.Tunnels(context.Background())
	for i := range out {
		out[i].NodeURLs = slices.Clone(r.nodeURLs)
	}
	return out
}

// readTunnels reads other nodes' live tunnels from the given agent hashes.
func (r *Redis) readTunnels(ctx context.Context, keys []string) ([]TunnelInfo, error) {
	pipe := r.client.Pipeline()
	cmds := make([]*redis.MapStringStringCmd, len(keys))
	for i, key := range keys {
		cmds[i] = pipe.HGetAll(ctx, key)
	}
	if _, err := pipe.Exec(ctx); err != nil {
		return nil, err
	}
	now := time.Now()
	var out []TunnelInfo
	for i, cmd := range cmds {
		for node, value := range cmd.Val() {
			if node == r.nodeID {
				continue
			}
			rec, ok := r.decode(keys[i], node, value, now)
			if !ok {
				continue
			}
			for _, info := range rec.Tunnels {
				info.NodeURLs = rec.NodeURLs
				out = append(out, info)
			}
		}
	}
	return out, nil
}

// Nodes lists the live nodes recorded in Redis, this one included once it
// has written its record, sorted by ID.
func (r *Redis) Nodes(ctx context.Context) ([]Node, error) {
	fields, err := r.client.HGetAll(ctx, r.keys.nodes).Result()
	if err != nil {
		err = fmt.Errorf("list kas nodes in Redis (%s): %w", r.keys.nodes, err)
		r.reportError("list", err)
		return nil, err
	}
	return r.liveNodes(fields, time.Now()), nil
}

func (r *Redis) liveNodes(fields map[string]string, now time.Time) []Node {
	var nodes []Node
	for id, value := range fields {
		if rec, ok := r.decode(r.keys.nodes, id, value, now); ok {
			nodes = append(nodes, Node{ID: id, URLs: rec.NodeURLs})
		}
	}
	slices.SortFunc(nodes, func(a, b Node) int { return strings.Compare(a.ID, b.ID) })
	return nodes
}

// Close stops the background work and removes this node's records from
// Redis, announcing the change, within ctx. If Redis cannot be reached the
// records stay until they expire, and Close says so. Tunnels registered
// locally remain usable through FindLocal; Register fails from now on.
func (r *Redis) Close(ctx context.Context) error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	r.mu.Unlock()
	r.cancel()
	r.done.Wait()

	withdraw := r.published
	r.mu.Lock()
	for id := range r.dirty {
		withdraw[id] = struct{}{}
	}
	r.mu.Unlock()
	infos, _ := r.local.Tunnels(ctx)
	for _, info := range infos {
		withdraw[info.AgentID] = struct{}{}
	}
	pipe := r.client.Pipeline()
	for id := range withdraw {
		pipe.HDel(ctx, r.keys.tunnels(id), r.nodeID)
		pipe.Publish(ctx, r.keys.events, strconv.FormatInt(id, 10))
	}
	pipe.HDel(ctx, r.keys.nodes, r.nodeID)
	if _, err := pipe.Exec(ctx); err != nil {
		r.metrics.errors.WithLabelValues("close").Inc()
		return fmt.Errorf("remove this node's records from Redis (they expire by themselves within %s): %w", r.ttl, err)
	}
	r.metrics.publishedAgents.Set(0)
	return nil
}

// markLocked makes the agent's record due, announcing it if announce.
func (r *Redis) markLocked(agentID int64, announce bool) {
	r.dirty[agentID] = r.dirty[agentID] || announce
	r.signal()
}

// markAll makes every local agent's record and the node record due.
func (r *Redis) markAll(announce bool) {
	infos, _ := r.local.Tunnels(context.Background())
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, info := range infos {
		r.markLocked(info.AgentID, announce)
	}
	r.nodeDue = true
	r.signal()
}

// signal wakes the writer without blocking.
func (r *Redis) signal() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// runWriter writes due records: on changes, every refresh period, and after
// an error again with backoff (at most a refresh period apart, so a node
// recovers within one refresh period of Redis coming back).
func (r *Redis) runWriter(ctx context.Context) {
	refresh := time.NewTicker(r.refresh)
	defer refresh.Stop()
	retry := backoff{max: min(maxRetry, r.refresh)}
	var retryAfter <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.wake:
		case <-refresh.C:
			r.markAll(false)
			r.cache.sweep()
		case <-retryAfter:
			retryAfter = nil
		}
		if retryAfter != nil {
			continue // waiting out an error; the retry writes everything due
		}
		if err := r.write(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			r.reportError("write", err)
			retryAfter = time.After(retry.next())
			continue
		}
		retry.reset()
	}
}

// write writes every due record, in pipelines of writeBatch agents. What
// fails stays due.
func (r *Redis) write(ctx context.Context) error {
	r.mu.Lock()
	due, nodeDue := r.dirty, r.nodeDue
	r.dirty, r.nodeDue = map[int64]bool{}, false
	r.mu.Unlock()

	ids := make([]int64, 0, len(due))
	for id := range due {
		ids = append(ids, id)
	}
	for len(ids) > 0 || nodeDue {
		n := min(len(ids), writeBatch)
		if err := r.writeBatch(ctx, ids[:n], due, nodeDue); err != nil {
			r.mu.Lock()
			for _, id := range ids {
				r.dirty[id] = r.dirty[id] || due[id]
			}
			r.nodeDue = r.nodeDue || nodeDue
			r.mu.Unlock()
			return err
		}
		ids, nodeDue = ids[n:], false
	}
	r.metrics.publishedAgents.Set(float64(len(r.published)))
	return nil
}

// writeBatch writes the agents' records from the local state (deleting the
// record of an agent with no tunnel left here) and, if nodeDue, the node
// record, reading back the node list for the nodes gauge.
func (r *Redis) writeBatch(ctx context.Context, ids []int64, announce map[int64]bool, nodeDue bool) error {
	expires := time.Now().Add(r.ttl).UnixMilli()
	pipe := r.client.Pipeline()
	var nodes *redis.MapStringStringCmd
	if nodeDue {
		value, err := json.Marshal(record{ExpiresAtMS: expires, NodeURLs: r.nodeURLs})
		if err != nil {
			return fmt.Errorf("encode node record: %w", err)
		}
		pipe.HSet(ctx, r.keys.nodes, r.nodeID, value)
		pipe.PExpire(ctx, r.keys.nodes, r.ttl)
		nodes = pipe.HGetAll(ctx, r.keys.nodes)
	}
	held := make([]bool, len(ids))
	for i, id := range ids {
		key := r.keys.tunnels(id)
		infos, _ := r.local.Tunnels(ctx, id)
		if held[i] = len(infos) > 0; held[i] {
			for j := range infos {
				infos[j].NodeURLs = nil // stored once per record
			}
			value, err := json.Marshal(record{ExpiresAtMS: expires, NodeURLs: r.nodeURLs, Tunnels: infos})
			if err != nil {
				return fmt.Errorf("encode agent %d's tunnels: %w", id, err)
			}
			pipe.HSet(ctx, key, r.nodeID, value)
			pipe.PExpire(ctx, key, r.ttl)
			// Recorded before Exec: a failed pipeline may still have
			// written it, and Close must then remove it.
			r.published[id] = struct{}{}
		} else {
			pipe.HDel(ctx, key, r.nodeID)
		}
		if announce[id] {
			pipe.Publish(ctx, r.keys.events, strconv.FormatInt(id, 10))
		}
	}
	if _, err := pipe.Exec(ctx); err != nil {
		return fmt.Errorf("write this node's records to Redis: %w", err)
	}
	for i, id := range ids {
		if !held[i] {
			delete(r.published, id)
		}
	}
	if nodes != nil {
		r.metrics.nodes.Set(float64(len(r.liveNodes(nodes.Val(), time.Now()))))
	}
	return nil
}

// runSubscriber listens on the channel for other nodes' changes,
// resubscribing with backoff after a failure.
func (r *Redis) runSubscriber(ctx context.Context) {
	retry := backoff{max: maxRetry}
	for {
		subscribed, err := r.listen(ctx)
		// Announcements may be lost from now until the next subscription.
		r.cache.setActive(false)
		if ctx.Err() != nil {
			return
		}
		if subscribed {
			retry.reset()
		}
		r.reportError("subscribe", fmt.Errorf("receive from Redis channel %s: %w", r.keys.events, err))
		select {
		case <-ctx.Done():
			return
		case <-time.After(retry.next()):
		}
	}
}

// listen runs one subscription until it fails, reporting whether it was
// ever confirmed.
func (r *Redis) listen(ctx context.Context) (subscribed bool, err error) {
	ps := r.client.Subscribe(ctx, r.keys.events)
	// Close interrupts a blocked receive when the registry closes.
	stop := context.AfterFunc(ctx, func() { _ = ps.Close() })
	defer func() {
		stop()
		_ = ps.Close()
	}()
	pinged := false
	for {
		msg, err := ps.ReceiveTimeout(ctx, pubsubHealthInterval)
		if err != nil {
			var netErr net.Error
			if errors.As(err, &netErr) && netErr.Timeout() && !pinged {
				if err := ps.Ping(ctx); err != nil {
					return subscribed, err
				}
				pinged = true
				continue
			}
			return subscribed, err
		}
		pinged = false
		switch m := msg.(type) {
		case *redis.Subscription:
			if m.Kind == "subscribe" {
				r.onSubscribed(subscribed)
				subscribed = true
			}
		case *redis.Message:
			r.onAnnouncement(m.Payload)
		}
	}
}

// onSubscribed starts caching and makes up for announcements that may have
// been missed: waiters look again, and this node announces all its records
// again (Redis may have restarted empty, and waiters elsewhere need to hear).
func (r *Redis) onSubscribed(resubscribed bool) {
	r.cache.setActive(true)
	r.mu.Lock()
	for id, w := range r.waiters {
		close(w.ready)
		delete(r.waiters, id)
	}
	r.mu.Unlock()
	r.markAll(true)
	if resubscribed || r.errLog.hadErrors() {
		r.log.Info("Subscribed to Redis again; writing this node's tunnel records again", "channel", r.keys.events)
	}
}

// onAnnouncement handles an agent's change on some node.
func (r *Redis) onAnnouncement(payload string) {
	id, err := strconv.ParseInt(payload, 10, 64)
	if err != nil {
		r.reportError("decode", fmt.Errorf("message %q on Redis channel %s is not an agent ID; is another program publishing there? %w", payload, r.keys.events, err))
		return
	}
	r.cache.invalidate(id)
	r.mu.Lock()
	r.wakeLocked(id)
	r.mu.Unlock()
}

// runGC deletes expired records every GC period.
func (r *Redis) runGC(ctx context.Context) {
	t := time.NewTicker(r.gcPeriod)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := r.collectGarbage(ctx); err != nil && ctx.Err() == nil {
				r.reportError("gc", err)
			}
		}
	}
}

// gcScript deletes the fields of hash KEYS[1] whose record expired before
// ARGV[1] (Unix milliseconds), or that are not records at all, and returns
// how many it deleted. Running in Redis makes read and delete atomic, so a
// field refreshed in between is never deleted.
var gcScript = redis.NewScript(`
local removed = 0
local all = redis.call('HGETALL', KEYS[1])
local now = tonumber(ARGV[1])
for i = 1, #all, 2 do
  local ok, rec = pcall(cjson.decode, all[i + 1])
  if not ok or type(rec) ~= 'table' or type(rec.expires_at_ms) ~= 'number' or rec.expires_at_ms <= now then
    redis.call('HDEL', KEYS[1], all[i])
    removed = removed + 1
  end
end
return removed
`)

// collectGarbage deletes expired records, unless another node does so this
// period.
func (r *Redis) collectGarbage(ctx context.Context) error {
	won, err := r.client.SetNX(ctx, r.keys.gcLock, r.nodeID, r.gcPeriod).Result()
	if err != nil {
		return fmt.Errorf("take the garbage collection lock %s: %w", r.keys.gcLock, err)
	}
	if !won {
		return nil
	}
	if err := gcScript.Load(ctx, r.client).Err(); err != nil {
		return fmt.Errorf("load the garbage collection script: %w", err)
	}
	now := time.Now().UnixMilli()
	var removed atomic.Int64
	sweep := func(ctx context.Context, keys []string) error {
		pipe := r.client.Pipeline()
		cmds := make([]*redis.Cmd, len(keys))
		for i, key := range keys {
			cmds[i] = gcScript.EvalSha(ctx, pipe, []string{key}, now)
		}
		if _, err := pipe.Exec(ctx); err != nil {
			return err
		}
		for _, cmd := range cmds {
			n, _ := cmd.Int64()
			removed.Add(n)
		}
		return nil
	}
	if err := sweep(ctx, []string{r.keys.nodes}); err != nil {
		return fmt.Errorf("delete expired node records: %w", err)
	}
	if err := r.scan(ctx, r.keys.tunnelsPattern(), sweep); err != nil {
		return fmt.Errorf("delete expired tunnel records: %w", err)
	}
	if n := removed.Load(); n > 0 {
		r.log.Info("Deleted expired records of kas nodes that stopped without cleaning up", "records", n)
	}
	return nil
}

// scan calls fn with batches of the keys matching pattern, on every primary
// of a cluster (concurrently) or on the one server.
func (r *Redis) scan(ctx context.Context, pattern string, fn func(context.Context, []string) error) error {
	scanOne := func(ctx context.Context, c redis.Cmdable) error {
		var cursor uint64
		for {
			keys, next, err := c.Scan(ctx, cursor, pattern, scanCount).Result()
			if err != nil {
				return err
			}
			if len(keys) > 0 {
				if err := fn(ctx, keys); err != nil {
					return err
				}
			}
			if next == 0 {
				return nil
			}
			cursor = next
		}
	}
	if cc, ok := r.client.(*redis.ClusterClient); ok {
		return cc.ForEachMaster(ctx, func(ctx context.Context, c *redis.Client) error { return scanOne(ctx, c) })
	}
	return scanOne(ctx, r.client)
}

// decode parses a record, reporting whether it is valid and live.
func (r *Redis) decode(key, field, value string, now time.Time) (record, bool) {
	var rec record
	if err := json.Unmarshal([]byte(value), &rec); err != nil {
		r.reportError("decode", fmt.Errorf("field %s of Redis hash %s is not a kas record (it is skipped, and deleted by garbage collection): %w", field, key, err))
		return record{}, false
	}
	return rec, rec.ExpiresAtMS > now.UnixMilli()
}

// reportError counts err and logs it, at most once per errorLogInterval.
func (r *Redis) reportError(operation string, err error) {
	r.metrics.errors.WithLabelValues(operation).Inc()
	r.errLog.report(operation, err)
}

// addWaiter joins the agent's wait list.
func (r *Redis) addWaiter(agentID int64) *waitList {
	r.mu.Lock()
	defer r.mu.Unlock()
	w := r.waiters[agentID]
	if w == nil {
		w = &waitList{ready: make(chan struct{})}
		r.waiters[agentID] = w
	}
	w.waiting++
	return w
}

// removeWaiter leaves w, forgetting it when its last waiter leaves so
// agents that never connect do not accumulate entries.
func (r *Redis) removeWaiter(agentID int64, w *waitList) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if w.waiting--; w.waiting == 0 && r.waiters[agentID] == w {
		delete(r.waiters, agentID)
	}
}

// wakeLocked wakes everyone waiting for the agent.
func (r *Redis) wakeLocked(agentID int64) {
	if w := r.waiters[agentID]; w != nil {
		close(w.ready)
		delete(r.waiters, agentID)
	}
}

// record is the JSON value of a hash field.
type record struct {
	ExpiresAtMS int64        `json:"expires_at_ms"`
	NodeURLs    []string     `json:"node_urls"`
	Tunnels     []TunnelInfo `json:"tunnels,omitempty"`
}

// redisKeys names the keys and the channel under the prefix.
type redisKeys struct {
	prefix string
	nodes  string
	gcLock string
	events string
}

func newRedisKeys(prefix string) redisKeys {
	return redisKeys{
		prefix: prefix,
		nodes:  prefix + ":nodes",
		gcLock: prefix + ":gc_lock",
		events: prefix + ":tunnel_events",
	}
}

func (k redisKeys) tunnels(agentID int64) string {
	return k.prefix + ":tunnels:" + strconv.FormatInt(agentID, 10)
}

// tunnelsPattern matches every agent hash, the prefix escaped so that glob
// characters in it match themselves.
func (k redisKeys) tunnelsPattern() string {
	var b strings.Builder
	for _, c := range k.prefix {
		if strings.ContainsRune(`*?[]\`, c) {
			b.WriteByte('\\')
		}
		b.WriteRune(c)
	}
	return b.String() + ":tunnels:*"
}

// backoff doubles the wait after each consecutive failure, from minRetry up to max.
type backoff struct {
	max time.Duration
	cur time.Duration
}

func (b *backoff) next() time.Duration {
	b.cur = min(max(2*b.cur, minRetry), b.max)
	return b.cur
}

func (b *backoff) reset() { b.cur = 0 }

// errorLog logs errors at most once per interval, counting those it skipped,
// so an unreachable Redis does not flood the log with one line per request.
type errorLog struct {
	log   *slog.Logger
	msg   string
	every time.Duration

	mu         sync.Mutex
	last       time.Time
	suppressed int
}

func (e *errorLog) report(operation string, err error) {
	e.mu.Lock()
	now := time.Now()
	if !e.last.IsZero() && now.Sub(e.last) < e.every {
		e.suppressed++
		e.mu.Unlock()
		return
	}
	suppressed := e.suppressed
	e.last, e.suppressed = now, 0
	e.mu.Unlock()
	e.log.Error(e.msg, "operation", operation, "error", err.Error(), "errors_not_logged_since_last", suppressed)
}

// hadErrors reports whether any error was logged.
func (e *errorLog) hadErrors() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return !e.last.IsZero()
}

// RedisClientLogger takes go-redis's own log lines (a dial failure each time
// the client tries to reconnect, for instance) into slog, at most one per
// errorLogInterval so an outage does not flood the log. go-redis has one
// logger per process: install it at start-up with redis.SetLogger.
type RedisClientLogger struct{ errLog *errorLog }

// NewRedisClientLogger returns a go-redis logger writing to log.
func NewRedisClientLogger(log *slog.Logger) *RedisClientLogger {
	return &RedisClientLogger{&errorLog{log: log, msg: "Redis client error", every: errorLogInterval}}
}

// Printf logs one go-redis message, unless one was logged recently.
func (l *RedisClientLogger) Printf(_ context.Context, format string, v ...any) {
	l.errLog.report("client", errors.New(fmt.Sprintf(format, v...)))
}

// commandCounter is a go-redis hook counting the commands sent.
type commandCounter struct{ n *atomic.Uint64 }

func (c commandCounter) DialHook(next redis.DialHook) redis.DialHook { return next }

func (c commandCounter) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		c.n.Add(1)
		return next(ctx, cmd)
	}
}

func (c commandCounter) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		c.n.Add(uint64(len(cmds)))
		return next(ctx, cmds)
	}
}

// redisMetrics are the registry's Prometheus metrics.
type redisMetrics struct {
	errors          *prometheus.CounterVec
	nodes           prometheus.Gauge
	publishedAgents prometheus.Gauge
}

func newRedisMetrics(reg prometheus.Registerer, commands *atomic.Uint64) (redisMetrics, error) {
	m := redisMetrics{
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kas_registry_redis_errors_total",
			Help: "Failed Redis operations of the agent registry, by operation (write, lookup, list, subscribe, gc, decode, close).",
		}, []string{"operation"}),
		nodes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kas_registry_nodes",
			Help: "Live kas nodes recorded in Redis, as of this node's last refresh.",
		}),
		publishedAgents: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kas_registry_published_agents",
			Help: "Agents for which this node has a tunnel record in Redis.",
		}),
	}
	if reg == nil {
		return m, nil
	}
	commandsTotal := prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "kas_registry_redis_commands_total",
		Help: "Redis commands sent by the agent registry's client.",
	}, func() float64 { return float64(commands.Load()) })
	for _, c := range []prometheus.Collector{m.errors, m.nodes, m.publishedAgents, commandsTotal} {
		if err := reg.Register(c); err != nil {
			return redisMetrics{}, fmt.Errorf("register Redis registry metrics: %w", err)
		}
	}
	return m, nil
}
