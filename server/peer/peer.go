// Package peer is the private API (kas → kas): the gRPC Server through which
// another node sends a request to one of this node's agent tunnels, and the
// Router that sends each proxied request to wherever the agent's tunnel is,
// this node first, then the nodes the registry names.
//
// One request is one bidirectional gRPC stream (see peerpb/forward.proto):
// request head and body chunks one way; response head, body chunks and
// trailers the other; upgraded connections' bytes both ways. Bodies stream in
// chunks and are never held whole, except those small enough to travel in
// the head message. A node acknowledges a request as soon as it has a
// tunnel for it; a node that does not within the accept timeout is skipped
// for a while (a circuit breaker per URL) and the request goes to another
// node holding the agent.
package peer

import (
	"net/http"
	"net/textproto"
	"sync"
	"time"
	"unsafe"

	"github.com/kasproject/kas/server/peer/peerpb"
)

// Transport sizes, shared by both ends.
const (
	// chunkSize is the most body bytes one data message carries. gRPC reads
	// and encodes each message into a pooled buffer that it zeroes whole,
	// from size classes of 32 KiB and then 1 MiB: a data message (chunk plus
	// a few bytes of framing) must fit the 32 KiB class, or every chunk
	// would cost clearing 1 MiB.
	chunkSize = 32<<10 - 64
	// bulkChunkSize is the chunk for bodies known to be at least
	// bulkThreshold long: it fills gRPC's 1 MiB class exactly as chunkSize
	// fills the 32 KiB one, and 32 times fewer messages halve the CPU a
	// large transfer costs across the hop. Bodies of unknown length
	// (watches, logs -f) keep small chunks, because they hold their buffer
	// for as long as they run.
	bulkChunkSize = 1<<20 - 64
	bulkThreshold = 256 << 10
	// maxInlineBody is the largest body that travels inside its head
	// message, leaving room in the 32 KiB class for the headers.
	maxInlineBody = 16 << 10
	// maxMessageSize bounds one gRPC message: a head with large headers
	// plus an inline body fits with room to spare.
	maxMessageSize = 16 << 20
	// streamWindow and connWindow are the HTTP/2 flow-control windows. Peers
	// are on a fast private network, so large static windows keep a stream
	// from waiting on WINDOW_UPDATEs; the stream window still bounds what a
	// slow reader makes a node buffer.
	streamWindow = 4 << 20 // a few bulk chunks in flight
	connWindow   = 16 << 20
	// ioBufferSize is each connection's read and write buffer: several
	// frames per system call.
	ioBufferSize = 128 << 10

	// keepaliveTime and keepaliveTimeout: an idle connection is pinged every
	// keepaliveTime and dropped if the ping is not answered in time. The
	// server allows pings down to keepaliveMinTime apart.
	keepaliveTime    = 30 * time.Second
	keepaliveTimeout = 10 * time.Second
	keepaliveMinTime = 15 * time.Second
)

// bufferPool hands out buffers for copying bodies: chunkSize ones, and
// bulkChunkSize ones for bodies known to be large.
type bufferPool struct{ small, bulk sync.Pool }

func newBufferPool() *bufferPool {
	return &bufferPool{
		small: sync.Pool{New: func() any { b := make([]byte, chunkSize); return &b }},
		bulk:  sync.Pool{New: func() any { b := make([]byte, bulkChunkSize); return &b }},
	}
}

// get returns a chunkSize buffer.
func (bp *bufferPool) get() *[]byte { return bp.small.Get().(*[]byte) }

// forLength returns a buffer suited to a body of contentLength bytes (-1
// for unknown).
func (bp *bufferPool) forLength(contentLength int64) *[]byte {
	if contentLength >= bulkThreshold {
		return bp.bulk.Get().(*[]byte)
	}
	return bp.get()
}

// put returns a buffer from get or forLength.
func (bp *bufferPool) put(b *[]byte) {
	if len(*b) == bulkChunkSize {
		bp.bulk.Put(b)
		return
	}
	bp.small.Put(b)
}

// headersToPB converts h for a message. The values are shared with h, not
// copied: messages are serialized before the caller can change h again.
func headersToPB(h http.Header) []*peerpb.Header {
	if len(h) == 0 {
		return nil
	}
	// One allocation each for all entries and all values, instead of one
	// per header.
	count := 0
	for _, values := range h {
		count += len(values)
	}
	entries := make([]peerpb.Header, len(h))
	allValues := make([][]byte, count)
	out := make([]*peerpb.Header, 0, len(h))
	for name, values := range h {
		e := &entries[len(out)]
		e.Name = name
		e.Values = allValues[:len(values):len(values)]
		allValues = allValues[len(values):]
		for i, v := range values {
			e.Values[i] = stringBytes(v)
		}
		out = append(out, e)
	}
	return out
}

// headersFromPB rebuilds an http.Header from a received message, which it
// keeps using. Names are canonicalized because they come from another
// process; for names that already are, this costs nothing.
func headersFromPB(hs []*peerpb.Header) http.Header {
	h := make(http.Header, len(hs))
	count := 0
	for _, e := range hs {
		count += len(e.GetValues())
	}
	allValues := make([]string, count)
	for _, e := range hs {
		if e.GetName() == "" {
			continue
		}
		values := allValues[:len(e.Values):len(e.Values)]
		allValues = allValues[len(e.Values):]
		for i, v := range e.Values {
			values[i] = bytesString(v)
		}
		name := textproto.CanonicalMIMEHeaderKey(e.Name)
		if prev, ok := h[name]; ok {
			h[name] = append(prev, values...)
		} else {
			h[name] = values
		}
	}
	return h
}

// stringBytes returns the bytes of s without copying them, for fields of a
// message being sent: marshalling only reads them.
func stringBytes(s string) []byte { return unsafe.Slice(unsafe.StringData(s), len(s)) }

// bytesString returns b as a string without copying it, for fields of a
// received message: the protobuf decoder gives each field fresh memory that
// nothing writes to afterwards.
func bytesString(b []byte) string { return unsafe.String(unsafe.SliceData(b), len(b)) }
