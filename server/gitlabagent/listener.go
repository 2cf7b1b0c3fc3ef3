package gitlabagent

import (
	"bytes"
	"io"
	"net"
	"sync"
	"time"

	"golang.org/x/net/http2"
)

// sniffTimeout bounds how long a new connection may stay silent before it
// is handed to the HTTP server, whose own timeouts then apply.
const sniffTimeout = 10 * time.Second

// SplitListener shares a plaintext listener between kas's HTTP server and
// GitLab's agentk over grpc://: a connection that opens with the HTTP/2
// client preface (gRPC with prior knowledge, which neither browsers nor
// Kubernetes clients use without TLS) is served by s; every other one is
// returned by Accept, unchanged, for the HTTP server. Closing the returned
// listener closes ln.
func (s *Server) SplitListener(ln net.Listener) net.Listener {
	l := &splitListener{ln: ln, srv: s, conns: make(chan net.Conn), done: make(chan struct{})}
	l.wg.Go(l.acceptLoop)
	return l
}

type splitListener struct {
	ln    net.Listener
	srv   *Server
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
	wg    sync.WaitGroup
	err   error // why ln stopped accepting; read after done is closed
}

func (l *splitListener) acceptLoop() {
	for {
		c, err := l.ln.Accept()
		if err != nil {
			l.err = err
			l.once.Do(func() { close(l.done) })
			return
		}
		go l.sniff(c)
	}
}

// sniff reads as much of the connection's start as tells the protocols
// apart, then gives the connection, with what was read, to its server.
func (l *splitListener) sniff(c net.Conn) {
	preface := []byte(http2.ClientPreface)
	_ = c.SetReadDeadline(time.Now().Add(sniffTimeout))
	buf := make([]byte, 0, len(preface))
	isGRPC := false
	for {
		n, err := c.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if !bytes.HasPrefix(preface, buf) {
			break
		}
		if len(buf) == len(preface) {
			isGRPC = true
			break
		}
		if err != nil {
			break
		}
	}
	_ = c.SetReadDeadline(time.Time{})
	pc := &prefixConn{Conn: c, prefix: buf}
	if isGRPC {
		l.srv.ServeConn(pc)
		return
	}
	select {
	case l.conns <- pc:
	case <-l.done:
		_ = c.Close()
	}
}

func (l *splitListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		if l.err != nil {
			return nil, l.err
		}
		return nil, net.ErrClosed
	}
}

func (l *splitListener) Close() error {
	err := l.ln.Close()
	l.wg.Wait()
	return err
}

func (l *splitListener) Addr() net.Addr { return l.ln.Addr() }

// prefixConn replays the bytes read while sniffing before the rest.
type prefixConn struct {
	net.Conn
	prefix []byte
}

func (c *prefixConn) Read(p []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(p, c.prefix)
		c.prefix = c.prefix[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

var _ io.Reader = (*prefixConn)(nil)
