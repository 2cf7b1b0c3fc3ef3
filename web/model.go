package web

import (
	"cmp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/logging"
	"github.com/kasproject/kas/server/traffic"
	"github.com/kasproject/kas/tlsutil"
)

// Status is what the page shows and what GET /debug/status answers (JSON,
// documented field by field in docs/status.md).
type Status struct {
	Version string `json:"version"`
	// Mode is "standalone" or "gitlab"; GitLabAddress is set in GitLab mode.
	Mode          string    `json:"mode"`
	GitLabAddress string    `json:"gitlab_address,omitempty"`
	NodeID        string    `json:"node_id,omitempty"`
	NodeURLs      []string  `json:"node_urls,omitempty"`
	StartedAt     time.Time `json:"started_at"`
	GeneratedAt   time.Time `json:"generated_at"`
	Ready         bool      `json:"ready"`
	// NotReadyReason says why /readiness fails, when it does.
	NotReadyReason string `json:"not_ready_reason,omitempty"`
	Links          Links  `json:"links"`
	// Query is the filter and sort the lists were made with.
	Query Query `json:"query"`
	// Summary counts the agents before filtering.
	Summary Summary `json:"summary"`
	Agents  []Agent `json:"agents"`
	// Nodes are the kas nodes sharing Redis, this one included; empty on
	// a single node.
	Nodes        []Node          `json:"nodes,omitempty"`
	Dependencies Dependencies    `json:"dependencies"`
	RecentErrors []logging.Entry `json:"recent_errors"`
	// Problems are what kas could not find out for this page (Redis
	// unreachable, …); the rest of the page is still right.
	Problems []string `json:"problems,omitempty"`
}

// Links are the observability listener's other paths.
type Links struct {
	Metrics   string `json:"metrics"`
	Liveness  string `json:"liveness"`
	Readiness string `json:"readiness"`
	JSON      string `json:"json"`
}

// Query filters and sorts the agents and recent errors (?q=…&sort=…).
type Query struct {
	// Filter keeps agents whose name or ID contains it (case-insensitive),
	// and the log entries about them.
	Filter string `json:"filter,omitempty"`
	// Sort is one of SortKeys, with a leading "-" for descending.
	Sort string `json:"sort,omitempty"`
}

// SortKeys are the columns agents can be sorted by.
var SortKeys = []string{"name", "id", "replicas", "rpm", "errors", "since", "failure"}

// Summary counts agents.
type Summary struct {
	Agents       int `json:"agents"`
	Connected    int `json:"connected"`
	Disconnected int `json:"disconnected"`
	// Failing agents had errors in the last 5 minutes.
	Failing int `json:"failing"`
	Tunnels int `json:"tunnels"`
}

// Agent is one agent, with all its connections on every node.
type Agent struct {
	ID        int64  `json:"id"`
	Name      string `json:"name,omitempty"`
	ProjectID int64  `json:"project_id,omitempty"`
	// Project is the configuration project's path, where known.
	Project   string `json:"project,omitempty"`
	Connected bool   `json:"connected"`
	// LastSeen is when a node last had a connection of a disconnected
	// agent (zero: not since kas started).
	LastSeen time.Time `json:"last_seen,omitzero"`
	// ConnectedSince is when its oldest connection was made.
	ConnectedSince time.Time `json:"connected_since,omitzero"`
	// Connections are its replicas' tunnels, with the node holding each.
	Connections []registry.TunnelInfo `json:"connections"`
	Traffic     Traffic               `json:"traffic"`
}

// Traffic is what the Kubernetes API proxy sent an agent, on every node.
type Traffic struct {
	Last5m  traffic.Window `json:"last_5m"`
	Last60m traffic.Window `json:"last_60m"`
	// RequestsPerMinute and ErrorsPerMinute are the last 60 minutes,
	// oldest first, the minute in progress last.
	RequestsPerMinute []uint64         `json:"requests_per_minute"`
	ErrorsPerMinute   []uint64         `json:"errors_per_minute"`
	LastFailure       *traffic.Failure `json:"last_failure,omitempty"`
}

