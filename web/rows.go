package web

import (
	"html/template"
	"strconv"
	"strings"
	"time"

	"github.com/kasproject/kas/registry"
)

// agentRows renders the agents table's rows. A page may list thousands of
// agents, and html/template spends several microseconds of reflection on
// each of a row's thirty-odd actions, so rows are written here instead:
// every value from outside (names, pod names, versions, messages) goes
// through template.HTMLEscapeString, and only into text or double-quoted
// attributes, where that escaping is complete. TestPage checks it with
// hostile values.
func agentRows(agents []Agent, now time.Time) template.HTML {
	var b strings.Builder
	b.Grow(600 * len(agents))
	for i := range agents {
		writeRow(&b, &agents[i], now)
	}
	return template.HTML(b.String())
}

func writeRow(b *strings.Builder, a *Agent, now time.Time) {
	esc := func(s string) { b.WriteString(template.HTMLEscapeString(s)) }
	w := b.WriteString
	id := strconv.FormatInt(a.ID, 10)
	class := ""
	switch {
	case !a.Connected:
		class = "disconnected"
	case a.Traffic.Last5m.Errors > 0:
		class = "failing"
	}
	w(`<div class="row ` + class + `" role="row" data-agent="` + id + `" data-name="`)
	esc(strings.ToLower(a.Name))
	w(`">` + "\n<div role=\"cell\"><b>")
	if a.Name != "" {
		esc(a.Name)
	} else {
		w(`<span class="muted">(unnamed)</span>`)
	}
	w("</b>")
	switch {
	case a.Project != "":
		w(`<small>`)
		esc(a.Project)
		w("</small>")
	case a.ProjectID != 0:
		w(`<small>project ` + strconv.FormatInt(a.ProjectID, 10) + "</small>")
	}
	w(`</div><div role="cell" class="num">` + id + "</div>\n<div role=\"cell\">")
	if a.Connected {
		w(strconv.Itoa(len(a.Connections)))
		for _, c := range a.Connections {
			w(`<small class="replica">`)
			esc(c.PodNamespace + "/" + c.PodName + " · " + connectionKind(c))
			if len(c.NodeURLs) > 0 {
				esc(" · on " + strings.Join(c.NodeURLs, ", "))
			}
			w("</small>")
		}
	} else {
		w(`<span class="badge">disconnected</span><small>`)
		if a.LastSeen.IsZero() {
			w("not connected since kas started")
		} else {
			esc("last seen " + ago(now, a.LastSeen))
		}
		w("</small>")
	}
	w("</div>\n<div role=\"cell\">")
	esc(strings.Join(distinct(a.Connections, "agent"), ", "))
	if k := distinct(a.Connections, "kubernetes"); len(k) > 0 {
		w(`<small>k8s `)
		esc(strings.Join(k, ", "))
		w("</small>")
	}
	w("</div>\n<div role=\"cell\">")
	if a.Connected {
		w(clock(a.ConnectedSince) + `<small>` + ago(now, a.ConnectedSince) + "</small>")
	}
	t := &a.Traffic
	w("</div>\n<div role=\"cell\" class=\"num\">" + rate(t.Last5m.RequestsPerMinute) + " · " + rate(t.Last60m.RequestsPerMinute) + "</div>\n")
	if t.Last5m.Errors > 0 {
		w(`<div role="cell" class="num bad">`)
	} else {
		w(`<div role="cell" class="num">`)
	}
	w(percent(t.Last5m.ErrorRate) + " · " + percent(t.Last60m.ErrorRate) + `<small>` +
		strconv.FormatUint(t.Last5m.Errors, 10) + " · " + strconv.FormatUint(t.Last60m.Errors, 10) + "</small></div>\n<div role=\"cell\">")
	w(string(sparkline(*t)))
	w("</div>\n<div role=\"cell\" class=\"num\">" + humanBytes(t.Last60m.BytesIn) + "<br>" + humanBytes(t.Last60m.BytesOut) + "</div>\n<div role=\"cell\" class=\"failure\">")
	if f := t.LastFailure; f != nil {
		w(`<span class="bad">`)
		esc(f.Message)
		w(`</span><small>` + clock(f.Time) + " (" + ago(now, f.Time) + ")")
		if f.CorrelationID != "" {
			esc(" · " + f.CorrelationID)
		}
		w("</small>")
	}
	w("</div>\n</div>\n")
}

// connectionKind says who dialled whom, and which agentk it is.
func connectionKind(c registry.TunnelInfo) string {
	s := "dialled in"
	if c.Receptive {
		s = "receptive (kas dialled)"
	}
	if c.Flavor == registry.FlavorGitLab {
		s += ", GitLab agentk"
	}
	return s
}

func clock(t time.Time) string { return t.UTC().Format("2006-01-02 15:04:05Z") }

func rate(f float64) string { return strconv.FormatFloat(f, 'f', 1, 64) }

func percent(f float64) string { return strconv.FormatFloat(100*f, 'f', 1, 64) + "%" }
