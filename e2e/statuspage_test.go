package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"k8s.io/client-go/rest"

	"github.com/kasproject/kas/agent"
	"github.com/kasproject/kas/internal/redistest"
	"github.com/kasproject/kas/server"
	"github.com/kasproject/kas/server/agentyaml"
	"github.com/kasproject/kas/server/config"
	"github.com/kasproject/kas/server/logging"
	"github.com/kasproject/kas/web"
)

// screenshotPath is where TestStatusPageInBrowser leaves its screenshot of
// the page, relative to this package: artifacts/status-page.png at the top
// of the repository (git-ignored; CI keeps it as an artifact).
const screenshotPath = "../artifacts/status-page.png"

// hostilePod is a pod name no page may turn into markup.
const hostilePod = `agentk-"><img src=x onerror="window.pwned=1">`

// chromiumPath finds Debian's chromium. Under CI=true its absence fails
// the test (scripts/install-test-deps.sh installs it); elsewhere the test
// is skipped with how to install it.
func chromiumPath(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("chromium is not in PATH under CI; scripts/install-test-deps.sh installs Debian's chromium when run as root")
	}
	t.Skip("chromium is not in PATH: install Debian's chromium (apt-get install chromium, or run scripts/install-test-deps.sh as root) to run the status page's browser tests")
	return ""
}

// newBrowser starts a headless Chromium for the test (as root it needs
// --no-sandbox; nothing may reach out of the machine) and returns a tab's
// context, bounded by timeout.
func newBrowser(t *testing.T, timeout time.Duration) context.Context {
	t.Helper()
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromiumPath(t)),
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.UserDataDir(t.TempDir()),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-quic", true),
		chromedp.WindowSize(1600, 1000),
	)
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancelTab := chromedp.NewContext(allocCtx)
	ctx, cancelTimeout := context.WithTimeout(ctx, timeout)
	t.Cleanup(func() {
		cancelTimeout()
		cancelTab()
		cancelAlloc() // waits for the browser to exit
	})
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	return ctx
}

// statusWorld is a standalone file listing only the given agents, each
// letting alice act as the agent's service account.
func statusWorld(t *testing.T, agents []testAgent) string {
	t.Helper()
	s := newScenario()
	s.Agents, s.configs = nil, map[string]agentyaml.Config{}
	for _, a := range agents {
		s.addAgent(a, agentyaml.Config{UserAccess: &agentyaml.UserAccess{
			AccessAs: &agentyaml.UserAccessAs{Agent: &struct{}{}},
			Projects: []agentyaml.Ref{{ID: "acme/app"}},
		}})
	}
	return s.write(t, t.TempDir())
}

// rowInfo is what the browser shows of one agent row.
type rowInfo struct {
	ID        string `json:"id"`
	Class     string `json:"class"`
	Text      string `json:"text"`
	Hidden    bool   `json:"hidden"`
	Bars      int    `json:"bars"`
	ErrorBars int    `json:"errorBars"`
}

// rowsJS describes the agent rows: their state class (failing,
// disconnected or none), text, whether hidden; bars counts the steps of a sparkline's
// path above zero (an idle sparkline has no path: 0).
const rowsJS = `Array.from(document.querySelectorAll("[data-agent]")).map(tr => {
  const spark = tr.querySelector("svg.spark");
  const bars = sel => { const p = spark.querySelector(sel); return p ? (p.getAttribute("d").match(/V\d+/g) || []).filter(v => +v.slice(1) < 20).length : 0; };
  return {id: tr.dataset.agent, class: tr.className.replace(/^row */, ""), text: tr.innerText, hidden: tr.hidden,
    bars: spark ? bars("path.req") : -1, errorBars: spark ? bars("path.err") : -1};
})`

// statusNodeConfig is a kas node's configuration on free loopback ports,
// sharing the Redis at redisAddr with the other nodes, in standalone mode.
func statusNodeConfig(t *testing.T, dir, name, redisAddr, privateSecretFile, standaloneFile string) *config.Config {
	t.Helper()
	loopback := func() map[string]any { return map[string]any{"address": "127.0.0.1:0"} }
	private := loopback()
	private["authentication_secret_file"] = privateSecretFile
	file := filepath.Join(dir, name+".yaml")
	writeYAML(t, file, map[string]any{
		"agent": map[string]any{"listen": loopback(),
			"kubernetes_api": map[string]any{"agent_wait_timeout": "200ms"}},
		"observability": map[string]any{"listen": loopback()},
		"api":           map[string]any{"listen": loopback()},
		"private_api":   map[string]any{"listen": private},
		"redis": map[string]any{
			"server":                     map[string]any{"address": redisAddr},
			"allow_loopback_private_api": true,
		},
		"standalone": map[string]any{"file": standaloneFile},
	})
	cfg, err := config.Load(file, func(string) string { return "" })
	if err != nil {
		t.Fatalf("load %s: %v", file, err)
	}
	return cfg
}

