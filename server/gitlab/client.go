package gitlab

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sync/singleflight"

	"github.com/kasproject/kas/server/correlation"
	"github.com/kasproject/kas/server/kasjwt"
	"github.com/kasproject/kas/tlsutil"
)

// Defaults of ClientOptions.
const (
	DefaultTimeout              = 10 * time.Second
	DefaultAgentInfoTTL         = 300 * time.Second
	DefaultAgentInfoErrorTTL    = 60 * time.Second
	DefaultAllowedAgentTTL      = 60 * time.Second
	DefaultAllowedAgentErrorTTL = 10 * time.Second
	DefaultCacheSize            = 10000
)

const (
	// jwtLifetime is short: the token only has to survive one call, and
	// GitLab Rails allows a minute of clock skew on its own.
	jwtLifetime = time.Minute
	// maxAnswerSize bounds what kas reads from GitLab; allowed_agents is the
	// largest answer and stays far below it.
	maxAnswerSize = 16 << 20
	// maxMessageSize bounds a GitLab error message kept in an Error.
	maxMessageSize = 512
)

// ClientOptions configure NewClient. Zero values take the defaults.
type ClientOptions struct {
	// BaseURL is gitlab.address, e.g. https://gitlab.example.com, or with a
	// relative URL root https://example.com/gitlab.
	BaseURL string
	// Secret is the decoded API secret (gitlab_kas['api_secret_key']),
	// exactly 32 bytes.
	Secret []byte
	// TLS is the client TLS configuration for https addresses; nil uses
	// Go's defaults (the system pool). See tlsutil.ClientConfig.
	TLS *tls.Config
	// Timeout bounds each call to GitLab, answer body included
	// (DefaultTimeout).
	Timeout time.Duration
	// Version is kas's version, sent as User-Agent kas/<Version>.
	Version string

	// How long answers are cached. A negative TTL turns that cache off.
	// AgentInfoTTL/AgentInfoErrorTTL are for GetAgentInfo (agent tokens
	// change rarely); AllowedAgentTTL/AllowedAgentErrorTTL for
	// AuthorizeProxyUser and GetAllowedAgentsForJob (user and job rights
	// change more often). The Error TTLs apply to 401, 403 and 404.
	AgentInfoTTL         time.Duration
	AgentInfoErrorTTL    time.Duration
	AllowedAgentTTL      time.Duration
	AllowedAgentErrorTTL time.Duration
	// CacheSize caps the entries of each cache (DefaultCacheSize).
	CacheSize int

	// RepositoryTokenFile is gitlab.repository_token_file: a file holding
	// a token with read_repository access to agents' configuration
	// projects, sent as PRIVATE-TOKEN to the repository files API. It is
	// read on every fetch, so a rotated token takes effect without a
	// restart. Empty means no token (public projects only).
	RepositoryTokenFile string

	// Logger receives transport failures (with hints) and the agent_info
	// path fallback; nil discards them.
	Logger *slog.Logger
	// Now is the clock for cache expiry (time.Now); tests set it.
	Now func() time.Time
}

// Client calls GitLab Rails' internal API. It implements API,
// ConfigurationReporter and UsageReporter, and is safe for concurrent use.
//
// Identical concurrent questions are asked once: callers wait for the shared
// call, each until its own context ends, while the call itself runs under
// the client's Timeout so one impatient caller cannot fail the others.
type Client struct {
	base      *url.URL
	secret    []byte
	http      *http.Client
	timeout   time.Duration
	userAgent string
	log       *slog.Logger
	// unknownCA logs an untrusted GitLab certificate once per cause instead
	// of on every failing call.
	unknownCA *tlsutil.UnknownAuthorityLogger
	tokenFile string // gitlab.repository_token_file, "" for none

	agentInfoPath atomic.Int32 // which agent_info path GitLab serves: agentInfoPath*
	flight        singleflight.Group

	agentInfo     *cache
	proxyUser     *cache
	allowedAgents *cache

	health health // how GitLab has been answering, for the status page
}

var (
	_ API                   = (*Client)(nil)
	_ ConfigurationReporter = (*Client)(nil)
	_ UsageReporter         = (*Client)(nil)
)

const (
	agentInfoPathUnknown int32 = iota
	agentInfoPathCurrent
	agentInfoPathLegacy
)

