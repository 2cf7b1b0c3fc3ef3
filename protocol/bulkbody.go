package protocol

import (
	"io"
	"sync"
)

// BulkReadSize is how much a body wrapped by BulkBodies reads from HTTP/2 at
// once, and the smallest known length worth wrapping.
const BulkReadSize = 256 << 10

// BulkBodies makes large HTTP/2 bodies cheap to stream through the tunnel.
// x/net/http2 returns flow control to the sender (a WINDOW_UPDATE, which is a
// tunnel write the other side must read) on every Read of 4 KiB or more, so a
// body copied with httputil.ReverseProxy's 32 KiB buffer costs a tunnel write
// per 32 KiB. A wrapped body reads BulkReadSize at a time into a pooled
// buffer and hands it out in the caller's chunks. A buffer is borrowed only
// while it holds unread data or a read is waiting for data, so an idle tunnel
// holds none. The zero value is ready to use.
type BulkBodies struct {
	pool sync.Pool
}

// Wrap returns body wrapped when its known length makes it a bulk transfer,
// else body itself. Open-ended bodies (length -1: watches, logs -f) are never
// wrapped: they may wait for hours and would hold a buffer all along.
func (b *BulkBodies) Wrap(body io.ReadCloser, contentLength int64) io.ReadCloser {
	if body == nil || contentLength < BulkReadSize {
		return body
	}
	return &bulkBody{body: body, pool: &b.pool}
}

// bulkBody is one wrapped body. Reads come from one goroutine at a time (as
// io.Reader requires); Close may come from another, so it touches only the
// underlying body. A buffer still borrowed when the body is closed before it
// is drained is left to the garbage collector.
type bulkBody struct {
	body io.ReadCloser
	pool *sync.Pool
	buf  *[]byte // borrowed from pool while it holds unread data
	data []byte  // the unread part of *buf
	err  error   // what ended the underlying body, returned once data is drained
}

func (b *bulkBody) Read(p []byte) (int, error) {
	if len(b.data) == 0 {
		if b.err != nil {
			return 0, b.err
		}
		if len(p) >= BulkReadSize {
			return b.body.Read(p)
		}
		if b.buf == nil {
			b.buf = b.borrow()
		}
		n, err := b.body.Read(*b.buf)
		b.data, b.err = (*b.buf)[:n], err
		if n == 0 {
			b.giveBack()
			return 0, err
		}
	}
	n := copy(p, b.data)
	b.data = b.data[n:]
	if len(b.data) == 0 {
		b.giveBack()
	}
	return n, nil
}

func (b *bulkBody) Close() error { return b.body.Close() }

func (b *bulkBody) borrow() *[]byte {
	if buf, ok := b.pool.Get().(*[]byte); ok {
		return buf
	}
	buf := make([]byte, BulkReadSize)
	return &buf
}

func (b *bulkBody) giveBack() {
	if b.buf != nil {
		b.pool.Put(b.buf)
		b.buf, b.data = nil, nil
	}
}
