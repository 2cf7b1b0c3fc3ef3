// Package gitlabtest is a fake GitLab Rails for tests: an httptest server
// that speaks kas's side of the GitLab contract (DESIGN §6) exactly and
// answers from a gitlab.API backend the test provides, so a test can plug in
// a hand-written backend or the standalone one.
//
// Every request is checked for a valid Gitlab-Kas-Api-Request JWT (HS256,
// the server's secret, iss gitlab-kas, aud gitlab, exp and nbf checked in
// whole seconds with no leeway, as ruby-jwt does; WithClockOffset sets Rails'
// clock apart from kas's) and answered 401 "KAS JWT authentication invalid"
// otherwise, like Rails. The server serves:
//
//	GET  /api/v4/internal/agents/agentk/agent_info  (Authorization: Bearer <agent token>)
//	GET  /api/v4/internal/kubernetes/agent_info     (the legacy path, same answer)
//	POST /api/v4/internal/kubernetes/authorize_proxy_user
//	GET  /api/v4/job/allowed_agents                 (Job-Token: <job token>)
//	POST /api/v4/internal/kubernetes/agent_configuration  → 204, recorded
//	POST /api/v4/internal/kubernetes/usage_metrics        → 204, recorded
//	GET  /api/v4/internal/kubernetes/receptive_agents  → {"agents": [...]} as set
//	     with SetReceptiveAgents; 404 until then, like a GitLab without the feature
//	GET  /api/v4/projects/:id/repository/files/:file_path/raw?ref=<ref>
//	     (the public repository files API: files set with SetRepositoryFile,
//	     PRIVATE-TOKEN checked when SetRepositoryToken was called)
//
// Backend errors wrapping gitlab.ErrUnauthorized, ErrForbidden and
// ErrNotFound become 401, 403 and 404; a *gitlab.Error with another status
// keeps it; anything else is a 500. Request bodies are decoded strictly
// (unknown fields are a 400) so contract drift fails tests.
//
// Typical use:
//
//	srv := gitlabtest.New(t, secret, backend)
//	client, _ := gitlab.NewClient(gitlab.ClientOptions{BaseURL: srv.URL, Secret: secret})
//	...
//	if n := srv.Calls(gitlab.PathAgentInfo); n != 1 { ... }
//	srv.Fail(gitlab.PathAgentInfo, gitlabtest.Failure{Status: 502, Times: 1})
package gitlabtest

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/kasproject/kas/server/correlation"
	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/kasjwt"
)

// Server is a running fake GitLab. Its methods are safe for concurrent use.
type Server struct {
	// URL is the base address to use as gitlab.address.
	URL string

	srv     *httptest.Server
	secret  []byte
	backend gitlab.API
	// clockOffset is how far Rails' clock is ahead of the test's.
	clockOffset time.Duration

	mu       sync.Mutex
	requests []Request
	calls    map[string]int
	failures map[string]*Failure
	configs  []gitlab.AgentConfigurationRequest
	metrics  []gitlab.UsageMetrics
	// files are repository files by project ID, ref and path.
	files     map[int64]map[string]map[string][]byte
	repoToken string // required PRIVATE-TOKEN, "" for none
	// receptive is the receptive agents list; nil until set (404).
	receptive []gitlab.ReceptiveAgent
}

// Request is one request the server received, as it arrived.
type Request struct {
	Method string
	Path   string
	Header http.Header
	Body   []byte
}

// Failure is a fault injected for requests to one path, applied before the
// JWT check: wait Delay (or until the client gives up), then answer Status
// with Message, or drop the connection if Hangup. With Status 0 and no
// Hangup the request is then served normally, so a Failure can be a pure
// delay.
type Failure struct {
	Delay   time.Duration
	Status  int
	Message string // GitLab's {"message": ...}; defaults to the status text
	Hangup  bool   // close the connection without answering
	// Location is the Location header of a 3xx Status: a redirect.
	Location string
	// Times is how many requests it affects; 0 means until ClearFailures.
	Times int
}

type options struct {
	legacyOnly  bool
	tls         bool
	clockOffset time.Duration
}

// Option changes how New sets the server up.
type Option func(*options)

