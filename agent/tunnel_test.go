package agent

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/kasproject/kas/protocol"
)

func TestHandshakeDescribesTheAgent(t *testing.T) {
	k := newKAS(t, nil)
	api := newAPIServer(t, nil)
	startAgent(t, k.URL, api, nil)
	recv(t, k.sessions)

	hs := recv(t, k.attempts)
	if hs.path != protocol.AgentPath {
		t.Errorf("agent dialed %q, want %q appended to a bare address", hs.path, protocol.AgentPath)
	}
	for name, want := range map[string]string{
		"Authorization":                  "Bearer " + testToken,
		"Sec-Websocket-Protocol":         protocol.Subprotocol,
		protocol.HeaderAgentVersion:      testAgentVersion,
		protocol.HeaderAgentCommit:       "abc123",
		protocol.HeaderPodName:           "agentk-0",
		protocol.HeaderPodNamespace:      "gitlab-agent",
		protocol.HeaderKubernetesVersion: testK8sVersion,
	} {
		if got := hs.header.Get(name); got != want {
			t.Errorf("handshake %s = %q, want %q", name, got, want)
		}
	}
}

func TestReconnectsAfterKASClosesTheTunnel(t *testing.T) {
	k := newKAS(t, nil)
	api := newAPIServer(t, nil)
	a := startAgent(t, k.URL, api, nil)

	first := recv(t, k.sessions)
	recv(t, a.Connected())
	resp := first.roundTrip(t, newRequest(t, http.MethodGet, "/api", nil, nil))
	_ = resp.Body.Close()
	first.close()

	second := recv(t, k.sessions)
	resp = second.roundTrip(t, newRequest(t, http.MethodGet, "/api", nil, nil))
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d through the new tunnel, want 200", resp.StatusCode)
	}
	recv(t, a.Connected())
	if got := counterValue(t, a.metrics.attempts); got < 2 {
		t.Errorf("%v connection attempts counted, want at least 2", got)
	}
	if !strings.Contains(a.logs.String(), "tunnel to kas closed") {
		t.Errorf("the dropped tunnel was not logged:\n%s", a.logs)
	}
}

func TestRejectedTokenRetriesAtMaximumBackoff(t *testing.T) {
	const maxBackoff = 200 * time.Millisecond
	k := newKAS(t, func(k *kasStandIn) {
		k.rejectStatus = http.StatusUnauthorized
		k.rejectReason = "invalid agent token"
	})
	api := newAPIServer(t, nil)
	a := startAgent(t, k.URL, api, func(o *Options) {
		o.MinBackoff = time.Millisecond
		o.MaxBackoff = maxBackoff
	})

	prev := recv(t, k.attempts)
	for range 3 {
		next := recv(t, k.attempts)
		// Ordinary failures would retry after about MinBackoff; a rejected
		// token waits at least half the maximum.
		if gap := next.at.Sub(prev.at); gap < maxBackoff/2 {
			t.Errorf("retried after %v, want at least %v", gap, maxBackoff/2)
		}
		prev = next
	}
	if got := counterValue(t, a.metrics.failures.WithLabelValues(failureUnauthorized)); got < 3 {
		t.Errorf("%v unauthorized failures counted, want at least 3", got)
	}
	logs := a.logs.String()
	for _, want := range []string{`"status":401`, `"reason":"invalid agent token"`, "rejected the agent token"} {
		if !strings.Contains(logs, want) {
			t.Errorf("logs lack %s:\n%s", want, logs)
		}
	}
	if a.IsConnected() {
		t.Error("agent reports a tunnel it never had")
	}
}

func TestRefusedHandshakeIsLoggedWithReason(t *testing.T) {
	k := newKAS(t, func(k *kasStandIn) {
		k.rejectStatus = http.StatusServiceUnavailable
		k.rejectReason = "kas is starting"
	})
	api := newAPIServer(t, nil)
	a := startAgent(t, k.URL, api, nil)
	recv(t, k.attempts)
	recv(t, k.attempts) // a second attempt means the first one's failure was handled
	logs := a.logs.String()
	for _, want := range []string{"kas refused the tunnel handshake", `"status":503`, `"reason":"kas is starting"`} {
		if !strings.Contains(logs, want) {
			t.Errorf("logs lack %s:\n%s", want, logs)
		}
	}
}

