package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kasproject/kas/internal/fakekube"
	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/internalapi/gitlabpb"
	"github.com/kasproject/kas/server/kasjwt"
	"github.com/kasproject/kas/server/peer/peerpb"
)

// TestMultiNode runs several kas processes (the kas binary) sharing one
// redis-server, with agents connected to different nodes (DESIGN §7). Each
// subtest has its own nodes and Redis, so they run in parallel.
func TestMultiNode(t *testing.T) {
	t.Parallel()
	bin := buildKAS(t)

	t.Run("standalone", func(t *testing.T) {
		t.Parallel()
		w := startThreeNodes(t, bin, clusterOptions{})
		t.Run("any node reaches any agent", w.anyNodeReachesAnyAgent)
		t.Run("watch across a hop", w.watchAcrossAHop)
		t.Run("upgrade across a hop", w.upgradeAcrossAHop)
		t.Run("private API refuses bad tokens", w.privateAPIRefusesBadTokens)
		t.Run("agents tracked across nodes", w.agentsTrackedAcrossNodes)
	})

	t.Run("through GitLab", func(t *testing.T) {
		t.Parallel()
		secret, secretFile := writeSecret(t)
		rails := fakeRails(t, secret)
		w := startThreeNodes(t, bin, clusterOptions{gitlabURL: rails.URL, apiSecret: secret, apiSecretFile: secretFile})
		w.anyNodeReachesAnyAgent(t)
		// Each node asked GitLab itself, about the agent connecting to it
		// (agent_info) and about the job (allowed_agents): nodes cache
		// GitLab's answers, but do not share them.
		if n := rails.Calls(gitlab.PathAgentInfo); n < len(w.agents) {
			t.Errorf("GitLab answered agent_info %d times, want at least once per agent (%d)", n, len(w.agents))
		}
		if n := rails.Calls(gitlab.PathAllowedAgents); n < len(w.nodes) {
			t.Errorf("GitLab answered allowed_agents %d times, want at least once per node (%d)", n, len(w.nodes))
		}
	})

	t.Run("node killed", func(t *testing.T) {
		t.Parallel()
		testNodeKilled(t, bin)
	})

	t.Run("grpcs between nodes", func(t *testing.T) {
		t.Parallel()
		testGRPCS(t, bin)
	})

	t.Run("Redis restart", func(t *testing.T) {
		t.Parallel()
		testRedisRestart(t, bin)
	})
}

// threeNodes is a cluster of three nodes with one agent on each. Each agent
// serves its own fake cluster, so a test sees which agent a request reached.
type threeNodes struct {
	e      *env
	c      *cluster
	nodes  []*node
	fleet  *fleet
	agents []testAgent // agents[i] is connected to nodes[i]
	kubes  []kube      // and serves kubes[i]
}

// startThreeNodes starts the cluster with opts, in standalone mode on the
// scenario unless opts name GitLab, and connects an agent to each node.
func startThreeNodes(t *testing.T, bin string, opts clusterOptions) *threeNodes {
	t.Helper()
	w := &threeNodes{e: newWorld(t), agents: []testAgent{asAgent, asImpersonate, asCIJob}}
	if opts.gitlabURL == "" {
		opts.standaloneFile = w.e.scenarioFile
	}
	w.c = newCluster(t, bin, opts)
	for i := range w.agents {
		w.nodes = append(w.nodes, w.c.startNode(t, fmt.Sprintf("kas-%d", i+1), nodeOptions{}))
	}
	w.fleet = newFleet(t, w.e)
	for i, a := range w.agents {
		w.kubes = append(w.kubes, newKube(t))
		w.fleet.connect(t, a, w.nodes[i], w.kubes[i].url, w.nodes)
	}
	return w
}

// namespaceLists counts the namespace lists that reached k.
func namespaceLists(k kube) int {
	n := 0
	for _, r := range k.Requests() {
		if r.Path == "/api/v1/namespaces" && r.Query == "" {
			n++
		}
	}
	return n
}

