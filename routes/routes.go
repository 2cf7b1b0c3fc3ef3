// Package routes says what kas answers where: one function per listener
// builds its chi router, so every URL kas serves is listed in this folder.
package routes

import (
	"context"
	"log/slog"
	"net/http"

	"github.com/go-chi/chi/v5"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/kasproject/kas/middleware"
	"github.com/kasproject/kas/protocol"
)

// Common is the middleware every listener shares.
type Common struct {
	Logger  *slog.Logger
	Metrics *middleware.Metrics
}

func (c Common) use(r chi.Router, listener string) {
	r.Use(middleware.Correlation, middleware.AccessLog(c.Logger, listener), c.Metrics.Handler(listener), middleware.Recover(c.Logger))
}

// PublicHandlers are the handlers of the agent-facing listener (:8150).
type PublicHandlers struct {
	// Agent is the agents' WebSocket endpoint (server/tunnel).
	Agent http.Handler
	// KubernetesProxy is the Kubernetes API proxy (server/k8sproxy); it
	// expects the Kubernetes API path with the mount prefix stripped.
	KubernetesProxy http.Handler
	// AllowedOrigins may use the proxy from a browser (GitLab's UI).
	AllowedOrigins []string
}

// Public routes the agent-facing listener:
//
//	GET  /-/kubernetes-agent/              agentk's WebSocket (agent token)
//	ANY  /-/kubernetes-agent/k8s-proxy/*   Kubernetes API proxy (CI job, PAT, _gitlab_kas cookie)
//	ANY  /k8s-proxy/*                      the same proxy, for a kas behind its own hostname
func Public(c Common, h PublicHandlers) http.Handler {
	r := chi.NewRouter()
	c.use(r, "public")
	r.Handle(protocol.AgentPath, h.Agent)
	mountKubernetesProxy(r, "/-/kubernetes-agent/k8s-proxy", h)
	mountKubernetesProxy(r, "/k8s-proxy", h)
	return r
}

// KubernetesAPI routes the optional dedicated proxy listener
// (agent.kubernetes_api.listen, GitLab's :8154) under its URL path prefix.
func KubernetesAPI(c Common, h PublicHandlers, prefix string) http.Handler {
	r := chi.NewRouter()
	c.use(r, "kubernetes_api")
	if prefix == "" || prefix == "/" {
		r.Use(middleware.CORS(h.AllowedOrigins))
		r.Handle("/*", h.KubernetesProxy)
		return r
	}
	mountKubernetesProxy(r, prefix, h)
	return r
}

func mountKubernetesProxy(r chi.Router, prefix string, h PublicHandlers) {
	r.Route(prefix, func(r chi.Router) {
		r.Use(middleware.CORS(h.AllowedOrigins))
		r.Handle("/*", http.StripPrefix(prefix, h.KubernetesProxy))
	})
}

// ObservabilityHandlers are the handlers of the observability listener (:8151).
type ObservabilityHandlers struct {
	Gatherer prometheus.Gatherer
	// Ready reports whether kas can serve (listeners up, Redis answering).
	Ready func(context.Context) error
	// Status is the HTML status page and StatusJSON the same data as JSON.
	Status, StatusJSON http.Handler
	// MetricsPath, LivenessPath and ReadinessPath are configurable (observability.*.url_path).
	MetricsPath, LivenessPath, ReadinessPath string
}

// Observability routes the observability listener:
//
//	GET /metrics       Prometheus metrics (observability.prometheus.url_path)
//	GET /liveness      200 while the process runs (observability.liveness_probe.url_path)
//	GET /readiness     200 when kas can serve, 503 with the reason otherwise
//	GET /              status page: agents on every node with their traffic, nodes,
//	                   dependencies, recent warnings (?q= filters agents, ?sort= sorts them)
//	GET /debug/status  the status page's data as JSON, same parameters (docs/status.md)
func Observability(c Common, h ObservabilityHandlers) http.Handler {
	r := chi.NewRouter()
	c.use(r, "observability")
	r.Handle(h.MetricsPath, promhttp.HandlerFor(h.Gatherer, promhttp.HandlerOpts{}))
	r.Get(h.LivenessPath, func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok\n"))
	})
	r.Get(h.ReadinessPath, func(w http.ResponseWriter, r *http.Request) {
		if err := h.Ready(r.Context()); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	r.Handle("/", h.Status)
	r.Handle("/debug/status", h.StatusJSON)
	return r
}

// InternalAPIHandlers are the JSON handlers of the internal API listener
// (server/internalapi); each mirrors one of its gRPC methods for curl.
type InternalAPIHandlers struct {
	// Authenticate refuses a request without Authorization: Bearer <JWT>,
	// the JWT signed with the API secret for audience gitlab-kas.
	Authenticate func(http.Handler) http.Handler
	// ServerInfo, ConnectedAgents, GitPushEvent and AgentConfigFiles mirror
	// GetServerInfo, GetConnectedAgentsBy{Agent,Project}IDs, GitPushEvent
	// and ListAgentConfigFiles.
	ServerInfo, ConnectedAgents, GitPushEvent, AgentConfigFiles http.Handler
	// NotFound and MethodNotAllowed answer everything else, as JSON.
	NotFound, MethodNotAllowed http.Handler
}

// InternalAPI routes the JSON side of the internal API listener
// (api.listen, :8153). The listener serves GitLab Rails' gRPC calls too:
// server/internalapi sends every request with content-type
// application/grpc to its gRPC server, which answers
//
//	gitlab.agent.server_info.rpc.ServerInfo/GetServerInfo
//	gitlab.agent.agent_tracker.rpc.AgentTracker/GetConnectedAgentsByAgentIDs
//	gitlab.agent.agent_tracker.rpc.AgentTracker/GetConnectedAgentsByProjectIDs
//	gitlab.agent.agent_tracker.rpc.AgentTracker/GetConnectedAgentksByAgentIDs  (newer GitLab's name)
//	gitlab.agent.notifications.rpc.Notifications/GitPushEvent
//	gitlab.agent.configuration_project.rpc.ConfigurationProject/ListAgentConfigFiles
//	grpc.reflection.v1(alpha).ServerReflection/ServerReflectionInfo  (grpcurl list/describe)
//	grpc.health.v1.Health/Check, Watch                                (no token needed)
//
// with metadata "authorization: bearer <JWT>". Everything else comes here;
// every route needs the same JWT as Authorization: Bearer <JWT>:
//
//	GET  /api/v1/server_info                              kas version, commit, build time
//	GET  /api/v1/connected_agents?agent_id=1&agent_id=2   connections of agents, on every node
//	GET  /api/v1/connected_agents?project_id=3            connections of the agents a project configures
//	POST /api/v1/git_push_event                           {"event":{"project":{"id":3,"full_path":"group/project"}}}
//	GET  /api/v1/projects/{project}/agent_config_files    a project's agent config files (ID or URL-encoded path)
func InternalAPI(c Common, h InternalAPIHandlers) http.Handler {
	r := chi.NewRouter()
	c.use(r, "internal_api")
	r.NotFound(h.NotFound.ServeHTTP)
	r.MethodNotAllowed(h.MethodNotAllowed.ServeHTTP)
	r.Route("/api/v1", func(r chi.Router) {
		r.Use(h.Authenticate)
		r.Method(http.MethodGet, "/server_info", h.ServerInfo)
		r.Method(http.MethodGet, "/connected_agents", h.ConnectedAgents)
		r.Method(http.MethodPost, "/git_push_event", h.GitPushEvent)
		r.Method(http.MethodGet, "/projects/{project}/agent_config_files", h.AgentConfigFiles)
	})
	return r
}
