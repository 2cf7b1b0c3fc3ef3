package k8sproxy

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/kasproject/kas/protocol"
	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/kubestatus"
	"github.com/kasproject/kas/server/proxyauth"
	"github.com/kasproject/kas/server/traffic"
)

// fixedAuth answers every request the same way.
type fixedAuth struct {
	res *proxyauth.Result
	err error
}

func (f fixedAuth) Authenticate(context.Context, *http.Request) (*proxyauth.Result, error) {
	return f.res, f.err
}

// recordingRouter routes to a RoundTripper that records what it was sent.
type recordingRouter struct {
	err  error
	rt   func(*http.Request) (*http.Response, error)
	seen chan *http.Request
}

func (r *recordingRouter) Route(ctx context.Context, _ int64) (http.RoundTripper, error) {
	if r.err != nil {
		<-ctx.Done() // like a router waiting for an agent that never comes
		return nil, r.err
	}
	return roundTripperFunc(func(req *http.Request) (*http.Response, error) {
		r.seen <- req
		return r.rt(req)
	}), nil
}

func okResponse(req *http.Request) (*http.Response, error) {
	return &http.Response{StatusCode: 200, Header: http.Header{"Content-Type": {"application/json"}},
		Body: io.NopCloser(strings.NewReader(`{"kind":"NamespaceList"}`)), Request: req}, nil
}

func TestHandler(t *testing.T) {
	user := &protocol.Identity{Username: "gitlab:user:alice", Groups: []string{"gitlab:user"}}
	tests := []struct {
		name        string
		path        string
		header      http.Header
		auth        fixedAuth
		routeErr    error
		rt          func(*http.Request) (*http.Response, error)
		wantCode    int
		wantReason  kubestatus.Reason
		wantHeader  map[string]string
		wantForward bool
		// wantFailure is the agent's last failure, "" for none; refused
		// callers are not counted for any agent.
		wantFailure string
	}{
		{
			name: "forwards with the identity and without the caller's credentials",
			path: "/api/v1/namespaces",
			header: http.Header{"Authorization": {"Bearer pat:1:x"}, "Impersonate-User": {"admin"}, "Cookie": {"_gitlab_kas=abc"},
				protocol.HeaderIdentity: {"spoofed"}, "Accept": {"application/json"}},
			auth:        fixedAuth{res: &proxyauth.Result{AgentID: 1, Kind: proxyauth.KindPersonalAccessToken, Identity: user}},
			rt:          okResponse,
			wantCode:    200,
			wantForward: true,
		},
		{
			name:       "refused credentials are a Status with Gitlab-Unauthorized",
			path:       "/api/v1/namespaces",
			auth:       fixedAuth{err: &proxyauth.Error{Code: 401, Reason: kubestatus.ReasonUnauthorized, Message: "bad token"}},
			wantCode:   401,
			wantReason: kubestatus.ReasonUnauthorized,
			wantHeader: map[string]string{"Gitlab-Unauthorized": "true"},
		},
		{
			name:       "forbidden",
			path:       "/api/v1/namespaces",
			auth:       fixedAuth{err: &proxyauth.Error{Code: 403, Reason: kubestatus.ReasonForbidden, Message: "no"}},
			wantCode:   403,
			wantReason: kubestatus.ReasonForbidden,
		},
		{
			name:        "agent not connected after the wait",
			path:        "/api/v1/namespaces",
			auth:        fixedAuth{res: &proxyauth.Result{AgentID: 1}},
			routeErr:    registry.ErrNoTunnel,
			wantCode:    503,
			wantReason:  kubestatus.ReasonServiceUnavailable,
			wantHeader:  map[string]string{"Retry-After": "5"},
			wantFailure: "agent 1 is not connected to kas (waited 50ms); check that agentk is running and can reach kas",
		},
		{
			name:        "agent failed",
			path:        "/api/v1/namespaces",
			auth:        fixedAuth{res: &proxyauth.Result{AgentID: 1}},
			rt:          func(*http.Request) (*http.Response, error) { return nil, errors.New("tunnel closed") },
			wantCode:    502,
			wantReason:  kubestatus.ReasonInternalError,
			wantFailure: "agent 1 failed to complete the request: tunnel closed",
		},
		{
			name:        "timed out",
			path:        "/api/v1/namespaces",
			auth:        fixedAuth{res: &proxyauth.Result{AgentID: 1}},
			rt:          func(*http.Request) (*http.Response, error) { return nil, context.DeadlineExceeded },
			wantCode:    504,
			wantReason:  kubestatus.ReasonTimeout,
			wantFailure: "request to agent 1 timed out",
		},
		{
			name: "the cluster's own error answer",
			path: "/api/v1/pods",
			auth: fixedAuth{res: &proxyauth.Result{AgentID: 1}},
			rt: func(req *http.Request) (*http.Response, error) {
				return &http.Response{StatusCode: 500, Header: http.Header{}, Body: io.NopCloser(strings.NewReader("etcd down")), Request: req}, nil
			},
			wantCode:    500,
			wantFailure: "GET /api/v1/pods: the cluster answered 500 Internal Server Error",
		},
		{
			name:       "agentk's own endpoints are not reachable",
			path:       "/x/../-/agentk/configuration",
			auth:       fixedAuth{res: &proxyauth.Result{AgentID: 1}},
			wantCode:   404,
			wantReason: kubestatus.ReasonNotFound,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			router := &recordingRouter{err: tc.routeErr, rt: tc.rt, seen: make(chan *http.Request, 1)}
			rec := &traffic.Recorder{}
			h := NewHandler(Options{
				Auth:             tc.auth,
				Router:           router,
				Logger:           slog.New(slog.DiscardHandler),
				AgentWaitTimeout: 50 * time.Millisecond,
				Traffic:          rec,
			})
			req := httptest.NewRequest(http.MethodGet, "http://kas"+tc.path, nil)
			for k, v := range tc.header {
				req.Header[k] = v
			}
			w := httptest.NewRecorder()
			h.ServeHTTP(w, req)
			if w.Code != tc.wantCode {
				t.Fatalf("status %d, want %d: %s", w.Code, tc.wantCode, w.Body)
			}
			for k, v := range tc.wantHeader {
				if got := w.Header().Get(k); got != v {
					t.Errorf("header %s = %q, want %q", k, got, v)
				}
			}
			checkTraffic(t, rec, tc.auth.res != nil && tc.wantCode != 404, tc.wantFailure)
			if tc.wantReason != "" {
				var st kubestatus.Status
				if err := json.Unmarshal(w.Body.Bytes(), &st); err != nil || st.Kind != "Status" || st.Reason != tc.wantReason || st.Code != tc.wantCode {
					t.Fatalf("body %s is not a %s Status (%v)", w.Body, tc.wantReason, err)
				}
			}
			if !tc.wantForward {
				return
			}
			out := <-router.seen
			for _, k := range []string{"Authorization", "Impersonate-User", "Cookie"} {
				if v := out.Header.Get(k); v != "" {
					t.Errorf("caller's %s reached the agent: %q", k, v)
				}
			}
			if out.Header.Get("Accept") != "application/json" {
				t.Errorf("Accept header lost: %v", out.Header)
			}
			id, err := protocol.DecodeIdentity(out.Header.Get(protocol.HeaderIdentity))
			if err != nil || id.Username != user.Username {
				t.Errorf("identity header decodes to %+v, %v; want %s", id, err, user.Username)
			}
			if out.URL.Path != tc.path {
				t.Errorf("path %q, want %q", out.URL.Path, tc.path)
			}
		})
	}
}

