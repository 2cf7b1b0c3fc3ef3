package main

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"k8s.io/client-go/rest"

	"github.com/kasproject/kas/agent"
	"github.com/kasproject/kas/server/config"
	"github.com/kasproject/kas/server/standalone"
)

// The receptive measurement: receptiveNodes kas nodes sharing a Redis (under
// their own key prefix) dial -receptive-agents receptive agentk, all run by
// one child process on loopback. It measures, at kas's default
// connections_per_agent and lease period (or -receptive-lease-period):
//
//   - the Redis commands the nodes spend on leases per second in steady state
//     (kas_receptive_lease_redis_commands_total, summed over the nodes);
//   - the time from an agent appearing in the standalone file to the first
//     request proxied through it (poll_period receptivePoll; the standalone
//     file itself is rechecked every second);
//   - the time until every agent has its connections again after the node
//     holding the most is killed with SIGKILL.
const (
	roleReceptiveAgents = "serve-receptive-agents"
	receptiveNodes      = 3
	receptivePoll       = time.Second
	receptiveKeyPrefix  = "kasbench-receptive"
	receptiveFirstID    = 2001
	receptiveTrials     = 5

	metricReceptiveCommands = "kas_receptive_lease_redis_commands_total"
	metricReceptiveTunnels  = "kas_receptive_tunnels_connected"
)

// receptiveResult is what the receptive measurement found.
type receptiveResult struct {
	Agents             int     `json:"agents"`
	Nodes              int     `json:"nodes"`
	PerAgent           int     `json:"connections_per_agent"`
	LeasePeriodSeconds float64 `json:"lease_period_seconds"`
	// Lease commands per second in steady state, over WindowSeconds.
	WindowSeconds     float64            `json:"window_seconds"`
	CommandsPerSecond float64            `json:"lease_redis_commands_per_second"`
	ByNode            map[string]float64 `json:"lease_redis_commands_per_second_by_node"`
	// FirstRequestMillis: listed → first proxied request answered, per trial.
	PollPeriodSeconds  float64   `json:"poll_period_seconds"`
	FirstRequestMillis []float64 `json:"first_request_millis"`
	// Takeover after SIGKILL of the node holding KilledHeld agents.
	KilledHeld      int     `json:"killed_node_held"`
	TakeoverSeconds float64 `json:"takeover_seconds"`
}

// receptiveBench is the running layout.
type receptiveBench struct {
	b       *bench
	dir     string
	n       int
	pub     map[int64]ed25519.PublicKey
	keyFile map[int64]string // private keys, for the standalone file
	addrs   map[int64]string // where each agentk listens
	nodes   []*child
	lease   time.Duration
}

