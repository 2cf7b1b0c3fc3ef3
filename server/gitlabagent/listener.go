package gitlabagent

import (
	"bytes"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
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

// prefixConn replays the bytes read while sniffing before the rest, which
// comes from rest if set, else from the connection.
type prefixConn struct {
	net.Conn
	prefix []byte
	rest   io.Reader
}

func (c *prefixConn) Read(p []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(p, c.prefix)
		c.prefix = c.prefix[n:]
		return n, nil
	}
	if c.rest != nil {
		return c.rest.Read(p)
	}
	return c.Conn.Read(p)
}

// TLSNextProtoH2 returns the handler of TLS connections that negotiated
// HTTP/2 (http.Server.TLSNextProto["h2"]) on a listener shared with GitLab's
// agentk over grpcs://: it reads the connection's first request head, and
// a gRPC call (content-type application/grpc…) makes it a GitLab agentk
// connection, served by s; anything else (kubectl, browsers) is served by
// h2 as the HTTP server's HTTP/2, with what was read replayed.
//
// A gRPC client sends no request before the server's SETTINGS frame, so
// kas sends an empty one (all defaults) first; the server that takes over
// sends its own, which HTTP/2 allows. The client's acknowledgement of the
// first is kept from that server, which never sent it.
func (s *Server) TLSNextProtoH2(h2 *http2.Server) func(*http.Server, *tls.Conn, http.Handler) {
	return func(hs *http.Server, c *tls.Conn, h http.Handler) {
		prefix, ackSeen, isGRPC := sniffHTTP2(c)
		var rest io.Reader = c
		if !ackSeen {
			rest = &settingsAckDropper{r: c}
		}
		pc := &prefixConn{Conn: c, prefix: prefix, rest: rest}
		if isGRPC {
			s.ServeConn(pc)
			return
		}
		h2.ServeConn(pc, &http2.ServeConnOpts{BaseConfig: hs, Handler: h})
	}
}

// HTTP/2 frame layout (RFC 9113 §4.1, §6).
const (
	frameHeaderLen      = 9
	frameHeaders        = 0x1
	frameSettings       = 0x4
	frameContinuation   = 0x9
	flagAck             = 0x1
	flagEndHeaders      = 0x4
	flagPadded          = 0x8
	flagPriority        = 0x20
	maxSniffedFrameSize = 1 << 14 // the default SETTINGS_MAX_FRAME_SIZE
	maxSniffedBytes     = 64 << 10
)

// sniffHTTP2 reads an HTTP/2 connection's client preface, answers it with
// an empty SETTINGS frame, and reads frames up to the first request head.
// It returns what it read, less the acknowledgement of its SETTINGS if that
// came (ackSeen), and whether the request is a gRPC call. A connection that
// sends no request head within sniffTimeout, or breaks the protocol, is
// left to the HTTP server, which reports it.
func sniffHTTP2(c net.Conn) (read []byte, ackSeen, isGRPC bool) {
	_ = c.SetReadDeadline(time.Now().Add(sniffTimeout))
	defer func() { _ = c.SetReadDeadline(time.Time{}) }()
	preface := make([]byte, len(http2.ClientPreface))
	n, err := io.ReadFull(c, preface)
	read = preface[:n]
	if err != nil || string(preface) != http2.ClientPreface {
		return read, true, false
	}
	if _, err := c.Write([]byte{0, 0, 0, frameSettings, 0, 0, 0, 0, 0}); err != nil {
		return read, true, false
	}
	var block []byte
	for len(read) < maxSniffedBytes {
		var hdr [frameHeaderLen]byte
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return append(read, hdr[:]...), ackSeen, false
		}
		length := int(hdr[0])<<16 | int(hdr[1])<<8 | int(hdr[2])
		typ, flags := hdr[3], hdr[4]
		if length > maxSniffedFrameSize {
			return append(read, hdr[:]...), ackSeen, false
		}
		payload := make([]byte, length)
		if _, err := io.ReadFull(c, payload); err != nil {
			return append(append(read, hdr[:]...), payload...), ackSeen, false
		}
		if typ == frameSettings && flags&flagAck != 0 && !ackSeen {
			ackSeen = true // the acknowledgement of kas's SETTINGS: dropped
			continue
		}
		read = append(append(read, hdr[:]...), payload...)
		switch typ {
		case frameHeaders:
			fragment, ok := headerFragment(payload, flags)
			if !ok {
				return read, ackSeen, false
			}
			block = append(block, fragment...)
		case frameContinuation:
			block = append(block, payload...)
		default:
			continue // SETTINGS, WINDOW_UPDATE, PRIORITY, PING come first
		}
		if flags&flagEndHeaders == 0 {
			continue
		}
		fields, err := hpack.NewDecoder(4096, nil).DecodeFull(block)
		if err != nil {
			return read, ackSeen, false
		}
		for _, f := range fields {
			if f.Name == "content-type" {
				return read, ackSeen, strings.HasPrefix(f.Value, "application/grpc")
			}
		}
		return read, ackSeen, false
	}
	return read, ackSeen, false
}

// headerFragment is the header block fragment of a HEADERS frame's payload.
func headerFragment(p []byte, flags byte) ([]byte, bool) {
	pad := 0
	if flags&flagPadded != 0 {
		if len(p) < 1 {
			return nil, false
		}
		pad, p = int(p[0]), p[1:]
	}
	if flags&flagPriority != 0 {
		if len(p) < 5 {
			return nil, false
		}
		p = p[5:]
	}
	if pad > len(p) {
		return nil, false
	}
	return p[:len(p)-pad], true
}

// settingsAckDropper passes a client's HTTP/2 frames through but drops
// the first SETTINGS acknowledgement, which answers kas's sniffing SETTINGS.
type settingsAckDropper struct {
	r       io.Reader
	dropped bool
	pending []byte // a frame header to pass on
	payload int    // bytes of the current frame's payload still to pass on
}

func (d *settingsAckDropper) Read(p []byte) (int, error) {
	for {
		switch {
		case len(d.pending) > 0:
			n := copy(p, d.pending)
			d.pending = d.pending[n:]
			return n, nil
		case d.payload > 0:
			n, err := d.r.Read(p[:min(len(p), d.payload)])
			d.payload -= n
			return n, err
		case d.dropped:
			return d.r.Read(p)
		}
		var hdr [frameHeaderLen]byte
		if _, err := io.ReadFull(d.r, hdr[:]); err != nil {
			return 0, err
		}
		if hdr[3] == frameSettings && hdr[4]&flagAck != 0 {
			d.dropped = true
			continue
		}
		d.pending = hdr[:]
		d.payload = int(hdr[0])<<16 | int(hdr[1])<<8 | int(hdr[2])
	}
}
