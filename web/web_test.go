package web

import (
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/html"

	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/logging"
	"github.com/kasproject/kas/server/traffic"
	"github.com/kasproject/kas/tlsutil"
)

const hostile = `<img src=x onerror=alert(1)>"'`

func testStatus() Status {
	now := time.Date(2026, 11, 27, 10, 30, 0, 0, time.UTC)
	perMinute := func(last uint64) []uint64 {
		s := make([]uint64, traffic.HistoryMinutes)
		s[len(s)-1] = last
		s[len(s)-2] = 2 * last
		return s
	}
	return Status{
		Version: "v1.2.3", Mode: "gitlab", GitLabAddress: "https://gitlab.example.com",
		NodeID: "node-a", NodeURLs: []string{"grpc://10.0.0.1:8155"},
		StartedAt: now.Add(-3 * time.Hour), GeneratedAt: now, Ready: true,
		Links:   Links{Metrics: "/metrics", Liveness: "/liveness", Readiness: "/readiness", JSON: "/debug/status"},
		Summary: Summary{Agents: 3, Connected: 2, Disconnected: 1, Failing: 1, Tunnels: 3},
		Agents: []Agent{
			{ID: 7, Name: "prod", Project: "acme/infra", Connected: true, ConnectedSince: now.Add(-time.Hour),
				Connections: []registry.TunnelInfo{
					{AgentID: 7, ConnectionID: 1, PodName: "agentk-0", PodNamespace: "gitlab-agent", AgentVersion: "v17.0.0", KubernetesVersion: "v1.31.2", NodeURLs: []string{"grpc://10.0.0.1:8155"}},
					{AgentID: 7, ConnectionID: 2, PodName: "agentk-1", PodNamespace: "gitlab-agent", AgentVersion: "v17.0.0", Receptive: true, Flavor: registry.FlavorGitLab, NodeURLs: []string{"grpc://10.0.0.2:8155"}},
				},
				Traffic: Traffic{Last5m: traffic.Window{Requests: 50, RequestsPerMinute: 10}, RequestsPerMinute: perMinute(10), ErrorsPerMinute: perMinute(0)}},
			{ID: 12, Name: hostile, Connected: true, ConnectedSince: now.Add(-time.Minute),
				Connections: []registry.TunnelInfo{{AgentID: 12, PodName: hostile, PodNamespace: hostile, AgentVersion: hostile, KubernetesVersion: hostile}},
				Traffic: Traffic{Last5m: traffic.Window{Requests: 4, Errors: 4, ErrorRate: 1, RequestsPerMinute: 0.8},
					RequestsPerMinute: perMinute(2), ErrorsPerMinute: perMinute(2),
					LastFailure: &traffic.Failure{Time: now.Add(-time.Minute), Message: "GET /api/v1/pods: the cluster answered 500 " + hostile, CorrelationID: "01JCORR"}}},
			{ID: 3, Name: "staging", Connected: false, LastSeen: now.Add(-2 * time.Hour), Connections: []registry.TunnelInfo{},
				Traffic: Traffic{RequestsPerMinute: perMinute(0), ErrorsPerMinute: perMinute(0)}},
		},
		Nodes: []Node{
			{ID: "node-a", URLs: []string{"grpc://10.0.0.1:8155"}, Self: true, Reachable: true, Tunnels: 2, LastHeartbeat: now.Add(-20 * time.Second)},
			{ID: "node-b", URLs: []string{"grpc://10.0.0.2:8155"}, Reachable: false, ReachError: "connection refused", Tunnels: 1},
		},
		Dependencies: Dependencies{
			GitLab: &GitLab{Address: "https://gitlab.example.com", LastCall: now.Add(-5 * time.Second), Last5m: traffic.Window{Requests: 4, Errors: 1, ErrorRate: 0.25},
				LastFailure: &traffic.Failure{Time: now.Add(-time.Minute), Message: "get agent info: call GitLab at https://gitlab.example.com/api: connection refused; is gitlab.address right?"}},
			Redis:        &Redis{Address: "redis:6379", LatencyMS: 0.42},
			Certificates: []tlsutil.CertificateInfo{{Source: "agent.listen certificate_file /etc/kas/tls.crt", Names: []string{"kas.example.com"}, Issuer: "CN=Example CA", NotAfter: now.Add(30 * 24 * time.Hour)}},
		},
		RecentErrors: []logging.Entry{
			{Time: now, Level: "WARN", Message: "Kubernetes API request through agent failed " + hostile, Attrs: map[string]string{"agent_id": "12", "correlation_id": "01JCORR", "error": hostile}},
			{Time: now, Level: "ERROR", Message: "Redis registry operation failed", Attrs: map[string]string{"operation": "write"}},
		},
	}
}