// WithLegacyAgentInfoOnly makes the server behave like a GitLab older than
// the agentk namespace: agent_info is only at gitlab.PathAgentInfoLegacy and
// gitlab.PathAgentInfo answers 404.
func WithLegacyAgentInfoOnly() Option { return func(o *options) { o.legacyOnly = true } }

// WithTLS serves https with httptest's certificate; see Certificate.
func WithTLS() Option { return func(o *options) { o.tls = true } }

// WithClockOffset sets the fake Rails' clock d ahead of the test's (behind
// for a negative d), for the JWT's exp and nbf checks.
func WithClockOffset(d time.Duration) Option { return func(o *options) { o.clockOffset = d } }

// New starts a fake GitLab checking JWTs against secret and answering from
// backend; a nil backend knows no credentials (every lookup is a 401). The
// server stops when the test ends.
func New(t testing.TB, secret []byte, backend gitlab.API, opts ...Option) *Server {
	t.Helper()
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	s := &Server{
		secret:      secret,
		backend:     backend,
		clockOffset: o.clockOffset,
		calls:       make(map[string]int),
		failures:    make(map[string]*Failure),
		files:       make(map[int64]map[string]map[string][]byte),
	}
	mux := http.NewServeMux()
	if !o.legacyOnly {
		mux.HandleFunc("GET "+gitlab.PathAgentInfo, s.agentInfo)
	}
	mux.HandleFunc("GET "+gitlab.PathAgentInfoLegacy, s.agentInfo)
	mux.HandleFunc("POST "+gitlab.PathAuthorizeProxyUser, s.authorizeProxyUser)
	mux.HandleFunc("GET "+gitlab.PathAllowedAgents, s.allowedAgents)
	mux.HandleFunc("POST "+gitlab.PathAgentConfiguration, s.agentConfiguration)
	mux.HandleFunc("POST "+gitlab.PathUsageMetrics, s.usageMetrics)
	mux.HandleFunc("GET "+gitlab.PathReceptiveAgents, s.receptiveAgents)
	mux.HandleFunc("GET /api/v4/projects/{id}/repository/files/{file_path}/raw", s.repositoryFile)
	mux.HandleFunc("GET /api/v4/projects/{id}/repository/tree", s.repositoryTree)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		// Grape's answer for a route it does not have.
		writeJSON(w, http.StatusNotFound, map[string]string{"error": "404 Not Found"})
	})
	s.srv = httptest.NewUnstartedServer(s.intercept(mux))
	if o.tls {
		s.srv.StartTLS()
	} else {
		s.srv.Start()
	}
	s.URL = s.srv.URL
	t.Cleanup(s.srv.Close)
	return s
}

// Certificate is the server's certificate when started WithTLS, to add to
// a client's pool (write it as PEM for a CA file); nil otherwise.
func (s *Server) Certificate() *x509.Certificate { return s.srv.Certificate() }

// Close stops the server early, e.g. to test a GitLab that went away; it
// is also done when the test ends.
func (s *Server) Close() { s.srv.Close() }

// Requests returns every request received so far, in order.
func (s *Server) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Request, len(s.requests))
	for i, r := range s.requests {
		out[i] = Request{Method: r.Method, Path: r.Path, Header: r.Header.Clone(), Body: bytes.Clone(r.Body)}
	}
	return out
}

// Calls counts the requests received for path, whatever their outcome.
func (s *Server) Calls(path string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.calls[path]
}

// Configurations returns the agent configurations posted so far.
func (s *Server) Configurations() []gitlab.AgentConfigurationRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]gitlab.AgentConfigurationRequest, len(s.configs))
	for i, c := range s.configs {
		out[i] = gitlab.AgentConfigurationRequest{AgentID: c.AgentID, AgentConfig: bytes.Clone(c.AgentConfig)}
	}
	return out
}

// UsageMetrics returns the usage reports posted so far. The maps are the
// server's own decodings; tests may read but should not change them.
func (s *Server) UsageMetrics() []gitlab.UsageMetrics {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]gitlab.UsageMetrics(nil), s.metrics...)
}

