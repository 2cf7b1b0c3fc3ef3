package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"

	"github.com/kasproject/kas/agent"
	"github.com/kasproject/kas/internal/fakekube"
	"github.com/kasproject/kas/internal/redistest"
	"github.com/kasproject/kas/server/peer/peerpb"
	"github.com/kasproject/kas/web"
)

// The registry's keys under the default redis.key_prefix (see the key
// layout in registry/redis.go), which the tests read as an operator would
// with redis-cli.
const (
	redisNodesKey         = "gitlab-kas:nodes"
	redisTunnelsKeyPrefix = "gitlab-kas:tunnels:"
)

// cluster is several kas processes sharing one redis-server (or a Redis
// Cluster, or a Sentinel-managed primary), run as an administrator would run
// them: each node has its own configuration file
// and kernel-chosen ports, all share the private API secret and the API
// secret, and each publishes its private API URL in Redis.
type cluster struct {
	bin  string
	dir  string
	opts clusterOptions
	// redis is the one redis-server, unless opts name a Redis Cluster or a
	// Sentinel.
	redis *redistest.Server
	// inspect reads what the nodes wrote to Redis.
	inspect redis.UniversalClient

	privateSecret     []byte
	privateSecretFile string
}

// clusterOptions are what all nodes of a cluster have in common.
type clusterOptions struct {
	// standaloneFile makes the nodes read the scenario; gitlabURL makes
	// them ask a fake GitLab instead.
	standaloneFile string
	gitlabURL      string
	// apiSecret is GitLab's API secret: the nodes sign their calls to
	// GitLab with it and check the internal API's callers against it.
	apiSecret     []byte
	apiSecretFile string
	// The agent.redis_conn_info_* settings; zero keeps kas's defaults.
	redisTTL, redisRefresh, redisGC time.Duration
	// agentWaitTimeout is agent.kubernetes_api.agent_wait_timeout; zero
	// keeps the default.
	agentWaitTimeout time.Duration
	// acceptTimeout is private_api.accept_timeout; zero keeps the default.
	acceptTimeout time.Duration
	// redisCluster or sentinel, if set, is the Redis the nodes use
	// (redis.cluster, redis.sentinel) instead of a redis-server of their own.
	redisCluster *redistest.Cluster
	sentinel     *redistest.Sentinel
	// receptive, if set, is the agent.receptive section.
	receptive map[string]any
}

// newCluster starts a redis-server for nodes built from bin with opts; the
// nodes themselves are started by startNode.
func newCluster(t *testing.T, bin string, opts clusterOptions) *cluster {
	t.Helper()
	c := &cluster{bin: bin, dir: t.TempDir(), opts: opts}
	c.privateSecret, c.privateSecretFile = writeSecret(t)
	if c.opts.apiSecretFile == "" {
		c.opts.apiSecret, c.opts.apiSecretFile = writeSecret(t)
	}
	switch {
	case opts.redisCluster != nil:
		c.inspect = redis.NewClusterClient(&redis.ClusterOptions{Addrs: opts.redisCluster.Addrs(), MaxRetries: -1})
	case opts.sentinel != nil:
		c.inspect = redis.NewFailoverClient(&redis.FailoverOptions{
			MasterName: opts.sentinel.MasterName(), SentinelAddrs: []string{opts.sentinel.Addr()}, MaxRetries: -1,
		})
	default:
		c.redis = redistest.Start(t)
		c.inspect = redis.NewClient(&redis.Options{Addr: c.redis.Addr(), MaxRetries: -1})
	}
	t.Cleanup(func() { _ = c.inspect.Close() })
	return c
}

// nodeOptions are what sets one node apart.
type nodeOptions struct {
	// env holds OWN_PRIVATE_API_* settings (NAME=value).
	env []string
	// tls makes the private API serve this certificate (grpcs://).
	tls *certificate
}

// node is one kas process of a cluster.
type node struct {
	name string
	proc *kasProcess
	// The bound addresses of its listeners.
	public, observability, api, private string
	// url is the private API URL the node publishes.
	url string
}