// NewClient checks opts and returns a client for the GitLab at opts.BaseURL.
func NewClient(opts ClientOptions) (*Client, error) {
	base, err := url.Parse(opts.BaseURL)
	if err != nil {
		// Only the reason: the raw address may hold a password.
		return nil, fmt.Errorf("gitlab.address: %w", errors.Unwrap(err))
	}
	if (base.Scheme != "http" && base.Scheme != "https") || base.Host == "" {
		return nil, fmt.Errorf("gitlab.address %q: want http://host[:port] or https://host[:port]", base.Redacted())
	}
	if base.User != nil || base.RawQuery != "" || base.Fragment != "" {
		return nil, fmt.Errorf("gitlab.address %q: must not hold credentials, a query or a fragment", base.Redacted())
	}
	if len(opts.Secret) != 32 {
		return nil, fmt.Errorf("GitLab API secret: want 32 bytes, got %d", len(opts.Secret))
	}
	if opts.Timeout < 0 {
		return nil, fmt.Errorf("GitLab client timeout: must not be negative, got %s", opts.Timeout)
	}
	if opts.CacheSize < 0 {
		return nil, fmt.Errorf("GitLab cache size: must not be negative, got %d", opts.CacheSize)
	}
	timeout := orDefault(opts.Timeout, DefaultTimeout)
	size := opts.CacheSize
	if size == 0 {
		size = DefaultCacheSize
	}
	now := opts.Now
	if now == nil {
		now = time.Now
	}
	logger := opts.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	userAgent := "kas"
	if opts.Version != "" {
		userAgent += "/" + opts.Version
	}
	transport := http.DefaultTransport.(*http.Transport).Clone()
	if opts.TLS != nil {
		transport.TLSClientConfig = opts.TLS.Clone()
	}
	return &Client{
		base:          base,
		secret:        bytes.Clone(opts.Secret),
		http:          &http.Client{Transport: transport, Timeout: timeout},
		timeout:       timeout,
		userAgent:     userAgent,
		tokenFile:     opts.RepositoryTokenFile,
		log:           logger,
		unknownCA:     tlsutil.NewUnknownAuthorityLogger(logger, "gitlab.ca_certificate_file"),
		agentInfo:     newCache(orDefault(opts.AgentInfoTTL, DefaultAgentInfoTTL), orDefault(opts.AgentInfoErrorTTL, DefaultAgentInfoErrorTTL), size, now),
		proxyUser:     newCache(orDefault(opts.AllowedAgentTTL, DefaultAllowedAgentTTL), orDefault(opts.AllowedAgentErrorTTL, DefaultAllowedAgentErrorTTL), size, now),
		allowedAgents: newCache(orDefault(opts.AllowedAgentTTL, DefaultAllowedAgentTTL), orDefault(opts.AllowedAgentErrorTTL, DefaultAllowedAgentErrorTTL), size, now),
	}, nil
}

func orDefault(d, def time.Duration) time.Duration {
	if d == 0 {
		return def
	}
	return d
}

// CloseIdleConnections closes the client's idle keep-alive connections to
// GitLab, e.g. at shutdown.
func (c *Client) CloseIdleConnections() {
	c.http.CloseIdleConnections()
}

// GetAgentInfo implements API. It asks PathAgentInfo and, if this GitLab
// answers 404 there before ever answering otherwise, PathAgentInfoLegacy;
// it then sticks to the path that worked.
func (c *Client) GetAgentInfo(ctx context.Context, agentToken string) (*AgentInfo, error) {
	const op = "get agent info"
	var info AgentInfo
	err := c.cached(ctx, op, c.agentInfo, cacheKey("agent_info", agentToken), &info, func(ctx context.Context) ([]byte, error) {
		return c.fetchAgentInfo(ctx, op, agentToken)
	})
	if err != nil {
		return nil, err
	}
	return &info, nil
}

func (c *Client) fetchAgentInfo(ctx context.Context, op, agentToken string) ([]byte, error) {
	bearer := func(h http.Header) { h.Set("Authorization", "Bearer "+agentToken) }
	known := c.agentInfoPath.Load()
	if known == agentInfoPathLegacy {
		return c.call(ctx, op, http.MethodGet, PathAgentInfoLegacy, bearer, nil, &AgentInfo{})
	}
	body, err := c.call(ctx, op, http.MethodGet, PathAgentInfo, bearer, nil, &AgentInfo{})
	if known == agentInfoPathCurrent || statusOf(err) != http.StatusNotFound {
		if routeAnswered(err) {
			c.agentInfoPath.CompareAndSwap(agentInfoPathUnknown, agentInfoPathCurrent)
		}
		return body, err
	}
	legacyBody, legacyErr := c.call(ctx, op, http.MethodGet, PathAgentInfoLegacy, bearer, nil, &AgentInfo{})
	if !routeAnswered(legacyErr) {
		// Both 404 (the agent is gone, not the route) or the legacy call
		// failed: nothing learnt, report the current path's answer.
		return body, err
	}
	if c.agentInfoPath.CompareAndSwap(agentInfoPathUnknown, agentInfoPathLegacy) {
		c.log.InfoContext(ctx, "GitLab has no agentk agent_info endpoint, using the older one",
			"path", PathAgentInfoLegacy, "correlation_id", correlation.FromContext(ctx))
	}
	return legacyBody, legacyErr
}

