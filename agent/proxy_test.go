package agent

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/textproto"
	"slices"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kasproject/kas/protocol"
)

func mustEncodeIdentity(t *testing.T, id protocol.Identity) string {
	t.Helper()
	v, err := protocol.EncodeIdentity(id)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// impersonationHeaders returns h's Impersonate-* headers with canonical keys.
func impersonationHeaders(h http.Header) http.Header {
	out := http.Header{}
	for k, v := range h {
		if k = textproto.CanonicalMIMEHeaderKey(k); strings.HasPrefix(k, "Impersonate-") {
			out[k] = append(out[k], v...)
		}
	}
	return out
}

func TestForwardSetsExactlyTheIdentityFromKAS(t *testing.T) {
	api := newAPIServer(t, nil)
	_, kas := connect(t, api, nil)

	alice := protocol.Identity{
		Username: "gitlab:user:alice",
		UID:      "42",
		Groups:   []string{"gitlab:user", "gitlab:project_role:7:developer"},
		Extra:    map[string][]string{"agent.gitlab.com/agent_id": {"3"}, "agent.gitlab.com/username": {"alice"}},
	}
	callerHeaders := http.Header{
		"Authorization":         {"Bearer caller-token"},
		"Impersonate-User":      {"system:admin"},
		"Impersonate-Group":     {"system:masters"},
		"Impersonate-Uid":       {"0"},
		"Impersonate-Extra-Foo": {"bar"},
		"Accept":                {"application/json"},
	}
	tests := []struct {
		name     string
		identity string // HeaderIdentity value; "" sends none
		want     http.Header
	}{
		{
			name:     "identity replaces the caller's impersonation",
			identity: mustEncodeIdentity(t, alice),
			want: func() http.Header {
				h := http.Header{}
				protocol.SetImpersonationHeaders(h, alice)
				return impersonationHeaders(h)
			}(),
		},
		{
			name: "no identity means the agent's own account",
			want: http.Header{},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := callerHeaders.Clone()
			if tt.identity != "" {
				h.Set(protocol.HeaderIdentity, tt.identity)
			}
			resp := kas.roundTrip(t, newRequest(t, http.MethodPost, "/api/v1/namespaces/default/configmaps?dryRun=All&fieldManager=kubectl", strings.NewReader(`{"kind":"ConfigMap"}`), h))
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("status %d, want 200", resp.StatusCode)
			}
			got := decodeJSON[echoed](t, resp.Body)
			if got.Method != http.MethodPost || got.Path != "/api/v1/namespaces/default/configmaps" ||
				got.Query != "dryRun=All&fieldManager=kubectl" || got.Body != `{"kind":"ConfigMap"}` {
				t.Errorf("API server saw %s %s?%s body %q", got.Method, got.Path, got.Query, got.Body)
			}
			if imp := impersonationHeaders(got.Header); !equalHeaders(imp, tt.want) {
				t.Errorf("API server saw impersonation %v, want %v", imp, tt.want)
			}
			if auth := got.Header.Values("Authorization"); !slices.Equal(auth, []string{"Bearer " + testSAToken}) {
				t.Errorf("API server saw Authorization %q, want only the agent's own credentials", auth)
			}
			for _, name := range []string{protocol.HeaderIdentity, protocol.HeaderUpgrade} {
				if v := got.Header.Get(name); v != "" {
					t.Errorf("API server saw %s: %q, want it removed", name, v)
				}
			}
			if got.Header.Get("Accept") != "application/json" {
				t.Errorf("API server saw Accept %q, want the caller's", got.Header.Get("Accept"))
			}
		})
	}
}