// measureReceptive runs the receptive measurement; it needs redis-server.
func measureReceptive(ctx context.Context, b *bench, upstreamURL string, step func(string, ...any)) (*receptiveResult, error) {
	if b.redis == nil {
		rs, err := startRedisServer(ctx, b.dir)
		if err != nil {
			return nil, err
		}
		b.redis = rs
	}
	defaults, err := config.Load("", nil)
	if err != nil {
		return nil, err
	}
	if b.ReceptiveLeasePeriod > 0 {
		defaults.Agent.Receptive.LeasePeriod = config.Duration(b.ReceptiveLeasePeriod)
	}
	rb := &receptiveBench{b: b, dir: b.path("receptive"), n: b.ReceptiveAgents,
		pub: map[int64]ed25519.PublicKey{}, keyFile: map[int64]string{}, addrs: map[int64]string{}}
	if err := os.MkdirAll(filepath.Join(rb.dir, "repo"), 0o700); err != nil {
		return nil, err
	}
	res := &receptiveResult{
		Agents: rb.n, Nodes: receptiveNodes, PerAgent: defaults.Agent.Receptive.ConnectionsPerAgent,
		LeasePeriodSeconds: defaults.Agent.Receptive.LeasePeriod.D().Seconds(), PollPeriodSeconds: receptivePoll.Seconds(),
	}
	lease := defaults.Agent.Receptive.LeasePeriod.D()
	rb.lease = lease
	want := rb.n * min(res.PerAgent, receptiveNodes)

	step("receptive: %d agentk listening, %d kas nodes dialling them (lease period %s)", rb.n, receptiveNodes, lease)
	if err := rb.startAgents(upstreamURL); err != nil {
		return nil, err
	}
	if err := rb.writeStandalone(rb.n); err != nil {
		return nil, err
	}
	if err := rb.startNodes(); err != nil {
		return nil, err
	}
	if err := rb.waitConnections(ctx, rb.nodes, want, 2*time.Minute); err != nil {
		return nil, err
	}
	// The nodes started one after the other: a lease period later the
	// holders are those rendezvous hashing picks, and no agent has an
	// extra connection left from the moves.
	time.Sleep(lease)
	if err := rb.waitConnections(ctx, rb.nodes, want, 2*time.Minute); err != nil {
		return nil, err
	}

	window := 2 * lease
	step("receptive: Redis commands for leases over %s", window)
	before, err := rb.counters(rb.nodes, metricReceptiveCommands)
	if err != nil {
		return nil, err
	}
	time.Sleep(window)
	after, err := rb.counters(rb.nodes, metricReceptiveCommands)
	if err != nil {
		return nil, err
	}
	res.WindowSeconds = window.Seconds()
	res.ByNode = map[string]float64{}
	for name, v := range after {
		rate := (v - before[name]) / window.Seconds()
		res.ByNode[name] = rate
		res.CommandsPerSecond += rate
	}

	late := int64(receptiveFirstID + rb.n)
	for trial := range receptiveTrials {
		step("receptive: listing one more agent, first proxied request (trial %d of %d)", trial+1, receptiveTrials)
		if err := rb.writeStandalone(rb.n + 1); err != nil {
			return nil, err
		}
		listed := time.Now()
		if err := rb.firstRequest(ctx, late); err != nil {
			return nil, err
		}
		res.FirstRequestMillis = append(res.FirstRequestMillis, float64(time.Since(listed).Microseconds())/1000)
		if err := rb.writeStandalone(rb.n); err != nil {
			return nil, err
		}
		if err := rb.waitConnections(ctx, rb.nodes, want, time.Minute); err != nil {
			return nil, err
		}
	}

	var victim *child
	most := -1.0
	for _, n := range rb.nodes {
		m, err := scrapeMetrics(metricsURL(n))
		if err != nil {
			return nil, err
		}
		if m[metricReceptiveTunnels] > most {
			victim, most = n, m[metricReceptiveTunnels]
		}
	}
	res.KilledHeld = int(most)
	step("receptive: kill -9 %s (holding %d agents); waiting for the others to take over", victim.name, res.KilledHeld)
	survivors := slices.DeleteFunc(slices.Clone(rb.nodes), func(c *child) bool { return c == victim })
	if err := victim.kill(); err != nil {
		return nil, err
	}
	killed := time.Now()
	if err := rb.waitConnections(ctx, survivors, rb.n*min(res.PerAgent, len(survivors)), 3*lease); err != nil {
		return res, err
	}
	res.TakeoverSeconds = time.Since(killed).Seconds()
	return res, nil
}

// startAgents makes a key pair per agent (one more for the agent listed
// later) and starts the child running every agentk.
func (rb *receptiveBench) startAgents(upstreamURL string) error {
	var keys strings.Builder
	for i := range rb.n + 1 {
		id := int64(receptiveFirstID + i)
		pub, priv, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return err
		}
		der, err := x509.MarshalPKCS8PrivateKey(priv)
		if err != nil {
			return err
		}
		rb.pub[id] = pub
		rb.keyFile[id] = filepath.Join(rb.dir, fmt.Sprintf("agent-%d.key", id))
		if err := os.WriteFile(rb.keyFile[id], pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
			return err
		}
		fmt.Fprintf(&keys, "%d %s\n", id, base64.StdEncoding.EncodeToString(pub))
	}
	keysFile, addrsFile := filepath.Join(rb.dir, "public-keys"), filepath.Join(rb.dir, "addresses")
	if err := os.WriteFile(keysFile, []byte(keys.String()), 0o600); err != nil {
		return err
	}
	if _, err := startChild(rb.b, "receptive-agents", roleReceptiveAgents, "-keys", keysFile, "-api", upstreamURL,
		"-addrs", addrsFile, "-log", filepath.Join(rb.dir, "agents.log")); err != nil {
		return err
	}
	lines, err := readLines(addrsFile)
	if err != nil {
		return err
	}
	for _, line := range lines {
		idText, addr, _ := strings.Cut(line, " ")
		id, err := strconv.ParseInt(idText, 10, 64)
		if err != nil {
			return fmt.Errorf("%s: %q: %w", addrsFile, line, err)
		}
		rb.addrs[id] = addr
	}
	return nil
}

