package middleware

import (
	"errors"
	"log/slog"
	"net/http"
	"runtime/debug"

	"github.com/kasproject/kas/server/correlation"
)

// Recover turns a panic in a handler into a logged error with its stack and,
// if nothing was sent yet, a 500, so one bad request cannot kill the process.
// http.ErrAbortHandler passes through: it is how a proxy aborts a stream.
func Recover(log *slog.Logger) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			rec := wrap(w)
			defer func() {
				v := recover()
				if v == nil {
					return
				}
				if err, ok := v.(error); ok && errors.Is(err, http.ErrAbortHandler) {
					panic(v)
				}
				log.Error("Handler panicked",
					"correlation_id", correlation.FromContext(r.Context()),
					"method", r.Method, "path", r.URL.Path,
					"panic", v, "stack", string(debug.Stack()))
				if rec.status == 0 && !rec.hijacked {
					http.Error(rec, "internal server error", http.StatusInternalServerError)
				}
			}()
			next.ServeHTTP(rec, r)
		})
	}
}