func serve(t *testing.T, st Status, target string) *httptest.ResponseRecorder {
	t.Helper()
	page, jsonView := Handlers(func(context.Context) Status { return st }, slog.New(slog.DiscardHandler))
	h := page
	if strings.HasPrefix(target, "/debug/status") {
		h = jsonView
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest(http.MethodGet, target, nil))
	if w.Code != http.StatusOK {
		t.Fatalf("GET %s: %d %s", target, w.Code, w.Body)
	}
	return w
}

func TestPage(t *testing.T) {
	w := serve(t, testStatus(), "/")
	body := w.Body.String()
	for _, want := range []string{
		"kas v1.2.3", "GitLab at https://gitlab.example.com", "node-a", `href="/metrics"`, `href="/debug/status"`, `href="/readiness"`, `href="/liveness"`,
		"prod", "acme/infra", "gitlab-agent/agentk-0", "dialled in", "receptive (kas dialled), GitLab agentk", "v1.31.2",
		"disconnected", "last seen 2h00m ago", "01JCORR", "the cluster answered 500",
		"no: connection refused", "PING 0.42 ms", "kas.example.com", "CN=Example CA", "(in 30d)",
		"3 known · 2 connected (3 tunnels)", "1 failing", "GitLab failing: 25.0% of calls (5m)",
		`<svg class="spark"`, `class="err" d="M0 20`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("status page lacks %q", want)
		}
	}
	if strings.Contains(body, "<img") || strings.Contains(body, "onerror=alert(1)>") {
		t.Error("status page does not escape what agents send")
	}
	if csp := w.Header().Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'none'") {
		t.Errorf("Content-Security-Policy %q", csp)
	}
	// No external asset: every src/href is relative to this listener.
	doc, err := html.Parse(strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for n := range doc.Descendants() {
		for _, a := range n.Attr {
			if (a.Key == "src" || a.Key == "href") && (strings.Contains(a.Val, "//") || strings.HasPrefix(a.Val, "http")) {
				t.Errorf("external asset %s=%q", a.Key, a.Val)
			}
		}
	}
	// The failing agent's row is marked, the disconnected one too.
	for _, want := range []string{`class="row failing" role="row" data-agent="12" data-name="` + "&lt;img src=x onerror=alert(1)&gt;&#34;&#39;" + `"`, `class="row disconnected" role="row" data-agent="3" data-name="staging"`} {
		if !strings.Contains(body, want) {
			t.Errorf("status page lacks row %s", want)
		}
	}
}

func TestPageNotReadyAndEmpty(t *testing.T) {
	st := Status{Version: "v1", Mode: "standalone", GeneratedAt: time.Now(), StartedAt: time.Now(), NotReadyReason: "Redis does not answer: dial tcp: connection refused",
		Problems: []string{"List agent tunnels: boom"}}
	st.Dependencies.Redis = &Redis{Address: "redis:6379", Error: "PING: dial tcp: connection refused"}
	body := serve(t, st, "/").Body.String()
	for _, want := range []string{"not ready: Redis does not answer", "List agent tunnels: boom", "No agent is known", "Redis unreachable", "PING: dial tcp: connection refused"} {
		if !strings.Contains(body, want) {
			t.Errorf("page lacks %q", want)
		}
	}
}

