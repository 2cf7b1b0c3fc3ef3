package protocol

import (
	"errors"
	"io"
	"net"
	"sync"
	"time"

	"github.com/gorilla/websocket"
)

// wsConn presents a WebSocket as a net.Conn byte stream: each Write is one
// binary message and Read concatenates message payloads. Message boundaries
// mean nothing to the HTTP/2 framing that runs on top.
type wsConn struct {
	ws *websocket.Conn

	readMu sync.Mutex
	reader io.Reader // the message being read, nil between messages

	writeMu sync.Mutex
}

// NewConn wraps ws as a net.Conn. Closing the net.Conn closes ws.
func NewConn(ws *websocket.Conn) net.Conn {
	return &wsConn{ws: ws}
}

func (c *wsConn) Read(p []byte) (int, error) {
	c.readMu.Lock()
	defer c.readMu.Unlock()
	for {
		if c.reader == nil {
			typ, r, err := c.ws.NextReader()
			if err != nil {
				return 0, mapCloseError(err)
			}
			if typ != websocket.BinaryMessage {
				return 0, errors.New("tunnel: unexpected non-binary WebSocket message")
			}
			c.reader = r
		}
		n, err := c.reader.Read(p)
		if errors.Is(err, io.EOF) {
			c.reader = nil
			if n > 0 {
				return n, nil
			}
			continue
		}
		return n, mapCloseError(err)
	}
}

func (c *wsConn) Write(p []byte) (int, error) {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	if err := c.ws.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Close sends a normal closure (best effort, bounded) and closes the socket.
func (c *wsConn) Close() error {
	msg := websocket.FormatCloseMessage(websocket.CloseNormalClosure, "")
	_ = c.ws.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second))
	return c.ws.Close()
}

func (c *wsConn) LocalAddr() net.Addr  { return c.ws.LocalAddr() }
func (c *wsConn) RemoteAddr() net.Addr { return c.ws.RemoteAddr() }

func (c *wsConn) SetDeadline(t time.Time) error {
	return errors.Join(c.SetReadDeadline(t), c.SetWriteDeadline(t))
}

func (c *wsConn) SetReadDeadline(t time.Time) error { return c.ws.SetReadDeadline(t) }

// SetWriteDeadline applies from the next write on. It waits for a write
// in progress, since the WebSocket reads the deadline while it writes
// (gRPC clears its handshake deadline while its writer already runs).
func (c *wsConn) SetWriteDeadline(t time.Time) error {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	return c.ws.SetWriteDeadline(t)
}

// mapCloseError turns a normal WebSocket closure into io.EOF so HTTP/2 sees
// the end of the stream rather than an error.
func mapCloseError(err error) error {
	if websocket.IsCloseError(err, websocket.CloseNormalClosure, websocket.CloseGoingAway) {
		return io.EOF
	}
	return err
}
