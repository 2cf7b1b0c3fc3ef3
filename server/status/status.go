// Package status gathers what the status page shows (web.Status): this
// node, every agent — connected on any node or only known (from the
// standalone file, or seen since kas started) — with its traffic, the other
// nodes, and how GitLab, Redis and the certificates are doing.
//
// Traffic is counted per node (server/traffic, on the node that received
// each request). With several nodes, each node publishes a summary of its
// counts once a minute in Redis (Cluster), and the page adds up the
// summaries of the other nodes and this node's live counts, minute by
// minute; other nodes' figures are therefore up to a minute old.
package status

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/logging"
	"github.com/kasproject/kas/server/standalone"
	"github.com/kasproject/kas/server/traffic"
	"github.com/kasproject/kas/tlsutil"
	"github.com/kasproject/kas/web"
)

// Options are where the page's data comes from. Nil sources are left out.
type Options struct {
	Version   string
	StartedAt time.Time
	// GitLabAddress is gitlab.address; empty in standalone mode.
	GitLabAddress string
	NodeURLs      []string
	Links         web.Links
	// Ready is the readiness check.
	Ready    func(context.Context) error
	Registry registry.Registry
	Traffic  *traffic.Recorder
	Seen     *Seen
	// Standalone lists the agents of the standalone file.
	Standalone     func() ([]standalone.Agent, error)
	StandaloneFile string
	// GitLab reports how GitLab has been answering (GitLab mode).
	GitLab func(now time.Time) gitlab.Health
	// Cluster is set with several nodes.
	Cluster *Cluster
	// Certificates describe the certificates kas serves.
	Certificates func() []tlsutil.CertificateInfo
	Recent       *logging.Recent
}

// Page gathers the status page's data.
type Page struct {
	opts Options
}

// New returns a Page over opts.
func New(opts Options) *Page { return &Page{opts: opts} }

// Gather collects the status as of now. What cannot be found out is listed
// in Problems; the rest is still filled in.
func (p *Page) Gather(ctx context.Context) web.Status {
	o := p.opts
	now := time.Now().UTC()
	st := web.Status{
		Version:       o.Version,
		Mode:          "standalone",
		GitLabAddress: o.GitLabAddress,
		NodeURLs:      o.NodeURLs,
		StartedAt:     o.StartedAt,
		GeneratedAt:   now,
		Links:         o.Links,
		Ready:         true,
	}
	if o.GitLabAddress != "" {
		st.Mode = "gitlab"
	}
	problem := func(format string, args ...any) { st.Problems = append(st.Problems, fmt.Sprintf(format, args...)) }

	// Independent look-ups run at once: with Redis, each is a round trip.
	var wg sync.WaitGroup
	var readyErr error
	if o.Ready != nil {
		wg.Go(func() { readyErr = o.Ready(ctx) })
	}
	var tunnels []registry.TunnelInfo
	var tunnelsErr error
	wg.Go(func() { tunnels, tunnelsErr = o.Registry.Tunnels(ctx) })
	var cluster clusterView
	if o.Cluster != nil {
		st.NodeID = o.Cluster.NodeID()
		wg.Go(func() { cluster = o.Cluster.view(ctx) })
	}
	wg.Wait()

	if readyErr != nil {
		st.Ready, st.NotReadyReason = false, readyErr.Error()
	}
	if tunnelsErr != nil {
		problem("List agent tunnels: %v", tunnelsErr)
		if o.Cluster != nil {
			tunnels = o.Cluster.localTunnels()
			problem("Showing this node's own tunnels only: the other nodes' are listed in Redis")
		}
	}
	st.Problems = append(st.Problems, cluster.problems...)

	// Traffic: this node's live counts plus the other nodes' summaries.
	minutes := map[int64][]traffic.Minutes{}
	since := o.StartedAt
	if o.Traffic != nil {
		for id, m := range o.Traffic.Minutes(now) {
			minutes[id] = append(minutes[id], m)
		}
	}
	seen := map[int64]SeenAgent{}
	if o.Seen != nil {
		for _, a := range o.Seen.List() {
			seen[a.ID] = a
		}
	}
	for nodeID, n := range cluster.summaries {
		if nodeID == cluster.self {
			continue // this node's counts are the live ones above
		}
		for id, m := range n.Agents {
			minutes[id] = append(minutes[id], m)
		}
		for _, a := range n.Seen {
			if cur, ok := seen[a.ID]; !ok || a.LastSeen.After(cur.LastSeen) {
				seen[a.ID] = a
			}
		}
		if !n.StartedAt.IsZero() && n.StartedAt.Before(since) {
			since = n.StartedAt
		}
	}

	agents := map[int64]*web.Agent{}
	agent := func(id int64) *web.Agent {
		a := agents[id]
		if a == nil {
			a = &web.Agent{ID: id}
			agents[id] = a
		}
		return a
	}
	for _, t := range tunnels {
		a := agent(t.AgentID)
		a.Connected = true
		a.ProjectID = cmp.Or(a.ProjectID, t.ProjectID)
		a.Connections = append(a.Connections, t)
		if a.ConnectedSince.IsZero() || t.ConnectedAt.Before(a.ConnectedSince) {
			a.ConnectedSince = t.ConnectedAt
		}
	}
	if o.Standalone != nil {
		known, err := o.Standalone()
		st.Dependencies.Standalone = &web.Standalone{File: o.StandaloneFile, Agents: len(known)}
		if err != nil {
			st.Dependencies.Standalone.Error = err.Error()
			problem("%v", err)
		}
		for _, k := range known {
			a := agent(k.ID)
			a.Name, a.ProjectID, a.Project = k.Name, k.ProjectID, k.ProjectPath
		}
	}
	for id, s := range seen {
		a := agent(id)
		a.Name = cmp.Or(a.Name, s.Name)
		a.ProjectID = cmp.Or(a.ProjectID, s.ProjectID)
		if !a.Connected {
			a.LastSeen = s.LastSeen
		}
	}
	for id, ms := range minutes {
		a := agent(id)
		m := traffic.Merge(now, ms...)
		a.Traffic = web.Traffic{
			Last5m:            m.Window(now, since, 5),
			Last60m:           m.Window(now, since, 60),
			RequestsPerMinute: m.Requests,
			ErrorsPerMinute:   m.Errors,
			LastFailure:       m.LastFailure,
		}
	}
	empty := make([]uint64, traffic.HistoryMinutes)
	st.Agents = make([]web.Agent, 0, len(agents))
	for _, a := range agents {
		if a.Traffic.RequestsPerMinute == nil {
			a.Traffic.RequestsPerMinute, a.Traffic.ErrorsPerMinute = empty, empty
		}
		if a.Connections == nil {
			a.Connections = []registry.TunnelInfo{}
		}
		st.Agents = append(st.Agents, *a)
		st.Summary.Agents++
		st.Summary.Tunnels += len(a.Connections)
		if a.Connected {
			st.Summary.Connected++
		} else {
			st.Summary.Disconnected++
		}
		if a.Traffic.Last5m.Errors > 0 {
			st.Summary.Failing++
		}
	}

	st.Nodes = cluster.nodes(tunnels, o.NodeURLs)
	if o.GitLab != nil {
		h := o.GitLab(now)
		st.Dependencies.GitLab = &web.GitLab{
			Address:     o.GitLabAddress,
			LastCall:    h.LastCall,
			Last5m:      h.Minutes.Window(now, o.StartedAt, 5),
			Last60m:     h.Minutes.Window(now, o.StartedAt, 60),
			LastFailure: h.Minutes.LastFailure,
		}
	}
	st.Dependencies.Redis = cluster.redis
	st.Dependencies.Certificates = []tlsutil.CertificateInfo{}
	if o.Certificates != nil {
		st.Dependencies.Certificates = o.Certificates()
	}
	st.RecentErrors = []logging.Entry{}
	if o.Recent != nil {
		st.RecentErrors = o.Recent.Entries()
	}
	return st
}