func (w *threeNodes) anyNodeReachesAnyAgent(t *testing.T) {
	// Every agent of the scenario lets CI job 5001 in, each with its own
	// identity, which must cross the hop too.
	wantUser := map[int64]string{
		asAgent.id:       "",
		asImpersonate.id: deployer.Username,
		asCIJob.id:       fmt.Sprintf("gitlab:ci_job:%d", jobID),
	}
	for _, n := range w.nodes {
		for i, a := range w.agents {
			k := w.kubes[i]
			before := namespaceLists(k)
			if err := listNamespaces(t, w.e, n, ciJob(a.id, jobToken)); err != nil {
				t.Errorf("agent %d on %s: %v", a.id, w.nodes[i].name, err)
				continue
			}
			if got := namespaceLists(k); got != before+1 {
				t.Errorf("through %s for agent %d: its cluster saw %d lists, want %d", n.name, a.id, got-before, 1)
				continue
			}
			got, _ := k.LastRequest("/api/v1/namespaces")
			if got.Header.Get("Authorization") != "Bearer "+agentSAToken || got.Header.Get("Impersonate-User") != wantUser[a.id] {
				t.Errorf("through %s for agent %d: the cluster saw Authorization %q and Impersonate-User %q, want the agent's token and %q",
					n.name, a.id, got.Header.Get("Authorization"), got.Header.Get("Impersonate-User"), wantUser[a.id])
			}
		}
	}
}

func (w *threeNodes) watchAcrossAHop(t *testing.T) {
	entry, a, k := w.nodes[0], w.agents[1], w.kubes[1]
	cs := clientsetFor(t, entry.proxyURL(), w.e.transport, ciJob(a.id, jobToken))
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	watch, err := cs.CoreV1().Namespaces().Watch(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatalf("watch namespaces through %s on %s: %v", entry.name, w.nodes[1].name, err)
	}
	defer watch.Stop()
	eventually(t, func() bool { return k.Watchers() == 1 },
		func() string { return fmt.Sprintf("the cluster has %d watches open, want 1", k.Watchers()) })

	// Each event must arrive before the next exists: neither node may
	// hold a chunk back waiting for more.
	for i, ev := range []fakekube.Event{
		{Type: "ADDED", Name: "team-a"},
		{Type: "MODIFIED", Name: "team-a"},
		{Type: "DELETED", Name: "team-a"},
	} {
		k.Emit(ev)
		select {
		case got, ok := <-watch.ResultChan():
			if !ok {
				t.Fatalf("event %d: the watch ended", i)
			}
			ns, isNS := got.Object.(*corev1.Namespace)
			if !isNS || string(got.Type) != ev.Type || ns.Name != ev.Name {
				t.Fatalf("event %d: got %s %#v, want %s of namespace %s", i, got.Type, got.Object, ev.Type, ev.Name)
			}
		case <-time.After(waitFor):
			t.Fatalf("event %d (%s %s) did not arrive", i, ev.Type, ev.Name)
		}
	}

	// Stopping the watch reaches the cluster across the hop.
	cancel()
	select {
	case path := <-k.Cancelled():
		if path != "/api/v1/namespaces" {
			t.Fatalf("the cluster saw %s cancelled, want the watch", path)
		}
	case <-time.After(waitFor):
		t.Fatal("the cancelled watch is still open in the cluster")
	}
}