// startNode writes the node's configuration file, runs kas with it and
// waits until it is ready. It is killed when the test ends.
func (c *cluster) startNode(t *testing.T, name string, o nodeOptions) *node {
	t.Helper()
	loopback := func() map[string]any { return map[string]any{"address": "127.0.0.1:0"} }
	agentSection := map[string]any{"listen": loopback()}
	for key, d := range map[string]time.Duration{
		"redis_conn_info_ttl":     c.opts.redisTTL,
		"redis_conn_info_refresh": c.opts.redisRefresh,
		"redis_conn_info_gc":      c.opts.redisGC,
	} {
		if d != 0 {
			agentSection[key] = d.String()
		}
	}
	if c.opts.agentWaitTimeout != 0 {
		agentSection["kubernetes_api"] = map[string]any{"agent_wait_timeout": c.opts.agentWaitTimeout.String()}
	}
	if c.opts.receptive != nil {
		agentSection["receptive"] = c.opts.receptive
	}
	api := loopback()
	api["authentication_secret_file"] = c.opts.apiSecretFile
	private := loopback()
	private["authentication_secret_file"] = c.privateSecretFile
	if o.tls != nil {
		private["certificate_file"] = o.tls.certFile
		private["key_file"] = o.tls.keyFile
		private["ca_certificate_file"] = o.tls.caFile
	}
	privateAPI := map[string]any{"listen": private}
	if c.opts.acceptTimeout != 0 {
		privateAPI["accept_timeout"] = c.opts.acceptTimeout.String()
	}
	cfg := map[string]any{
		"agent":         agentSection,
		"observability": map[string]any{"listen": loopback()},
		"api":           map[string]any{"listen": api},
		"private_api":   privateAPI,
		"redis":         c.redisSection(),
	}
	if c.opts.gitlabURL != "" {
		cfg["gitlab"] = map[string]any{"address": c.opts.gitlabURL, "authentication_secret_file": c.opts.apiSecretFile}
	} else {
		cfg["standalone"] = map[string]any{"file": c.opts.standaloneFile}
	}
	file := filepath.Join(c.dir, name+".yaml")
	writeYAML(t, file, cfg)

	p := startKASProcess(t, c.bin, file, o.env...)
	n := &node{
		name:          name,
		proc:          p,
		public:        p.address(t, "agent.listen"),
		observability: p.address(t, "observability.listen"),
		api:           p.address(t, "api.listen"),
		private:       p.address(t, "private_api.listen"),
	}
	st, err := fetchStatus(n.observability)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	if len(st.NodeURLs) != 1 {
		t.Fatalf("%s publishes private API URLs %v, want one", name, st.NodeURLs)
	}
	n.url = st.NodeURLs[0]
	return n
}

// redisSection is the nodes' redis configuration.
func (c *cluster) redisSection() map[string]any {
	section := map[string]any{
		// Every node listens on 127.0.0.1 of this one machine.
		"allow_loopback_private_api": true,
	}
	switch {
	case c.opts.redisCluster != nil:
		section["cluster"] = map[string]any{"addresses": c.opts.redisCluster.Addrs()}
	case c.opts.sentinel != nil:
		section["sentinel"] = map[string]any{"master_name": c.opts.sentinel.MasterName(), "addresses": []string{c.opts.sentinel.Addr()}}
	default:
		section["server"] = map[string]any{"address": c.redis.Addr()}
	}
	return section
}

// kill ends the node with SIGKILL: it cleans nothing up.
func (n *node) kill(t *testing.T) {
	t.Helper()
	if err := n.proc.cmd.Process.Kill(); err != nil {
		t.Fatalf("kill %s: %v", n.name, err)
	}
	<-n.proc.exited
}

func (n *node) proxyURL() string { return "http://" + n.public + "/k8s-proxy" }

// fetchStatus reads kas's status page as JSON.
func fetchStatus(observability string) (web.Status, error) {
	var st web.Status
	req, err := http.NewRequest(http.MethodGet, "http://"+observability+"/debug/status", nil)
	if err != nil {
		return st, err
	}
	req.Close = true // leave no idle connection behind
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return st, fmt.Errorf("read kas's status: %w", err)
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return st, fmt.Errorf("decode kas's status: %w", err)
	}
	return st, nil
}

