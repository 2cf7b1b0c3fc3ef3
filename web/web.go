// Package web serves kas's status page (embedded HTML) and the same data as
// JSON: this node, its peers, connected agents and recent errors.
package web

import (
	"context"
	_ "embed"
	"encoding/json"
	"html/template"
	"net/http"
	"time"

	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/logging"
)

// Status is what the page shows.
type Status struct {
	Version      string                `json:"version"`
	StartedAt    time.Time             `json:"started_at"`
	Mode         string                `json:"mode"`
	NodeURLs     []string              `json:"node_urls,omitempty"`
	Peers        []registry.Node       `json:"peers,omitempty"`
	Agents       []registry.TunnelInfo `json:"agents"`
	RecentErrors []logging.Entry       `json:"recent_errors"`
	Error        string                `json:"error,omitempty"`
}

// Source gathers the current status.
type Source func(ctx context.Context) Status

//go:embed status.html
var statusHTML string

// Handlers returns the HTML page and the JSON view over src.
func Handlers(src Source) (page, jsonView http.Handler) {
	tmpl := template.Must(template.New("status").Parse(statusHTML))
	page = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		_ = tmpl.Execute(w, src(r.Context()))
	})
	jsonView = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(src(r.Context()))
	})
	return page, jsonView
}