// Node is one kas node sharing Redis.
type Node struct {
	ID   string   `json:"id"`
	URLs []string `json:"urls"`
	Self bool     `json:"self,omitempty"`
	// Version and StartedAt come from the node's last heartbeat.
	Version   string    `json:"version,omitempty"`
	StartedAt time.Time `json:"started_at,omitzero"`
	// LastHeartbeat is when the node last published its status (once a
	// minute); zero if it never did.
	LastHeartbeat time.Time `json:"last_heartbeat,omitzero"`
	Tunnels       int       `json:"tunnels"`
	// Reachable says whether this node's private API client reached it
	// just now (always true for this node); ReachError says why not.
	Reachable  bool    `json:"reachable"`
	ReachError string  `json:"reach_error,omitempty"`
	ProbeMS    float64 `json:"probe_ms,omitempty"`
}

// Dependencies are what kas relies on.
type Dependencies struct {
	GitLab       *GitLab                   `json:"gitlab,omitempty"`
	Standalone   *Standalone               `json:"standalone,omitempty"`
	Redis        *Redis                    `json:"redis,omitempty"`
	Certificates []tlsutil.CertificateInfo `json:"certificates"`
}

// GitLab is how GitLab has answered this node's calls.
type GitLab struct {
	Address     string           `json:"address"`
	LastCall    time.Time        `json:"last_call,omitzero"`
	Last5m      traffic.Window   `json:"last_5m"`
	Last60m     traffic.Window   `json:"last_60m"`
	LastFailure *traffic.Failure `json:"last_failure,omitempty"`
}

// Standalone is the file kas reads instead of asking GitLab.
type Standalone struct {
	File   string `json:"file"`
	Agents int    `json:"agents"`
	Error  string `json:"error,omitempty"`
}

// Redis is how Redis answers this node.
type Redis struct {
	Address   string  `json:"address"`
	LatencyMS float64 `json:"latency_ms"`
	// Error is why the ping just now failed.
	Error       string           `json:"error,omitempty"`
	LastFailure *traffic.Failure `json:"last_failure,omitempty"`
}

// apply filters and sorts s's agents and log entries by q, keeping the
// summary of all agents.
func (s *Status) apply(q Query) {
	s.Query = q
	if f := strings.ToLower(strings.TrimSpace(q.Filter)); f != "" {
		ids := map[string]bool{}
		s.Agents = slices.DeleteFunc(s.Agents, func(a Agent) bool {
			id := strconv.FormatInt(a.ID, 10)
			keep := strings.Contains(strings.ToLower(a.Name), f) || strings.Contains(id, f)
			if keep {
				ids[id] = true
			}
			return !keep
		})
		s.RecentErrors = slices.DeleteFunc(s.RecentErrors, func(e logging.Entry) bool { return !ids[e.Attrs["agent_id"]] })
	}
	key, desc := strings.CutPrefix(q.Sort, "-")
	compare := agentOrder(key)
	slices.SortStableFunc(s.Agents, func(a, b Agent) int {
		if desc {
			a, b = b, a
		}
		return cmp.Or(compare(a, b), cmp.Compare(a.ID, b.ID))
	})
}

// agentOrder compares agents by a sort key (by name for unknown keys).
func agentOrder(key string) func(a, b Agent) int {
	switch key {
	case "id":
		return func(a, b Agent) int { return cmp.Compare(a.ID, b.ID) }
	case "replicas":
		return func(a, b Agent) int { return cmp.Compare(len(a.Connections), len(b.Connections)) }
	case "rpm":
		return func(a, b Agent) int {
			return cmp.Compare(a.Traffic.Last5m.RequestsPerMinute, b.Traffic.Last5m.RequestsPerMinute)
		}
	case "errors":
		return func(a, b Agent) int { return cmp.Compare(a.Traffic.Last5m.ErrorRate, b.Traffic.Last5m.ErrorRate) }
	case "since":
		return func(a, b Agent) int { return a.ConnectedSince.Compare(b.ConnectedSince) }
	case "failure":
		return func(a, b Agent) int { return failureTime(a).Compare(failureTime(b)) }
	}
	return func(a, b Agent) int {
		return cmp.Compare(strings.ToLower(a.Name), strings.ToLower(b.Name))
	}
}

func failureTime(a Agent) time.Time {
	if f := a.Traffic.LastFailure; f != nil {
		return f.Time
	}
	return time.Time{}
}