func TestFilterAndSort(t *testing.T) {
	ids := func(st Status) []int64 {
		var out []int64
		for _, a := range st.Agents {
			out = append(out, a.ID)
		}
		return out
	}
	tests := []struct {
		query    Query
		want     []int64
		wantLogs int
	}{
		{Query{}, []int64{12, 7, 3}, 2}, // by name: "<img…" sorts before letters
		{Query{Sort: "id"}, []int64{3, 7, 12}, 2},
		{Query{Sort: "-id"}, []int64{12, 7, 3}, 2},
		{Query{Sort: "rpm"}, []int64{3, 12, 7}, 2},
		{Query{Sort: "-errors"}, []int64{12, 7, 3}, 2}, // ties: reversed ID order
		{Query{Sort: "-failure"}, []int64{12, 7, 3}, 2},
		{Query{Filter: "PRO"}, []int64{7}, 0},
		{Query{Filter: "12"}, []int64{12}, 1},
		{Query{Filter: "1"}, []int64{12}, 1}, // ID 12 contains 1; 7 and 3 do not
		{Query{Filter: "nothing"}, nil, 0},
	}
	for _, tt := range tests {
		st := testStatus()
		st.apply(tt.query)
		if got := ids(st); !slices.Equal(got, tt.want) {
			t.Errorf("%+v: agents %v, want %v", tt.query, got, tt.want)
		}
		if len(st.RecentErrors) != tt.wantLogs {
			t.Errorf("%+v: %d log entries, want %d", tt.query, len(st.RecentErrors), tt.wantLogs)
		}
		if st.Summary.Agents != 3 {
			t.Errorf("%+v: summary changed by the filter: %+v", tt.query, st.Summary)
		}
	}
	// The page takes them from the URL, and its sort links keep the filter.
	body := serve(t, testStatus(), "/?q=prod&sort=-id").Body.String()
	if !strings.Contains(body, `value="prod"`) || !strings.Contains(body, `href="?q=prod&amp;sort=name"`) || !strings.Contains(body, `href="?q=prod&amp;sort=id"`) {
		t.Errorf("filtered page lacks the filter in its form and sort links")
	}
	if strings.Contains(body, "staging") {
		t.Error("filtered page still lists agent staging")
	}
}

func TestJSON(t *testing.T) {
	w := serve(t, testStatus(), "/debug/status?q=12")
	var got Status
	if err := json.Unmarshal(w.Body.Bytes(), &got); err != nil {
		t.Fatalf("JSON view: %v", err)
	}
	if got.Version != "v1.2.3" || len(got.Agents) != 1 || got.Agents[0].ID != 12 || got.Query.Filter != "12" ||
		got.Agents[0].Traffic.LastFailure == nil || len(got.Nodes) != 2 || got.Dependencies.Redis == nil || len(got.Agents[0].Traffic.RequestsPerMinute) != traffic.HistoryMinutes {
		t.Fatalf("JSON view lost data: %s", w.Body)
	}
	// Field names are the documented ones.
	for _, key := range []string{`"generated_at"`, `"last_5m"`, `"requests_per_minute"`, `"last_failure"`, `"connections"`, `"pod_name"`, `"dependencies"`, `"certificates"`, `"recent_errors"`} {
		if !strings.Contains(w.Body.String(), key) {
			t.Errorf("JSON view lacks %s", key)
		}
	}
}

func TestSparkline(t *testing.T) {
	s := string(sparkline(Traffic{RequestsPerMinute: []uint64{0, 5, 10, 10}, ErrorsPerMinute: []uint64{0, 0, 10, 0}}))
	for _, want := range []string{`viewBox="0 0 8 20"`, `class="req" d="M0 20V20h2V10h2V0h2h2V20z"`, `class="err" d="M0 20V20h2h2V0h2V20h2V20z"`, "25 requests, 10 failed; peak 10/min"} {
		if !strings.Contains(s, want) {
			t.Errorf("sparkline %s lacks %s", s, want)
		}
	}
	if s := string(sparkline(Traffic{RequestsPerMinute: make([]uint64, 60), ErrorsPerMinute: make([]uint64, 60)})); s != `<svg class="spark"></svg>` {
		t.Errorf("idle sparkline draws bars: %s", s)
	}
}