// Seen remembers the agents that connected to this node since it started:
// their names (which tunnels do not carry) and when they were last
// connected, so a GitLab-mode page can list agents that went away.
type Seen struct {
	mu     sync.Mutex
	agents map[int64]*seenAgent
}

type seenAgent struct {
	SeenAgent
	connections int
}

// SeenAgent is an agent this node has seen.
type SeenAgent struct {
	ID        int64  `json:"id"`
	Name      string `json:"name,omitempty"`
	ProjectID int64  `json:"project_id,omitempty"`
	// LastSeen is now while connected, else when its last connection here ended.
	LastSeen time.Time `json:"last_seen"`
}

// NewSeen returns an empty record.
func NewSeen() *Seen { return &Seen{agents: map[int64]*seenAgent{}} }

// Connect records a connection of the agent.
func (s *Seen) Connect(info gitlab.AgentInfo) {
	s.mu.Lock()
	defer s.mu.Unlock()
	a := s.agents[info.AgentID]
	if a == nil {
		a = &seenAgent{SeenAgent: SeenAgent{ID: info.AgentID}}
		s.agents[info.AgentID] = a
	}
	a.Name, a.ProjectID = info.AgentName, info.ProjectID
	a.connections++
	a.LastSeen = time.Now().UTC()
}

// Disconnect records the end of one of the agent's connections.
func (s *Seen) Disconnect(agentID int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if a := s.agents[agentID]; a != nil {
		a.connections = max(a.connections-1, 0)
		a.LastSeen = time.Now().UTC()
	}
}

// List returns the agents seen, connected ones as seen now.
func (s *Seen) List() []SeenAgent {
	now := time.Now().UTC()
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]SeenAgent, 0, len(s.agents))
	for _, a := range s.agents {
		sa := a.SeenAgent
		if a.connections > 0 {
			sa.LastSeen = now
		}
		out = append(out, sa)
	}
	slices.SortFunc(out, func(a, b SeenAgent) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

// urlsKey identifies a node by its private API URLs.
func urlsKey(urls []string) string { return strings.Join(urls, " ") }
