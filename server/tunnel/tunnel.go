// Package tunnel is kas's side of the agent tunnel: the /-/kubernetes-agent/
// WebSocket endpoint, the HTTP/2 client connection kas runs over each
// agent's WebSocket to send it requests, and the life every tunnel shares
// whatever agentk is at the other end (Endpoint.Authenticate and
// Endpoint.Serve: token check and rate limit, registration, configuration
// hooks, max connection age, draining). GitLab's own agentk, which offers
// the WebSocket subprotocol ws-tunnel, is handed to server/gitlabagent.
package tunnel

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"

	"github.com/kasproject/kas/protocol"
	"github.com/kasproject/kas/registry"
)

// Tunnel is one agent connection: an HTTP/2 client connection over the
// agent's WebSocket. It implements registry.Tunnel.
type Tunnel struct {
	info   registry.TunnelInfo
	cc     *http2.ClientConn
	conn   *notifyConn
	bodies *protocol.BulkBodies // shared by the endpoint's tunnels
}

// Info describes the connection.
func (t *Tunnel) Info() registry.TunnelInfo { return t.info }

// Done is closed when the underlying connection has closed for any reason
// (agent gone, missed pings, shutdown).
func (t *Tunnel) Done() <-chan struct{} { return t.conn.done }

// Shutdown stops new requests (GOAWAY) and waits for in-flight ones until
// ctx ends, then closes the connection.
func (t *Tunnel) Shutdown(ctx context.Context) error {
	err := t.cc.Shutdown(ctx)
	if err != nil {
		_ = t.cc.Close()
	}
	return err
}

// Close closes the connection at once, failing in-flight requests.
func (t *Tunnel) Close() error { return t.cc.Close() }

// RoundTrip sends req to the agent as one HTTP/2 stream. A request carrying
// an HTTP/1.1 Upgrade (kubectl exec, attach, port-forward) is sent as a
// full-duplex stream marked with protocol.HeaderUpgrade; when the agent
// reports that the API server switched protocols, the response is presented
// as a 101 whose Body is an io.ReadWriteCloser, which is what
// httputil.ReverseProxy needs to splice the caller's connection.
func (t *Tunnel) RoundTrip(req *http.Request) (*http.Response, error) {
	upgrade := upgradeType(req.Header)
	if upgrade != "" {
		return t.roundTripUpgrade(req, upgrade)
	}
	resp, err := t.cc.RoundTrip(req)
	if err != nil {
		return nil, err
	}
	resp.Body = t.bodies.Wrap(resp.Body, resp.ContentLength)
	return resp, nil
}

func (t *Tunnel) roundTripUpgrade(req *http.Request, upgrade string) (*http.Response, error) {
	out := req.Clone(req.Context())
	out.Header.Del("Connection")
	out.Header.Del("Upgrade")
	out.Header.Set(protocol.HeaderUpgrade, upgrade)
	// The request body becomes the caller→cluster byte stream after the switch.
	pr, pw := io.Pipe()
	out.Body = pr
	out.ContentLength = -1
	resp, err := t.cc.RoundTrip(out)
	if err != nil {
		_ = pw.CloseWithError(err)
		return nil, err
	}
	if resp.StatusCode != http.StatusOK || resp.Header.Get(protocol.HeaderUpgradeStatus) != "101" {
		_ = pw.Close()
		return resp, nil
	}
	resp.Header.Del(protocol.HeaderUpgradeStatus)
	resp.Header.Del(protocol.HeaderUpgrade)
	resp.Header.Set("Connection", "Upgrade")
	resp.Header.Set("Upgrade", upgrade)
	resp.StatusCode = http.StatusSwitchingProtocols
	resp.Status = "101 Switching Protocols"
	resp.ContentLength = -1
	resp.Body = &duplexBody{ReadCloser: resp.Body, w: pw}
	return resp, nil
}

// upgradeType returns the requested protocol if h asks for an HTTP/1.1 upgrade.
func upgradeType(h http.Header) string {
	if !httpguts.HeaderValuesContainsToken(h["Connection"], "Upgrade") {
		return ""
	}
	return strings.TrimSpace(h.Get("Upgrade"))
}

// duplexBody joins the response stream (cluster→caller) and the request
// pipe (caller→cluster) of an upgraded stream.
type duplexBody struct {
	io.ReadCloser
	w *io.PipeWriter
}

func (b *duplexBody) Write(p []byte) (int, error) { return b.w.Write(p) }

func (b *duplexBody) Close() error {
	return errors.Join(b.w.Close(), b.ReadCloser.Close())
}

// notifyConn closes done when the connection is closed, so the endpoint
// notices a tunnel that HTTP/2 gave up on (missed PINGs, read errors).
type notifyConn struct {
	net.Conn
	once sync.Once
	done chan struct{}
}

func newNotifyConn(c net.Conn) *notifyConn {
	return &notifyConn{Conn: c, done: make(chan struct{})}
}

func (c *notifyConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { close(c.done) })
	return err
}