// metric reads one series of n's Prometheus metrics, e.g.
// kas_registry_redis_errors_total{operation="write"}; 0 if it is absent.
func (n *node) metric(series string) (float64, error) {
	req, err := http.NewRequest(http.MethodGet, "http://"+n.observability+"/metrics", nil)
	if err != nil {
		return 0, err
	}
	req.Close = true
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, fmt.Errorf("read kas's metrics: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, fmt.Errorf("read kas's metrics: %w", err)
	}
	for line := range strings.Lines(string(body)) {
		if value, ok := strings.CutPrefix(strings.TrimSpace(line), series+" "); ok {
			return strconv.ParseFloat(value, 64)
		}
	}
	return 0, nil
}

// waitMetric waits until the series of n's metrics is at least least.
func (n *node) waitMetric(t *testing.T, series string, least float64) {
	t.Helper()
	var got float64
	var err error
	eventually(t, func() bool {
		got, err = n.metric(series)
		return err == nil && got >= least
	}, func() string {
		return fmt.Sprintf("%s: %s is %v (error %v), want at least %v", n.name, series, got, err, least)
	})
}

// holders returns the private API URL of the node holding each tunnel of
// the agent that n lists on its status page (which shows every node's).
func (n *node) holders(agentID int64) ([]string, error) {
	st, err := fetchStatus(n.observability)
	if err != nil {
		return nil, err
	}
	var urls []string
	for _, a := range st.Agents {
		if a.ID != agentID {
			continue
		}
		for _, c := range a.Connections {
			urls = append(urls, strings.Join(c.NodeURLs, ","))
		}
	}
	return urls, nil
}

// waitHolders waits until every one of nodes lists exactly the tunnels of
// the agent that the holders hold, one each.
func waitHolders(t *testing.T, nodes []*node, agentID int64, holders ...*node) {
	t.Helper()
	var want []string
	for _, h := range holders {
		want = append(want, h.url)
	}
	slices.Sort(want)
	for _, n := range nodes {
		var got []string
		var err error
		eventually(t, func() bool {
			got, err = n.holders(agentID)
			slices.Sort(got)
			return err == nil && slices.Equal(got, want)
		}, func() string {
			return fmt.Sprintf("%s lists agent %d's tunnels on %v (error %v), want on %v", n.name, agentID, got, err, want)
		})
	}
}

// redisFields returns the fields of a registry hash: node IDs.
func (c *cluster) redisFields(ctx context.Context, key string) ([]string, error) {
	fields, err := c.inspect.HKeys(ctx, key).Result()
	slices.Sort(fields)
	return fields, err
}

// nodeID finds n's ID, its field in the registry's hashes, from the node
// record holding its URL.
func (c *cluster) nodeID(t *testing.T, n *node) string {
	t.Helper()
	var id string
	eventually(t, func() bool {
		records, err := c.inspect.HGetAll(context.Background(), redisNodesKey).Result()
		if err != nil {
			return false
		}
		for field, value := range records {
			var rec struct {
				NodeURLs []string `json:"node_urls"`
			}
			if json.Unmarshal([]byte(value), &rec) == nil && slices.Contains(rec.NodeURLs, n.url) {
				id = field
				return true
			}
		}
		return false
	}, func() string { return fmt.Sprintf("no node record in Redis holds %s's URL %s", n.name, n.url) })
	return id
}

// fleet runs in-process agents and stops them all at once when the test
// ends: an agent lets its requests finish for a while after GOAWAY, so
// stopping them one by one would add up.
type fleet struct {
	e      *env
	mu     sync.Mutex
	agents []*agentNode
}

func newFleet(t *testing.T, e *env) *fleet {
	f := &fleet{e: e}
	t.Cleanup(func() {
		f.mu.Lock()
		agents := f.agents
		f.mu.Unlock()
		var wg sync.WaitGroup
		for _, a := range agents {
			wg.Go(func() {
				if err := a.stop(); err != nil {
					t.Errorf("stop agentk: %v", err)
				}
			})
		}
		wg.Wait()
	})
	return f
}

