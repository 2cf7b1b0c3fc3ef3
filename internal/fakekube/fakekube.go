// Package fakekube is a small stand-in for kube-apiserver: it records what
// reaches it (method, path, headers — the impersonation headers above all),
// answers the few Kubernetes API calls tests and the quick start make, and
// streams on demand. It is used by end-to-end tests, the quick start and the
// benchmark; it is not a Kubernetes implementation.
package fakekube

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Request is what the server saw of one request.
type Request struct {
	Method string
	Path   string
	Query  string
	Header http.Header
}

// Server is the fake API server's handler.
type Server struct {
	mu       sync.Mutex
	requests []Request
	watchers map[chan Event]struct{}
	// cancelled receives the path of every streaming or waiting request
	// whose client went away, so tests can see cancellation reach the cluster.
	cancelled chan string
	// release is closed by Release to let the /slow requests waiting on it
	// answer; slow counts them.
	release chan struct{}
	slow    int
}

// Event is a watch event: Type ADDED, MODIFIED or DELETED, on a namespace.
type Event struct {
	Type string
	Name string
}

// New returns an empty fake API server handler.
func New() *Server {
	return &Server{watchers: map[chan Event]struct{}{}, cancelled: make(chan string, 100), release: make(chan struct{})}
}

// Requests returns what reached the server, oldest first.
func (s *Server) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Request(nil), s.requests...)
}

// LastRequest returns the newest request whose path starts with prefix.
func (s *Server) LastRequest(prefix string) (Request, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := len(s.requests) - 1; i >= 0; i-- {
		if strings.HasPrefix(s.requests[i].Path, prefix) {
			return s.requests[i], true
		}
	}
	return Request{}, false
}

// Cancelled receives the path of streaming and /slow requests the client
// abandoned.
func (s *Server) Cancelled() <-chan string { return s.cancelled }

// Watchers returns how many watches are open.
func (s *Server) Watchers() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.watchers)
}

// Slow returns how many /slow requests are waiting for Release.
func (s *Server) Slow() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.slow
}

// Release lets every /slow request waiting now answer; later ones wait for
// the next Release.
func (s *Server) Release() {
	s.mu.Lock()
	defer s.mu.Unlock()
	close(s.release)
	s.release = make(chan struct{})
}

// Emit sends an event to every open watch.
func (s *Server) Emit(ev Event) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for ch := range s.watchers {
		select {
		case ch <- ev:
		default: // a stuck watcher must not block the test
		}
	}
}

func (s *Server) record(r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.requests = append(s.requests, Request{Method: r.Method, Path: r.URL.Path, Query: r.URL.RawQuery, Header: r.Header.Clone()})
}

