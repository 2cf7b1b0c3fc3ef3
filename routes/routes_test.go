package routes

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kasproject/kas/middleware"
)

// named answers with its name and the path it saw.
func named(name string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, name+" "+r.URL.Path)
	})
}

func common(t *testing.T) Common {
	m, err := middleware.NewMetrics(prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	return Common{Logger: slog.New(slog.DiscardHandler), Metrics: m}
}

func TestRoutes(t *testing.T) {
	c := common(t)
	handlers := PublicHandlers{Agent: named("agent"), KubernetesProxy: named("proxy")}
	public := Public(c, handlers)
	dedicated := KubernetesAPI(c, handlers, "/k8s")
	ready := errors.New("starting")
	observability := Observability(c, ObservabilityHandlers{
		Gatherer:      prometheus.NewRegistry(),
		Ready:         func(context.Context) error { return ready },
		Status:        named("status"),
		StatusJSON:    named("status-json"),
		MetricsPath:   "/metrics",
		LivenessPath:  "/liveness",
		ReadinessPath: "/readiness",
	})

	tests := []struct {
		name     string
		router   http.Handler
		path     string
		wantCode int
		wantBody string
	}{
		{"agent endpoint", public, "/-/kubernetes-agent/", 200, "agent /-/kubernetes-agent/"},
		{"proxy behind GitLab's path", public, "/-/kubernetes-agent/k8s-proxy/api/v1/namespaces", 200, "proxy /api/v1/namespaces"},
		{"proxy on its own", public, "/k8s-proxy/apis/apps/v1/deployments", 200, "proxy /apis/apps/v1/deployments"},
		{"unknown path", public, "/api/v1/namespaces", 404, ""},
		{"dedicated listener prefix", dedicated, "/k8s/api/v1/pods", 200, "proxy /api/v1/pods"},
		{"liveness", observability, "/liveness", 200, "ok\n"},
		{"readiness says why not", observability, "/readiness", 503, "not ready: starting\n"},
		{"status page", observability, "/", 200, "status /"},
		{"status JSON", observability, "/debug/status", 200, "status-json /debug/status"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			w := httptest.NewRecorder()
			tc.router.ServeHTTP(w, httptest.NewRequest(http.MethodGet, tc.path, nil))
			if w.Code != tc.wantCode || (tc.wantBody != "" && w.Body.String() != tc.wantBody) {
				t.Fatalf("GET %s: %d %q, want %d %q", tc.path, w.Code, w.Body, tc.wantCode, tc.wantBody)
			}
		})
	}
	ready = nil
	w := httptest.NewRecorder()
	observability.ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/readiness", nil))
	if w.Code != 200 {
		t.Fatalf("readiness once ready: %d", w.Code)
	}
	w = httptest.NewRecorder()
	observability.ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if w.Code != 200 {
		t.Fatalf("metrics: %d", w.Code)
	}
}
