package middleware

import (
	"net/http"
	"slices"
)

// corsAllowedHeaders are the request headers GitLab's UI sends to the proxy.
const corsAllowedHeaders = "Accept, Content-Type, Gitlab-Agent-Id, X-Csrf-Token, X-Requested-With, X-Request-Id"

// CORS answers preflights and marks responses for the browser origins allowed
// to use the proxy with the _gitlab_kas cookie (GitLab's UI). Other origins get
// no CORS headers, so browsers keep them out.
func CORS(allowedOrigins []string) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			origin := r.Header.Get("Origin")
			if origin == "" {
				next.ServeHTTP(w, r)
				return
			}
			h := w.Header()
			h.Add("Vary", "Origin")
			allowed := slices.Contains(allowedOrigins, origin)
			preflight := r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != ""
			if !allowed {
				if preflight {
					http.Error(w, "origin "+origin+" is not allowed to use this proxy", http.StatusForbidden)
					return
				}
				next.ServeHTTP(w, r)
				return
			}
			h.Set("Access-Control-Allow-Origin", origin)
			h.Set("Access-Control-Allow-Credentials", "true")
			if preflight {
				h.Set("Access-Control-Allow-Methods", "GET, HEAD, POST, PUT, PATCH, DELETE")
				h.Set("Access-Control-Allow-Headers", corsAllowedHeaders)
				h.Set("Access-Control-Max-Age", "86400")
				w.WriteHeader(http.StatusNoContent)
				return
			}
			next.ServeHTTP(w, r)
		})
	}
}
