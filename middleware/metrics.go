package middleware

import (
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics counts requests and observes their latency by listener, route
// pattern, method and status code.
type Metrics struct {
	requests *prometheus.CounterVec
	duration *prometheus.HistogramVec
}

// NewMetrics registers the request metrics with reg.
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kas_http_requests_total",
			Help: "HTTP requests served, by listener, route, method and status code.",
		}, []string{"listener", "route", "method", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "kas_http_request_duration_seconds",
			Help:    "Time to serve HTTP requests (whole stream for watches and tunnels).",
			Buckets: prometheus.ExponentialBuckets(0.001, 4, 10),
		}, []string{"listener", "route", "code"}),
	}
	for _, c := range []prometheus.Collector{m.requests, m.duration} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register HTTP metrics: %w", err)
		}
	}
	return m, nil
}

// Handler instruments one listener's router.
func (m *Metrics) Handler(listener string) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			start := time.Now()
			rec := wrap(w)
			next.ServeHTTP(rec, r)
			status := rec.status
			if status == 0 {
				status = http.StatusOK
			}
			code := strconv.Itoa(status)
			route := routePattern(r)
			m.requests.WithLabelValues(listener, route, r.Method, code).Inc()
			m.duration.WithLabelValues(listener, route, code).Observe(time.Since(start).Seconds())
		})
	}
}
