package agent

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/gorilla/websocket"

	"github.com/kasproject/kas/protocol"
)

// ReceptiveOptions configure receptive mode: kas dials the agent. kas must
// authenticate itself with a JWT (JWTPublicKey), an mTLS client certificate
// (ClientCAs), or either when both are set.
type ReceptiveOptions struct {
	// Listener accepts kas's connections; Run serves it until its context
	// ends, then closes it. For TLS, wrap it with tls.NewListener (see
	// ServerTLS); a plain listener is for TLS terminated in front of agentk
	// (a service mesh) and for tests.
	Listener net.Listener
	// JWTPublicKey, if set, accepts kas's JWT (Authorization: Bearer)
	// signed with the matching Ed25519 private key for audience AgentID.
	JWTPublicKey ed25519.PublicKey
	// AgentID is this agent's GitLab ID, the audience kas's JWT must name;
	// required with JWTPublicKey.
	AgentID int64
	// ClientCAs, if set, accepts kas's client certificate when it chains to
	// one of them; the listener must do TLS with ServerTLS(…, true).
	ClientCAs *x509.CertPool
}

// check reports what is missing from o.
func (o *ReceptiveOptions) check() error {
	var errs []error
	if o.Listener == nil {
		errs = append(errs, errors.New("receptive mode needs a listener"))
	}
	if o.JWTPublicKey == nil && o.ClientCAs == nil {
		errs = append(errs, errors.New("receptive mode needs a way to authenticate kas: a JWT public key, a client CA, or both"))
	}
	if o.JWTPublicKey != nil && len(o.JWTPublicKey) != ed25519.PublicKeySize {
		errs = append(errs, fmt.Errorf("receptive JWT public key has %d bytes, an Ed25519 key has %d", len(o.JWTPublicKey), ed25519.PublicKeySize))
	}
	if o.JWTPublicKey != nil && o.AgentID <= 0 {
		errs = append(errs, errors.New("receptive JWT authentication needs the agent's ID (the JWT's audience): pass --receptive-agent-id"))
	}
	return errors.Join(errs...)
}

// ServerTLS is the TLS configuration of a receptive listener serving cert.
// With requestClientCert, kas may present a client certificate, which the
// agent checks against ReceptiveOptions.ClientCAs itself (so a refusal is
// logged with its reason rather than ending in a bare TLS alert). The
// WebSocket upgrade is HTTP/1.1, so only http/1.1 is offered.
func ServerTLS(cert tls.Certificate, requestClientCert bool) *tls.Config {
	c := &tls.Config{
		Certificates: []tls.Certificate{cert},
		MinVersion:   tls.VersionTLS12,
		NextProtos:   []string{"http/1.1"},
	}
	if requestClientCert {
		c.ClientAuth = tls.RequestClientCert
	}
	return c
}

// receptiveReadHeaderTimeout bounds kas's upgrade request.
const receptiveReadHeaderTimeout = 10 * time.Second

// serveReceptive accepts kas's connections until ctx is cancelled; each
// authenticated one becomes a tunnel served like the dialled one.
func (a *Agent) serveReceptive(ctx context.Context, header http.Header) {
	answer := header.Clone()
	answer.Del("Authorization")
	if a.token != "" {
		answer.Set(protocol.HeaderAgentToken, a.token)
	}
	h := &receptiveHandler{a: a, ctx: ctx, answer: answer}
	h.upgrader = websocket.Upgrader{
		Subprotocols:    []string{protocol.Subprotocol},
		ReadBufferSize:  wsReadBufferSize,
		WriteBufferSize: wsWriteBufferSize,
		// kas is no browser; it authenticates with its JWT or certificate.
		CheckOrigin: func(*http.Request) bool { return true },
		Error:       h.upgradeFailed,
	}
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: receptiveReadHeaderTimeout,
		ErrorLog:          slog.NewLogLogger(a.logger.Handler(), slog.LevelWarn),
		BaseContext:       func(net.Listener) context.Context { return context.WithoutCancel(ctx) },
	}
	served := make(chan error, 1)
	a.receptiveServing.Store(true)
	go func() { served <- srv.Serve(a.receptive.Listener) }()
	a.logger.Info("accepting kas's connections (receptive mode)", "address", a.receptive.Listener.Addr().String(),
		"jwt", a.receptive.JWTPublicKey != nil, "mtls", a.receptive.ClientCAs != nil)

	select {
	case <-ctx.Done():
	case err := <-served:
		// The listener failed; the dialled tunnel, if any, carries on.
		a.logger.Error("receptive listener failed; kas can no longer connect to this agent", "address", a.receptive.Listener.Addr().String(), "error", err.Error())
	}
	// Close stops accepting; the tunnels, hijacked from the server, shut
	// down gracefully on their own as ctx is cancelled.
	a.receptiveServing.Store(false)
	_ = srv.Close()
	h.tunnels.closeAndWait()
}

