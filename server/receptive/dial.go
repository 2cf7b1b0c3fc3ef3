package receptive

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"
	"time"

	"github.com/gorilla/websocket"

	"github.com/kasproject/kas/protocol"
	"github.com/kasproject/kas/server/gitlab"
)

// Causes of a failed dial: the label of kas_receptive_dials_total and the
// key of "log once per cause".
const (
	causeUnreachable = "unreachable"
	causeTLSName     = "tls_name"
	causeUnknownCA   = "unknown_ca"
	causeTLS         = "tls"
	causeRefused     = "refused"
	causeProtocol    = "protocol"
	causeIdentity    = "identity"
	causeOther       = "other"
)

// dialError is a failed attempt to connect to a receptive agent: why, and
// what the operator can do about it.
type dialError struct {
	cause string
	err   error
	hint  string
}

func (e *dialError) Error() string { return e.err.Error() }
func (e *dialError) Unwrap() error { return e.err }

// handshake is a connection kas made to an agent, authenticated both ways.
type handshake struct {
	ws *websocket.Conn
	// answer is agentk's answer to the upgrade: its description headers
	// and, perhaps, its agent token.
	answer http.Header
}

// dial opens the WebSocket to the agent, checking its certificate against
// the agent's CA and TLS name and authenticating kas with the JWT and/or
// client certificate.
func (m *Manager) dial(ctx context.Context, s *spec) (*handshake, error) {
	d := websocket.Dialer{
		NetDialContext:   (&net.Dialer{Timeout: m.dialTimeout, KeepAlive: 30 * time.Second}).DialContext,
		Proxy:            http.ProxyFromEnvironment,
		TLSClientConfig:  s.tls,
		HandshakeTimeout: m.dialTimeout,
		// As the endpoint's upgrader: large writes borrow a pooled buffer
		// only while writing, so an idle tunnel holds none.
		WriteBufferPool: &m.writeBuffers,
		WriteBufferSize: 64 << 10,
		Subprotocols:    []string{protocol.Subprotocol},
	}
	header := http.Header{}
	header.Set("User-Agent", m.userAgent)
	if s.jwtKey != nil {
		token, err := protocol.SignReceptiveJWT(s.jwtKey, s.id)
		if err != nil {
			return nil, &dialError{cause: causeOther, err: err}
		}
		header.Set("Authorization", "Bearer "+token)
	}
	ws, resp, err := d.DialContext(ctx, s.url.String(), header)
	if err != nil {
		return nil, classify(s, resp, err)
	}
	if got := ws.Subprotocol(); got != protocol.Subprotocol {
		_ = ws.Close()
		return nil, &dialError{cause: causeProtocol,
			err:  fmt.Errorf("agentk at %s accepted the WebSocket but not the %s protocol (it chose %q)", s.rawURL, protocol.Subprotocol, got),
			hint: "run an agentk that matches kas's version"}
	}
	return &handshake{ws: ws, answer: resp.Header}, nil
}

