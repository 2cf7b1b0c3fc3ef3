package tunnel

import (
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kasproject/kas/protocol"
	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/gitlab"
)

// TestMadeUpTokensDoNotGrowMemory sends 20,000 agent connection attempts
// with made-up tokens from one address through a real listener, with the
// GitLab client (and its answer cache) in front of a fake GitLab, and
// checks what kas holds on to afterwards. Before limits were taken per
// address for refused tokens and per token only once GitLab accepted it,
// this grew the heap by about 8 MiB (a limiter entry and a cached 401 per
// made-up token) and asked GitLab 20,000 times.
func TestMadeUpTokensDoNotGrowMemory(t *testing.T) {
	const attempts = 20000
	// GitLab knows no token: every one is a 401. (A plain server rather
	// than gitlabtest, which keeps every request and would be measured.)
	var asked atomic.Int64
	rails := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		asked.Add(1)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		_, _ = io.WriteString(w, `{"message":"401 Unauthorized"}`)
	}))
	defer rails.Close()
	client, err := gitlab.NewClient(gitlab.ClientOptions{BaseURL: rails.URL, Secret: []byte("0123456789abcdef0123456789abcdef")})
	if err != nil {
		t.Fatal(err)
	}
	defer client.CloseIdleConnections()
	e, err := NewEndpoint(Options{
		API: client, Registry: registry.NewMemory(), Logger: slog.New(slog.DiscardHandler),
		PingInterval: time.Minute, PingTimeout: 10 * time.Second, MaxConnectionAge: time.Hour,
		GracePeriod: time.Second, ConnectionsPerTokenPerMinute: 40000,
	})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(e)
	defer srv.Close()
	transport := &http.Transport{}
	defer transport.CloseIdleConnections()
	c := &http.Client{Transport: transport}

	before := heapInUse()
	start := time.Now()
	codes := map[int]int{}
	for i := range attempts {
		req, _ := http.NewRequest(http.MethodGet, srv.URL+protocol.AgentPath, nil)
		req.Header.Set("Connection", "Upgrade")
		req.Header.Set("Upgrade", "websocket")
		req.Header.Set("Sec-WebSocket-Version", "13")
		req.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
		req.Header.Set("Sec-WebSocket-Protocol", protocol.Subprotocol)
		req.Header.Set("Authorization", fmt.Sprintf("Bearer made-up-token-%08d-%s", i, strings.Repeat("x", 40)))
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		codes[resp.StatusCode]++
	}
	transport.CloseIdleConnections()
	grown := int64(heapInUse()) - int64(before)
	t.Logf("%d made-up tokens: answers %v, GitLab asked %d times, heap grew by %.2f MiB",
		attempts, codes, asked.Load(), float64(grown)/(1<<20))
	// The allowance, plus what refilled while the loop ran (slow under -race).
	allowance := int64(refusedPerAddressPerMinute) + int64(time.Since(start).Seconds()*refusedPerAddressPerMinute/60) + 2
	if n := asked.Load(); n > allowance {
		t.Errorf("GitLab was asked %d times, want at most %d (the address's allowance)", n, allowance)
	}
	if int64(codes[http.StatusTooManyRequests]) < attempts-allowance {
		t.Errorf("answers %v: want all but the allowance refused with 429", codes)
	}
	if n, m := e.refusals.size(), e.limiter.size(); n != 1 || m != 0 {
		t.Errorf("limiter tables hold %d addresses and %d tokens, want 1 and 0", n, m)
	}
	if grown > 2<<20 {
		t.Errorf("heap grew by %.2f MiB, want well under 2 MiB", float64(grown)/(1<<20))
	}
	runtime.KeepAlive(e)
	runtime.KeepAlive(client)
}

// heapInUse is the live heap after a full collection.
func heapInUse() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}