func (w *threeNodes) upgradeAcrossAHop(t *testing.T) {
	entry, a := w.nodes[0], w.agents[2]
	conn, err := net.DialTimeout("tcp", entry.public, waitFor)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(waitFor))
	const path = "/api/v1/namespaces/default/pods/web/exec?command=sh&stdin=true&stdout=true"
	fmt.Fprintf(conn, "POST /k8s-proxy%s HTTP/1.1\r\nHost: %s\r\nAuthorization: %s\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n",
		path, entry.public, ciJob(a.id, jobToken).authorization)
	br := bufio.NewReader(conn)
	// Framed as the cluster frames its 101 (fakekube's), across the hop too.
	status, lines := readHead(t, br)
	checkUpgradeFraming(t, status, lines, "HTTP/1.1 101 Switching Protocols",
		[]string{"Connection: Upgrade", "Upgrade: SPDY/3.1", "X-Fakekube-Upgrade: echo"})
	got, _ := w.kubes[2].LastRequest("/api/v1/namespaces/default/pods/web/exec")
	if got.Header.Get("X-Stream-Protocol-Version") != "v4.channel.k8s.io" {
		t.Fatalf("the agent's cluster saw headers %v, want the exec request's", got.Header)
	}
	if ff := got.Header.Values("X-Forwarded-For"); len(ff) != 1 || ff[0] != "127.0.0.1" {
		t.Errorf("the agent's cluster saw X-Forwarded-For %q across the hop, want the caller's 127.0.0.1", ff)
	}

	// Interactive: each line comes back before the next is sent.
	for _, line := range []string{"ls\n", "echo hello\n"} {
		if _, err := io.WriteString(conn, line); err != nil {
			t.Fatal(err)
		}
		echo := make([]byte, len(line))
		if _, err := io.ReadFull(br, echo); err != nil || string(echo) != line {
			t.Fatalf("echo of %q: got %q, %v", line, echo, err)
		}
	}
	// Bulk, full duplex: more than one chunk of the private API each way.
	payload := make([]byte, 256<<10)
	_, _ = rand.Read(payload)
	sent := make(chan error, 1)
	go func() {
		_, err := conn.Write(payload)
		sent <- err
	}()
	echo := make([]byte, len(payload))
	if _, err := io.ReadFull(br, echo); err != nil {
		t.Fatalf("read the echo of %d bytes: %v", len(payload), err)
	}
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(echo, payload) {
		t.Fatal("the bytes came back changed")
	}
	// The caller ending its side ends the session on both nodes.
	if err := conn.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if rest, err := io.ReadAll(br); err != nil || len(rest) != 0 {
		t.Fatalf("after closing: got %q, %v; want the end of the stream", rest, err)
	}
}

func (w *threeNodes) privateAPIRefusesBadTokens(t *testing.T) {
	n := w.nodes[0]
	sign := func(secret []byte, issuer, audience string) string {
		token, err := kasjwt.Sign(secret, issuer, audience, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		return token
	}
	otherSecret, _ := writeSecret(t)
	// Expired longer ago than the leeway kas allows for clock skew.
	now := time.Now()
	expired, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.RegisteredClaims{
		Issuer:    kasjwt.IssuerPrivateAPI,
		Audience:  jwt.ClaimStrings{kasjwt.AudiencePrivateAPI},
		IssuedAt:  jwt.NewNumericDate(now.Add(-2 * time.Minute)),
		NotBefore: jwt.NewNumericDate(now.Add(-2 * time.Minute)),
		ExpiresAt: jwt.NewNumericDate(now.Add(-time.Minute)),
	}).SignedString(w.c.privateSecret)
	if err != nil {
		t.Fatal(err)
	}
	valid := sign(w.c.privateSecret, kasjwt.IssuerPrivateAPI, kasjwt.AudiencePrivateAPI)

	for _, tc := range []struct {
		name  string
		token string // sent as "Bearer <token>"; "" sends no authorization
		agent testAgent
		want  codes.Code
	}{
		{"no token", "", w.agents[0], codes.Unauthenticated},
		{"another secret", sign(otherSecret, kasjwt.IssuerPrivateAPI, kasjwt.AudiencePrivateAPI), w.agents[0], codes.Unauthenticated},
		{"expired", expired, w.agents[0], codes.Unauthenticated},
		{"internal API token", sign(w.c.opts.apiSecret, "gitlab", kasjwt.AudienceKAS), w.agents[0], codes.Unauthenticated},
		{"valid, agent here", valid, w.agents[0], codes.OK},
		// The node serves its own tunnels only: it never forwards further.
		{"valid, agent on another node", valid, w.agents[1], codes.NotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			authorization := ""
			if tc.token != "" {
				authorization = "Bearer " + tc.token
			}
			ctx, cancel := context.WithTimeout(context.Background(), waitFor)
			defer cancel()
			msg, err := callPrivateAPI(ctx, n.private, authorization, &peerpb.RequestHead{
				AgentId: tc.agent.id, Method: http.MethodGet, Path: []byte("/version"), EndOfBody: true,
			})
			if got := status.Code(err); got != tc.want {
				t.Fatalf("got %v (%v), want %v", got, err, tc.want)
			}
			if tc.token != "" && err != nil && strings.Contains(err.Error(), tc.token) {
				t.Fatal("the refusal contains the token")
			}
			if tc.want == codes.OK && msg.GetHead().GetStatusCode() != http.StatusOK {
				t.Fatalf("got %v, want the cluster's 200 for /version", msg)
			}
		})
	}
}