// TestClientAddressAndReservedHeaders: agentk forwards kas's
// X-Forwarded-For and nothing else that speaks for the caller's address or
// identity, in any spelling; and no Kas-* header of the API server's answer
// reaches kas as if agentk had sent it.
func TestClientAddressAndReservedHeaders(t *testing.T) {
	api := newAPIServer(t, map[string]http.HandlerFunc{
		"/spoof": func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set(protocol.HeaderUpgradeStatus, "101")
			w.Header().Set("Kas-Anything", "x")
			w.Header().Set("X-Api", "kept")
			_, _ = io.WriteString(w, "ok")
		},
	})
	_, kas := connect(t, api, nil)
	h := http.Header{
		protocol.HeaderForwardedFor: {"203.0.113.9"}, // set by kas
		"X-Real-Ip":                 {"10.9.9.9"},
		"X_Real_Ip":                 {"10.9.9.9"},
		"Forwarded":                 {"for=10.9.9.9"},
		"X-Forwarded-Host":          {"evil.example.com"},
		"X-Remote-User":             {"system:admin"},
		"X-Remote-Group":            {"system:masters"},
		"X-Remote-Extra-Scopes":     {"all"},
		"Impersonate_User":          {"system:admin"},
		"Accept":                    {"application/json"},
	}
	resp := kas.roundTrip(t, newRequest(t, http.MethodGet, "/api/v1/namespaces", nil, h))
	got := decodeJSON[echoed](t, resp.Body)
	if ff := got.Header.Values(protocol.HeaderForwardedFor); !slices.Equal(ff, []string{"203.0.113.9"}) {
		t.Errorf("API server saw X-Forwarded-For %q, want kas's 203.0.113.9 alone", ff)
	}
	for name := range got.Header {
		if protocol.IsReservedHeader(name) && name != protocol.HeaderForwardedFor {
			t.Errorf("API server saw %s: %q", name, got.Header[name])
		}
	}
	if got.Header.Get("Accept") != "application/json" {
		t.Errorf("API server saw Accept %q, want the caller's", got.Header.Get("Accept"))
	}

	resp = kas.roundTrip(t, newRequest(t, http.MethodGet, "/spoof", nil, nil))
	if resp.Header.Get(protocol.HeaderUpgradeStatus) != "" || resp.Header.Get("Kas-Anything") != "" || resp.Header.Get("X-Api") != "kept" {
		t.Errorf("answer headers %v: want the API server's Kas-* removed and the rest kept", resp.Header)
	}
}

func equalHeaders(a, b http.Header) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if !slices.Equal(v, b[k]) {
			return false
		}
	}
	return true
}

func TestBadIdentityIsRefusedAndNothingForwarded(t *testing.T) {
	api := newAPIServer(t, nil)
	_, kas := connect(t, api, nil)

	tests := []struct {
		name   string
		values []string
		want   string // part of the Status message
	}{
		{name: "not base64", values: []string{"!!!"}, want: "not base64url"},
		{name: "not JSON", values: []string{mustBase64("not json")}, want: "not valid JSON"},
		{name: "no username", values: []string{mustBase64(`{"groups":["g"]}`)}, want: "no username"},
		{name: "group not a header value", values: []string{mustBase64(`{"username":"u","groups":["a\nImpersonate-User: root"]}`)}, want: "not allowed in an HTTP header"},
		{name: "two identities", values: []string{mustBase64(`{"username":"a"}`), mustBase64(`{"username":"b"}`)}, want: "want one"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := api.requests.Load()
			resp := kas.roundTrip(t, newRequest(t, http.MethodGet, "/api/v1/pods", nil, http.Header{protocol.HeaderIdentity: tt.values}))
			if resp.StatusCode != http.StatusBadRequest {
				t.Fatalf("status %d, want 400", resp.StatusCode)
			}
			status := decodeJSON[metav1.Status](t, resp.Body)
			if status.Kind != "Status" || status.Status != metav1.StatusFailure || status.Code != 400 || !strings.Contains(status.Message, tt.want) {
				t.Errorf("got %+v, want a 400 Status saying %q", status, tt.want)
			}
			if n := api.requests.Load() - before; n != 0 {
				t.Errorf("%d requests reached the API server, want none", n)
			}
		})
	}
}

// TestUnsafePathsAreRefusedAndNothingForwarded: agentk refuses dot
// segments and encoded slashes or dots itself, whatever kas sent.
func TestUnsafePathsAreRefusedAndNothingForwarded(t *testing.T) {
	api := newAPIServer(t, nil)
	_, kas := connect(t, api, nil)
	for _, path := range []string{"/../../escape", "/api/v1/..%2F..%2Fescape", "/api/%2e%2e/x", "/api/./v1"} {
		t.Run(path, func(t *testing.T) {
			before := api.requests.Load()
			resp := kas.roundTrip(t, newRequest(t, http.MethodGet, path, nil, nil))
			if resp.StatusCode != http.StatusBadRequest {
				t.Fatalf("status %d, want 400", resp.StatusCode)
			}
			status := decodeJSON[metav1.Status](t, resp.Body)
			if status.Reason != metav1.StatusReasonBadRequest || !strings.Contains(status.Message, "dot segment") {
				t.Errorf("got %+v, want a 400 BadRequest Status about the dot segment", status)
			}
			if n := api.requests.Load() - before; n != 0 {
				t.Errorf("%d requests reached the API server, want none", n)
			}
		})
	}
}

func mustBase64(s string) string { return base64.RawURLEncoding.EncodeToString([]byte(s)) }

