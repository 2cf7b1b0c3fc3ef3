package receptive

// Leases in Redis decide which nodes hold each receptive agent. <p> is
// redis.key_prefix (default gitlab-kas).
//
//	<p>:receptive:nodes        hash of the nodes taking part.
//	    field: node ID; value: expiry, Unix milliseconds.
//	<p>:receptive:lease:<id>   hash of the holders of agent <id>.
//	    field: node ID; value: "<expiry ms>:<flags>", flags a subset of
//	    "c" (the holder's connection to the agent is up) and "d" (the
//	    holder is displaced: rendezvous hashing prefers other nodes now).
//
// Every sync (four times per lease period) a node renews its node record
// and reads the live nodes (one script), then, for every agent it is among
// the preferred holders of or holds, runs one script on that agent's hash
// (pipelined). The preferred holders of an agent are the first
// min(connections_per_agent, live nodes) live nodes ranked by rendezvous
// hashing of (node, agent); every node computes the same ranking from the
// same node list. Records live for three quarters of a lease period, so a
// node that stops renewing — killed, frozen, cut off — drops out of the
// ranking and out of its leases within that time, and the next node in the
// ranking takes the lease at its next sync: within one lease period.
//
// The scripts keep two nodes from fighting over a slot: a preferred node
// takes a lease only while fewer than that many undisplaced holders hold
// it, and a displaced holder lets go only once at least that many other
// holders are connected (at once if it is not connected itself). So when a
// node joins, the agents it is now preferred for get one more connection
// first, and the node they move away from leaves after: the agent never
// has fewer connections than before. Each hash has one key, so the scripts
// work on Redis Cluster too. Expiry times are wall-clock milliseconds of the
// writing node, so nodes' clocks must agree to well within a lease period.

