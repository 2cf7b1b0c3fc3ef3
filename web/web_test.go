package web

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/logging"
)

func TestHandlers(t *testing.T) {
	status := Status{
		Version:   "v1.2.3",
		StartedAt: time.Date(2026, 11, 27, 10, 0, 0, 0, time.UTC),
		Mode:      "standalone",
		NodeURLs:  []string{"grpc://10.0.0.1:8155"},
		Peers:     []registry.Node{{ID: "node-b", URLs: []string{"grpc://10.0.0.2:8155"}}},
		Agents: []registry.TunnelInfo{{AgentID: 1, ProjectID: 100, ConnectionID: 7, AgentVersion: "v17.0.0",
			PodName: "agentk-0", PodNamespace: "gitlab-agent", ConnectedAt: time.Now()},
			{AgentID: 2, ProjectID: 100, ConnectionID: 8, Receptive: true, ConnectedAt: time.Now()}},
		RecentErrors: []logging.Entry{{Time: time.Now(), Level: "ERROR", Message: "<script>alert(1)</script>"}},
	}
	page, jsonView := Handlers(func(context.Context) Status { return status })

	w := httptest.NewRecorder()
	page.ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/", nil))
	body := w.Body.String()
	for _, want := range []string{"kas v1.2.3", "node-b", "grpc://10.0.0.2:8155", "agentk-0", "gitlab-agent/agentk-0", "&lt;script&gt;", "2 (receptive: kas dialled it)"} {
		if !strings.Contains(body, want) {
			t.Errorf("status page lacks %q", want)
		}
	}
	if strings.Contains(body, "<script>alert") {
		t.Error("status page does not escape log messages")
	}

	w = httptest.NewRecorder()
	jsonView.ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/debug/status", nil))
	var got Status
	if err := json.Unmarshal(w.Body.Bytes(), &got); err != nil {
		t.Fatalf("JSON view: %v", err)
	}
	if got.Version != "v1.2.3" || len(got.Agents) != 2 || got.Agents[0].ConnectionID != 7 || !got.Agents[1].Receptive || len(got.Peers) != 1 {
		t.Fatalf("JSON view lost data: %+v", got)
	}
}
