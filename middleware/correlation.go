package middleware

import (
	"net/http"

	"github.com/kasproject/kas/server/correlation"
)

// Correlation adopts the caller's X-Request-Id when it is safe to log, or
// makes a new one, puts it in the request context and returns it to the
// caller, so one ID ties the access log, kas's logs and GitLab's together.
func Correlation(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := r.Header.Get(correlation.Header)
		if !correlation.Valid(id) {
			id = correlation.NewID()
		}
		w.Header().Set(correlation.Header, id)
		next.ServeHTTP(w, r.WithContext(correlation.WithID(r.Context(), id)))
	})
}