// SetRepositoryFile stores content as filePath at ref in project
// projectID's repository, for the raw repository file endpoint; nil content
// removes the file but keeps the project and ref. A project without files
// answers "404 Project Not Found", a ref without files "404 Commit Not
// Found", a missing file "404 File Not Found", as GitLab does.
func (s *Server) SetRepositoryFile(projectID int64, ref, filePath string, content []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	refs := s.files[projectID]
	if refs == nil {
		refs = make(map[string]map[string][]byte)
		s.files[projectID] = refs
	}
	files := refs[ref]
	if files == nil {
		files = make(map[string][]byte)
		refs[ref] = files
	}
	if content == nil {
		delete(files, filePath)
		return
	}
	files[filePath] = bytes.Clone(content)
}

// SetReceptiveAgents sets the answer of gitlab.PathReceptiveAgents, which
// answers 404 until the first call, as a GitLab without receptive agents
// does. A nil or empty list lists no agent.
func (s *Server) SetReceptiveAgents(agents []gitlab.ReceptiveAgent) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.receptive = append([]gitlab.ReceptiveAgent{}, agents...)
}

func (s *Server) receptiveAgents(w http.ResponseWriter, _ *http.Request) {
	s.mu.Lock()
	agents := s.receptive
	s.mu.Unlock()
	if agents == nil {
		writeError(w, http.StatusNotFound, "")
		return
	}
	writeJSON(w, http.StatusOK, gitlab.ReceptiveAgents{Agents: agents})
}

// SetRepositoryToken makes the repository files API require PRIVATE-TOKEN:
// token (401 otherwise); "" accepts any request.
func (s *Server) SetRepositoryToken(token string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.repoToken = token
}

// Fail injects f for the next requests to path (an exact path such as
// gitlab.PathAgentInfo), replacing any failure set for it.
func (s *Server) Fail(path string, f Failure) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.failures[path] = &f
}

// ClearFailures removes every injected failure.
func (s *Server) ClearFailures() {
	s.mu.Lock()
	defer s.mu.Unlock()
	clear(s.failures)
}

// intercept records the request, applies an injected failure and checks
// the JWT before routing.
func (s *Server) intercept(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			return // the client went away mid-body
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		f := s.record(Request{Method: r.Method, Path: r.URL.Path, Header: r.Header.Clone(), Body: body})

		if f.Delay > 0 {
			timer := time.NewTimer(f.Delay)
			defer timer.Stop()
			select {
			case <-timer.C:
			case <-r.Context().Done():
				return
			}
		}
		switch {
		case f.Hangup:
			if conn, _, err := http.NewResponseController(w).Hijack(); err == nil {
				conn.Close()
			}
			return
		case f.Status != 0:
			if f.Location != "" {
				w.Header().Set("Location", f.Location)
			}
			writeError(w, f.Status, f.Message)
			return
		}

		if err := s.verifyAPIRequest(r.Header.Get(gitlab.HeaderAPIRequest)); err != nil {
			writeError(w, http.StatusUnauthorized, "KAS JWT authentication invalid")
			return
		}
		if id := r.Header.Get(correlation.Header); id != "" {
			r = r.WithContext(correlation.WithID(r.Context(), id))
		}
		next.ServeHTTP(w, r)
	})
}

// verifyAPIRequest checks kas's JWT as Rails' Gitlab::Kas.verify_api_request
// does with ruby-jwt: HS256 with the secret, iss and aud, and exp and nbf
// against Rails' clock in whole seconds with no leeway.
func (s *Server) verifyAPIRequest(token string) error {
	var claims jwt.RegisteredClaims
	_, err := jwt.NewParser(
		jwt.WithValidMethods([]string{"HS256"}),
		jwt.WithoutClaimsValidation(), // checked below, ruby-jwt's way
	).ParseWithClaims(token, &claims, func(*jwt.Token) (any, error) { return s.secret, nil })
	if err != nil {
		return err
	}
	now := time.Now().Add(s.clockOffset).Unix()
	switch {
	case claims.Issuer != kasjwt.IssuerKAS:
		return errors.New("wrong iss")
	case !slices.Contains(claims.Audience, kasjwt.AudienceGitLab):
		return errors.New("wrong aud")
	case claims.ExpiresAt == nil:
		return errors.New("no exp") // Rails requires it too
	case claims.ExpiresAt.Unix() <= now:
		return errors.New("expired")
	case claims.NotBefore != nil && claims.NotBefore.Unix() > now:
		return errors.New("not yet valid")
	}
	return nil
}