import (
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// LeaseOptions configure NewLeases.
type LeaseOptions struct {
	// Client reaches Redis.
	Client redis.UniversalClient
	// KeyPrefix is redis.key_prefix.
	KeyPrefix string
	// NodeID identifies this node; unique per process.
	NodeID string
	// PerAgent is agent.receptive.connections_per_agent.
	PerAgent int
	// Period is agent.receptive.lease_period.
	Period time.Duration
}

// Leases takes and renews this node's leases on receptive agents.
type Leases struct {
	client   redis.UniversalClient
	prefix   string
	nodeID   string
	perAgent int
	period   time.Duration
	ttl      time.Duration
	// commands counts the Redis commands sent, for the metric and the
	// benchmark.
	commands atomic.Uint64
	// scriptLoaded: Redis knows leaseScript, which runs pipelined (where
	// go-redis cannot fall back from EVALSHA to EVAL).
	scriptLoaded atomic.Bool
}

// NewLeases checks opts.
func NewLeases(opts LeaseOptions) (*Leases, error) {
	switch {
	case opts.Client == nil:
		return nil, errors.New("receptive leases: no Redis client")
	case opts.KeyPrefix == "" || opts.NodeID == "":
		return nil, errors.New("receptive leases: key prefix and node ID are required")
	case opts.PerAgent < 1:
		return nil, fmt.Errorf("receptive leases: connections per agent must be at least 1, got %d", opts.PerAgent)
	case opts.Period < 4*time.Millisecond:
		return nil, fmt.Errorf("receptive leases: lease period %s is too short", opts.Period)
	}
	return &Leases{
		client:   opts.Client,
		prefix:   opts.KeyPrefix + ":receptive:",
		nodeID:   opts.NodeID,
		perAgent: opts.PerAgent,
		period:   opts.Period,
		ttl:      opts.Period * 3 / 4,
	}, nil
}

// SyncInterval is how often Sync must run: a quarter of the lease period.
func (l *Leases) SyncInterval() time.Duration { return l.period / 4 }

// Commands is the number of Redis commands sent so far.
func (l *Leases) Commands() uint64 { return l.commands.Load() }

func (l *Leases) nodesKey() string { return l.prefix + "nodes" }

func (l *Leases) leaseKey(agentID int64) string {
	return l.prefix + "lease:" + strconv.FormatInt(agentID, 10)
}

// heartbeatScript records node ARGV[1] as live until ARGV[3] in hash
// KEYS[1], deletes the records that expired before ARGV[2], keeps the hash
// for ARGV[4] milliseconds, and returns the live nodes.
var heartbeatScript = redis.NewScript(`
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local now = tonumber(ARGV[2])
local live = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local exp = tonumber(all[i + 1])
  if exp == nil or exp <= now then
    redis.call('HDEL', KEYS[1], all[i])
  else
    live[#live + 1] = all[i]
  end
end
return live
`)

// leaseScript is one node's move on agent hash KEYS[1]. ARGV: node, now,
// expiry (ms), capacity, flags, mode, key lifetime (ms). Expired records
// go first. Mode "hold" (a preferred node) renews the node's lease, or
// takes one while fewer than capacity undisplaced holders remain. Mode
// "yield" (a displaced holder) lets go when the node is not connected or
// at least capacity other holders are, and otherwise renews. It returns
// 1 when the node holds the lease afterwards, 0 when not.
var leaseScript = redis.NewScript(`
local node, now, value = ARGV[1], tonumber(ARGV[2]), ARGV[3] .. ':' .. ARGV[5]
local capacity, mode = tonumber(ARGV[4]), ARGV[6]
local mine, undisplaced, connected = false, 0, 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local exp, flags = string.match(all[i + 1], '^(%d+):(%a*)$')
  if exp == nil or tonumber(exp) <= now then
    redis.call('HDEL', KEYS[1], all[i])
  elseif all[i] == node then
    mine = true
  else
    if not string.find(flags, 'd', 1, true) then undisplaced = undisplaced + 1 end
    if string.find(flags, 'c', 1, true) then connected = connected + 1 end
  end
end
if mode == 'hold' then
  if not mine and undisplaced >= capacity then return 0 end
else
  if not mine then return 0 end
  if not string.find(ARGV[5], 'c', 1, true) or connected >= capacity then
    redis.call('HDEL', KEYS[1], node)
    return 0
  end
end
redis.call('HSET', KEYS[1], node, value)
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return 1
`)

// Sync renews this node's record and leases and returns the agents it
// holds afterwards. agents lists every receptive agent; held says which
// this node held until now, connected which of those it has a connection
// to. On an error nothing can be concluded: callers keep what they hold.
func (l *Leases) Sync(ctx context.Context, agents []int64, held, connected func(int64) bool) (map[int64]bool, error) {
	now := time.Now()
	nowMS := now.UnixMilli()
	expiry := now.Add(l.ttl).UnixMilli()
	keyLife := (2 * l.ttl).Milliseconds()

	l.commands.Add(1)
	live, err := l.runScript(ctx, heartbeatScript, []string{l.nodesKey()}, l.nodeID, nowMS, expiry, keyLife).StringSlice()
	if err != nil {
		return nil, fmt.Errorf("renew this node's record in Redis (%s): %w", l.nodesKey(), err)
	}
	if !slices.Contains(live, l.nodeID) {
		live = append(live, l.nodeID) // a clock far behind the others'; take part anyway
	}
	capacity := min(l.perAgent, len(live))

	type move struct {
		agent int64
		cmd   *redis.Cmd
	}
	var moves []move
	pipe := l.client.Pipeline()
	for _, id := range agents {
		preferred := rank(live, l.nodeID, id) < capacity
		if !preferred && !held(id) {
			continue
		}
		mode, flags := "hold", ""
		if !preferred {
			mode, flags = "yield", "d"
		}
		if held(id) && connected(id) {
			flags += "c"
		}
		cmd := leaseScript.EvalSha(ctx, pipe, []string{l.leaseKey(id)}, l.nodeID, nowMS, expiry, capacity, flags, mode, keyLife)
		moves = append(moves, move{id, cmd})
	}
	if len(moves) > 0 {
		if !l.scriptLoaded.Load() {
			l.commands.Add(1)
			if err := leaseScript.Load(ctx, l.client).Err(); err != nil {
				return nil, fmt.Errorf("load the lease script into Redis: %w", err)
			}
			l.scriptLoaded.Store(true)
		}
		l.commands.Add(uint64(len(moves)))
		if _, err := pipe.Exec(ctx); err != nil {
			if isNoScript(err) {
				// Redis restarted and forgot the script: load it next time.
				l.scriptLoaded.Store(false)
			}
			return nil, fmt.Errorf("renew leases on receptive agents in Redis: %w", err)
		}
	}
	out := make(map[int64]bool, len(moves))
	for _, mv := range moves {
		if n, _ := mv.cmd.Int64(); n == 1 {
			out[mv.agent] = true
		}
	}
	return out, nil
}

// runScript runs a script by hash, loading it when Redis does not know it.
func (l *Leases) runScript(ctx context.Context, s *redis.Script, keys []string, args ...any) *redis.Cmd {
	cmd := s.EvalSha(ctx, l.client, keys, args...)
	if isNoScript(cmd.Err()) {
		l.commands.Add(1)
		cmd = s.Eval(ctx, l.client, keys, args...)
	}
	return cmd
}

func isNoScript(err error) bool {
	return err != nil && strings.HasPrefix(err.Error(), "NOSCRIPT")
}

// Release gives up this node's leases on the agents and its node record,
// so the other nodes take over at their next sync instead of a lease
// period later (shutdown, or agents no longer listed).
func (l *Leases) Release(ctx context.Context, agents []int64, leaving bool) error {
	pipe := l.client.Pipeline()
	for _, id := range agents {
		pipe.HDel(ctx, l.leaseKey(id), l.nodeID)
	}
	if leaving {
		pipe.HDel(ctx, l.nodesKey(), l.nodeID)
	}
	n := pipe.Len()
	if n == 0 {
		return nil
	}
	l.commands.Add(uint64(n))
	if _, err := pipe.Exec(ctx); err != nil {
		return fmt.Errorf("release leases on receptive agents in Redis: %w", err)
	}
	return nil
}

// rank is node's place among live nodes for the agent by rendezvous
// (highest random weight) hashing: 0 is the most preferred. Every node
// computes the same ranking from the same list, and a node joining or
// leaving moves only the agents it ranks first or is ranked among.
func rank(live []string, node string, agentID int64) int {
	mine := weight(node, agentID)
	r := 0
	for _, other := range live {
		if other == node {
			continue
		}
		w := weight(other, agentID)
		if w > mine || (w == mine && cmp.Less(other, node)) {
			r++
		}
	}
	return r
}

// weight is the rendezvous hash of (node, agent): FNV-1a, finished with
// SplitMix64's mixer so that similar inputs spread.
func weight(node string, agentID int64) uint64 {
	h := fnv.New64a()
	_, _ = h.Write([]byte(node))
	var b [9]byte
	b[0] = 0 // separates the node ID from the agent ID
	binary.BigEndian.PutUint64(b[1:], uint64(agentID))
	_, _ = h.Write(b[:])
	z := h.Sum64()
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}
