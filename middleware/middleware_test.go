package middleware

import (
	"bytes"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/go-chi/chi/v5"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/kasproject/kas/server/correlation"
)

func TestCorrelation(t *testing.T) {
	tests := []struct {
		name    string
		given   string
		adopted bool
	}{
		{"sane ID adopted", "req-123_abc", true},
		{"none: made up", "", false},
		{"spaces refused", "a b", false},
		{"quote refused", `a"b`, false},
		{"too long refused", strings.Repeat("x", 129), false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var seen string
			h := Correlation(http.HandlerFunc(func(_ http.ResponseWriter, r *http.Request) {
				seen = correlation.FromContext(r.Context())
			}))
			req := httptest.NewRequest(http.MethodGet, "/", nil)
			if tc.given != "" {
				req.Header.Set(correlation.Header, tc.given)
			}
			w := httptest.NewRecorder()
			h.ServeHTTP(w, req)
			returned := w.Header().Get(correlation.Header)
			if seen == "" || returned != seen {
				t.Fatalf("context has %q, response %q: want the same non-empty ID", seen, returned)
			}
			if (seen == tc.given) != tc.adopted {
				t.Fatalf("ID %q for given %q: adopted=%v, want %v", seen, tc.given, seen == tc.given, tc.adopted)
			}
		})
	}
}

func TestRecover(t *testing.T) {
	var logs bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&logs, nil))
	t.Run("panic becomes a logged 500", func(t *testing.T) {
		h := Recover(log)(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { panic("boom") }))
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/x", nil))
		if w.Code != http.StatusInternalServerError {
			t.Fatalf("status %d, want 500", w.Code)
		}
		if !strings.Contains(logs.String(), `"panic":"boom"`) || !strings.Contains(logs.String(), "stack") {
			t.Fatalf("panic not logged with its stack: %s", &logs)
		}
	})
	t.Run("after the header nothing more is written", func(t *testing.T) {
		h := Recover(log)(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			w.WriteHeader(http.StatusAccepted)
			panic("late")
		}))
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/x", nil))
		if w.Code != http.StatusAccepted || w.Body.Len() != 0 {
			t.Fatalf("got %d %q", w.Code, w.Body)
		}
	})
	t.Run("ErrAbortHandler passes through", func(t *testing.T) {
		h := Recover(log)(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { panic(http.ErrAbortHandler) }))
		defer func() {
			if v := recover(); v == nil || !errors.Is(v.(error), http.ErrAbortHandler) {
				t.Fatalf("recovered %v, want http.ErrAbortHandler", v)
			}
		}()
		h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodGet, "/x", nil))
	})
}

func TestCORS(t *testing.T) {
	const gitlab = "https://gitlab.example.com"
	tests := []struct {
		name        string
		method      string
		origin      string
		preflight   bool
		wantCode    int
		wantAllowed bool
		wantNext    bool
	}{
		{"no origin", http.MethodGet, "", false, 200, false, true},
		{"allowed preflight", http.MethodOptions, gitlab, true, 204, true, false},
		{"allowed request", http.MethodGet, gitlab, false, 200, true, true},
		{"other origin preflight refused", http.MethodOptions, "https://evil.example", true, 403, false, false},
		{"other origin request gets no CORS headers", http.MethodGet, "https://evil.example", false, 200, false, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			called := false
			h := CORS([]string{gitlab})(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { called = true }))
			req := httptest.NewRequest(tc.method, "/k8s-proxy/api", nil)
			if tc.origin != "" {
				req.Header.Set("Origin", tc.origin)
			}
			if tc.preflight {
				req.Header.Set("Access-Control-Request-Method", "GET")
			}
			w := httptest.NewRecorder()
			h.ServeHTTP(w, req)
			if w.Code != tc.wantCode || called != tc.wantNext {
				t.Fatalf("status %d, next called %v; want %d, %v", w.Code, called, tc.wantCode, tc.wantNext)
			}
			allowed := w.Header().Get("Access-Control-Allow-Origin") == tc.origin && w.Header().Get("Access-Control-Allow-Credentials") == "true"
			if allowed != tc.wantAllowed {
				t.Fatalf("CORS headers %v, want allowed=%v", w.Header(), tc.wantAllowed)
			}
			if tc.preflight && tc.wantAllowed && !strings.Contains(w.Header().Get("Access-Control-Allow-Headers"), "X-Csrf-Token") {
				t.Fatalf("preflight does not allow X-Csrf-Token: %v", w.Header())
			}
		})
	}
}

func TestAccessLogAndMetrics(t *testing.T) {
	var logs bytes.Buffer
	reg := prometheus.NewRegistry()
	m, err := NewMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	r := chi.NewRouter()
	r.Use(Correlation, AccessLog(slog.New(slog.NewJSONHandler(&logs, nil)), "public"), m.Handler("public"))
	r.Get("/k8s-proxy/*", func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusTeapot)
		_, _ = w.Write([]byte("short and stout"))
	})
	req := httptest.NewRequest(http.MethodGet, "/k8s-proxy/api/v1/pods?token=secret-in-query", nil)
	r.ServeHTTP(httptest.NewRecorder(), req)

	var line map[string]any
	if err := json.Unmarshal(logs.Bytes(), &line); err != nil {
		t.Fatalf("access log is not one JSON line: %q", &logs)
	}
	want := map[string]any{"listener": "public", "method": "GET", "path": "/k8s-proxy/api/v1/pods", "route": "/k8s-proxy/*", "status": float64(418), "bytes": float64(15)}
	for k, v := range want {
		if line[k] != v {
			t.Errorf("log %s = %v, want %v", k, line[k], v)
		}
	}
	if line["correlation_id"] == "" || strings.Contains(logs.String(), "secret-in-query") {
		t.Errorf("log line lacks a correlation ID or contains the query: %s", &logs)
	}
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, f := range families {
		if f.GetName() != "kas_http_requests_total" {
			continue
		}
		for _, metric := range f.GetMetric() {
			labels := map[string]string{}
			for _, l := range metric.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["route"] == "/k8s-proxy/*" && labels["code"] == "418" && metric.GetCounter().GetValue() == 1 {
				found = true
			}
		}
	}
	if !found {
		t.Fatal("kas_http_requests_total{route=/k8s-proxy/*,code=418} is not 1")
	}
}