func TestGracefulShutdownLetsInFlightRequestsFinish(t *testing.T) {
	arrived := make(chan struct{})
	release := make(chan struct{})
	api := newAPIServer(t, map[string]http.HandlerFunc{
		"/slow": func(w http.ResponseWriter, r *http.Request) {
			close(arrived)
			<-release
			_, _ = io.WriteString(w, "finished")
		},
	})
	a, kas := connect(t, api, nil)

	type result struct {
		status int
		body   string
		err    error
	}
	done := make(chan result, 1)
	req := newRequest(t, http.MethodGet, "/slow", nil, nil)
	go func() {
		resp, err := kas.cc.RoundTrip(req)
		if err != nil {
			done <- result{err: err}
			return
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		done <- result{status: resp.StatusCode, body: string(body), err: err}
	}()
	recv(t, arrived)

	a.cancel()
	// GOAWAY reaches kas while the request is still running.
	eventually(t, func() bool { return !kas.cc.CanTakeNewRequest() })
	select {
	case <-a.done:
		t.Fatalf("Run returned (%v) with a request in flight", a.runErr)
	default:
	}
	close(release)

	if r := recv(t, done); r.err != nil || r.status != http.StatusOK || r.body != "finished" {
		t.Errorf("in-flight request ended with %d %q %v, want 200 finished", r.status, r.body, r.err)
	}
	if err := a.stop(t); err != nil {
		t.Errorf("Run returned %v, want nil", err)
	}
	if a.IsConnected() {
		t.Error("agent still reports a tunnel after Run returned")
	}
}

func TestShutdownGraceBoundsInFlightRequests(t *testing.T) {
	api := newAPIServer(t, map[string]http.HandlerFunc{
		"/hang": func(w http.ResponseWriter, r *http.Request) {
			w.(http.Flusher).Flush()
			<-r.Context().Done()
		},
	})
	a, kas := connect(t, api, func(o *Options) { o.ShutdownGrace = 100 * time.Millisecond })

	resp := kas.roundTrip(t, newRequest(t, http.MethodGet, "/hang", nil, nil))
	start := time.Now()
	if err := a.stop(t); err != nil {
		t.Errorf("Run returned %v, want nil", err)
	}
	if elapsed := time.Since(start); elapsed > 10*time.Second {
		t.Errorf("shutdown took %v with a 100ms grace period", elapsed)
	}
	if _, err := io.ReadAll(resp.Body); err == nil {
		t.Error("the cut-off request ended cleanly, want an error")
	}
	if !strings.Contains(a.logs.String(), "grace period over") {
		t.Errorf("cut-off not logged:\n%s", a.logs)
	}
}

func TestRunTwiceFails(t *testing.T) {
	api := newAPIServer(t, nil)
	a, _ := connect(t, api, nil)
	if err := a.Run(context.Background()); err == nil {
		t.Error("second Run succeeded, want an error")
	}
}

func TestObservabilityEndpoints(t *testing.T) {
	k := newKAS(t, func(k *kasStandIn) { k.rejectStatus = http.StatusServiceUnavailable })
	api := newAPIServer(t, nil)
	a := startAgent(t, k.URL, api, nil)
	obs := httptest.NewServer(a.ObservabilityHandler(a.registry))
	t.Cleanup(obs.Close)

	get := func(path string) (int, string) {
		t.Helper()
		resp, err := http.Get(obs.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	recv(t, k.attempts)
	if code, _ := get("/liveness"); code != http.StatusOK {
		t.Errorf("/liveness = %d, want 200", code)
	}
	if code, _ := get("/readiness"); code != http.StatusServiceUnavailable {
		t.Errorf("/readiness without a tunnel = %d, want 503", code)
	}
	code, metrics := get("/metrics")
	for _, want := range []string{"agentk_tunnel_connected 0", "agentk_tunnel_connection_attempts_total", `agentk_tunnel_connection_failures_total{reason="refused"}`} {
		if code != http.StatusOK || !strings.Contains(metrics, want) {
			t.Errorf("/metrics = %d without %q", code, want)
		}
	}

	k2 := newKAS(t, nil)
	a2 := startAgent(t, k2.URL, api, nil)
	recv(t, a2.Connected())
	obs2 := httptest.NewServer(a2.ObservabilityHandler(a2.registry))
	t.Cleanup(obs2.Close)
	resp, err := http.Get(obs2.URL + "/readiness")
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("/readiness with a tunnel = %d, want 200", resp.StatusCode)
	}
}

func TestNewChecksOptions(t *testing.T) {
	api := newAPIServer(t, nil)
	tests := []struct {
		name string
		opts Options
		want string
	}{
		{name: "no address", opts: Options{Token: "t", RESTConfig: api.restConfig()}, want: "kas address is empty"},
		{name: "http scheme", opts: Options{KASAddress: "https://kas", Token: "t", RESTConfig: api.restConfig()}, want: "ws:// or wss://"},
		{name: "no host", opts: Options{KASAddress: "wss:///x", Token: "t", RESTConfig: api.restConfig()}, want: "no host"},
		{name: "no token", opts: Options{KASAddress: "wss://kas", RESTConfig: api.restConfig()}, want: "token is empty"},
		{name: "no REST config", opts: Options{KASAddress: "wss://kas", Token: "t"}, want: "Kubernetes client configuration"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := New(tt.opts)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("New: %v, want an error saying %q", err, tt.want)
			}
		})
	}
}

func TestKASEndpoint(t *testing.T) {
	tests := []struct{ in, want string }{
		{"ws://kas:8150", "ws://kas:8150" + protocol.AgentPath},
		{"wss://gitlab.example.com/", "wss://gitlab.example.com" + protocol.AgentPath},
		{"wss://gitlab.example.com/-/kubernetes-agent/", "wss://gitlab.example.com/-/kubernetes-agent/"},
		{"wss://proxy.example.com/custom/path", "wss://proxy.example.com/custom/path"},
	}
	for _, tt := range tests {
		if got, err := kasEndpoint(tt.in); err != nil || got != tt.want {
			t.Errorf("kasEndpoint(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
		}
	}
}

// eventually waits for cond, polling, and fails the test after testTimeout.
func eventually(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(testTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in time")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func scrape(t *testing.T, a *runningAgent) string {
	t.Helper()
	rec := httptest.NewRecorder()
	a.ObservabilityHandler(a.registry).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if rec.Code != http.StatusOK {
		t.Fatalf("/metrics = %d", rec.Code)
	}
	return rec.Body.String()
}

func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}
