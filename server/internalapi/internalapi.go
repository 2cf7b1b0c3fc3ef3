// Package internalapi serves the internal API GitLab Rails calls on kas
// (api.listen, GitLab's :8153): GitLab's gRPC services under their
// fully-qualified names, so Rails' existing client works unchanged, and the
// same data as JSON for curl, both on one listener and both authenticated
// with a JWT signed with the API secret.
//
// gRPC and JSON share the listener by content type: requests with
// content-type application/grpc go to the gRPC server, everything else to
// the JSON router (routes.InternalAPI). gRPC over plain TCP is HTTP/2 with
// prior knowledge (h2c), so the http.Server must enable it: set its
// Protocols to ServerProtocols().
package internalapi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/kasproject/kas/internal/healthreflection"
	"github.com/kasproject/kas/middleware"
	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/routes"
	"github.com/kasproject/kas/server/internalapi/gitlabpb"
)

// Defaults for the zero values of Options.
const (
	// DefaultCallTimeout leaves a margin under GitLab's default deadline
	// (gitlab_kas client_timeout_seconds, 5 s) so a slow registry or
	// configuration source gets a clear DeadlineExceeded from kas rather
	// than a bare timeout in Rails.
	DefaultCallTimeout = 4 * time.Second
	// DefaultPushQueueSize is how many distinct projects may wait for the
	// push notifier before further pushes are dropped.
	DefaultPushQueueSize = 1000
	// DefaultPushWorkers is how many notifier calls run at once.
	DefaultPushWorkers = 4
)

// PushNotifier is told that something was pushed to a project's repository,
// so it can refetch the configuration of agents configured there. It runs
// on a worker goroutine, never on the RPC's, and must return when ctx is
// cancelled (at shutdown).
type PushNotifier func(ctx context.Context, projectID int64, projectPath string)

// ConfigProject names the project whose agent configuration files are
// listed. GitLab sends both; a curl caller may give only one.
type ConfigProject struct {
	// ID is the project's numeric ID, 0 when the caller named it by path.
	ID int64
	// Path is the project's full path (group/subgroup/project), "" when the
	// caller named it by ID.
	Path string
}

// AgentConfigFile is one .gitlab/agents/<agent name>/config.yaml in a
// project's repository.
type AgentConfigFile struct {
	// AgentName is the agent the file configures.
	AgentName string
	// Path is the file's path in the repository.
	Path string
}

// ConfigFileLister lists the agent configuration files of a project's
// default branch. kas implements it against GitLab and against the
// standalone files.
type ConfigFileLister interface {
	// ListAgentConfigFiles returns the project's agent configuration files,
	// none when it has none; an error wrapping ErrProjectNotFound when
	// there is no such project.
	ListAgentConfigFiles(ctx context.Context, project ConfigProject) ([]AgentConfigFile, error)
}

// ErrProjectNotFound is what a ConfigFileLister wraps when the project does
// not exist; callers get NotFound (HTTP 404) instead of Unavailable.
var ErrProjectNotFound = errors.New("project not found")

// Options configure the internal API.
type Options struct {
	// Secret is the API secret shared with GitLab Rails (the decoded
	// contents of api.listen.authentication_secret_file). Without one,
	// every call is refused with a message saying how to set it.
	Secret []byte
	// Registry lists agent connections, on every node when Redis-backed.
	Registry registry.Registry
	// ConfigFiles lists projects' agent configuration files. Without it,
	// ListAgentConfigFiles answers Unimplemented.
	ConfigFiles ConfigFileLister
	// OnGitPush hears about pushes GitLab reports, asynchronously. Without
	// it pushes are acknowledged and nothing else happens.
	OnGitPush PushNotifier

	// Version, Commit and BuildTime describe this kas binary for
	// GetServerInfo; Commit and BuildTime may be empty.
	Version   string
	Commit    string
	BuildTime time.Time
	// GitLabExternalURL is gitlab.external_url, also told by GetServerInfo.
	GitLabExternalURL string

	// CallTimeout bounds the work of one call; 0 means DefaultCallTimeout.
	CallTimeout time.Duration
	// PushQueueSize bounds the projects waiting for OnGitPush; 0 means
	// DefaultPushQueueSize.
	PushQueueSize int
	// PushWorkers is how many OnGitPush calls may run at once; 0 means
	// DefaultPushWorkers.
	PushWorkers int

	// Logger receives one line per gRPC call and the push queue's
	// warnings; nil discards them.
	Logger *slog.Logger
	// Metrics instruments the JSON routes like every other listener's.
	Metrics *middleware.Metrics
}

// Handler serves the internal API on one listener. It owns the gRPC server
// and the push notification workers; Close stops them.
type Handler struct {
	grpc      *grpc.Server
	health    *health.Server
	json      http.Handler
	pushes    *pushQueue // nil without Options.OnGitPush
	closeOnce sync.Once
}