// checkTraffic checks what the handler counted for agent 1: one request if
// counted, failed with the message wantFailure unless that is "".
func checkTraffic(t *testing.T, rec *traffic.Recorder, counted bool, wantFailure string) {
	t.Helper()
	all := rec.Minutes(time.Now())
	m, ok := all[1]
	if !counted {
		if len(all) != 0 {
			t.Errorf("counted traffic %v for a request no agent served", all)
		}
		return
	}
	if !ok {
		t.Fatal("request not counted for agent 1")
	}
	w := m.Window(time.Now(), time.Now().Add(-time.Minute), 5)
	wantErrors := uint64(0)
	if wantFailure != "" {
		wantErrors = 1
	}
	if w.Requests != 1 || w.Errors != wantErrors {
		t.Errorf("counted %d requests, %d errors; want 1 and %d", w.Requests, w.Errors, wantErrors)
	}
	switch f := m.LastFailure; {
	case wantFailure == "" && f != nil:
		t.Errorf("last failure %q, want none", f.Message)
	case wantFailure != "" && (f == nil || f.Message != wantFailure):
		t.Errorf("last failure %+v, want %q", f, wantFailure)
	}
}

// TestTrafficBytes counts request bodies of known and unknown length and
// the response body.
func TestTrafficBytes(t *testing.T) {
	rec := &traffic.Recorder{}
	router := &recordingRouter{seen: make(chan *http.Request, 2), rt: func(req *http.Request) (*http.Response, error) {
		_, _ = io.Copy(io.Discard, req.Body)
		return okResponse(req)
	}}
	h := NewHandler(Options{
		Auth:             fixedAuth{res: &proxyauth.Result{AgentID: 1}},
		Router:           router,
		Logger:           slog.New(slog.DiscardHandler),
		AgentWaitTimeout: time.Second,
		Traffic:          rec,
	})
	known := httptest.NewRequest(http.MethodPost, "http://kas/api/v1/namespaces", strings.NewReader("0123456789"))
	unknown := httptest.NewRequest(http.MethodPost, "http://kas/api/v1/namespaces", io.MultiReader(strings.NewReader("abcde")))
	unknown.ContentLength = -1
	for _, req := range []*http.Request{known, unknown} {
		h.ServeHTTP(httptest.NewRecorder(), req)
	}
	w := rec.Minutes(time.Now())[1].Window(time.Now(), time.Now().Add(-time.Minute), 5)
	wantOut := uint64(2 * len(`{"kind":"NamespaceList"}`))
	if w.Requests != 2 || w.BytesIn != 15 || w.BytesOut != wantOut {
		t.Fatalf("counted %+v, want 2 requests, 15 bytes in, %d out", w, wantOut)
	}
}
