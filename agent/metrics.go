package agent

import (
	"errors"
	"fmt"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

type metrics struct {
	connected prometheus.Gauge
	attempts  prometheus.Counter
	failures  *prometheus.CounterVec
	requests  *prometheus.CounterVec
	// kas's connections in receptive mode, by result.
	receptiveAccepted prometheus.Counter
	receptiveRefused  prometheus.Counter
	bytesReceived     prometheus.Counter
	bytesSent         prometheus.Counter
}

// newMetrics creates the agent's metrics and registers them with reg, if any.
func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	bytes := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "agentk_tunnel_bytes_total",
		Help: "Bytes carried by the tunnel to kas, by direction as seen from the agent.",
	}, []string{"direction"})
	receptive := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "agentk_receptive_connections_total",
		Help: "Connections kas opened to this agent in receptive mode, by result: accepted, or refused (kas did not authenticate).",
	}, []string{"result"})
	m := &metrics{
		connected: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "agentk_tunnel_connected",
			Help: "Tunnels to kas that are up: 1 while the dialled tunnel is up, plus kas's connections in receptive mode.",
		}),
		attempts: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "agentk_tunnel_connection_attempts_total",
			Help: "Attempts to connect to kas.",
		}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "agentk_tunnel_connection_failures_total",
			Help: "Failed attempts to connect to kas, by reason: dial, unauthorized (token rejected), refused (other HTTP status), protocol.",
		}, []string{"reason"}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "agentk_requests_total",
			Help: "Requests served through the tunnel, by status code (101 for upgrades).",
		}, []string{"code"}),
		receptiveAccepted: receptive.WithLabelValues("accepted"),
		receptiveRefused:  receptive.WithLabelValues("refused"),
		bytesReceived:     bytes.WithLabelValues("received"),
		bytesSent:         bytes.WithLabelValues("sent"),
	}
	for _, reason := range []string{failureDial, failureUnauthorized, failureRefused, failureProtocol} {
		m.failures.WithLabelValues(reason)
	}
	if reg == nil {
		return m, nil
	}
	var errs []error
	for _, c := range []prometheus.Collector{m.connected, m.attempts, m.failures, m.requests, receptive, bytes} {
		errs = append(errs, reg.Register(c))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("register agentk metrics: %w", err)
	}
	return m, nil
}

// ObservabilityHandler serves /metrics from gatherer, /liveness (200 while
// the process runs) and /readiness: 200 while a tunnel to kas is up or, in
// receptive mode, while agentk accepts kas's connections (a Kubernetes
// Service must send kas to a receptive agentk before any tunnel exists), else
// 503.
func (a *Agent) ObservabilityHandler(gatherer prometheus.Gatherer) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(gatherer, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /liveness", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readiness", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		switch {
		case a.IsConnected():
			_, _ = w.Write([]byte("ok\n"))
		case a.receptiveServing.Load():
			_, _ = w.Write([]byte("ok: accepting kas's connections (receptive mode), no tunnel yet\n"))
		default:
			w.WriteHeader(http.StatusServiceUnavailable)
			_, _ = w.Write([]byte("no tunnel to kas\n"))
		}
	})
	return mux
}