// TestStatusPageInBrowser runs two kas nodes sharing Redis with agents —
// one with a replica on each node, one with a hostile pod name, one whose
// Kubernetes API server fails, one never connected — sends traffic through
// the first node, and checks in Chromium what an operator sees on its
// page: a row per agent with its replicas' nodes, sparklines, the failing
// agent's last error, the disconnected agent, both nodes, escaping, and
// filtering. It saves a screenshot (screenshotPath).
func TestStatusPageInBrowser(t *testing.T) {
	ctx := newBrowser(t, 2*time.Minute)
	web1 := testAgent{11, "web", "glagent-e2e-web-11"}
	batch := testAgent{12, "batch", "glagent-e2e-batch-12"}
	flaky := testAgent{13, "flaky", "glagent-e2e-flaky-13"}
	offline := testAgent{14, "offline", "glagent-e2e-offline-14"}

	e := newWorld(t)
	world := statusWorld(t, []testAgent{web1, batch, flaky, offline})
	rdb := redistest.Start(t)
	_, privateSecret := writeSecret(t)
	dir := t.TempDir()
	recent := logging.NewRecent(100)
	e.kas = startKASWith(t, statusNodeConfig(t, dir, "kas-a", rdb.Addr(), privateSecret, world),
		server.Options{Logger: logging.New(e.logs, slog.LevelDebug, recent).With("node", "kas-a"), Recent: recent, Version: "v0.14.0-e2e"})
	kasB := startKASWith(t, statusNodeConfig(t, dir, "kas-b", rdb.Addr(), privateSecret, world),
		server.Options{Logger: e.log.With("node", "kas-b"), Version: "v0.14.0-e2e"})

	// flaky's cluster answers every request with a 500, as an API server
	// whose etcd is down does.
	broken := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusInternalServerError)
		_, _ = w.Write([]byte(`{"kind":"Status","apiVersion":"v1","status":"Failure","message":"etcdserver: request timed out","code":500}`))
	}))
	t.Cleanup(broken.Close)

	start := func(a testAgent, kas *kasNode, pod string, apiServer string) {
		opts := e.agentOptions(a, kas.public)
		opts.PodName = pod
		opts.AgentVersion = "v17.6.0"
		if apiServer != "" {
			opts.RESTConfig = &rest.Config{Host: apiServer, BearerToken: agentSAToken}
		}
		n := runAgent(t, opts)
		e.mu.Lock()
		e.agents = append(e.agents, n)
		e.mu.Unlock()
		waitConnected(t, n.agent)
	}
	start(web1, e.kas, "agentk-web-0", "")
	start(web1, kasB, "agentk-web-1", "")
	start(batch, e.kas, hostilePod, "")
	start(flaky, kasB, "agentk-flaky-0", broken.URL)
	waitTunnels(t, e.kas.observability, web1.id, 2)
	waitTunnels(t, e.kas.observability, batch.id, 1)
	waitTunnels(t, e.kas.observability, flaky.id, 1)

	send := func(a testAgent, n, wantStatus int) {
		for range n {
			resp := e.do(t, http.MethodGet, "/api/v1/namespaces", pat(a.id, alicePAT), nil, nil)
			_ = resp.Body.Close()
			if resp.StatusCode != wantStatus {
				t.Fatalf("GET through agent %s: %d, want %d", a.name, resp.StatusCode, wantStatus)
			}
		}
	}
	send(web1, 12, http.StatusOK)
	send(batch, 4, http.StatusOK)
	send(flaky, 5, http.StatusInternalServerError)
	send(offline, 1, http.StatusServiceUnavailable)

	pageURL := "http://" + e.kas.observability + "/"
	if err := chromedp.Do(ctx, chromedp.Navigate(pageURL), chromedp.WaitVisible(chromedp.CSS("#agent-table"))); err != nil {
		t.Fatalf("load the status page in chromium: %v", err)
	}
	rows := evaluate[[]rowInfo](t, ctx, rowsJS)
	summary, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS("#summary")))
	if err != nil {
		t.Fatal(err)
	}
	byID := map[string]rowInfo{}
	for _, r := range rows {
		byID[r.ID] = r
	}
	if len(rows) != 4 {
		t.Fatalf("the page shows %d agent rows, want 4: %+v", len(rows), rows)
	}
	if !strings.Contains(summary, "4 known · 3 connected (4 tunnels)") || !strings.Contains(summary, "1 disconnected") || !strings.Contains(summary, "2 failing") {
		t.Errorf("summary %q", summary)
	}
	check := func(id int64, class string, bars, errorBars bool, texts ...string) {
		t.Helper()
		r, ok := byID[fmt.Sprint(id)]
		if !ok {
			t.Errorf("no row for agent %d", id)
			return
		}
		if r.Class != class {
			t.Errorf("agent %d's row has class %q, want %q", id, r.Class, class)
		}
		if (r.Bars > 0) != bars || (r.ErrorBars > 0) != errorBars || r.Bars < 0 || r.ErrorBars < 0 {
			t.Errorf("agent %d's sparkline has %d request bars and %d error bars (-1: missing)", id, r.Bars, r.ErrorBars)
		}
		for _, want := range texts {
			if !strings.Contains(r.Text, want) {
				t.Errorf("agent %d's row lacks %q:\n%s", id, want, r.Text)
			}
		}
	}
	check(web1.id, "", true, false, "web", "acme/infra", "agentk-web-0", "agentk-web-1", "dialled in", "v17.6.0", "0.0%")
	check(batch.id, "", true, false, "batch", hostilePod)
	check(flaky.id, "failing", true, true, "flaky", "100.0%", "GET /api/v1/namespaces: the cluster answered 500 Internal Server Error")
	check(offline.id, "disconnected", true, true, "offline", "disconnected", "agent 14 is not connected to kas")
	nodes := evaluate[[]string](t, ctx, `Array.from(document.querySelectorAll("#nodes tbody tr")).map(tr => tr.innerText)`)
	if len(nodes) != 2 || !strings.Contains(nodes[0], "this node") || !strings.Contains(nodes[1], "yes") || !strings.Contains(nodes[1], "v0.14.0-e2e") {
		t.Errorf("nodes table %q, want this node and the other, reachable", nodes)
	}
	if r := byID[fmt.Sprint(web1.id)].Text; strings.Count(r, " · on grpc://127.0.0.1:") != 2 {
		t.Errorf("web's replicas do not name their two nodes:\n%s", r)
	}
	pwned := evaluate[bool](t, ctx, `window.pwned === 1`)
	images := evaluate[int](t, ctx, `document.querySelectorAll("img").length`)
	if pwned || images != 0 {
		t.Errorf("the hostile pod name became markup: pwned %v, %d img elements", pwned, images)
	}

	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100)) // quality 100: PNG
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	if err := os.MkdirAll(filepath.Dir(screenshotPath), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(screenshotPath, png, 0o644); err != nil {
		t.Fatal(err)
	}
	abs, _ := filepath.Abs(screenshotPath)
	t.Logf("screenshot of the status page: %s", abs)

	// Filtering: typing hides the other rows at once, puts the filter in
	// the URL, and the refresh that follows asks the server for it.
	if err := chromedp.Do(ctx, chromedp.SendKeys(chromedp.CSS("#filter"), "fla")); err != nil {
		t.Fatal(err)
	}
	visible := evaluate[int](t, ctx, `Array.from(document.querySelectorAll("[data-agent]")).filter(tr => !tr.hidden).length`)
	search := evaluate[string](t, ctx, `location.search`)
	if visible != 1 || search != "?q=fla" {
		t.Errorf("after typing \"fla\": %d visible rows, URL query %q; want 1 and ?q=fla", visible, search)
	}
	var left []rowInfo
	deadline := time.Now().Add(10 * time.Second)
	for {
		left = evaluate[[]rowInfo](t, ctx, rowsJS)
		if len(left) == 1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(left) != 1 || left[0].ID != fmt.Sprint(flaky.id) {
		t.Errorf("after the refresh the page has rows %+v, want only flaky's", left)
	}
	// Without JavaScript the same filter is a plain GET.
	st := fetchStatusQuery(t, e.kas.observability, "q=flaky")
	if len(st.Agents) != 1 || st.Agents[0].ID != flaky.id || st.Summary.Agents != 4 {
		t.Errorf("JSON with q=flaky: %d agents, summary %+v", len(st.Agents), st.Summary)
	}
}

func fetchStatusQuery(t *testing.T, observability, query string) web.Status {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, "http://"+observability+"/debug/status?"+query, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Close = true
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var st web.Status
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		t.Fatal(err)
	}
	return st
}

