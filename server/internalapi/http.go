package internalapi

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/go-chi/chi/v5"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/kasproject/kas/routes"
	"github.com/kasproject/kas/server/internalapi/gitlabpb"
)

// maxRequestBody bounds a JSON request body; a push event is a few
// hundred bytes.
const maxRequestBody = 64 << 10

// The JSON routes answer with the gRPC response messages in protobuf's
// JSON mapping under their proto field names, so one description fits
// grpcurl's output and curl's. (That mapping writes 64-bit integers as
// strings.)
var (
	marshalJSON   = protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: true, Multiline: true}
	unmarshalJSON = protojson.UnmarshalOptions{}
)

// jsonHandlers are the JSON mirrors of the gRPC methods: each parses its
// request, calls the same service method the gRPC server does, and writes
// its response or error as JSON.
func jsonHandlers(svc services, auth authenticator) routes.InternalAPIHandlers {
	return routes.InternalAPIHandlers{
		Authenticate: auth.middleware,
		ServerInfo: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			resp, err := svc.serverInfo.GetServerInfo(r.Context(), &gitlabpb.GetServerInfoRequest{})
			writeResult(w, http.StatusOK, resp, err)
		}),
		ConnectedAgents: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			serveConnectedAgents(w, r, svc.tracker)
		}),
		GitPushEvent: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			var req gitlabpb.GitPushEventRequest
			if err := readJSON(w, r, &req); err != nil {
				writeError(w, err)
				return
			}
			resp, err := svc.notify.GitPushEvent(r.Context(), &req)
			writeResult(w, http.StatusAccepted, resp, err)
		}),
		AgentConfigFiles: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			project, err := projectFromPath(chi.URLParam(r, "project"))
			if err != nil {
				writeError(w, err)
				return
			}
			resp, err := svc.configs.list(r.Context(), project)
			writeResult(w, http.StatusOK, resp, err)
		}),
		NotFound: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			writeError(w, status.Errorf(codes.NotFound, "no route %s %s; the internal API's JSON routes are under /api/v1/", r.Method, r.URL.Path))
		}),
		MethodNotAllowed: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			writeJSONError(w, http.StatusMethodNotAllowed, "MethodNotAllowed", fmt.Sprintf("%s is not allowed on %s", r.Method, r.URL.Path))
		}),
	}
}

// serveConnectedAgents answers ?agent_id=1&agent_id=2 or ?project_id=3 (values
// may also be comma-separated).
func serveConnectedAgents(w http.ResponseWriter, r *http.Request, tracker *agentTrackerService) {
	query := r.URL.Query()
	agentIDs, err := queryIDs(query, "agent_id")
	if err != nil {
		writeError(w, err)
		return
	}
	projectIDs, err := queryIDs(query, "project_id")
	if err != nil {
		writeError(w, err)
		return
	}
	switch {
	case len(agentIDs) > 0 && len(projectIDs) > 0:
		writeError(w, status.Error(codes.InvalidArgument, "give agent_id or project_id, not both"))
	case len(agentIDs) > 0:
		resp, err := tracker.GetConnectedAgentsByAgentIDs(r.Context(), &gitlabpb.GetConnectedAgentsByAgentIDsRequest{AgentIds: agentIDs})
		writeResult(w, http.StatusOK, resp, err)
	case len(projectIDs) > 0:
		resp, err := tracker.GetConnectedAgentsByProjectIDs(r.Context(), &gitlabpb.GetConnectedAgentsByProjectIDsRequest{ProjectIds: projectIDs})
		writeResult(w, http.StatusOK, resp, err)
	default:
		writeError(w, status.Error(codes.InvalidArgument, "give the agents to look up as ?agent_id=1&agent_id=2 or their configuration projects as ?project_id=3"))
	}
}

func queryIDs(query url.Values, name string) ([]int64, error) {
	var ids []int64
	for _, value := range query[name] {
		for field := range strings.SplitSeq(value, ",") {
			id, err := strconv.ParseInt(strings.TrimSpace(field), 10, 64)
			if err != nil {
				return nil, status.Errorf(codes.InvalidArgument, "%s %.32q is not a number", name, field)
			}
			ids = append(ids, id)
		}
	}
	return ids, nil
}

// projectFromPath reads {project}: a numeric ID, or a full path with its
// slashes escaped as in GitLab's API (group%2Fproject).
func projectFromPath(param string) (ConfigProject, error) {
	unescaped, err := url.PathUnescape(param)
	if err != nil || unescaped == "" {
		return ConfigProject{}, status.Errorf(codes.InvalidArgument, "project %.64q is neither an ID nor a URL-encoded path", param)
	}
	if id, err := strconv.ParseInt(unescaped, 10, 64); err == nil {
		if id <= 0 {
			return ConfigProject{}, status.Errorf(codes.InvalidArgument, "project ID must be positive, got %d", id)
		}
		return ConfigProject{ID: id}, nil
	}
	return ConfigProject{Path: unescaped}, nil
}

func readJSON(w http.ResponseWriter, r *http.Request, m proto.Message) error {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxRequestBody))
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "read request body (at most %d bytes): %v", maxRequestBody, err)
	}
	if err := unmarshalJSON.Unmarshal(body, m); err != nil {
		return status.Errorf(codes.InvalidArgument, `decode request body: %v (want e.g. {"event":{"project":{"id":1,"full_path":"group/project"}}})`, err)
	}
	return nil
}

func writeResult(w http.ResponseWriter, code int, resp proto.Message, err error) {
	if err != nil {
		writeError(w, err)
		return
	}
	body, err := marshalJSON.Marshal(resp)
	if err != nil {
		writeError(w, status.Errorf(codes.Internal, "encode response: %v", err))
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_, _ = w.Write(append(body, '\n'))
}

// writeError answers a status error as JSON with the HTTP status that
// matches its code.
func writeError(w http.ResponseWriter, err error) {
	st := status.Convert(err)
	writeJSONError(w, httpStatus(st.Code()), st.Code().String(), st.Message())
}

func writeJSONError(w http.ResponseWriter, httpCode int, code, message string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(httpCode)
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false) // messages quote URLs; keep & and < readable in curl
	_ = enc.Encode(struct {
		Error string `json:"error"`
		Code  string `json:"code"`
	}{message, code})
}

// httpStatus maps gRPC codes to HTTP statuses as grpc-gateway does.
func httpStatus(code codes.Code) int {
	switch code {
	case codes.OK:
		return http.StatusOK
	case codes.InvalidArgument, codes.OutOfRange:
		return http.StatusBadRequest
	case codes.Unauthenticated:
		return http.StatusUnauthorized
	case codes.PermissionDenied:
		return http.StatusForbidden
	case codes.NotFound:
		return http.StatusNotFound
	case codes.AlreadyExists, codes.Aborted:
		return http.StatusConflict
	case codes.FailedPrecondition:
		return http.StatusBadRequest
	case codes.ResourceExhausted:
		return http.StatusTooManyRequests
	case codes.Canceled:
		return 499 // client closed request, as nginx and grpc-gateway say
	case codes.Unimplemented:
		return http.StatusNotImplemented
	case codes.Unavailable:
		return http.StatusServiceUnavailable
	case codes.DeadlineExceeded:
		return http.StatusGatewayTimeout
	default:
		return http.StatusInternalServerError
	}
}