// writeStandalone lists the first count agents as receptive, and the user
// whose personal access token the requests carry.
func (rb *receptiveBench) writeStandalone(count int) error {
	var sa strings.Builder
	sa.WriteString("# Written by kasbench for the receptive measurement.\ngroups: [{id: 1, path: kasbench}]\nprojects: [{id: 10, path: kasbench/cluster, repository: repo}]\nagents:\n")
	for i := range rb.n + 1 {
		id := int64(receptiveFirstID + i)
		name := fmt.Sprintf("receptive-%d", id)
		config := filepath.Join(rb.dir, "repo", ".gitlab", "agents", name, "config.yaml")
		if err := os.MkdirAll(filepath.Dir(config), 0o700); err != nil {
			return err
		}
		if err := os.WriteFile(config, []byte("user_access:\n  access_as:\n    agent: {}\n  projects:\n    - id: kasbench/cluster\n"), 0o600); err != nil {
			return err
		}
		fmt.Fprintf(&sa, "  - id: %d\n    name: %s\n    project: kasbench/cluster\n", id, name)
		if i < count {
			fmt.Fprintf(&sa, "    receptive: {url: \"grpc://%s\", jwt_private_key_file: %s}\n", rb.addrs[id], rb.keyFile[id])
		} else {
			// Not receptive (yet): it needs a token to be valid.
			fmt.Fprintf(&sa, "    token_sha256: %s\n", standalone.HashToken(rand.Text()))
		}
	}
	fmt.Fprintf(&sa, "users:\n  - id: 100\n    username: bencher\n    personal_access_tokens: [{token_sha256: %s, scopes: [k8s_proxy]}]\n    memberships: {projects: {kasbench/cluster: developer}}\n",
		standalone.HashToken(rb.b.creds.userPAT))
	// Written whole, then renamed: kas never reads half a file.
	file := filepath.Join(rb.dir, "standalone.yaml")
	if err := os.WriteFile(file+".new", []byte(sa.String()), 0o600); err != nil {
		return err
	}
	return os.Rename(file+".new", file)
}

// startNodes starts the kas nodes, sharing the bench's redis-server under
// their own key prefix.
func (rb *receptiveBench) startNodes() error {
	secret := make([]byte, config.SecretLength)
	_, _ = rand.Read(secret)
	secretFile := filepath.Join(rb.dir, "private-api-secret")
	if err := os.WriteFile(secretFile, []byte(base64.StdEncoding.EncodeToString(secret)+"\n"), 0o600); err != nil {
		return err
	}
	cfg := fmt.Sprintf(`# Written by kasbench for the receptive measurement.
agent:
  listen:
    address: 127.0.0.1:0
    listen_grace_period: 2s
  receptive:
    enabled: true
    poll_period: %s
    lease_period: %s
observability:
  listen:
    address: 127.0.0.1:0
  logging:
    level: %s
api:
  listen:
    address: 127.0.0.1:0
private_api:
  listen:
    address: 127.0.0.1:0
    authentication_secret_file: %s
redis:
  server:
    address: %s
  key_prefix: %s
  allow_loopback_private_api: true
standalone:
  file: standalone.yaml
`, receptivePoll, rb.lease, rb.b.KASLogLevel, secretFile, rb.b.redis.addr, receptiveKeyPrefix)
	file := filepath.Join(rb.dir, "kas.yaml")
	if err := os.WriteFile(file, []byte(cfg), 0o600); err != nil {
		return err
	}
	for i := range receptiveNodes {
		name := fmt.Sprintf("kas-r%d", i+1)
		n, err := startChild(rb.b, name, roleKAS, "-config", file, "-log", filepath.Join(rb.dir, name+".log"))
		if err != nil {
			return err
		}
		rb.nodes = append(rb.nodes, n)
	}
	return nil
}

