package gitlab

import (
	"context"
	"encoding/json"
)

// Paths of GitLab's API that kas calls, relative to gitlab.address.
const (
	PathAgentInfo = "/api/v4/internal/agents/agentk/agent_info"
	// PathAgentInfoLegacy is where GitLab versions before the agentk
	// namespace serve agent_info; the client falls back to it on a 404.
	PathAgentInfoLegacy    = "/api/v4/internal/kubernetes/agent_info"
	PathAuthorizeProxyUser = "/api/v4/internal/kubernetes/authorize_proxy_user"
	PathAllowedAgents      = "/api/v4/job/allowed_agents"
	PathAgentConfiguration = "/api/v4/internal/kubernetes/agent_configuration"
	PathUsageMetrics       = "/api/v4/internal/kubernetes/usage_metrics"
)

// Request headers of the contract.
const (
	// HeaderAPIRequest carries kas's JWT (kasjwt.IssuerKAS to
	// kasjwt.AudienceGitLab, signed with the API secret) on every call.
	HeaderAPIRequest = "Gitlab-Kas-Api-Request"
	// HeaderJobToken carries a CI job token to PathAllowedAgents.
	HeaderJobToken = "Job-Token"
)

// AgentConfigurationRequest is the body of POST PathAgentConfiguration.
type AgentConfigurationRequest struct {
	AgentID     int64           `json:"agent_id"`
	AgentConfig json.RawMessage `json:"agent_config"`
}

// UsageMetrics is the body of POST PathUsageMetrics: event counts since the
// last report, and for unique counters the IDs (e.g. of users or agents) seen.
type UsageMetrics struct {
	Counters       map[string]int64   `json:"counters,omitempty"`
	UniqueCounters map[string][]int64 `json:"unique_counters,omitempty"`
}

// ConfigurationReporter accepts an agent's configuration for GitLab to show
// in its UI. The Rails client implements it; a backend without a GitLab may
// too.
type ConfigurationReporter interface {
	PostAgentConfiguration(ctx context.Context, agentID int64, config json.RawMessage) error
}

// UsageReporter accepts usage counters for GitLab's service ping.
type UsageReporter interface {
	SendUsageMetrics(ctx context.Context, m UsageMetrics) error
}