// ServeHTTP answers:
//
//	GET  /version                         a version.Info
//	GET  /api, /api/v1, /apis             discovery: the core group with namespaces
//	GET  /api/v1/namespaces               a NamespaceList (watch=true: a watch stream fed by Emit)
//	GET  /api/v1/namespaces/{ns}/pods/{p}/log?follow=true   lines every 10ms until the client leaves
//	GET  /bytes?size=N                    N bytes of data, streamed (chunked=true: without Content-Length)
//	POST /bytes                           counts the request body, answers {"bytes": N}
//	GET  /echo                            the request as JSON (method, path, headers)
//	GET  /slow                            waits until Release, then answers {"released": true}
//	*    with Connection: Upgrade         101, then echoes bytes back (an exec-style stream)
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.record(r)
	if strings.EqualFold(r.Header.Get("Connection"), "Upgrade") && r.Header.Get("Upgrade") != "" {
		s.upgrade(w, r)
		return
	}
	switch {
	case r.URL.Path == "/version":
		writeJSON(w, map[string]string{"major": "1", "minor": "33", "gitVersion": "v1.33.0-fakekube", "platform": "linux/amd64"})
	// Discovery, as kubectl asks before anything else: the core group with
	// namespaces, and no other group.
	case r.URL.Path == "/api":
		writeJSON(w, map[string]any{"kind": "APIVersions", "versions": []string{"v1"},
			"serverAddressByClientCIDRs": []any{map[string]string{"clientCIDR": "0.0.0.0/0", "serverAddress": r.Host}}})
	case r.URL.Path == "/api/v1":
		writeJSON(w, map[string]any{"kind": "APIResourceList", "groupVersion": "v1", "resources": []any{
			map[string]any{"name": "namespaces", "singularName": "namespace", "namespaced": false, "kind": "Namespace",
				"verbs": []string{"get", "list", "watch"}, "shortNames": []string{"ns"}},
		}})
	case r.URL.Path == "/apis":
		writeJSON(w, map[string]any{"kind": "APIGroupList", "apiVersion": "v1", "groups": []any{}})
	case r.URL.Path == "/api/v1/namespaces" && r.URL.Query().Get("watch") != "" && r.URL.Query().Get("watch") != "false":
		s.watch(w, r)
	case r.URL.Path == "/api/v1/namespaces":
		writeJSON(w, map[string]any{
			"kind": "NamespaceList", "apiVersion": "v1", "metadata": map[string]any{"resourceVersion": "1"},
			"items": []any{namespace("default"), namespace("kube-system")},
		})
	case strings.HasSuffix(r.URL.Path, "/log") && strings.HasPrefix(r.URL.Path, "/api/v1/namespaces/"):
		s.logs(w, r)
	case r.URL.Path == "/bytes" && r.Method == http.MethodGet:
		size, err := strconv.ParseInt(r.URL.Query().Get("size"), 10, 64)
		if err != nil || size < 0 {
			http.Error(w, "size must be a non-negative integer", http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		if r.URL.Query().Get("chunked") != "true" {
			w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
		}
		_, _ = io.CopyN(w, zeroReader{}, size)
	case r.URL.Path == "/bytes" && (r.Method == http.MethodPost || r.Method == http.MethodPut):
		n, err := io.Copy(io.Discard, r.Body)
		if err != nil {
			http.Error(w, "read body: "+err.Error(), http.StatusBadRequest)
			return
		}
		writeJSON(w, map[string]int64{"bytes": n})
	case r.URL.Path == "/echo":
		writeJSON(w, map[string]any{"method": r.Method, "path": r.URL.Path, "query": r.URL.RawQuery, "headers": r.Header})
	case r.URL.Path == "/slow":
		s.waitForRelease(w, r)
	default:
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusNotFound)
		_ = json.NewEncoder(w).Encode(map[string]any{
			"kind": "Status", "apiVersion": "v1", "metadata": map[string]any{}, "status": "Failure",
			"message": fmt.Sprintf("the server could not find the requested resource (fakekube: %q)", r.URL.Path),
			"reason":  "NotFound", "code": http.StatusNotFound,
		})
	}
}

func namespace(name string) map[string]any {
	return map[string]any{"metadata": map[string]any{"name": name, "resourceVersion": "1"}, "status": map[string]any{"phase": "Active"}}
}

func (s *Server) watch(w http.ResponseWriter, r *http.Request) {
	ch := make(chan Event, 16)
	s.mu.Lock()
	s.watchers[ch] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.watchers, ch)
		s.mu.Unlock()
	}()
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	flush(w)
	enc := json.NewEncoder(w)
	for {
		select {
		case ev := <-ch:
			_ = enc.Encode(map[string]any{"type": ev.Type, "object": map[string]any{
				"kind": "Namespace", "apiVersion": "v1", "metadata": map[string]any{"name": ev.Name, "resourceVersion": "2"},
			}})
			flush(w)
		case <-r.Context().Done():
			s.cancelled <- r.URL.Path
			return
		}
	}
}

func (s *Server) logs(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain")
	follow := r.URL.Query().Get("follow") == "true"
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for i := 1; ; i++ {
		_, _ = fmt.Fprintf(w, "log line %d\n", i)
		flush(w)
		if !follow && i == 3 {
			return
		}
		select {
		case <-tick.C:
		case <-r.Context().Done():
			s.cancelled <- r.URL.Path
			return
		}
	}
}

// waitForRelease holds a /slow request until Release, standing for an API
// call that takes long (a big list, an admission webhook).
func (s *Server) waitForRelease(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	release := s.release
	s.slow++
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.slow--
		s.mu.Unlock()
	}()
	select {
	case <-release:
		writeJSON(w, map[string]bool{"released": true})
	case <-r.Context().Done():
		s.cancelled <- r.URL.Path
	}
}

// upgrade switches protocols and echoes every byte back until the client closes.
func (s *Server) upgrade(w http.ResponseWriter, r *http.Request) {
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		http.Error(w, "cannot hijack: "+err.Error(), http.StatusInternalServerError)
		return
	}
	defer conn.Close()
	_, _ = fmt.Fprintf(brw, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: %s\r\nX-Fakekube-Upgrade: echo\r\n\r\n", r.Header.Get("Upgrade"))
	if err := brw.Flush(); err != nil {
		return
	}
	echo(conn, brw.Reader)
}

func echo(w io.Writer, r *bufio.Reader) {
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

func flush(w http.ResponseWriter) { _ = http.NewResponseController(w).Flush() }

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}