// routeAnswered reports whether a call's outcome shows that GitLab serves
// the path: success or a refusal other than 404.
func routeAnswered(err error) bool {
	switch statusOf(err) {
	case http.StatusOK, http.StatusUnauthorized, http.StatusForbidden:
		return true
	}
	return false
}

// statusOf is the HTTP status behind a call's outcome: 200 for success, the
// Error's StatusCode otherwise (0 for transport failures).
func statusOf(err error) int {
	if err == nil {
		return http.StatusOK
	}
	var e *Error
	if errors.As(err, &e) {
		return e.StatusCode
	}
	return 0
}

// AuthorizeProxyUser implements API.
func (c *Client) AuthorizeProxyUser(ctx context.Context, req AuthorizeProxyUserRequest) (*AuthorizeProxyUserResponse, error) {
	const op = "authorize proxy user"
	key := cacheKey("authorize_proxy_user", strconv.FormatInt(req.AgentID, 10), req.AccessType, req.AccessKey, req.CSRFToken)
	var resp AuthorizeProxyUserResponse
	err := c.cached(ctx, op, c.proxyUser, key, &resp, func(ctx context.Context) ([]byte, error) {
		return c.call(ctx, op, http.MethodPost, PathAuthorizeProxyUser, nil, req, &AuthorizeProxyUserResponse{})
	})
	if err != nil {
		return nil, err
	}
	return &resp, nil
}

// GetAllowedAgentsForJob implements API.
func (c *Client) GetAllowedAgentsForJob(ctx context.Context, jobToken string) (*AllowedAgentsForJob, error) {
	const op = "get allowed agents for job"
	var resp AllowedAgentsForJob
	err := c.cached(ctx, op, c.allowedAgents, cacheKey("allowed_agents", jobToken), &resp, func(ctx context.Context) ([]byte, error) {
		return c.call(ctx, op, http.MethodGet, PathAllowedAgents, func(h http.Header) { h.Set(HeaderJobToken, jobToken) }, nil, &AllowedAgentsForJob{})
	})
	if err != nil {
		return nil, err
	}
	return &resp, nil
}

// PostAgentConfiguration implements ConfigurationReporter: it sends an
// agent's configuration (as JSON) for GitLab to show. Not cached.
func (c *Client) PostAgentConfiguration(ctx context.Context, agentID int64, config json.RawMessage) error {
	_, err := c.call(ctx, "post agent configuration", http.MethodPost, PathAgentConfiguration, nil,
		AgentConfigurationRequest{AgentID: agentID, AgentConfig: config}, nil)
	return err
}

// SendUsageMetrics implements UsageReporter. Not cached.
func (c *Client) SendUsageMetrics(ctx context.Context, m UsageMetrics) error {
	_, err := c.call(ctx, "send usage metrics", http.MethodPost, PathUsageMetrics, nil, m, nil)
	return err
}

// cached answers from cache if it can, else runs fetch once for all
// concurrent callers with the same key, stores the outcome, and decodes the
// body into out.
func (c *Client) cached(ctx context.Context, op string, cache *cache, key string, out any, fetch func(context.Context) ([]byte, error)) error {
	if body, err, ok := cache.get(key); ok {
		if err != nil {
			return err
		}
		return json.Unmarshal(body, out) // decoded once already: cannot fail
	}
	// The shared call keeps ctx's values (the correlation ID) but not its
	// cancellation; c.http's Timeout bounds it instead.
	shared := context.WithoutCancel(ctx)
	ch := c.flight.DoChan(key, func() (any, error) {
		body, err := fetch(shared)
		cache.put(key, body, err)
		return body, err
	})
	select {
	case <-ctx.Done():
		return &Error{Op: op, URL: c.base.Redacted(), Message: "gave up waiting for GitLab: " + ctx.Err().Error(), Err: ctx.Err()}
	case r := <-ch:
		if r.Err != nil {
			return r.Err
		}
		return json.Unmarshal(r.Val.([]byte), out)
	}
}