// NewHandler builds the internal API and starts its push notification
// workers; the caller must Close it.
func NewHandler(opts Options) (*Handler, error) {
	if opts.Registry == nil {
		return nil, errors.New("internal API: Options.Registry is required")
	}
	if opts.Metrics == nil {
		return nil, errors.New("internal API: Options.Metrics is required")
	}
	if opts.CallTimeout < 0 || opts.PushQueueSize < 0 || opts.PushWorkers < 0 {
		return nil, fmt.Errorf("internal API: negative CallTimeout (%s), PushQueueSize (%d) or PushWorkers (%d)",
			opts.CallTimeout, opts.PushQueueSize, opts.PushWorkers)
	}
	if opts.CallTimeout == 0 {
		opts.CallTimeout = DefaultCallTimeout
	}
	if opts.PushQueueSize == 0 {
		opts.PushQueueSize = DefaultPushQueueSize
	}
	if opts.PushWorkers == 0 {
		opts.PushWorkers = DefaultPushWorkers
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}

	auth := authenticator{secret: opts.Secret, healthReflection: healthreflection.New()}
	calls := callLogger{log: log}
	h := &Handler{
		grpc: grpc.NewServer(
			grpc.ChainUnaryInterceptor(calls.unary, auth.unary),
			grpc.ChainStreamInterceptor(calls.stream, auth.stream),
		),
		health: health.NewServer(),
	}
	if opts.OnGitPush != nil {
		h.pushes = newPushQueue(opts.OnGitPush, opts.PushQueueSize, opts.PushWorkers, log)
	}

	svc := services{
		serverInfo: &serverInfoService{info: serverInfo(opts)},
		tracker:    &agentTrackerService{registry: opts.Registry, timeout: opts.CallTimeout},
		notify:     &notificationsService{pushes: h.pushes},
		configs:    &configurationProjectService{lister: opts.ConfigFiles, timeout: opts.CallTimeout},
	}
	gitlabpb.RegisterServerInfoServer(h.grpc, svc.serverInfo)
	gitlabpb.RegisterAgentTrackerServer(h.grpc, svc.tracker)
	gitlabpb.RegisterNotificationsServer(h.grpc, svc.notify)
	gitlabpb.RegisterConfigurationProjectServer(h.grpc, svc.configs)
	reflection.Register(h.grpc)
	healthpb.RegisterHealthServer(h.grpc, h.health)
	// Health says whether calls can succeed: without a secret every call
	// is refused, so the services are NOT_SERVING.
	state := healthpb.HealthCheckResponse_SERVING
	if len(opts.Secret) == 0 {
		state = healthpb.HealthCheckResponse_NOT_SERVING
	}
	h.health.SetServingStatus("", state)
	for name := range h.grpc.GetServiceInfo() {
		h.health.SetServingStatus(name, state)
	}

	h.json = routes.InternalAPI(routes.Common{Logger: log, Metrics: opts.Metrics}, jsonHandlers(svc, auth))
	return h, nil
}

// ServeHTTP sends gRPC requests to the gRPC server and the rest to the JSON
// router.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc") {
		h.json.ServeHTTP(w, r)
		return
	}
	if r.ProtoMajor != 2 {
		// The client spoke HTTP/1.1 or the server was built without h2c.
		http.Error(w, "gRPC needs HTTP/2: call with HTTP/2 (h2c on a plain TCP listener), and build the listener's http.Server with internalapi.ServerProtocols()", http.StatusHTTPVersionNotSupported)
		return
	}
	h.grpc.ServeHTTP(w, r)
}

// Close marks the services NOT_SERVING, ends gRPC calls still running,
// and stops the push workers: the notifier's context is cancelled, Close
// waits for running notifier calls to return, and pushes still queued are
// dropped (kas polls configurations anyway). Call it after the listener's
// http.Server has shut down. Later calls do nothing.
func (h *Handler) Close() error {
	h.closeOnce.Do(func() {
		h.health.Shutdown()
		h.grpc.Stop()
		if h.pushes != nil {
			h.pushes.close()
		}
	})
	return nil
}

// ServerProtocols are the protocols the internal API listener's
// http.Server must speak: HTTP/1.1 for curl, HTTP/2 over TLS, and HTTP/2
// with prior knowledge on plain TCP (h2c), which is how gRPC clients such
// as GitLab Rails (grpc://) and grpcurl -plaintext connect.
func ServerProtocols() *http.Protocols {
	p := new(http.Protocols)
	p.SetHTTP1(true)
	p.SetHTTP2(true)
	p.SetUnencryptedHTTP2(true)
	return p
}

func serverInfo(opts Options) *gitlabpb.ServerInfo {
	info := &gitlabpb.ServerInfo{
		Version:           opts.Version,
		GitRef:            opts.Commit,
		GitlabExternalUrl: opts.GitLabExternalURL,
	}
	if info.GitRef == "" {
		// GitLab links git_ref to the source: a commit, else a version tag.
		info.GitRef = opts.Version
	}
	if !opts.BuildTime.IsZero() {
		info.BuildTime = timestamppb.New(opts.BuildTime)
	}
	return info
}