// record stores req and returns the failure to apply to it (zero if none),
// using up one of its Times.
func (s *Server) record(req Request) Failure {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.requests = append(s.requests, req)
	s.calls[req.Path]++
	f, ok := s.failures[req.Path]
	if !ok {
		return Failure{}
	}
	if f.Times > 0 {
		f.Times--
		if f.Times == 0 {
			delete(s.failures, req.Path)
		}
	}
	return *f
}

func (s *Server) agentInfo(w http.ResponseWriter, r *http.Request) {
	token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok || token == "" {
		writeError(w, http.StatusUnauthorized, "")
		return
	}
	if s.backend == nil {
		writeError(w, http.StatusUnauthorized, "")
		return
	}
	info, err := s.backend.GetAgentInfo(r.Context(), token)
	answer(w, info, err)
}

func (s *Server) authorizeProxyUser(w http.ResponseWriter, r *http.Request) {
	var req gitlab.AuthorizeProxyUserRequest
	if err := decodeStrict(r.Body, &req); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	if req.AgentID == 0 || req.AccessType == "" || req.AccessKey == "" {
		writeError(w, http.StatusBadRequest, "agent_id, access_type and access_key are required")
		return
	}
	if s.backend == nil {
		writeError(w, http.StatusUnauthorized, "")
		return
	}
	resp, err := s.backend.AuthorizeProxyUser(r.Context(), req)
	answer(w, resp, err)
}

func (s *Server) allowedAgents(w http.ResponseWriter, r *http.Request) {
	token := r.Header.Get(gitlab.HeaderJobToken)
	if token == "" || s.backend == nil {
		writeError(w, http.StatusUnauthorized, "")
		return
	}
	resp, err := s.backend.GetAllowedAgentsForJob(r.Context(), token)
	answer(w, resp, err)
}

// repositoryFile serves GET /api/v4/projects/:id/repository/files/:file_path/raw.
func (s *Server) repositoryFile(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	required := s.repoToken
	s.mu.Unlock()
	if required != "" && r.Header.Get(gitlab.HeaderPrivateToken) != required {
		writeError(w, http.StatusUnauthorized, "")
		return
	}
	ref := r.URL.Query().Get("ref")
	if ref == "" {
		writeError(w, http.StatusBadRequest, "ref is missing")
		return
	}
	id, err := strconv.ParseInt(r.PathValue("id"), 10, 64)
	if err != nil {
		writeError(w, http.StatusNotFound, "404 Project Not Found")
		return
	}
	s.mu.Lock()
	refs, projectOK := s.files[id]
	files, refOK := refs[ref]
	content, fileOK := files[r.PathValue("file_path")]
	content = bytes.Clone(content)
	s.mu.Unlock()
	switch {
	case !projectOK:
		writeError(w, http.StatusNotFound, "404 Project Not Found")
	case !refOK:
		writeError(w, http.StatusNotFound, "404 Commit Not Found")
	case !fileOK:
		writeError(w, http.StatusNotFound, "404 File Not Found")
	default:
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write(content) // the client may have gone; nothing to do
	}
}

// repositoryTree answers GitLab's repository tree API (recursive listings
// only, as kas asks) from the files set with SetRepositoryFile, at ref or,
// without one, "main" standing for the default branch; paginated with
// page/per_page like GitLab.
func (s *Server) repositoryTree(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	required := s.repoToken
	s.mu.Unlock()
	if required != "" && r.Header.Get(gitlab.HeaderPrivateToken) != required {
		writeError(w, http.StatusUnauthorized, "")
		return
	}
	q := r.URL.Query()
	ref := q.Get("ref")
	if ref == "" {
		ref = "main"
	}
	id, err := strconv.ParseInt(r.PathValue("id"), 10, 64)
	if err != nil {
		writeError(w, http.StatusNotFound, "404 Project Not Found")
		return
	}
	page, _ := strconv.Atoi(q.Get("page"))
	perPage, _ := strconv.Atoi(q.Get("per_page"))
	page, perPage = max(page, 1), min(max(perPage, 1), 100)
	prefix := strings.TrimSuffix(q.Get("path"), "/") + "/"
	s.mu.Lock()
	refs, projectOK := s.files[id]
	var paths []string
	for p := range refs[ref] {
		if strings.HasPrefix(p, prefix) {
			paths = append(paths, p)
		}
	}
	s.mu.Unlock()
	if !projectOK {
		writeError(w, http.StatusNotFound, "404 Project Not Found")
		return
	}
	if len(paths) == 0 {
		writeError(w, http.StatusNotFound, "404 Tree Not Found")
		return
	}
	slices.Sort(paths)
	type entry struct {
		Name string `json:"name"`
		Type string `json:"type"`
		Path string `json:"path"`
	}
	out := []entry{}
	for _, p := range paths[min((page-1)*perPage, len(paths)):min(page*perPage, len(paths))] {
		out = append(out, entry{Name: path.Base(p), Type: "blob", Path: p})
	}
	writeJSON(w, http.StatusOK, out)
}