// call makes one request to GitLab and returns the answer's body. reqBody,
// if not nil, is sent as JSON; a 2xx answer is decoded into check, if not
// nil, to refuse a malformed body before anyone caches it.
func (c *Client) call(ctx context.Context, op, method, path string, setHeader func(http.Header), reqBody, check any) (answer []byte, err error) {
	defer func() { c.health.observe(err) }()
	p, query, _ := strings.Cut(path, "?") // JoinPath would escape the '?'
	target := c.base.JoinPath(p)
	target.RawQuery = query
	u := target.String()
	var body io.Reader
	if reqBody != nil {
		b, err := json.Marshal(reqBody)
		if err != nil {
			return nil, &Error{Op: op, URL: u, Message: "encode request: " + err.Error(), Err: err}
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return nil, &Error{Op: op, URL: u, Message: err.Error(), Err: err}
	}
	token, err := kasjwt.Sign(c.secret, kasjwt.IssuerKAS, kasjwt.AudienceGitLab, jwtLifetime)
	if err != nil {
		return nil, &Error{Op: op, URL: u, Message: err.Error(), Err: err}
	}
	req.Header.Set(HeaderAPIRequest, token)
	req.Header.Set("User-Agent", c.userAgent)
	req.Header.Set("Accept", "application/json")
	if reqBody != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if id := correlation.FromContext(ctx); id != "" {
		req.Header.Set(correlation.Header, id)
	}
	if setHeader != nil {
		setHeader(req.Header)
	}

	resp, err := c.http.Do(req)
	if err != nil {
		return nil, c.transportError(ctx, op, u, err)
	}
	defer resp.Body.Close()
	answer, err = io.ReadAll(io.LimitReader(resp.Body, maxAnswerSize+1))
	if err != nil {
		return nil, c.transportError(ctx, op, u, err)
	}
	if len(answer) > maxAnswerSize {
		return nil, &Error{Op: op, URL: u, StatusCode: resp.StatusCode, Message: fmt.Sprintf("answer larger than %d bytes", maxAnswerSize)}
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return nil, statusError(op, u, resp.StatusCode, answer)
	}
	if check != nil {
		if err := json.Unmarshal(answer, check); err != nil {
			return nil, &Error{Op: op, URL: u, StatusCode: resp.StatusCode, Message: "answer is not the expected JSON: " + err.Error(), Err: err}
		}
	}
	return answer, nil
}

// statusError describes a non-2xx answer with GitLab's own message.
func statusError(op, u string, status int, answer []byte) *Error {
	e := &Error{Op: op, URL: u, StatusCode: status, Message: gitlabMessage(answer)}
	if e.Message == "" {
		e.Message = http.StatusText(status)
	}
	switch status {
	case http.StatusUnauthorized:
		e.Err = ErrUnauthorized
	case http.StatusForbidden:
		e.Err = ErrForbidden
	case http.StatusNotFound:
		e.Err = ErrNotFound
	}
	return e
}

// gitlabMessage extracts GitLab's error text: Grape answers
// {"message": "..."} (sometimes an object of field errors) or
// {"error": "..."}.
func gitlabMessage(answer []byte) string {
	var m struct {
		Message json.RawMessage `json:"message"`
		Error   string          `json:"error"`
	}
	if json.Unmarshal(answer, &m) != nil {
		return ""
	}
	msg := m.Error
	if len(m.Message) > 0 {
		var s string
		if json.Unmarshal(m.Message, &s) == nil {
			msg = s
		} else {
			var compact bytes.Buffer
			if json.Compact(&compact, m.Message) == nil {
				msg = compact.String()
			}
		}
	}
	if len(msg) > maxMessageSize {
		msg = msg[:maxMessageSize] + "…"
	}
	return msg
}

// transportError describes a call that got no answer, with a hint for the
// failures an operator can fix, and logs it.
func (c *Client) transportError(ctx context.Context, op, u string, err error) *Error {
	detail := err.Error()
	var urlErr *url.Error
	if errors.As(err, &urlErr) {
		detail = urlErr.Err.Error() // url.Error repeats method and URL
	}
	var dnsErr *net.DNSError
	var netErr net.Error
	var msg string
	knownCause := false // an untrusted certificate, logged once by unknownCA
	switch {
	case ctx.Err() != nil:
		msg = "gave up: " + ctx.Err().Error()
	case errors.Is(err, syscall.ECONNREFUSED):
		msg = fmt.Sprintf("%s; is gitlab.address (%s) right and is GitLab running?", detail, c.base.Redacted())
	case tlsutil.IsUnknownAuthority(err):
		msg = detail + "; add GitLab's CA certificate to gitlab.ca_certificate_file or to SSL_CERT_DIR"
		knownCause = c.unknownCA.Log(c.base.Host, err)
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &netErr) && netErr.Timeout():
		msg = fmt.Sprintf("no answer within the %s timeout (%s)", c.timeout, detail)
	case errors.As(err, &dnsErr):
		msg = fmt.Sprintf("%s; is gitlab.address (%s) right?", detail, c.base.Redacted())
	default:
		msg = detail
	}
	e := &Error{Op: op, URL: u, Message: msg, Err: err}
	if ctx.Err() == nil && !knownCause {
		c.log.WarnContext(ctx, "GitLab call failed", "error", e.Error(), "correlation_id", correlation.FromContext(ctx))
	}
	return e
}