// connectedAgents asks n's internal API, as GitLab Rails does
// (GetConnectedAgentsByAgentIDs, JSON mirror), which of the agents are
// connected, and returns their connections' pod names by agent ID.
func connectedAgents(e *env, n *node, token string, agents ...testAgent) (map[int64][]string, error) {
	var ids []string
	for _, a := range agents {
		ids = append(ids, fmt.Sprint(a.id))
	}
	req, err := http.NewRequest(http.MethodGet, "http://"+n.api+"/api/v1/connected_agents?agent_id="+strings.Join(ids, ","), nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := e.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s: %s %s (%v)", n.name, resp.Status, body, err)
	}
	var answer gitlabpb.GetConnectedAgentsByAgentIDsResponse
	if err := protojson.Unmarshal(body, &answer); err != nil {
		return nil, fmt.Errorf("%s: decode %s: %w", n.name, body, err)
	}
	out := map[int64][]string{}
	for _, a := range answer.GetAgents() {
		out[a.GetAgentId()] = append(out[a.GetAgentId()], a.GetAgentMeta().GetPodName())
	}
	return out, nil
}

func (w *threeNodes) agentsTrackedAcrossNodes(t *testing.T) {
	token, err := kasjwt.Sign(w.c.opts.apiSecret, "gitlab", kasjwt.AudienceKAS, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	connected := func(n *node, agents ...testAgent) (map[int64][]string, error) {
		return connectedAgents(w.e, n, token, agents...)
	}
	// waitListed waits until every node answers, asked about the agents,
	// that exactly want are connected, once each.
	waitListed := func(asked []testAgent, want ...testAgent) {
		t.Helper()
		expected := map[int64][]string{}
		for _, a := range want {
			expected[a.id] = []string{"agentk-" + a.name}
		}
		for _, n := range w.nodes {
			var got map[int64][]string
			var err error
			eventually(t, func() bool {
				got, err = connected(n, asked...)
				return err == nil && maps.EqualFunc(got, expected, slices.Equal)
			}, func() string {
				return fmt.Sprintf("%s lists connected agents %v (error %v), want %v", n.name, got, err, expected)
			})
		}
	}

	asked := append(slices.Clone(w.agents), asUser)
	waitListed(asked, w.agents...)

	// One more agent connects to the last node, then goes away.
	extra := w.fleet.connect(t, asUser, w.nodes[2], w.kubes[2].url, w.nodes)
	waitListed(asked, asked...)
	if err := extra.stop(); err != nil {
		t.Fatal(err)
	}
	waitListed(asked, w.agents...)
}

// testNodeKilled kills the node holding an agent's tunnel: requests for
// the agent fail cleanly, then work once the agent has reconnected to
// another node through its load balancer, and the dead node's records
// disappear from Redis.
func testNodeKilled(t *testing.T, bin string) {
	const ttl, refresh = 3 * time.Second, time.Second
	e := newWorld(t)
	c := newCluster(t, bin, clusterOptions{
		standaloneFile: e.scenarioFile,
		redisTTL:       ttl,
		redisRefresh:   refresh,
		redisGC:        refresh,
		// Bounds how long a request waits for an agent nobody holds.
		agentWaitTimeout: 2 * time.Second,
	})
	entry, survivor, victim := c.startNode(t, "kas-1", nodeOptions{}), c.startNode(t, "kas-2", nodeOptions{}), c.startNode(t, "kas-victim", nodeOptions{})
	nodes := []*node{entry, survivor, victim}
	f := newFleet(t, e)
	balancer := startRelay(t, victim.public)
	f.run(t, asAgent, balancer.addr(), e.kubeServer.URL)
	waitHolders(t, nodes, asAgent.id, victim)
	victimID := c.nodeID(t, victim)
	tunnelsKey := fmt.Sprintf("%s%d", redisTunnelsKeyPrefix, asAgent.id)
	if fields, err := c.redisFields(context.Background(), tunnelsKey); err != nil || !slices.Contains(fields, victimID) {
		t.Fatalf("Redis hash %s has fields %v (error %v), want the victim's %s", tunnelsKey, fields, err, victimID)
	}
	cred := pat(asAgent.id, alicePAT)

	// A request waits in the cluster, through entry and the victim.
	inFlight := make(chan *http.Response, 1)
	failed := make(chan error, 1)
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	go func() {
		resp, err := get(ctx, e, entry, "/slow", cred)
		if err != nil {
			failed <- err
			return
		}
		inFlight <- resp
	}()
	eventually(t, func() bool { return e.kube.Slow() == 1 },
		func() string { return "the request never reached the cluster" })

	victim.kill(t)
	killed := time.Now()
	select {
	case resp := <-inFlight:
		defer resp.Body.Close()
		expectUnavailable(t, resp)
	case err := <-failed:
		t.Fatalf("the request in flight through the killed node got no answer: %v", err)
	case <-time.After(waitFor):
		t.Fatal("the request in flight through the killed node got no answer")
	}
	t.Logf("the request in flight was answered %s after the kill", time.Since(killed).Round(time.Millisecond))

	// The agent cannot reconnect yet (its load balancer still sends it to
	// the dead node): new requests fail cleanly, within the agent wait.
	for _, n := range []*node{entry, survivor} {
		ctx, cancel := context.WithTimeout(context.Background(), waitFor)
		start := time.Now()
		resp, err := get(ctx, e, n, "/version", cred)
		if err != nil {
			cancel()
			t.Fatalf("through %s: %v", n.name, err)
		}
		expectUnavailable(t, resp)
		_ = resp.Body.Close()
		cancel()
		t.Logf("through %s, the agent of the killed node: refused in %s", n.name, time.Since(start).Round(time.Millisecond))
	}

	// The load balancer sends the agent to a live node: both nodes reach
	// it again, the entry node skipping the dead node's stale record.
	balancer.retarget(survivor.public)
	eventually(t, func() bool {
		urls, err := entry.holders(asAgent.id)
		return err == nil && slices.Contains(urls, survivor.url)
	}, func() string { return "the agent's new tunnel on the surviving node is not listed" })
	t.Logf("the agent reconnected %s after the kill", time.Since(killed).Round(time.Millisecond))
	for _, n := range []*node{entry, survivor} {
		if err := listNamespaces(t, e, n, cred); err != nil {
			t.Fatal(err)
		}
	}

	// The dead node's records expire and are collected.
	var nodeFields, tunnelFields []string
	eventually(t, func() bool {
		var err1, err2 error
		nodeFields, err1 = c.redisFields(context.Background(), redisNodesKey)
		tunnelFields, err2 = c.redisFields(context.Background(), tunnelsKey)
		return err1 == nil && err2 == nil && !slices.Contains(nodeFields, victimID) && !slices.Contains(tunnelFields, victimID) &&
			len(nodeFields) == 2 && len(tunnelFields) == 1
	}, func() string {
		return fmt.Sprintf("Redis still holds %s: %s has fields %v, %s has %v", victimID, redisNodesKey, nodeFields, tunnelsKey, tunnelFields)
	})
	// The last refresh before the kill was at most a refresh period earlier.
	if took := time.Since(killed); took < ttl-refresh {
		t.Errorf("the dead node's records were gone %s after the kill, before their TTL (%s) could have run out", took, ttl)
	} else {
		t.Logf("the dead node's records were gone %s after the kill (TTL %s)", took.Round(time.Millisecond), ttl)
	}
	waitHolders(t, []*node{entry, survivor}, asAgent.id, survivor)
}

// testGRPCS runs the private API over TLS: nodes check each other's
// certificate for OWN_PRIVATE_API_HOST, and a node expecting another name
// refuses the hop.
func testGRPCS(t *testing.T, bin string) {
	e := newWorld(t)
	c := newCluster(t, bin, clusterOptions{standaloneFile: e.scenarioFile})
	// The certificate names kas.internal only: not the 127.0.0.1 the
	// nodes publish, so only the checked name can make it pass.
	cert := issueCertificate(t, "kas.internal")
	tlsNode := func(host string) nodeOptions {
		return nodeOptions{env: []string{"OWN_PRIVATE_API_SCHEME=grpcs", "OWN_PRIVATE_API_HOST=" + host}, tls: cert}
	}
	entry := c.startNode(t, "kas-1", tlsNode("kas.internal"))
	holder := c.startNode(t, "kas-2", tlsNode("kas.internal"))
	misnamed := c.startNode(t, "kas-misnamed", tlsNode("wrong.internal"))
	nodes := []*node{entry, holder, misnamed}
	for _, n := range nodes {
		if !strings.HasPrefix(n.url, "grpcs://") {
			t.Fatalf("%s publishes %s, want a grpcs:// URL", n.name, n.url)
		}
	}
	f := newFleet(t, e)
	f.connect(t, asAgent, holder, e.kubeServer.URL, nodes)
	cred := pat(asAgent.id, alicePAT)

	if err := listNamespaces(t, e, entry, cred); err != nil {
		t.Fatalf("a hop over grpcs: %v", err)
	}

	// The misnamed node checks the holder's certificate for wrong.internal.
	// The caller is told that kas failed, and how (not that the agent is
	// not connected), every time; the log says it once.
	for range 3 {
		ctx, cancel := context.WithTimeout(context.Background(), waitFor)
		resp, err := get(ctx, e, misnamed, "/version", cred)
		if err != nil {
			cancel()
			t.Fatalf("through %s: %v", misnamed.name, err)
		}
		st := expectStatus(t, resp, http.StatusBadGateway, metav1.StatusReasonInternalError)
		_ = resp.Body.Close()
		cancel()
		for _, want := range []string{"kas cannot reach agent 1: the kas node holding its tunnel is unreachable: " + holder.url,
			"TLS name mismatch: certificate is valid for kas.internal, not wrong.internal", "OWN_PRIVATE_API_HOST"} {
			if !strings.Contains(st.Message, want) {
				t.Errorf("the caller was told %q, want it to say %q", st.Message, want)
			}
		}
	}
	const unreachable = "kas node unreachable over the private API; skipping it for a while"
	line := misnamed.proc.waitLog(t, unreachable)
	logged, _ := line["cause"].(string)
	for _, want := range []string{"certificate is valid for kas.internal, not wrong.internal", "OWN_PRIVATE_API_HOST"} {
		if !strings.Contains(logged, want) {
			t.Errorf("the misnamed node logged %q, want it to say %q", logged, want)
		}
	}
	if n := misnamed.proc.count(unreachable, "level", "WARN"); n != 1 {
		t.Errorf("the misnamed node warned %d times, want once per cause", n)
	}
}

// testRedisRestart stops Redis under running nodes and starts it again,
// empty: the node holding a tunnel serves it meanwhile, the other node
// reaches the agents it had looked up through their last known node
// (stale-while-error) and says that the registry is unavailable for the
// others, then the holder writes its records again within one refresh
// period, so the other node reaches every agent again.
func testRedisRestart(t *testing.T, bin string) {
	const refresh = 2 * time.Second
	// slack allows for the write itself and for scheduling on a busy machine.
	const slack = time.Second
	e := newWorld(t)
	c := newCluster(t, bin, clusterOptions{
		standaloneFile:   e.scenarioFile,
		redisTTL:         3 * refresh,
		redisRefresh:     refresh,
		redisGC:          refresh,
		agentWaitTimeout: 5 * time.Second,
	})
	holder, other := c.startNode(t, "kas-1", nodeOptions{}), c.startNode(t, "kas-2", nodeOptions{})
	nodes := []*node{holder, other}
	f := newFleet(t, e)
	f.connect(t, asAgent, holder, e.kubeServer.URL, nodes)
	f.connect(t, asImpersonate, holder, e.kubeServer.URL, nodes)
	holderID := c.nodeID(t, holder)
	tunnelsKey := fmt.Sprintf("%s%d", redisTunnelsKeyPrefix, asAgent.id)
	cred := pat(asAgent.id, alicePAT)
	// The other node has looked up agent 1, not agent 2.
	if err := listNamespaces(t, e, other, cred); err != nil {
		t.Fatal(err)
	}

	// Redis stays away until both nodes have seen it gone: the other
	// node's subscription failed (so it no longer trusts its lookup cache)
	// and the holder failed to refresh its records (so it is retrying).
	c.redis.Stop()
	other.waitMetric(t, `kas_registry_redis_errors_total{operation="subscribe"}`, 1)
	holder.waitMetric(t, `kas_registry_redis_errors_total{operation="write"}`, 1)
	if err := listNamespaces(t, e, holder, cred); err != nil {
		t.Fatalf("the holder without Redis: %v", err)
	}
	// The other node still reaches agent 1 where it last found it.
	start := time.Now()
	if err := listNamespaces(t, e, other, cred); err != nil {
		t.Fatalf("through %s without Redis, an agent it had looked up: %v", other.name, err)
	}
	t.Logf("through %s without Redis, an agent it had looked up: served in %s", other.name, time.Since(start).Round(time.Millisecond))
	// Agent 2 it cannot look up: it says so at once, and does not blame the
	// agent.
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	start = time.Now()
	resp, err := get(ctx, e, other, "/version", ciJob(asImpersonate.id, jobToken))
	if err != nil {
		t.Fatalf("through %s without Redis: %v", other.name, err)
	}
	st := expectStatus(t, resp, http.StatusServiceUnavailable, metav1.StatusReasonServiceUnavailable)
	_ = resp.Body.Close()
	took := time.Since(start)
	t.Logf("through %s without Redis, an agent it had not looked up: %d %q in %s", other.name, st.Code, st.Message, took.Round(time.Millisecond))
	if want := "the agent registry (Redis) is unavailable"; !strings.Contains(st.Message, want) || strings.Contains(st.Message, "not connected") {
		t.Errorf("the caller was told %q, want it to say %q and not blame the agent", st.Message, want)
	}
	if resp.Header.Get("Retry-After") != "" {
		t.Errorf("Retry-After %q for a registry outage, want none", resp.Header.Get("Retry-After"))
	}
	if took >= 5*time.Second {
		t.Errorf("answered after %s: it waited for the agent although it could not look", took)
	}

	c.redis.Restart()
	back := time.Now()
	var fields []string
	eventually(t, func() bool {
		fields, _ = c.redisFields(context.Background(), tunnelsKey)
		return slices.Contains(fields, holderID)
	}, func() string {
		return fmt.Sprintf("Redis hash %s has fields %v, want the holder's %s", tunnelsKey, fields, holderID)
	})
	took = time.Since(back)
	if took > refresh+slack {
		t.Errorf("the holder wrote its record %s after Redis came back, want within one refresh period (%s)", took, refresh)
	}
	t.Logf("the holder wrote its record again %s after Redis came back (refresh period %s)", took.Round(time.Millisecond), refresh)

	// The other node reaches the agent again. A request that finds no
	// tunnel waits a second, then is refused and tried again.
	eventually(t, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), waitFor)
		defer cancel()
		resp, err := get(ctx, e, other, "/version", cred)
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		_, _ = io.Copy(io.Discard, resp.Body)
		return resp.StatusCode == http.StatusOK
	}, func() string { return "the other node does not reach the agent after Redis came back" })
	t.Logf("the other node reached the agent %s after Redis came back", time.Since(back).Round(time.Millisecond))
}
