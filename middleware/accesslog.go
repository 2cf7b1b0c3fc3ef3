package middleware

import (
	"log/slog"
	"net/http"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/kasproject/kas/server/correlation"
)

// AccessLog writes one log line per request once it ends: method, path
// (never the query, which may carry credentials), route, status, bytes,
// duration and correlation ID. Long-lived requests (tunnels, watches) are
// logged when they end, with their full duration.
func AccessLog(log *slog.Logger, listener string) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			start := time.Now()
			rec := wrap(w)
			defer func() {
				status := rec.status
				if status == 0 {
					status = http.StatusOK
				}
				log.LogAttrs(r.Context(), slog.LevelInfo, "Request",
					slog.String("listener", listener),
					slog.String("correlation_id", correlation.FromContext(r.Context())),
					slog.String("method", r.Method),
					slog.String("path", r.URL.Path),
					slog.String("route", routePattern(r)),
					slog.Int("status", status),
					slog.Int64("bytes", rec.bytes),
					slog.Float64("duration_s", time.Since(start).Seconds()),
					slog.String("remote_addr", r.RemoteAddr),
					slog.String("user_agent", r.UserAgent()),
				)
			}()
			next.ServeHTTP(rec, r)
		})
	}
}

// routePattern is the chi pattern that matched (e.g. /k8s-proxy/*), which
// keeps metric labels and log fields bounded.
func routePattern(r *http.Request) string {
	if rc := chi.RouteContext(r.Context()); rc != nil {
		if p := rc.RoutePattern(); p != "" {
			return p
		}
	}
	return "unmatched"
}
