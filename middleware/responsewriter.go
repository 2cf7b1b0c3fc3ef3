package middleware

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
)

// recorder remembers the status and size of a response. It passes Flush and
// Hijack through, because streaming (watches) and upgrades (exec, agent
// WebSockets) need them, and Unwrap for http.ResponseController.
type recorder struct {
	http.ResponseWriter
	status   int
	bytes    int64
	hijacked bool
}

func (r *recorder) WriteHeader(code int) {
	if r.status == 0 {
		r.status = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(p []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	n, err := r.ResponseWriter.Write(p)
	r.bytes += int64(n)
	return n, err
}

func (r *recorder) Flush() {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	_ = http.NewResponseController(r.ResponseWriter).Flush()
}

func (r *recorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, rw, err := http.NewResponseController(r.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, fmt.Errorf("hijack: %w", err)
	}
	r.hijacked = true
	if r.status == 0 {
		r.status = http.StatusSwitchingProtocols
	}
	return c, rw, nil
}

func (r *recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

// wrap returns w as a recorder, reusing one an outer middleware installed.
func wrap(w http.ResponseWriter) *recorder {
	if rec, ok := w.(*recorder); ok {
		return rec
	}
	return &recorder{ResponseWriter: w}
}

// Recorded is what a handler can learn of its own response after serving it.
type Recorded interface {
	// Status is the status sent (101 for a hijacked upgrade), 0 if nothing was.
	Status() int
	// BytesWritten counts the body bytes written through the ResponseWriter.
	BytesWritten() int64
}

func (r *recorder) Status() int         { return r.status }
func (r *recorder) BytesWritten() int64 { return r.bytes }

// Record returns a ResponseWriter to serve through and what it recorded.
// Behind AccessLog or Metrics it is the recorder they installed, so it
// costs nothing; elsewhere it wraps w.
func Record(w http.ResponseWriter) (http.ResponseWriter, Recorded) {
	rec := wrap(w)
	return rec, rec
}