// counters reads one counter of every node, by node name.
func (rb *receptiveBench) counters(nodes []*child, metric string) (map[string]float64, error) {
	out := map[string]float64{}
	for _, n := range nodes {
		m, err := scrapeMetrics(metricsURL(n))
		if err != nil {
			return nil, fmt.Errorf("%s: %w", n.name, err)
		}
		out[n.name] = m[metric]
	}
	return out, nil
}

// waitConnections waits until nodes hold want receptive tunnels in all.
func (rb *receptiveBench) waitConnections(ctx context.Context, nodes []*child, want int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var got float64
	for {
		byNode, err := rb.counters(nodes, metricReceptiveTunnels)
		if err == nil {
			got = 0
			for _, v := range byNode {
				got += v
			}
			if int(got) == want {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the kas nodes hold %v receptive tunnels after %s, want %d; see %s", got, timeout, want, rb.dir)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// firstRequest sends a request for the agent through the first node until
// one is answered by the upstream.
func (rb *receptiveBench) firstRequest(ctx context.Context, agentID int64) error {
	client := &http.Client{Timeout: 5 * time.Second}
	defer client.CloseIdleConnections()
	url := "http://" + rb.nodes[0].ready.Addr + "/k8s-proxy" + versionPath
	deadline := time.Now().Add(time.Minute)
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		req.Header.Set("Authorization", fmt.Sprintf("Bearer pat:%d:%s", agentID, rb.b.creds.userPAT))
		resp, err := client.Do(req)
		if err == nil {
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no request through receptive agent %d was answered within a minute; see %s", agentID, rb.dir)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// serveReceptiveAgents runs one receptive agentk per line of the keys file
// ("<agent id> <base64 Ed25519 public key>"), each on its own loopback
// port, writes "<agent id> <address>" lines to the addresses file, and is
// ready once every one listens.
func serveReceptiveAgents(ctx context.Context, args []string, ready func(readyMessage)) error {
	fs := flag.NewFlagSet(roleReceptiveAgents, flag.ContinueOnError)
	keysFile := fs.String("keys", "", "`file` of agent IDs and public keys")
	apiURL := fs.String("api", "", "Kubernetes API server URL")
	addrsFile := fs.String("addrs", "", "`file` to write the agents' addresses to")
	logFile := fs.String("log", "", "log `file`")
	if err := fs.Parse(args); err != nil {
		return err
	}
	lines, err := readLines(*keysFile)
	if err != nil {
		return err
	}
	logOut, err := os.Create(*logFile)
	if err != nil {
		return err
	}
	defer logOut.Close()
	log := slog.New(slog.NewJSONHandler(logOut, &slog.HandlerOptions{Level: slog.LevelWarn}))
	var agents []*agent.Agent
	var addrs strings.Builder
	for _, line := range lines {
		idText, keyText, _ := strings.Cut(line, " ")
		id, err := strconv.ParseInt(idText, 10, 64)
		if err != nil {
			return fmt.Errorf("%s: %q: %w", *keysFile, line, err)
		}
		raw, err := base64.StdEncoding.DecodeString(keyText)
		if err != nil || len(raw) != ed25519.PublicKeySize {
			return fmt.Errorf("%s: agent %d: not a base64 Ed25519 public key", *keysFile, id)
		}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		a, err := agent.New(agent.Options{
			Receptive:     &agent.ReceptiveOptions{Listener: ln, JWTPublicKey: ed25519.PublicKey(raw), AgentID: id},
			RESTConfig:    &rest.Config{Host: *apiURL},
			Logger:        log,
			AgentVersion:  "kasbench",
			PodName:       fmt.Sprintf("agentk-receptive-%d", id),
			PodNamespace:  "kasbench",
			ShutdownGrace: time.Second,
		})
		if err != nil {
			_ = ln.Close()
			return fmt.Errorf("build agent %d: %w", id, err)
		}
		agents = append(agents, a)
		fmt.Fprintf(&addrs, "%d %s\n", id, ln.Addr())
	}
	if err := os.WriteFile(*addrsFile, []byte(addrs.String()), 0o600); err != nil {
		return err
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	for _, a := range agents {
		wg.Go(func() { _ = a.Run(ctx) })
	}
	ready(readyMessage{})
	<-ctx.Done()
	return nil
}