func TestStreamedResponseArrivesChunkByChunk(t *testing.T) {
	const chunks = 5
	next := make(chan struct{})
	api := newAPIServer(t, map[string]http.HandlerFunc{
		"/api/v1/pods": func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			for i := range chunks {
				_, _ = fmt.Fprintf(w, `{"type":"ADDED","object":{"n":%d}}`+"\n", i)
				w.(http.Flusher).Flush()
				// The next event is only written once the test has seen
				// this one, so a buffering proxy would deadlock.
				select {
				case <-next:
				case <-r.Context().Done():
					return
				}
			}
		},
	})
	_, kas := connect(t, api, nil)

	resp := kas.roundTrip(t, newRequest(t, http.MethodGet, "/api/v1/pods?watch=true", nil, nil))
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d, want 200", resp.StatusCode)
	}
	for i := range chunks {
		want := fmt.Sprintf(`{"type":"ADDED","object":{"n":%d}}`+"\n", i)
		got := make([]byte, len(want))
		if _, err := io.ReadFull(resp.Body, got); err != nil {
			t.Fatalf("read event %d: %v", i, err)
		}
		if string(got) != want {
			t.Fatalf("event %d = %q, want %q", i, got, want)
		}
		next <- struct{}{}
	}
	if rest, err := io.ReadAll(resp.Body); err != nil || len(rest) != 0 {
		t.Errorf("after the events: %q, %v; want a clean end", rest, err)
	}
}

// hashReader returns n deterministic pseudo-random bytes and their SHA-256.
func hashReader(n int64) (io.Reader, string) {
	h := sha256.New()
	_, _ = io.Copy(h, io.LimitReader(rand.NewChaCha8([32]byte{1}), n))
	return io.LimitReader(rand.NewChaCha8([32]byte{1}), n), hex.EncodeToString(h.Sum(nil))
}

func TestLargeBodiesStream(t *testing.T) {
	const size = 64 << 20
	api := newAPIServer(t, map[string]http.HandlerFunc{
		"/upload": func(w http.ResponseWriter, r *http.Request) {
			h := sha256.New()
			n, err := io.Copy(h, r.Body)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			_, _ = fmt.Fprintf(w, "%d %x", n, h.Sum(nil))
		},
		"/download": func(w http.ResponseWriter, r *http.Request) {
			body, _ := hashReader(size)
			_, _ = io.Copy(w, body)
		},
	})
	_, kas := connect(t, api, nil)

	t.Run("request body", func(t *testing.T) {
		body, sum := hashReader(size)
		resp := kas.roundTrip(t, newRequest(t, http.MethodPut, "/upload", body, nil))
		got, _ := io.ReadAll(resp.Body)
		if want := fmt.Sprintf("%d %s", size, sum); resp.StatusCode != http.StatusOK || string(got) != want {
			t.Errorf("API server got %d %q, want 200 %q", resp.StatusCode, got, want)
		}
	})
	t.Run("response body", func(t *testing.T) {
		_, want := hashReader(size)
		resp := kas.roundTrip(t, newRequest(t, http.MethodGet, "/download", nil, nil))
		h := sha256.New()
		n, err := io.Copy(h, resp.Body)
		if err != nil || n != size || hex.EncodeToString(h.Sum(nil)) != want {
			t.Errorf("received %d bytes (%v) with sha256 %x, want %d with %s", n, err, h.Sum(nil), size, want)
		}
	})
}

func TestAPIServerFailureIs502Status(t *testing.T) {
	api := newAPIServer(t, nil)
	a, kas := connect(t, api, nil)
	api.Close() // the API server goes away

	resp := kas.roundTrip(t, newRequest(t, http.MethodGet, "/api/v1/pods", nil, nil))
	if resp.StatusCode != http.StatusBadGateway {
		t.Fatalf("status %d, want 502", resp.StatusCode)
	}
	status := decodeJSON[metav1.Status](t, resp.Body)
	if status.Kind != "Status" || status.APIVersion != "v1" || status.Status != metav1.StatusFailure ||
		status.Code != http.StatusBadGateway || status.Reason == "" || !strings.Contains(status.Message, "Kubernetes API server failed") {
		t.Errorf("got %+v, want a 502 Status saying the API server failed", status)
	}
	if !strings.Contains(a.logs.String(), "Kubernetes API server request failed") {
		t.Errorf("failure not logged; logs:\n%s", a.logs)
	}
}