// TestStatusPageRendersThousandAgents connects 1,000 real agentk tunnels
// (in this process) to kas, sends a request through a tenth of them, and
// checks that Chromium loads and renders the page — kas gathering and
// rendering it, the browser laying it out — in under a second.
func TestStatusPageRendersThousandAgents(t *testing.T) {
	if testing.Short() {
		t.Skip("1,000 agents: not in -short")
	}
	const agents = 1000
	ctx := newBrowser(t, 4*time.Minute)
	world := make([]testAgent, agents)
	for i := range world {
		id := int64(10_000 + i)
		world[i] = testAgent{id, fmt.Sprintf("cluster-%04d", i), fmt.Sprintf("glagent-e2e-many-%d", id)}
	}
	e := newWorld(t)
	cfg := kasConfig(t)
	cfg.Standalone.File = statusWorld(t, world)
	cfg.Agent.Listen.ConnectionsPerTokenPerMinute = 0
	e.kas = startKASWith(t, cfg, server.Options{Logger: slog.New(slog.DiscardHandler), Version: "v0.14.0-e2e"})

	quiet := slog.New(slog.DiscardHandler)
	runCtx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	t.Cleanup(func() {
		stop()
		wg.Wait()
	})
	for _, a := range world {
		opts := e.agentOptions(a, e.kas.public)
		opts.Logger = quiet
		opts.MinBackoff, opts.MaxBackoff = 100*time.Millisecond, time.Second
		opts.ShutdownGrace = 0
		ag, err := agent.New(opts)
		if err != nil {
			t.Fatal(err)
		}
		wg.Go(func() { _ = ag.Run(runCtx) })
	}
	connectStart := time.Now()
	eventually(t, func() bool {
		return fetchStatusQuery(t, e.kas.observability, "q=nothing-matches").Summary.Tunnels == agents
	}, func() string { return fmt.Sprintf("kas did not list %d tunnels", agents) })
	t.Logf("%d agentk tunnels connected in %s", agents, time.Since(connectStart).Round(time.Millisecond))
	for i := 0; i < agents; i += 10 {
		resp := e.do(t, http.MethodGet, "/api/v1/namespaces", pat(world[i].id, alicePAT), nil, nil)
		_ = resp.Body.Close()
	}

	// Best of three loads: the machine is shared, and the first load also
	// warms Chromium up.
	best := math.Inf(1)
	var rows int
	for range 3 {
		if err := chromedp.Do(ctx, chromedp.Navigate("http://"+e.kas.observability+"/"), chromedp.WaitVisible(chromedp.CSS("#agent-table"))); err != nil {
			t.Fatalf("load the page with %d agents: %v", agents, err)
		}
		rows = evaluate[int](t, ctx, `document.querySelectorAll("[data-agent]").length`)
		// Loaded and laid out: the time of the first frame after loading,
		// from the start of the navigation.
		timing := evaluate[pageTiming](t, ctx, `new Promise(r => requestAnimationFrame(() => {
			const n = performance.getEntriesByType("navigation")[0];
			r({response: n.responseEnd, dom: n.domContentLoadedEventEnd, load: Math.max(n.loadEventEnd, performance.now())}); }))`,
			chromedp.EvalAwaitPromise)
		t.Logf("%d agents: response complete at %.0f ms, DOM ready at %.0f ms, rendered at %.0f ms", rows, timing.Response, timing.DOM, timing.Load)
		best = min(best, timing.Load)
	}
	if rows != agents {
		t.Fatalf("the page shows %d agent rows, want %d", rows, agents)
	}
	if best >= 1000 {
		t.Errorf("the page with %d agents took %.0f ms at best to load and render, want under 1 s", agents, best)
	}
}

// evaluate runs a JavaScript expression in the page and returns its value.
func evaluate[T any](t *testing.T, ctx context.Context, expr string, opts ...chromedp.EvaluateOption) T {
	t.Helper()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[T](expr, opts...))
	if err != nil {
		t.Fatalf("evaluate %s: %v", expr, err)
	}
	return v
}

// pageTiming is when, in ms from the start of the navigation, the page's
// response was complete, its DOM ready, and it was loaded and painted.
type pageTiming struct {
	Response float64 `json:"response"`
	DOM      float64 `json:"dom"`
	Load     float64 `json:"load"`
}
