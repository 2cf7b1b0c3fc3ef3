package k8sproxy

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/kasproject/kas/middleware"
	"github.com/kasproject/kas/server/proxyauth"
	"github.com/kasproject/kas/server/traffic"
)

// BenchmarkCounting is the proxy handler behind the access-log recorder,
// serving a small answer from an in-memory agent, without and with the
// per-agent traffic counting, to show what counting adds per request.
func BenchmarkCounting(b *testing.B) {
	for _, counted := range []bool{false, true} {
		name := "uncounted"
		var rec *traffic.Recorder
		if counted {
			name, rec = "counted", &traffic.Recorder{}
		}
		b.Run(name, func(b *testing.B) {
			router := &fixedRouter{rt: roundTripperFunc(func(req *http.Request) (*http.Response, error) {
				return &http.Response{StatusCode: 200, Header: http.Header{}, ContentLength: 2, Body: io.NopCloser(strings.NewReader("{}")), Request: req}, nil
			})}
			h := NewHandler(Options{
				Auth:             fixedAuth{res: &proxyauth.Result{AgentID: 1}},
				Router:           router,
				Logger:           slog.New(slog.DiscardHandler),
				AgentWaitTimeout: time.Second,
				Traffic:          rec,
			})
			// As in kas: the access log's recorder wraps the writer.
			served := middleware.AccessLog(slog.New(slog.DiscardHandler), "public")(h)
			req := httptest.NewRequest(http.MethodGet, "http://kas/api/v1/namespaces", nil)
			b.ReportAllocs()
			for b.Loop() {
				served.ServeHTTP(httptest.NewRecorder(), req)
			}
		})
	}
}

type fixedRouter struct{ rt http.RoundTripper }

func (f *fixedRouter) Route(context.Context, int64) (http.RoundTripper, error) { return f.rt, nil }
