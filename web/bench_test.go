package web

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/traffic"
)

// manyAgents is a status with n connected agents, a tenth with traffic.
func manyAgents(n int) Status {
	st := testStatus()
	st.Agents = nil
	now := st.GeneratedAt
	for i := range n {
		req := make([]uint64, traffic.HistoryMinutes)
		errs := make([]uint64, traffic.HistoryMinutes)
		if i%10 == 0 {
			for m := range req {
				req[m] = uint64(m % 7)
			}
			errs[59] = 1
		}
		st.Agents = append(st.Agents, Agent{ID: int64(10000 + i), Name: fmt.Sprintf("cluster-%04d", i), Project: "acme/infra", Connected: true, ConnectedSince: now.Add(-time.Hour),
			Connections: []registry.TunnelInfo{{AgentID: int64(10000 + i), PodName: "agentk-0", PodNamespace: "gitlab-agent", AgentVersion: "v17.6.0", KubernetesVersion: "v1.31.0", ConnectedAt: now.Add(-time.Hour)}},
			Traffic:     Traffic{RequestsPerMinute: req, ErrorsPerMinute: errs}})
	}
	return st
}

// BenchmarkPage1000 renders the page with 1,000 agents.
func BenchmarkPage1000(b *testing.B) {
	st := manyAgents(1000)
	page, _ := Handlers(func(context.Context) Status { return st }, slog.New(slog.DiscardHandler))
	var size int
	for b.Loop() {
		w := httptest.NewRecorder()
		page.ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/", nil))
		size = w.Body.Len()
	}
	b.ReportMetric(float64(size), "bytes/page")
}