// receptiveHandler authenticates kas's upgrade requests and serves each
// accepted connection as a tunnel.
type receptiveHandler struct {
	a        *Agent
	ctx      context.Context // Run's: cancelling it shuts the tunnels down
	answer   http.Header     // the description headers, and the token if any
	upgrader websocket.Upgrader
	tunnels  handlerTracker // the connections being served as tunnels
}

func (h *receptiveHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	log := h.a.logger.With("remote", r.RemoteAddr)
	if !websocket.IsWebSocketUpgrade(r) {
		refuseKAS(w, http.StatusBadRequest, "this is agentk's receptive endpoint: kas connects here with a WebSocket upgrade")
		return
	}
	how, err := h.authenticate(r)
	if err != nil {
		h.a.metrics.receptiveRefused.Inc()
		log.Warn("refused a connection that did not authenticate as kas", "reason", err.Error())
		refuseKAS(w, http.StatusUnauthorized, "agentk refused the connection: "+err.Error())
		return
	}
	if !subprotocolOffered(r) {
		refuseKAS(w, http.StatusBadRequest, fmt.Sprintf("unsupported tunnel protocol %q: this agentk speaks %s", r.Header.Get("Sec-WebSocket-Protocol"), protocol.Subprotocol))
		return
	}
	if !h.tunnels.add() {
		refuseKAS(w, http.StatusServiceUnavailable, "agentk is shutting down")
		return
	}
	defer h.tunnels.done()
	ws, err := h.upgrader.Upgrade(w, r, h.answer)
	if err != nil {
		return // upgradeFailed answered and logged it
	}
	h.a.metrics.receptiveAccepted.Inc()
	log.Info("kas connected (receptive mode)", "authenticated_by", how)
	start := time.Now()
	err = h.a.serveTunnel(h.ctx, ws)
	attrs := []any{"duration", time.Since(start).Round(time.Millisecond).String()}
	if err != nil {
		attrs = append(attrs, "error", err.Error())
	}
	log.Info("kas's connection closed", attrs...)
}

// authenticate accepts r if kas presented a valid JWT or client
// certificate, and says which; otherwise it says why not.
func (h *receptiveHandler) authenticate(r *http.Request) (string, error) {
	o := h.a.receptive
	var reasons []string
	if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
		if o.ClientCAs == nil {
			reasons = append(reasons, "kas presented a client certificate but this agentk has no --receptive-client-ca-file")
		} else if err := verifyClientCertificate(r.TLS.PeerCertificates, o.ClientCAs); err != nil {
			reasons = append(reasons, "client certificate: "+err.Error())
		} else {
			return "client certificate", nil
		}
	}
	if token, ok := bearer(r.Header.Get("Authorization")); ok {
		if o.JWTPublicKey == nil {
			reasons = append(reasons, "kas sent a JWT but this agentk has no --receptive-jwt-public-key-file")
		} else if err := protocol.VerifyReceptiveJWT(o.JWTPublicKey, token, o.AgentID); err != nil {
			reasons = append(reasons, err.Error())
		} else {
			return "JWT", nil
		}
	}
	if len(reasons) == 0 {
		var want []string
		if o.JWTPublicKey != nil {
			want = append(want, "a JWT (Authorization: Bearer)")
		}
		if o.ClientCAs != nil {
			want = append(want, "a client certificate")
		}
		return "", fmt.Errorf("no credentials: kas must present %s", strings.Join(want, " or "))
	}
	return "", errors.New(strings.Join(reasons, "; "))
}

// verifyClientCertificate checks kas's certificate chain against the
// client CAs, for client authentication.
func verifyClientCertificate(chain []*x509.Certificate, roots *x509.CertPool) error {
	intermediates := x509.NewCertPool()
	for _, c := range chain[1:] {
		intermediates.AddCert(c)
	}
	_, err := chain[0].Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: intermediates,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	var unknown x509.UnknownAuthorityError
	if errors.As(err, &unknown) {
		return fmt.Errorf("signed by %q, which --receptive-client-ca-file does not hold", chain[0].Issuer.String())
	}
	return err
}

// bearer extracts the token of an "Authorization: Bearer <token>" header.
func bearer(v string) (string, bool) {
	scheme, token, ok := strings.Cut(v, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	token = strings.TrimSpace(token)
	return token, token != ""
}

func subprotocolOffered(r *http.Request) bool {
	for _, p := range websocket.Subprotocols(r) {
		if p == protocol.Subprotocol {
			return true
		}
	}
	return false
}

// upgradeFailed answers an upgrade the WebSocket library refused.
func (h *receptiveHandler) upgradeFailed(w http.ResponseWriter, r *http.Request, status int, reason error) {
	h.a.logger.Warn("kas's WebSocket upgrade failed", "remote", r.RemoteAddr, "status", status, "error", reason.Error())
	refuseKAS(w, status, "agentk: "+reason.Error())
}

// refuseKAS answers kas with a plain-text reason, which kas logs.
func refuseKAS(w http.ResponseWriter, status int, reason string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(status)
	_, _ = fmt.Fprintln(w, reason)
}
