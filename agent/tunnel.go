package agent

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/http2"

	"github.com/kasproject/kas/protocol"
)

// HTTP/2 settings for the tunnel. The tunnel multiplexes every request of
// every user of the cluster and carries bulk transfers (large lists, logs,
// copies), so the limits are far above HTTP/2's defaults.
const (
	maxConcurrentStreams = 1000
	maxReadFrameSize     = 1 << 20
	// Request bodies kas may send ahead of the handler reading them. The
	// connection window caps the memory all streams together can hold.
	streamReceiveWindow     = 8 << 20
	connectionReceiveWindow = 32 << 20
	// A tunnel with no frames for pingAfter is probed with a PING; without an
	// answer within pingTimeout it is closed and the agent reconnects.
	pingAfter   = 30 * time.Second
	pingTimeout = 15 * time.Second
)

// serveTunnel serves HTTP/2 on ws until kas closes it, it fails, or ctx is
// cancelled. On cancellation it sends GOAWAY, lets in-flight requests run for
// the shutdown grace period, then closes the tunnel.
func (a *Agent) serveTunnel(ctx context.Context, ws *websocket.Conn) error {
	conn := &countingConn{Conn: protocol.NewConn(ws), received: a.metrics.bytesReceived, sent: a.metrics.bytesSent}

	// Requests must outlive ctx by the grace period, so their base context
	// is cancelled only once the tunnel is torn down.
	baseCtx, cancelRequests := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelRequests()

	// Both servers belong to this tunnel only: Shutdown on the http.Server is
	// how x/net/http2 is told to send GOAWAY and drain.
	hs := &http.Server{
		Handler:  a,
		ErrorLog: slog.NewLogLogger(a.logger.Handler(), slog.LevelWarn),
	}
	h2 := &http2.Server{
		MaxConcurrentStreams:         maxConcurrentStreams,
		MaxReadFrameSize:             maxReadFrameSize,
		MaxUploadBufferPerStream:     streamReceiveWindow,
		MaxUploadBufferPerConnection: connectionReceiveWindow,
		ReadIdleTimeout:              pingAfter,
		PingTimeout:                  pingTimeout,
	}
	if err := http2.ConfigureServer(hs, h2); err != nil {
		_ = conn.Close()
		return err
	}

	served := make(chan struct{})
	go func() {
		defer close(served)
		h2.ServeConn(conn, &http2.ServeConnOpts{Context: baseCtx, BaseConfig: hs, Handler: a})
	}()
	a.tunnelUp(+1)
	defer a.tunnelUp(-1)

	select {
	case <-served:
		_ = conn.Close()
		return conn.readErr()
	case <-ctx.Done():
	}

	a.logger.Info("shutting down: sending GOAWAY and waiting for in-flight requests", "grace", a.shutdownGrace.String())
	// Shutdown returns at once: the tunnel is no listener of hs, it only
	// triggers the GOAWAY hook ConfigureServer installed.
	_ = hs.Shutdown(baseCtx)
	grace := time.NewTimer(a.shutdownGrace)
	defer grace.Stop()
	select {
	case <-served:
	case <-grace.C:
		a.logger.Warn("shutdown grace period over, closing the tunnel with requests still running")
	}
	cancelRequests()
	_ = conn.Close()
	<-served
	return nil
}

// countingConn counts the tunnel's bytes for the metrics and remembers why
// reading stopped, which is why the tunnel ended.
type countingConn struct {
	net.Conn
	received, sent prometheus.Counter

	mu      sync.Mutex
	lastErr error
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.received.Add(float64(n))
	if err != nil {
		c.mu.Lock()
		if c.lastErr == nil {
			c.lastErr = err
		}
		c.mu.Unlock()
	}
	return n, err
}

func (c *countingConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.sent.Add(float64(n))
	return n, err
}

// readErr is why reading the tunnel stopped; nil when kas closed it cleanly.
func (c *countingConn) readErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if errors.Is(c.lastErr, io.EOF) {
		return nil
	}
	return c.lastErr
}