// run starts agentk for a, dialling kas at kasAddr (host:port) and serving
// the cluster kube; it does not wait for the tunnel.
func (f *fleet) run(t *testing.T, a testAgent, kasAddr string, kube string) *agentNode {
	t.Helper()
	opts := f.e.agentOptions(a, kasAddr)
	opts.RESTConfig = &rest.Config{Host: kube, BearerToken: agentSAToken}
	opts.ShutdownGrace = 100 * time.Millisecond
	ag, err := agent.New(opts)
	if err != nil {
		t.Fatalf("build agentk %s: %v", a.name, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ag.Run(ctx) }()
	n := &agentNode{
		agent: ag,
		stop: sync.OnceValue(func() error {
			cancel()
			select {
			case err := <-done:
				return err
			case <-time.After(time.Minute):
				return errors.New("agentk did not stop within a minute")
			}
		}),
	}
	f.mu.Lock()
	f.agents = append(f.agents, n)
	f.mu.Unlock()
	return n
}

// connect runs agentk for a on node n, serving kube, and waits until every
// one of nodes lists its tunnel on n.
func (f *fleet) connect(t *testing.T, a testAgent, n *node, kube string, nodes []*node) *agentNode {
	t.Helper()
	ag := f.run(t, a, n.public, kube)
	waitConnected(t, ag.agent)
	waitHolders(t, nodes, a.id, n)
	return ag
}

// kube is a fake cluster with its URL.
type kube struct {
	*fakekube.Server
	url string
}

func newKube(t *testing.T) kube {
	t.Helper()
	k, srv := startCluster(t)
	return kube{k, srv.URL}
}

// listNamespaces lists the namespaces through n's proxy with client-go as
// cred and checks the answer is the fake cluster's.
func listNamespaces(t *testing.T, e *env, n *node, cred credential) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	list, err := clientsetFor(t, n.proxyURL(), e.transport, cred).CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("list namespaces through %s: %w", n.name, err)
	}
	var names []string
	for _, ns := range list.Items {
		names = append(names, ns.Name)
	}
	if want := []string{"default", "kube-system"}; !slices.Equal(names, want) {
		return fmt.Errorf("list namespaces through %s: got %v, want %v", n.name, names, want)
	}
	return nil
}

// get sends GET path through n's proxy as cred; the caller closes the body.
func get(ctx context.Context, e *env, n *node, path string, cred credential) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, n.proxyURL()+path, nil)
	if err != nil {
		return nil, err
	}
	cred.apply(req.Header)
	return e.client.Do(req)
}

// expectUnavailable checks that resp is kas's clean refusal for an agent it
// cannot reach: a Kubernetes Status 503 (no tunnel) or 502 (the tunnel
// failed the request).
func expectUnavailable(t *testing.T, resp *http.Response) {
	t.Helper()
	switch resp.StatusCode {
	case http.StatusServiceUnavailable:
		expectStatus(t, resp, http.StatusServiceUnavailable, metav1.StatusReasonServiceUnavailable)
	case http.StatusBadGateway:
		expectStatus(t, resp, http.StatusBadGateway, metav1.StatusReasonInternalError)
	default:
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		t.Fatalf("got HTTP %d %s, want a Status 503 or 502", resp.StatusCode, body)
	}
}

// callPrivateAPI sends one request head to the Forward service at addr
// with the authorization metadata (none if empty) and returns the first
// answer.
func callPrivateAPI(ctx context.Context, addr, authorization string, head *peerpb.RequestHead) (*peerpb.ServerMessage, error) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	if authorization != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", authorization)
	}
	stream, err := peerpb.NewForwardClient(conn).RoundTrip(ctx)
	if err != nil {
		return nil, err
	}
	if err := stream.Send(&peerpb.ClientMessage{Msg: &peerpb.ClientMessage_Head{Head: head}}); err != nil {
		// The stream ended; Recv says why.
		_, err = stream.Recv()
		return nil, err
	}
	if err := stream.CloseSend(); err != nil {
		return nil, err
	}
	return stream.Recv()
}

// certificate is a key pair and the CA that issued it, as PEM files.
type certificate struct {
	certFile, keyFile, caFile string
}

// issueCertificate makes a CA and a server certificate from it for the
// DNS names (no IP addresses).
func issueCertificate(t *testing.T, names ...string) *certificate {
	t.Helper()
	ca := newTestCA(t, "e2e private API CA")
	certFile, keyFile := ca.issue(t, "private-api", false, names...)
	return &certificate{certFile: certFile, keyFile: keyFile, caFile: ca.file}
}