// agentConfiguration records the post and passes it on to a backend that
// implements gitlab.ConfigurationReporter.
func (s *Server) agentConfiguration(w http.ResponseWriter, r *http.Request) {
	var req gitlab.AgentConfigurationRequest
	if err := decodeStrict(r.Body, &req); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	if req.AgentID == 0 || len(req.AgentConfig) == 0 {
		writeError(w, http.StatusBadRequest, "agent_id and agent_config are required")
		return
	}
	s.mu.Lock()
	s.configs = append(s.configs, req)
	s.mu.Unlock()
	if rep, ok := s.backend.(gitlab.ConfigurationReporter); ok {
		if err := rep.PostAgentConfiguration(r.Context(), req.AgentID, req.AgentConfig); err != nil {
			answer(w, nil, err)
			return
		}
	}
	w.WriteHeader(http.StatusNoContent)
}

// usageMetrics records the report and passes it on to a backend that
// implements gitlab.UsageReporter.
func (s *Server) usageMetrics(w http.ResponseWriter, r *http.Request) {
	var m gitlab.UsageMetrics
	if err := decodeStrict(r.Body, &m); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	s.mu.Lock()
	s.metrics = append(s.metrics, m)
	s.mu.Unlock()
	if rep, ok := s.backend.(gitlab.UsageReporter); ok {
		if err := rep.SendUsageMetrics(r.Context(), m); err != nil {
			answer(w, nil, err)
			return
		}
	}
	w.WriteHeader(http.StatusNoContent)
}

// answer writes a backend's result as GitLab would.
func answer(w http.ResponseWriter, v any, err error) {
	if err == nil {
		writeJSON(w, http.StatusOK, v)
		return
	}
	var ge *gitlab.Error
	switch {
	case errors.Is(err, gitlab.ErrInsufficientScope):
		// Rails' API guard (Rack::OAuth2's insufficient_scope).
		writeJSON(w, http.StatusForbidden, map[string]string{
			"error":             "insufficient_scope",
			"error_description": "The request requires higher privileges than provided by the access token.",
			"scope":             "k8s_proxy",
		})
	case errors.Is(err, gitlab.ErrUnauthorized):
		writeError(w, http.StatusUnauthorized, "")
	case errors.Is(err, gitlab.ErrForbidden):
		writeError(w, http.StatusForbidden, "")
	case errors.Is(err, gitlab.ErrNotFound):
		writeError(w, http.StatusNotFound, "")
	case errors.As(err, &ge) && ge.StatusCode != 0:
		writeError(w, ge.StatusCode, ge.Message)
	case errors.Is(err, context.Canceled):
		// The client went away; nobody reads the answer.
	default:
		writeError(w, http.StatusInternalServerError, err.Error())
	}
}

// writeError answers {"message": "<status> <text>"} like Grape, or with msg.
func writeError(w http.ResponseWriter, status int, msg string) {
	if msg == "" {
		msg = fmt.Sprintf("%d %s", status, http.StatusText(status))
	}
	writeJSON(w, status, map[string]string{"message": msg})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v) // the client may have gone; nothing to do
}

func decodeStrict(r io.Reader, v any) error {
	dec := json.NewDecoder(r)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("invalid JSON body: %w", err)
	}
	return nil
}
