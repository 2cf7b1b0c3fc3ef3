package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/kasproject/kas/agent"
	"github.com/kasproject/kas/internal/fakekube"
	"github.com/kasproject/kas/server"
	"github.com/kasproject/kas/server/config"
	"github.com/kasproject/kas/server/logging"
	"github.com/kasproject/kas/web"
)

// waitFor bounds every wait for something that happens in the background
// (an agent connecting, a request arriving); generous, since the machine
// running the tests may be slow and busy.
const waitFor = 30 * time.Second

// env is one test's world: the scenario's files, a fake cluster, one kas
// node serving them, and an HTTP transport for the callers.
type env struct {
	logs *logBuffer
	log  *slog.Logger

	scenarioFile string
	kube         *fakekube.Server
	kubeServer   *httptest.Server
	kas          *kasNode

	// transport carries every caller's requests; it is closed with the env.
	transport *http.Transport
	client    *http.Client

	mu     sync.Mutex
	agents []*agentNode // stopped together, before kas
}

// newEnv writes the scenario, starts the fake cluster and a kas node in
// standalone mode on it; configure, if not nil, adjusts kas's configuration
// first. Everything stops when the test ends.
func newEnv(t *testing.T, configure func(*config.Config)) *env {
	t.Helper()
	e := newWorld(t)
	cfg := kasConfig(t)
	cfg.Standalone.File = e.scenarioFile
	if configure != nil {
		configure(cfg)
	}
	e.kas = startKAS(t, cfg, e.log.With("component", "kas"))
	// agentk waits a second after its GOAWAY before it closes the tunnel
	// (x/net/http2's rule), so the agents stop together, not one by one.
	t.Cleanup(func() {
		e.mu.Lock()
		agents := e.agents
		e.mu.Unlock()
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
	return e
}

// newWorld is an env without kas: the scenario's files, the fake cluster
// and the callers' transport. The test provides e.kas.
func newWorld(t *testing.T) *env {
	t.Helper()
	e := &env{logs: newLogBuffer(t)}
	e.log = logging.New(e.logs, slog.LevelDebug, nil)
	e.scenarioFile = newScenario().write(t, t.TempDir())
	e.kube, e.kubeServer = startCluster(t)
	e.transport = &http.Transport{}
	t.Cleanup(e.transport.CloseIdleConnections)
	e.client = &http.Client{Transport: e.transport}
	return e
}

// startCluster starts a fake Kubernetes API server.
func startCluster(t *testing.T) (*fakekube.Server, *httptest.Server) {
	t.Helper()
	kube := fakekube.New()
	srv := httptest.NewServer(kube)
	t.Cleanup(func() {
		// Let waiting requests go, so Close does not wait for them.
		kube.Release()
		srv.CloseClientConnections()
		srv.Close()
	})
	return kube, srv
}

// kasConfig is kas's embedded default configuration on free loopback ports.
func kasConfig(t *testing.T) *config.Config {
	t.Helper()
	cfg, err := config.Load("", nil)
	if err != nil {
		t.Fatalf("load the default configuration: %v", err)
	}
	for _, l := range []*config.Listen{
		&cfg.Agent.Listen.Listen, &cfg.Observability.Listen, &cfg.API.Listen.Listen, &cfg.PrivateAPI.Listen.Listen,
	} {
		l.Address = "127.0.0.1:0"
	}
	return cfg
}

// kasNode is one kas running in-process.
type kasNode struct {
	public        string // the agent listener (agents, Kubernetes API proxy)
	observability string
	// stop shuts kas down and returns Run's error; later calls return the same.
	stop func() error
}

// startKAS runs kas with cfg until stop is called or the test ends.
func startKAS(t *testing.T, cfg *config.Config, log *slog.Logger) *kasNode {
	t.Helper()
	return startKASWith(t, cfg, server.Options{Logger: log, Version: "e2e"})
}

// startKASWith runs kas with cfg and opts until stop is called or the test ends.
func startKASWith(t *testing.T, cfg *config.Config, opts server.Options) *kasNode {
	t.Helper()
	srv, err := server.New(cfg, opts)
	if err != nil {
		t.Fatalf("build kas: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	select {
	case <-srv.Ready():
	case err := <-done:
		cancel()
		t.Fatalf("start kas: %v", err)
	case <-time.After(waitFor):
		cancel()
		t.Fatal("kas did not become ready")
	}
	k := &kasNode{
		public:        srv.Addr("agent.listen").String(),
		observability: srv.Addr("observability.listen").String(),
		stop: sync.OnceValue(func() error {
			cancel()
			select {
			case err := <-done:
				return err
			case <-time.After(time.Minute):
				return errors.New("kas did not stop within a minute")
			}
		}),
	}
	t.Cleanup(func() {
		if err := k.stop(); err != nil {
			t.Errorf("stop kas: %v", err)
		}
	})
	return k
}

// tunnels counts the agent's tunnels kas lists on its status page.
func tunnels(observability string, agentID int64) (int, error) {
	req, err := http.NewRequest(http.MethodGet, "http://"+observability+"/debug/status", nil)
	if err != nil {
		return 0, err
	}
	req.Close = true // leave no idle connection behind
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	var st web.Status
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return 0, fmt.Errorf("decode status: %w", err)
	}
	for _, a := range st.Agents {
		if a.ID == agentID {
			return len(a.Connections), nil
		}
	}
	return 0, nil
}

// waitTunnels waits until kas lists exactly n tunnels for the agent.
func waitTunnels(t *testing.T, observability string, agentID int64, n int) {
	t.Helper()
	var got int
	var err error
	eventually(t, func() bool {
		got, err = tunnels(observability, agentID)
		return err == nil && got == n
	}, func() string {
		return fmt.Sprintf("kas lists %d tunnels for agent %d (error %v), want %d", got, agentID, err, n)
	})
}

// agentNode is one agentk running in-process.
type agentNode struct {
	agent *agent.Agent
	// stop cancels the agent, waits for Run to return and returns its error.
	stop func() error
}

// agentOptions are an agentk's options for a, connecting to kas at public
// and reaching the cluster at kubeURL with agentSAToken.
func (e *env) agentOptions(a testAgent, public string) agent.Options {
	return agent.Options{
		KASAddress:    "ws://" + public,
		Token:         a.token,
		RESTConfig:    &rest.Config{Host: e.kubeServer.URL, BearerToken: agentSAToken},
		Logger:        e.log.With("component", "agentk", "agent", a.name),
		AgentVersion:  "e2e",
		PodName:       "agentk-" + a.name,
		PodNamespace:  "gitlab-agent",
		MinBackoff:    10 * time.Millisecond,
		MaxBackoff:    100 * time.Millisecond,
		ShutdownGrace: 2 * time.Second,
	}
}

// startAgent connects agentk for a to the env's kas and waits until kas has
// registered its tunnel.
func (e *env) startAgent(t *testing.T, a testAgent) *agentNode {
	t.Helper()
	n := runAgent(t, e.agentOptions(a, e.kas.public))
	e.mu.Lock()
	e.agents = append(e.agents, n)
	e.mu.Unlock()
	waitConnected(t, n.agent)
	eventually(t, func() bool {
		got, err := tunnels(e.kas.observability, a.id)
		return err == nil && got > 0
	}, func() string { return fmt.Sprintf("kas never registered a tunnel for agent %d", a.id) })
	return n
}

// runAgent runs agentk with opts until stop is called or the test ends.
// (Agents of an env are stopped before, all at once.)
func runAgent(t *testing.T, opts agent.Options) *agentNode {
	t.Helper()
	a, err := agent.New(opts)
	if err != nil {
		t.Fatalf("build agentk: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	n := &agentNode{
		agent: a,
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
	t.Cleanup(func() {
		if err := n.stop(); err != nil {
			t.Errorf("stop agentk: %v", err)
		}
	})
	return n
}

func waitConnected(t *testing.T, a *agent.Agent) {
	t.Helper()
	select {
	case <-a.Connected():
	case <-time.After(waitFor):
		t.Fatalf("agentk did not connect to kas within %s", waitFor)
	}
}

// credential is what a caller of the Kubernetes API proxy presents.
type credential struct {
	authorization string // the Authorization header
	cookie, csrf  string // the browser session: _gitlab_kas cookie and X-Csrf-Token
	agentID       int64  // the Gitlab-Agent-Id header of the browser session
}

func ciJob(agentID int64, token string) credential {
	return credential{authorization: fmt.Sprintf("Bearer ci:%d:%s", agentID, token)}
}

func pat(agentID int64, token string) credential {
	return credential{authorization: fmt.Sprintf("Bearer pat:%d:%s", agentID, token)}
}

func browser(agentID int64, cookie, csrf string) credential {
	return credential{cookie: cookie, csrf: csrf, agentID: agentID}
}

func (c credential) apply(h http.Header) {
	if c.authorization != "" {
		h.Set("Authorization", c.authorization)
	}
	if c.cookie != "" {
		h.Add("Cookie", "_gitlab_kas="+c.cookie)
	}
	if c.agentID != 0 {
		h.Set("Gitlab-Agent-Id", fmt.Sprint(c.agentID))
	}
	if c.csrf != "" {
		h.Set("X-Csrf-Token", c.csrf)
	}
}

// proxyURL is the Kubernetes API proxy's URL on the env's kas.
func (e *env) proxyURL() string { return "http://" + e.kas.public + "/k8s-proxy" }

// clientset is a client-go client of the cluster through kas, as cred.
func (e *env) clientset(t *testing.T, cred credential) kubernetes.Interface {
	t.Helper()
	return clientsetFor(t, e.proxyURL(), e.transport, cred)
}

func clientsetFor(t *testing.T, host string, transport http.RoundTripper, cred credential) kubernetes.Interface {
	t.Helper()
	cs, err := kubernetes.NewForConfig(&rest.Config{
		Host:      host,
		Transport: transport,
		WrapTransport: func(rt http.RoundTripper) http.RoundTripper {
			return roundTripperFunc(func(r *http.Request) (*http.Response, error) {
				r = r.Clone(r.Context())
				cred.apply(r.Header)
				return rt.RoundTrip(r)
			})
		},
		// The tests make requests in bursts; client-go would throttle them.
		QPS:   1000,
		Burst: 1000,
	})
	if err != nil {
		t.Fatalf("build client-go clientset: %v", err)
	}
	return cs
}

type roundTripperFunc func(*http.Request) (*http.Response, error)

func (f roundTripperFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// do sends one request through the env's proxy as cred, with the extra
// headers, and returns the response; the test owns its body.
func (e *env) do(t *testing.T, method, path string, cred credential, header http.Header, body io.Reader) *http.Response {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	t.Cleanup(cancel)
	req, err := http.NewRequestWithContext(ctx, method, e.proxyURL()+path, body)
	if err != nil {
		t.Fatal(err)
	}
	for k, vs := range header {
		req.Header[k] = vs
	}
	cred.apply(req.Header)
	resp, err := e.client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	t.Cleanup(func() { _ = resp.Body.Close() })
	return resp
}

// expectStatus checks that resp is kas's (or agentk's) answer as a
// Kubernetes Status with the given code and reason, and returns it.
func expectStatus(t *testing.T, resp *http.Response, code int, reason metav1.StatusReason) metav1.Status {
	t.Helper()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("read answer: %v", err)
	}
	if resp.StatusCode != code {
		t.Fatalf("got HTTP %d %s, want %d", resp.StatusCode, body, code)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Errorf("Content-Type %q, want application/json", ct)
	}
	var st metav1.Status
	if err := json.Unmarshal(body, &st); err != nil {
		t.Fatalf("answer %q is not a Status: %v", body, err)
	}
	if st.Kind != "Status" || st.APIVersion != "v1" || st.Status != metav1.StatusFailure ||
		st.Code != int32(code) || st.Reason != reason || st.Message == "" {
		t.Fatalf("got %+v, want a v1 Status Failure with code %d, reason %s and a message", st, code, reason)
	}
	return st
}

// eventually polls cond until it holds, failing the test with what()
// after waitFor.
func eventually(t *testing.T, cond func() bool, what func() string) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %s: %s", waitFor, what())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// logBuffer collects the logs of one test's kas and agents. They are printed
// if the test fails, and checked for credentials when it ends.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func newLogBuffer(t *testing.T) *logBuffer {
	b := &logBuffer{}
	// Registered first, so it runs last, when everything has stopped.
	t.Cleanup(func() {
		logs := b.String()
		for _, s := range secrets {
			if strings.Contains(logs, s) {
				t.Errorf("a credential (%.12s…) appears in the logs", s)
			}
		}
		if t.Failed() {
			t.Logf("kas and agentk logs:\n%s", logs)
		}
	})
	return b
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// relay forwards TCP connections to a target, which retarget changes for
// the connections that follow (a load balancer in front of several kas
// nodes). cut drops every connection at once and stops accepting: what kas
// sees when the agent's host dies.
type relay struct {
	ln net.Listener

	mu     sync.Mutex
	target string
	conns  []net.Conn
	closed bool
	wg     sync.WaitGroup
}

func startRelay(t *testing.T, target string) *relay {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &relay{ln: ln, target: target}
	r.wg.Go(r.accept)
	t.Cleanup(r.cut)
	return r
}

func (r *relay) addr() string { return r.ln.Addr().String() }

// retarget sends the connections accepted from now on to target.
func (r *relay) retarget(target string) {
	r.mu.Lock()
	r.target = target
	r.mu.Unlock()
}

func (r *relay) accept() {
	for {
		in, err := r.ln.Accept()
		if err != nil {
			return
		}
		r.mu.Lock()
		target := r.target
		r.mu.Unlock()
		out, err := net.Dial("tcp", target)
		if err != nil {
			_ = in.Close()
			continue
		}
		r.mu.Lock()
		if r.closed {
			r.mu.Unlock()
			_ = in.Close()
			_ = out.Close()
			return
		}
		r.conns = append(r.conns, in, out)
		r.mu.Unlock()
		for _, dir := range [][2]net.Conn{{in, out}, {out, in}} {
			r.wg.Go(func() {
				_, _ = io.Copy(dir[0], dir[1])
				_ = dir[0].Close()
				_ = dir[1].Close()
			})
		}
	}
}

// cut closes the listener and every connection and waits for the copies.
func (r *relay) cut() {
	_ = r.ln.Close()
	r.mu.Lock()
	r.closed = true
	for _, c := range r.conns {
		_ = c.Close()
	}
	r.mu.Unlock()
	r.wg.Wait()
}