// classify explains a failed dial with a hint for its cause.
func classify(s *spec, resp *http.Response, err error) *dialError {
	if resp != nil {
		reason := answerReason(resp)
		switch resp.StatusCode {
		case http.StatusUnauthorized, http.StatusForbidden:
			hint := "check that agentk's --receptive-jwt-public-key-file holds the public key of the agent's URL configuration and that its --receptive-agent-id is " +
				protocol.ReceptiveJWTAudience(s.id)
			if s.jwtKey == nil {
				hint = "check that agentk's --receptive-client-ca-file holds the CA that issued kas's client certificate for this agent"
			}
			return &dialError{cause: causeRefused, err: fmt.Errorf("agentk at %s refused kas (HTTP %d): %s", s.rawURL, resp.StatusCode, reason), hint: hint}
		default:
			return &dialError{cause: causeProtocol,
				err:  fmt.Errorf("agentk at %s answered HTTP %d instead of switching to the tunnel: %s", s.rawURL, resp.StatusCode, reason),
				hint: "is the URL agentk's receptive listener (--receptive-listen-address), and is it the project's agentk? GitLab's own agentk speaks gRPC there, which kas does not dial"}
		}
	}
	var hostErr x509.HostnameError
	var unknownCA x509.UnknownAuthorityError
	var invalid x509.CertificateInvalidError
	var recordErr tls.RecordHeaderError
	var alert tls.AlertError
	var dnsErr *net.DNSError
	var opErr *net.OpError
	switch {
	case errors.As(err, &hostErr):
		name := s.tls.ServerName
		return &dialError{cause: causeTLSName, err: fmt.Errorf("agentk's certificate at %s is not valid for %q: %w", s.rawURL, name, err),
			hint: fmt.Sprintf("set the agent's TLS host (GitLab: tls_host; standalone: tls_host) to a name its certificate holds, or issue agentk's --receptive-cert-file for %q", name)}
	case errors.As(err, &unknownCA):
		return &dialError{cause: causeUnknownCA, err: fmt.Errorf("agentk's certificate at %s is signed by an unknown authority: %w", s.rawURL, err),
			hint: "put the CA that issued agentk's --receptive-cert-file in the agent's CA certificate (GitLab: ca_cert; standalone: ca_certificate_file); without one kas trusts the system pool and SSL_CERT_DIR"}
	case errors.As(err, &invalid):
		return &dialError{cause: causeTLS, err: fmt.Errorf("agentk's certificate at %s is not valid: %w", s.rawURL, err),
			hint: "renew agentk's --receptive-cert-file"}
	case errors.As(err, &recordErr):
		return &dialError{cause: causeTLS, err: fmt.Errorf("agentk at %s does not speak TLS: %w", s.rawURL, err),
			hint: "use a grpc:// or ws:// URL for an agentk started with --receptive-allow-plaintext, or give agentk --receptive-cert-file and --receptive-key-file"}
	case errors.As(err, &alert):
		return &dialError{cause: causeTLS, err: fmt.Errorf("agentk at %s ended the TLS handshake: %w", s.rawURL, err),
			hint: "agentk's logs say why; with mTLS, check that kas's client certificate is valid"}
	case errors.Is(err, websocket.ErrBadHandshake), strings.Contains(err.Error(), "malformed HTTP"):
		return &dialError{cause: causeProtocol, err: fmt.Errorf("the server at %s is not an agentk accepting kas: %w", s.rawURL, err),
			hint: "is the URL agentk's receptive listener (--receptive-listen-address)? GitLab's own agentk speaks gRPC there, which kas does not dial"}
	case errors.As(err, &dnsErr), errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ENETUNREACH),
		errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ECONNRESET), errors.Is(err, context.DeadlineExceeded),
		errors.As(err, &opErr):
		return &dialError{cause: causeUnreachable, err: fmt.Errorf("kas cannot reach agentk at %s: %w", s.rawURL, err),
			hint: "check the agent's URL, that agentk runs with --receptive-listen-address on that port, and that the network lets kas connect to the cluster"}
	default:
		return &dialError{cause: causeOther, err: fmt.Errorf("connect to agentk at %s: %w", s.rawURL, err)}
	}
}

// answerReason is agentk's plain-text reason for refusing, cut to one log line.
func answerReason(resp *http.Response) string {
	const maxReason = 512
	body, _ := io.ReadAll(io.LimitReader(resp.Body, maxReason))
	return strings.TrimSpace(strings.ToValidUTF8(string(body), "?"))
}

// identify learns who the connected agent is. The configured ID is its
// identity; the rest (project, name, configuration project) comes from
// GitLab: by the agent token agentk handed over (which must be the same
// agent's), or, in standalone mode, by ID. Without either, kas knows the
// ID only, and says once what that costs.
func (m *Manager) identify(ctx context.Context, s *spec, answer http.Header) (*gitlab.AgentInfo, error) {
	ctx, cancel := context.WithTimeout(ctx, m.dialTimeout)
	defer cancel()
	if token := answer.Get(protocol.HeaderAgentToken); token != "" {
		info, err := m.api.GetAgentInfo(ctx, token)
		if err != nil {
			if gitlab.Cacheable(err) {
				return nil, &dialError{cause: causeIdentity, err: fmt.Errorf("the agent token agentk at %s handed over is not valid: %w", s.rawURL, err),
					hint: "give agentk the agent's current token (--token-file), or none"}
			}
			return nil, &dialError{cause: causeIdentity, err: fmt.Errorf("identify agent %d: %w", s.id, err)}
		}
		if info.AgentID != s.id {
			return nil, &dialError{cause: causeIdentity,
				err:  fmt.Errorf("agentk at %s holds the token of agent %d, but that URL is configured for agent %d", s.rawURL, info.AgentID, s.id),
				hint: "the URL configuration and the agentk listening there belong to different agents: fix the URL, or give agentk its own agent's token"}
		}
		return info, nil
	}
	if m.agentByID != nil {
		info, err := m.agentByID(ctx, s.id)
		if err != nil {
			return nil, &dialError{cause: causeIdentity, err: fmt.Errorf("identify agent %d: %w", s.id, err)}
		}
		return info, nil
	}
	m.warnNoToken(s)
	return &gitlab.AgentInfo{AgentID: s.id}, nil
}

// warnNoToken says, once per agent, that kas cannot know the project of an
// agent whose agentk has no token: GitLab's list of receptive agents names
// only the agent.
func (m *Manager) warnNoToken(s *spec) {
	if _, warned := m.warnedNoToken.LoadOrStore(s.id, true); warned {
		return
	}
	m.log.Warn("Receptive agent connected without its agent token: kas knows its ID but not its project, so it cannot fetch its configuration (config.yaml) and GitLab lists it without a project; give agentk its agent token (--token-file) as GitLab's Helm chart does",
		"agent_id", s.id, "url", s.rawURL)
}
