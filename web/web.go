// Package web serves kas's status page (embedded HTML, no external assets,
// usable without JavaScript; a little script refreshes it in place) and the
// same data as JSON. What it shows is gathered by server/status.
package web

import (
	"bytes"
	"context"
	_ "embed"
	"encoding/json"
	"fmt"
	"html/template"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/logging"
)

// Source gathers the current status.
type Source func(ctx context.Context) Status

//go:embed status.html
var statusHTML string

// Handlers returns the HTML page and the JSON view over src. Both take
// ?q= (filter agents by name or ID) and ?sort= (one of SortKeys, "-" first
// for descending).
func Handlers(src Source, log *slog.Logger) (page, jsonView http.Handler) {
	tmpl := template.Must(template.New("status").Funcs(funcs).Parse(statusHTML))
	page = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		st := src(r.Context())
		st.apply(queryOf(r))
		var buf bytes.Buffer
		if err := tmpl.Execute(&buf, st); err != nil {
			log.Error("Render the status page", "error", err.Error())
			http.Error(w, "render the status page: "+err.Error(), http.StatusInternalServerError)
			return
		}
		h := w.Header()
		h.Set("Content-Type", "text/html; charset=utf-8")
		h.Set("Cache-Control", "no-store")
		// Everything the page needs is inline; nothing else may load.
		h.Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:")
		h.Set("X-Content-Type-Options", "nosniff")
		_, _ = w.Write(buf.Bytes())
	})
	jsonView = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		st := src(r.Context())
		st.apply(queryOf(r))
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(st)
	})
	return page, jsonView
}

func queryOf(r *http.Request) Query {
	q := r.URL.Query()
	return Query{Filter: q.Get("q"), Sort: q.Get("sort")}
}

var funcs = template.FuncMap{
	"ago":       ago,
	"until":     until,
	"clock":     clock,
	"percent":   percent,
	"ms":        func(f float64) string { return strconv.FormatFloat(f, 'f', 2, 64) + " ms" },
	"agentRows": agentRows,
	"join":      strings.Join,
	"sortLink":  sortLink,
	"attr":      func(e logging.Entry, k string) string { return e.Attrs[k] },
	"otherAttrs": func(e logging.Entry) []string {
		var out []string
		for k, v := range e.Attrs {
			if k != "agent_id" && k != "correlation_id" {
				out = append(out, k+"="+v)
			}
		}
		slices.Sort(out)
		return out
	},
}

// ago says how long before now t was, roughly.
func ago(now, t time.Time) string {
	if t.IsZero() {
		return "never"
	}
	d := now.Sub(t)
	switch {
	case d < 0:
		return "just now"
	case d < time.Minute:
		return fmt.Sprintf("%ds ago", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm ago", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh%02dm ago", int(d.Hours()), int(d.Minutes())%60)
	}
	return fmt.Sprintf("%dd ago", int(d.Hours()/24))
}

// until says how long after now t is, roughly.
func until(now, t time.Time) string {
	d := t.Sub(now)
	switch {
	case d < 0:
		return "expired " + ago(now, t)
	case d < time.Hour:
		return fmt.Sprintf("in %dm", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("in %dh", int(d.Hours()))
	}
	return fmt.Sprintf("in %dd", int(d.Hours()/24))
}

func humanBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// sparkline draws requests per minute as a stepped area, errors in red
// over it, on one scale per agent; an idle hour is an empty frame. It is
// built from numbers only, so it is safe HTML. Kept small: a page may hold
// a thousand of them.
func sparkline(t Traffic) template.HTML {
	peak := uint64(0)
	var total, failed uint64
	for _, n := range t.RequestsPerMinute {
		peak = max(peak, n)
		total += n
	}
	for _, n := range t.ErrorsPerMinute {
		failed += n
	}
	if total == 0 {
		return `<svg class="spark"></svg>`
	}
	b := make([]byte, 0, 512)
	b = fmt.Appendf(b, `<svg class="spark" viewBox="0 0 %d %d"><title>last hour: %d requests, %d failed; peak %d/min</title>`,
		sparkStep*len(t.RequestsPerMinute), sparkHeight, total, failed, peak)
	b = appendSteps(append(b, `<path class="req" d="`...), t.RequestsPerMinute, peak)
	if failed > 0 {
		b = appendSteps(append(b, `"/><path class="err" d="`...), t.ErrorsPerMinute, peak)
	}
	return template.HTML(append(b, `"/></svg>`...))
}

// The sparkline's geometry: each minute is sparkStep wide, the busiest
// minute sparkHeight high.
const sparkStep, sparkHeight = 2, 20

// appendSteps appends a path outlining counts as steps, scaled to peak.
func appendSteps(b []byte, counts []uint64, peak uint64) []byte {
	b = fmt.Appendf(b, "M0 %d", sparkHeight)
	prev := -1
	for _, n := range counts {
		h := 0
		if n > 0 {
			h = max(1, int(float64(n)/float64(peak)*sparkHeight+0.5))
		}
		if h != prev {
			b = append(b, 'V')
			b = strconv.AppendInt(b, int64(sparkHeight-h), 10)
			prev = h
		}
		b = append(b, "h2"...)
	}
	return fmt.Appendf(b, "V%dz", sparkHeight)
}

// distinct lists the non-empty values of field over the connections.
func distinct(conns []registry.TunnelInfo, field string) []string {
	var out []string
	for _, c := range conns {
		var v string
		switch field {
		case "agent":
			v = c.AgentVersion
		case "kubernetes":
			v = c.KubernetesVersion
		}
		if v != "" && !slices.Contains(out, v) {
			out = append(out, v)
		}
	}
	return out
}

// sortLink is the page's URL sorted by key: descending when it is already
// sorted ascending by it.
func sortLink(q Query, key string) string {
	v := url.Values{}
	if q.Filter != "" {
		v.Set("q", q.Filter)
	}
	if q.Sort == key {
		key = "-" + key
	}
	v.Set("sort", key)
	return "?" + v.Encode()
}
