// Package registry records where agents' tunnels are: the Registry interface,
// the in-memory implementation a single node uses by default, and (for
// several nodes) the Redis one.
package registry

import (
	"context"
	"errors"
	"net/http"
	"time"
)

// Tunnel is one live agent connection held by this node.
type Tunnel interface {
	// Info describes the connection.
	Info() TunnelInfo
	// RoundTrip sends one request to the agent as one HTTP/2 stream.
	RoundTrip(*http.Request) (*http.Response, error)
}

// TunnelInfo is what kas knows about one agent connection; it is what the
// registry publishes and what GitLab's agent tracker answers.
type TunnelInfo struct {
	AgentID           int64     `json:"agent_id"`
	ProjectID         int64     `json:"project_id"`
	ConnectionID      int64     `json:"connection_id"`
	AgentVersion      string    `json:"agent_version,omitempty"`
	AgentCommit       string    `json:"agent_commit,omitempty"`
	PodName           string    `json:"pod_name,omitempty"`
	PodNamespace      string    `json:"pod_namespace,omitempty"`
	KubernetesVersion string    `json:"kubernetes_version,omitempty"`
	ConnectedAt       time.Time `json:"connected_at"`
	// NodeURLs are the private API URLs of the kas node holding the tunnel.
	NodeURLs []string `json:"node_urls,omitempty"`
	// Flavor says which agentk is at the other end: FlavorKas (empty, the
	// project's own agentk, HTTP/2 over the tunnel) or FlavorGitLab
	// (GitLab's agentk, gRPC reverse-tunnel streams).
	Flavor string `json:"flavor,omitempty"`
	// Receptive is true when kas dialled the agent (a receptive agent that
	// cannot dial out) rather than the agent dialling kas.
	Receptive bool `json:"receptive,omitempty"`
}

// Flavors of agentk (TunnelInfo.Flavor).
const (
	// FlavorKas is the project's own agentk; it is the zero value so that
	// records written before Flavor existed read as it.
	FlavorKas = ""
	// FlavorGitLab is GitLab's agentk, served unchanged over gRPC.
	FlavorGitLab = "gitlab"
)

// Registry tracks tunnels on this node and, for several nodes, everywhere.
type Registry interface {
	// Register records a tunnel this node now holds.
	Register(ctx context.Context, t Tunnel) error
	// Unregister forgets it.
	Unregister(ctx context.Context, t Tunnel) error
	// FindLocal returns one of this node's tunnels for the agent, spreading
	// successive calls over the agent's replicas.
	FindLocal(agentID int64) (Tunnel, bool)
	// FindRemote returns the private API URLs of other nodes that hold
	// tunnels for the agent (one entry per node, each with its URLs). When
	// the shared registry cannot be read, the error wraps ErrUnavailable,
	// and the nodes, if any, are the last ones known to hold the agent's
	// tunnels (worth trying: the agent is probably still there).
	FindRemote(ctx context.Context, agentID int64) ([][]string, error)
	// WaitForAgent returns when a tunnel for the agent registers on any node,
	// or with ctx's error.
	WaitForAgent(ctx context.Context, agentID int64) error
	// Tunnels lists the connections known for the given agents (all agents
	// when agentIDs is empty), on every node.
	Tunnels(ctx context.Context, agentIDs ...int64) ([]TunnelInfo, error)
	// LastSeen is when this node last knew the agent to have a tunnel
	// anywhere: now while it has one here, when its last one here went
	// away, or when a lookup last found it on another node. It is the zero
	// time when the node knows nothing recent (departures are remembered
	// for minutes, not forever).
	LastSeen(agentID int64) time.Time
}

// Refresher is implemented by registries that publish tunnels' Info
// beyond this node (Redis): Refresh republishes a registered tunnel's Info
// after it changed, e.g. when GitLab's agentk reports its version after
// its connection became a tunnel. A registry that reads Info when asked
// (Memory) needs no Refresh.
type Refresher interface {
	Refresh(t Tunnel)
}

// ErrNoTunnel means no node holds a tunnel for the agent.
var ErrNoTunnel = errors.New("agent is not connected")

// ErrUnavailable means the shared registry (Redis) could not be read, so
// where the agent's tunnels are is not known: kas's failure, not the agent's.
var ErrUnavailable = errors.New("the agent registry (Redis) is unavailable")

// ErrNodeUnreachable means the kas nodes holding the agent's tunnels could
// not be reached over the private API (refused, unreachable, TLS failure,
// or no answer in time): kas's failure, not the agent's.
var ErrNodeUnreachable = errors.New("kas node unreachable")