func TestInternalEndpoints(t *testing.T) {
	api := newAPIServer(t, nil)
	a, kas := connect(t, api, nil)
	const config = "observability:\n  logging:\n    level: debug\n"

	tests := []struct {
		name       string
		method     string
		path       string
		body       string
		wantStatus int
		wantConfig string // Configuration() afterwards
		notFromKAS bool   // sent without protocol.HeaderInternal, as a proxied caller's request would be
		wantAPI    int64  // requests that reach the API server
	}{
		{name: "push", method: http.MethodPost, path: protocol.ConfigurationPath, body: config, wantStatus: http.StatusNoContent, wantConfig: config},
		{name: "same again", method: http.MethodPost, path: protocol.ConfigurationPath, body: config, wantStatus: http.StatusNoContent, wantConfig: config},
		{name: "invalid YAML keeps the last", method: http.MethodPost, path: protocol.ConfigurationPath, body: "a: [", wantStatus: http.StatusBadRequest, wantConfig: config},
		{name: "too large", method: http.MethodPost, path: protocol.ConfigurationPath, body: "a: " + strings.Repeat("x", maxConfigurationSize), wantStatus: http.StatusRequestEntityTooLarge, wantConfig: config},
		{name: "GET", method: http.MethodGet, path: protocol.ConfigurationPath, wantStatus: http.StatusMethodNotAllowed, wantConfig: config},
		{name: "unknown internal path", method: http.MethodGet, path: protocol.InternalPathPrefix + "nope", wantStatus: http.StatusNotFound, wantConfig: config},
		{name: "a caller's request is not internal", method: http.MethodPost, path: protocol.ConfigurationPath, body: "a: 1", notFromKAS: true, wantStatus: http.StatusOK, wantConfig: config, wantAPI: 1},
		{name: "empty configuration", method: http.MethodPost, path: protocol.ConfigurationPath, body: "", wantStatus: http.StatusNoContent, wantConfig: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := api.requests.Load()
			header := http.Header{protocol.HeaderInternal: {"1"}}
			if tt.notFromKAS {
				header = nil
			}
			resp := kas.roundTrip(t, newRequest(t, tt.method, tt.path, strings.NewReader(tt.body), header))
			if resp.StatusCode != tt.wantStatus {
				body, _ := io.ReadAll(resp.Body)
				t.Fatalf("status %d (%s), want %d", resp.StatusCode, body, tt.wantStatus)
			}
			if got := string(a.Configuration()); got != tt.wantConfig {
				t.Errorf("Configuration() = %q, want %q", got, tt.wantConfig)
			}
			if n := api.requests.Load() - before; n != tt.wantAPI {
				t.Errorf("%d requests reached the API server, want %d", n, tt.wantAPI)
			}
		})
	}
	if n := strings.Count(a.logs.String(), "agent configuration changed"); n != 2 {
		t.Errorf("logged %d configuration changes, want 2 (the first push and the empty one)", n)
	}
}

func TestRequestsCountedByCode(t *testing.T) {
	api := newAPIServer(t, map[string]http.HandlerFunc{
		"/missing": func(w http.ResponseWriter, r *http.Request) { http.NotFound(w, r) },
	})
	a, kas := connect(t, api, nil)
	for _, path := range []string{"/api", "/api", "/missing"} {
		resp := kas.roundTrip(t, newRequest(t, http.MethodGet, path, nil, nil))
		_, _ = io.Copy(io.Discard, resp.Body)
		_ = resp.Body.Close()
	}
	metrics := scrape(t, a)
	for _, want := range []string{`agentk_requests_total{code="200"} 2`, `agentk_requests_total{code="404"} 1`, "agentk_tunnel_connected 1"} {
		if !strings.Contains(metrics, want) {
			t.Errorf("metrics lack %q:\n%s", want, metrics)
		}
	}
}

func TestOpenEndedRequestsUseSmallBuffers(t *testing.T) {
	tests := []struct {
		target string
		want   bool
	}{
		{"/api/v1/namespaces/default/pods?watch=true", true},
		{"/api/v1/namespaces/default/pods?watch=1&resourceVersion=5", true},
		{"/api/v1/watch/namespaces/default/pods", true},
		{"/apis/apps/v1/watch/deployments", true},
		{"/api/v1/namespaces/default/pods/web/log?follow=true", true},
		{"/api/v1/namespaces/default/pods?watch=false", false},
		{"/api/v1/namespaces/default/pods/web/log", false},
		{"/api/v1/pods?limit=500", false},
	}
	for _, tt := range tests {
		r := newRequest(t, http.MethodGet, tt.target, nil, nil)
		if got := openEnded(r); got != tt.want {
			t.Errorf("openEnded(%s) = %v, want %v", tt.target, got, tt.want)
		}
	}
}
