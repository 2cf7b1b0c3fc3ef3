package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/gorilla/websocket"

	"github.com/kasproject/kas/internal/backoff"
	"github.com/kasproject/kas/protocol"
)

const (
	// The tunnel carries every byte between kas and the cluster, so the
	// WebSocket buffers are sized for whole HTTP/2 frames (kas reads frames
	// of up to 1 MiB): one frame becomes one WebSocket frame and one write.
	wsReadBufferSize  = 256 << 10
	wsWriteBufferSize = 1<<20 + 64<<10

	handshakeTimeout = 30 * time.Second

	// stableConnection is how long a tunnel must have stayed up for the next
	// reconnect to start again from the minimum delay. Shorter-lived tunnels
	// keep growing the delay so a kas that accepts and then drops agents is
	// not hammered.
	stableConnection = 10 * time.Second
)

// kasEndpoint checks kas's address and appends protocol.AgentPath when it has
// no path.
func kasEndpoint(address string) (string, error) {
	if address == "" {
		return "", errors.New("kas address is empty: pass e.g. wss://gitlab.example.com/-/kubernetes-agent/")
	}
	u, err := url.Parse(address)
	if err != nil {
		return "", fmt.Errorf("kas address %q is not a URL: %w", address, err)
	}
	if u.Scheme != "ws" && u.Scheme != "wss" {
		return "", fmt.Errorf("kas address %q must start with ws:// or wss://", address)
	}
	if u.Host == "" {
		return "", fmt.Errorf("kas address %q has no host", address)
	}
	if u.User != nil {
		return "", fmt.Errorf("kas address must not carry credentials; the agent token authenticates the agent")
	}
	if u.Path == "" || u.Path == "/" {
		u.Path = protocol.AgentPath
	}
	return u.String(), nil
}

// handshakeHeader is what the agent sends kas with every connection attempt.
func handshakeHeader(opts Options) http.Header {
	h := http.Header{}
	h.Set("Authorization", "Bearer "+opts.Token)
	for name, value := range map[string]string{
		protocol.HeaderAgentVersion: opts.AgentVersion,
		protocol.HeaderAgentCommit:  opts.AgentCommit,
		protocol.HeaderPodName:      opts.PodName,
		protocol.HeaderPodNamespace: opts.PodNamespace,
	} {
		if value != "" {
			h.Set(name, value)
		}
	}
	return h
}

func newDialer(tlsConfig *tls.Config) *websocket.Dialer {
	if tlsConfig != nil {
		tlsConfig = tlsConfig.Clone()
	} else {
		tlsConfig = &tls.Config{}
	}
	// A WebSocket upgrade is HTTP/1.1; kas's listener also offers h2.
	tlsConfig.NextProtos = []string{"http/1.1"}
	return &websocket.Dialer{
		Proxy:             http.ProxyFromEnvironment,
		TLSClientConfig:   tlsConfig,
		HandshakeTimeout:  handshakeTimeout,
		ReadBufferSize:    wsReadBufferSize,
		WriteBufferSize:   wsWriteBufferSize,
		Subprotocols:      []string{protocol.Subprotocol},
		EnableCompression: false, // HTTP/2 payloads are mostly compressed or small; deflate would cap throughput.
	}
}

// connectAndServe makes one connection attempt and, when it succeeds, serves
// the tunnel until it ends. It returns how long to wait before the next one.
func (a *Agent) connectAndServe(ctx context.Context, header http.Header, b *backoff.Backoff) time.Duration {
	a.metrics.attempts.Inc()
	ws, resp, err := a.dialer.DialContext(ctx, a.kasURL, header)
	if err != nil {
		if ctx.Err() != nil {
			return 0
		}
		return a.handshakeFailed(resp, err, b)
	}
	if got := ws.Subprotocol(); got != protocol.Subprotocol {
		_ = ws.Close()
		a.metrics.failures.WithLabelValues(failureProtocol).Inc()
		a.logger.Error("kas did not accept the tunnel protocol; run an agentk that matches kas's version",
			"kas_url", a.kasURL, "offered", protocol.Subprotocol, "accepted", got)
		return b.Next()
	}

	a.logger.Info("connected to kas", "kas_url", a.kasURL)
	start := time.Now()
	err = a.serveTunnel(ctx, ws)
	lived := time.Since(start)
	if lived >= stableConnection {
		b.Reset()
	}
	attrs := []any{"kas_url", a.kasURL, "duration", lived.Round(time.Millisecond).String()}
	if err != nil {
		attrs = append(attrs, "error", err.Error())
	}
	a.logger.Info("tunnel to kas closed", attrs...)
	return b.Next()
}

// handshakeFailed logs why kas could not be reached or refused the agent and
// picks the delay: a rejected token waits the longest, since retrying sooner
// cannot help until someone fixes it.
func (a *Agent) handshakeFailed(resp *http.Response, err error, b *backoff.Backoff) time.Duration {
	if resp == nil {
		a.metrics.failures.WithLabelValues(failureDial).Inc()
		attrs := []any{"kas_url", a.kasURL, "error", err.Error()}
		var unknownCA x509.UnknownAuthorityError
		if errors.As(err, &unknownCA) {
			attrs = append(attrs, "hint", "kas's certificate is signed by an unknown authority: pass its CA with --ca-cert-file")
		}
		a.logger.Warn("connect to kas failed", attrs...)
		return b.Next()
	}
	reason := responseReason(resp)
	switch resp.StatusCode {
	case http.StatusUnauthorized, http.StatusForbidden:
		a.metrics.failures.WithLabelValues(failureUnauthorized).Inc()
		a.logger.Error("kas rejected the agent token: check that the token file holds the agent's current token from GitLab",
			"kas_url", a.kasURL, "status", resp.StatusCode, "reason", reason)
		return b.Longest()
	default:
		a.metrics.failures.WithLabelValues(failureRefused).Inc()
		a.logger.Warn("kas refused the tunnel handshake",
			"kas_url", a.kasURL, "status", resp.StatusCode, "reason", reason)
		return b.Next()
	}
}

// responseReason is kas's plain-text reason for refusing the handshake,
// trimmed to something fit for one log line.
func responseReason(resp *http.Response) string {
	const maxReason = 512
	body, _ := io.ReadAll(io.LimitReader(resp.Body, maxReason)) // gorilla keeps at most 1 KiB of it in memory
	return strings.TrimSpace(strings.ToValidUTF8(string(body), "?"))
}

// Labels of the connection failures counter.
const (
	failureDial         = "dial"
	failureUnauthorized = "unauthorized"
	failureRefused      = "refused"
	failureProtocol     = "protocol"
)
