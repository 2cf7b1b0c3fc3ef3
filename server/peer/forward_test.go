package peer

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"google.golang.org/grpc"

	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/peer/peerpb"
)

// testTimeout bounds every wait, so a broken path fails instead of hanging.
const testTimeout = 10 * time.Second

func TestForwardCarriesRequest(t *testing.T) {
	a, _, _ := twoNodes(t)
	big := bytes.Repeat([]byte("x"), 200<<10)
	tests := []struct {
		name        string
		method      string
		target      string // path and query as sent
		body        io.Reader
		wantPath    string
		wantRawPath string
		wantQuery   string
		wantLen     int64
		wantSum     string
	}{
		{
			name: "GET with query", method: http.MethodGet,
			target:   "/echo/api/v1/namespaces/default/pods?labelSelector=app%3Dweb&watch=false",
			wantPath: "/echo/api/v1/namespaces/default/pods", wantQuery: "labelSelector=app%3Dweb&watch=false",
			wantSum: patternSHA256(0),
		},
		{
			name: "encoded path", method: http.MethodGet,
			target:   "/echo/api/v1/namespaces/a%3Ab/pods", // an encoded slash or dot would be refused
			wantPath: "/echo/api/v1/namespaces/a:b/pods", wantRawPath: "/echo/api/v1/namespaces/a%3Ab/pods",
			wantSum: patternSHA256(0),
		},
		{
			name: "bytes that are not UTF-8", method: http.MethodGet,
			target:   "/echo/caf%E9?q=%E9",
			wantPath: "/echo/caf\xe9", wantRawPath: "", wantQuery: "q=%E9",
			wantSum: patternSHA256(0),
		},
		{
			name: "small body inline", method: http.MethodPost, target: "/echo/apis/apps/v1/deployments",
			body: strings.NewReader(`{"kind":"Deployment"}`), wantPath: "/echo/apis/apps/v1/deployments",
			wantLen: 21, wantSum: sha256Hex([]byte(`{"kind":"Deployment"}`)),
		},
		{
			name: "body streamed after the node takes the request", method: http.MethodPut, target: "/echo/big",
			body: bytes.NewReader(big), wantPath: "/echo/big", wantLen: int64(len(big)), wantSum: sha256Hex(big),
		},
		{
			name: "body of unknown length", method: http.MethodPatch, target: "/echo/chunked",
			body: io.MultiReader(strings.NewReader("part one,"), strings.NewReader("part two")), wantPath: "/echo/chunked",
			wantLen: 17, wantSum: sha256Hex([]byte("part one,part two")),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, err := http.NewRequest(tt.method, a.proxy.URL+tt.target, tt.body)
			if err != nil {
				t.Fatal(err)
			}
			req.Header.Set("Accept", "application/json")
			req.Header.Add("X-Custom", "one")
			req.Header.Add("X-Custom", "two")
			req.Header.Set("Authorization", "Bearer pat:1:secret") // the proxy must strip it
			req.Header.Set("X-Raw", "caf\xe9")                     // Latin-1, as old clients send
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				b, _ := io.ReadAll(resp.Body)
				t.Fatalf("status %d: %s", resp.StatusCode, b)
			}
			if got := resp.Header.Get("X-Agent"); got != "b" {
				t.Errorf("response header X-Agent = %q, want b", got)
			}
			var got echo
			if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
				t.Fatal(err)
			}
			if got.PathHex != hex.EncodeToString([]byte(tt.wantPath)) {
				t.Errorf("agent saw path %s in hex, want %x", got.PathHex, tt.wantPath)
			}
			if got.RawHeaderHex != hex.EncodeToString([]byte("caf\xe9")) {
				t.Errorf("agent saw X-Raw %s in hex, want %x", got.RawHeaderHex, "caf\xe9")
			}
			if got.Method != tt.method || (got.Path != tt.wantPath && utf8.ValidString(tt.wantPath)) || got.RawPath != tt.wantRawPath || got.RawQuery != tt.wantQuery {
				t.Errorf("agent saw %s %s (raw %q) ?%s; want %s %s (raw %q) ?%s",
					got.Method, got.Path, got.RawPath, got.RawQuery, tt.method, tt.wantPath, tt.wantRawPath, tt.wantQuery)
			}
			if got.BodyLength != tt.wantLen || got.BodySHA256 != tt.wantSum {
				t.Errorf("agent saw a body of %d bytes (sha256 %s), want %d (%s)", got.BodyLength, got.BodySHA256, tt.wantLen, tt.wantSum)
			}
			if v := got.Header.Values("X-Custom"); len(v) != 2 || v[0] != "one" || v[1] != "two" {
				t.Errorf("agent saw X-Custom %q, want [one two]", v)
			}
			if got.Header.Get("Accept") != "application/json" {
				t.Errorf("agent saw Accept %q", got.Header.Get("Accept"))
			}
			if got.Header.Get("Authorization") != "" {
				t.Error("the caller's Authorization header reached the agent")
			}
			if got.Identity != testIdentity.Username {
				t.Errorf("agent impersonates %q, want %q", got.Identity, testIdentity.Username)
			}
		})
	}
}

func TestForwardStreamsResponseChunkByChunk(t *testing.T) {
	a, _, agent := twoNodes(t)
	resp, err := http.Get(a.proxy.URL + "/chunks?n=3")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	lines := bufio.NewReader(resp.Body)
	for i := range 3 {
		if i > 0 {
			// The agent writes the next chunk only now: had any hop
			// buffered the body, the previous read would not have returned.
			select {
			case agent.release <- struct{}{}:
			case <-time.After(testTimeout):
				t.Fatal("agent never asked for the next chunk")
			}
		}
		line, err := lines.ReadString('\n')
		if err != nil {
			t.Fatalf("chunk %d: %v", i, err)
		}
		if want := fmt.Sprintf("chunk %d\n", i); line != want {
			t.Fatalf("got %q, want %q", line, want)
		}
	}
	if rest, err := io.ReadAll(lines); err != nil || len(rest) != 0 {
		t.Fatalf("after the last chunk: %q, %v", rest, err)
	}
}

func TestForwardLargeBodies(t *testing.T) {
	a, _, _ := twoNodes(t)
	const size = 16 << 20
	t.Run("upload", func(t *testing.T) {
		resp, err := http.Post(a.proxy.URL+"/echo/upload", "application/octet-stream", io.LimitReader(pattern{}, size))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var got echo
		if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
			t.Fatal(err)
		}
		if got.BodyLength != size || got.BodySHA256 != patternSHA256(size) {
			t.Fatalf("agent got %d bytes (sha256 %s), want %d (%s)", got.BodyLength, got.BodySHA256, size, patternSHA256(size))
		}
	})
	for _, length := range []string{"known", "unknown"} {
		t.Run("download, length "+length, func(t *testing.T) {
			resp, err := http.Get(fmt.Sprintf("%s/bytes?n=%d&length=%s", a.proxy.URL, size, length))
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			if err != nil {
				t.Fatal(err)
			}
			if len(body) != size || sha256Hex(body) != patternSHA256(size) {
				t.Fatalf("got %d bytes (sha256 %s), want %d (%s)", len(body), sha256Hex(body), size, patternSHA256(size))
			}
		})
	}
}

func TestForwardCancellationReachesAgent(t *testing.T) {
	a, b, agent := twoNodes(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, a.proxy.URL+"/watch", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	line, err := bufio.NewReader(resp.Body).ReadString('\n')
	if err != nil || line != "event 1\n" {
		t.Fatalf("first event: %q, %v", line, err)
	}
	cancel()
	select {
	case <-agent.canceled:
	case <-time.After(testTimeout):
		t.Fatal("cancelling the request on node A did not cancel it at the agent behind node B")
	}
	waitFor(t, "node B to count the cancelled request", func() bool {
		return counterValue(b.server.results.canceled) == 1
	})
}

func TestForwardReportsAgentFailure(t *testing.T) {
	a, _, _ := twoNodes(t)
	rt, err := a.router.Route(context.Background(), 1)
	if err != nil {
		t.Fatal(err)
	}
	t.Run("before the response", func(t *testing.T) {
		req, _ := http.NewRequest(http.MethodGet, "http://agent/abort-before-answering", nil)
		resp, err := rt.RoundTrip(req)
		if err == nil {
			resp.Body.Close()
			t.Fatal("RoundTrip succeeded; want an error, since the agent failed")
		}
		if errors.Is(err, registry.ErrNoTunnel) || !strings.Contains(err.Error(), "agent 1") {
			t.Errorf("error %q should say agent 1 failed, not that it has no tunnel", err)
		}
	})
	t.Run("in the body", func(t *testing.T) {
		req, _ := http.NewRequest(http.MethodGet, "http://agent/abort", nil)
		resp, err := rt.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		n, err := io.Copy(io.Discard, resp.Body)
		if err == nil {
			t.Fatalf("body ended cleanly after %d bytes; want an error, since the agent failed", n)
		}
		if !strings.Contains(err.Error(), "agent 1") {
			t.Errorf("error %q does not say which agent failed", err)
		}
	})
}

func TestForwardTrailers(t *testing.T) {
	a, _, _ := twoNodes(t)
	rt, err := a.router.Route(context.Background(), 1)
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest(http.MethodGet, "http://agent/trailers", nil)
	resp, err := rt.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if _, ok := resp.Trailer["X-Checksum"]; !ok {
		t.Fatalf("trailer not announced: %v", resp.Trailer)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil || string(body) != "body" {
		t.Fatalf("body %q, %v", body, err)
	}
	if got := resp.Trailer.Get("X-Checksum"); got != "abc" {
		t.Fatalf("trailer X-Checksum = %q, want abc", got)
	}
}

// dialUpgrade sends an exec upgrade request to path through node n's proxy
// and returns the connection and the response.
func dialUpgrade(t *testing.T, n *node, path string) (net.Conn, *bufio.Reader, *http.Response) {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(n.proxy.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	_ = conn.SetDeadline(time.Now().Add(testTimeout))
	_, err = io.WriteString(conn, "POST "+path+" HTTP/1.1\r\n"+
		"Host: kas\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nContent-Length: 0\r\n\r\n")
	if err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	return conn, br, resp
}

func TestForwardUpgradeRefused(t *testing.T) {
	a, _, _ := twoNodes(t)
	_, _, resp := dialUpgrade(t, a, "/api/v1/namespaces/default/pods/web/exec/refused")
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusForbidden || !strings.Contains(string(body), "exec not allowed") {
		t.Fatalf("got %s %q; want the agent's 403", resp.Status, body)
	}
}

func TestForwardUpgrade(t *testing.T) {
	a, _, _ := twoNodes(t)
	conn, br, resp := dialUpgrade(t, a, "/api/v1/namespaces/default/pods/web/exec?command=sh")
	if resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("Upgrade") != "SPDY/3.1" {
		t.Fatalf("got %s, Upgrade %q; want 101 to SPDY/3.1", resp.Status, resp.Header.Get("Upgrade"))
	}
	for _, msg := range []string{"hello", strings.Repeat("stream ", 20000)} {
		if _, err := io.WriteString(conn, msg); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(br, got); err != nil {
			t.Fatal(err)
		}
		if string(got) != strings.ToUpper(msg) {
			t.Fatalf("agent answered %.40q…, want %.40q…", got, strings.ToUpper(msg))
		}
	}
	// Half-closing ends the exchange on every hop, and the caller then
	// sees the end of the stream.
	if err := conn.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if rest, err := io.ReadAll(br); err != nil || len(rest) != 0 {
		t.Fatalf("after half-close: %q, %v; want a clean end", rest, err)
	}
}

func TestForwardTriesNextNode(t *testing.T) {
	a := newNode(t, nodeConfig{})
	b := newNode(t, nodeConfig{}) // no tunnel
	c := newNode(t, nodeConfig{})
	c.connectAgent(t, 1, newTestAgent("c"))
	a.reg.setRemote([]string{b.url}, []string{c.url})
	// Successive requests start at successive nodes, so one of every two
	// starts at B.
	for range 2 {
		got := getEcho(t, a.proxy.URL+"/echo/x")
		if got.Agent != "c" {
			t.Fatalf("served by agent %q, want c", got.Agent)
		}
	}
	// A body too large to travel inline is still intact when the node that
	// takes the request is not the first one asked.
	big := bytes.Repeat([]byte("y"), 100<<10)
	for range 2 {
		resp, err := http.Post(a.proxy.URL+"/echo/upload", "application/octet-stream", bytes.NewReader(big))
		if err != nil {
			t.Fatal(err)
		}
		var got echo
		err = json.NewDecoder(resp.Body).Decode(&got)
		resp.Body.Close()
		if err != nil {
			t.Fatal(err)
		}
		if got.Agent != "c" || got.BodySHA256 != sha256Hex(big) {
			t.Fatalf("served by agent %q with a body of %d bytes; want c with all %d", got.Agent, got.BodyLength, len(big))
		}
	}
	if n := counterValue(b.server.results.noTunnel); n != 2 {
		t.Errorf("node B answered no tunnel %v times, want 2", n)
	}
	if n := counterValue(a.router.metrics.failNoTunnel); n != 2 {
		t.Errorf("node A counted %v no-tunnel failures, want 2", n)
	}
	if n := counterValue(a.router.metrics.ok); n != 4 {
		t.Errorf("node A counted %v forwards, want 4", n)
	}
}

func TestForwardSkipsUnusableURLs(t *testing.T) {
	tests := []struct {
		name       string
		remote     func(bad, good string) [][]string
		bad        func(testing.TB) string
		wantReason string
	}{
		{
			name:       "unreachable URL, next URL of the same node",
			remote:     func(bad, good string) [][]string { return [][]string{{bad, good}} },
			bad:        closedURL,
			wantReason: reasonUnreachable,
		},
		{
			name:       "unreachable node, next node",
			remote:     func(bad, good string) [][]string { return [][]string{{bad}, {good}, {bad}} },
			bad:        closedURL,
			wantReason: reasonUnreachable,
		},
		{
			name:       "URL of the wrong scheme",
			remote:     func(bad, good string) [][]string { return [][]string{{bad, good}} },
			bad:        func(testing.TB) string { return "http://127.0.0.1:1" },
			wantReason: reasonBadURL,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, b, _ := twoNodes(t)
			a.reg.setRemote(tt.remote(tt.bad(t), b.url)...)
			for range 2 {
				if got := getEcho(t, a.proxy.URL+"/echo/x"); got.Agent != "b" {
					t.Fatalf("served by agent %q, want b", got.Agent)
				}
			}
			failures := map[string]float64{
				reasonUnreachable: counterValue(a.router.metrics.failUnreachable),
				reasonBadURL:      counterValue(a.router.metrics.failURL),
			}
			if failures[tt.wantReason] == 0 {
				t.Errorf("no %s failure counted: %v", tt.wantReason, failures)
			}
		})
	}
}

// TestForwardNoNodeTakesIt: the error says what happened, the agent's
// tunnels gone (the agent is reconnecting) or a node unreachable (kas's
// failure), and names the nodes.
func TestForwardNoNodeTakesIt(t *testing.T) {
	tests := []struct {
		name   string
		closed bool // a node that refuses connections holds the agent too
		want   error
		says   []string
	}{
		{"no node has a tunnel", false, registry.ErrNoTunnel, []string{"no tunnel for agent 1 on this node"}},
		{"a holder is unreachable", true, registry.ErrNodeUnreachable, []string{"connection refused", "unreachable"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := newNode(t, nodeConfig{})
			b := newNode(t, nodeConfig{}) // no tunnel
			nodes := [][]string{{b.url}}
			says := tt.says
			if tt.closed {
				closed := closedURL(t)
				nodes = append(nodes, []string{closed})
				says = append(says, closed)
			} else {
				says = append(says, b.url)
			}
			a.reg.setRemote(nodes...)
			rt, err := a.router.Route(context.Background(), 1)
			if err != nil {
				t.Fatal(err)
			}
			req, _ := http.NewRequest(http.MethodPost, "http://agent/echo", strings.NewReader("body"))
			_, err = rt.RoundTrip(req)
			if !errors.Is(err, tt.want) {
				t.Fatalf("error %v; want %v", err, tt.want)
			}
			for _, want := range says {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not mention %q", err, want)
				}
			}
		})
	}
}

func TestForwardFallsBackToLocalTunnel(t *testing.T) {
	// Route picks node B, then the agent moves to node A: B says it has no
	// tunnel and A serves the request itself.
	a := newNode(t, nodeConfig{})
	b := newNode(t, nodeConfig{})
	a.reg.setRemote([]string{b.url})
	rt, err := a.router.Route(context.Background(), 1)
	if err != nil {
		t.Fatal(err)
	}
	a.connectAgent(t, 1, newTestAgent("a"))
	req, _ := http.NewRequest(http.MethodPost, "http://agent/echo", strings.NewReader("body"))
	resp, err := rt.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var got echo
	if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
		t.Fatal(err)
	}
	if got.Agent != "a" || got.BodySHA256 != sha256Hex([]byte("body")) {
		t.Fatalf("served by %q with body sha256 %s", got.Agent, got.BodySHA256)
	}
}

func TestRouteWaitsForAgent(t *testing.T) {
	a := newNode(t, nodeConfig{})
	b := newNode(t, nodeConfig{})
	t.Run("until its deadline", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		if _, err := a.router.Route(ctx, 1); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Route = %v, want context.DeadlineExceeded", err)
		}
	})
	t.Run("until the agent connects elsewhere", func(t *testing.T) {
		routed := make(chan error, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
			defer cancel()
			_, err := a.router.Route(ctx, 1)
			routed <- err
		}()
		b.connectAgent(t, 1, newTestAgent("b"))
		a.reg.setRemote([]string{b.url})
		if err := <-routed; err != nil {
			t.Fatal(err)
		}
	})
	t.Run("and prefers its own tunnel", func(t *testing.T) {
		a.connectAgent(t, 1, newTestAgent("a"))
		if got := getEcho(t, a.proxy.URL+"/echo/x"); got.Agent != "a" {
			t.Fatalf("served by agent %q, want a", got.Agent)
		}
	})
}

func getEcho(t *testing.T, url string) echo {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("GET %s: %d %s", url, resp.StatusCode, b)
	}
	var got echo
	if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
		t.Fatal(err)
	}
	return got
}

// waitFor polls cond, which becomes true by an event the test cannot wait
// on directly (a metric updated as a handler returns).
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(testTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// stallingForward takes a request (acknowledging it, as a node with a
// tunnel does) and holds it until its stream ends.
type stallingForward struct {
	peerpb.UnimplementedForwardServer
	took chan struct{}
}

func (f *stallingForward) RoundTrip(stream grpc.BidiStreamingServer[peerpb.ClientMessage, peerpb.ServerMessage]) error {
	if err := stream.SendHeader(nil); err != nil {
		return err
	}
	f.took <- struct{}{}
	<-stream.Context().Done()
	return stream.Context().Err()
}

func TestForwardRetriesOnlyIdempotentRequestsAfterNodeLoss(t *testing.T) {
	tests := []struct {
		method    string
		wantRetry bool
	}{
		{http.MethodGet, true},
		{http.MethodPost, false},
	}
	for _, tt := range tests {
		t.Run(tt.method, func(t *testing.T) {
			a, b, _ := twoNodes(t)
			// Node D takes the request and then dies before answering.
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			d := grpc.NewServer()
			stalling := &stallingForward{took: make(chan struct{})}
			peerpb.RegisterForwardServer(d, stalling)
			served := make(chan struct{})
			go func() { defer close(served); _ = d.Serve(l) }()
			go func() {
				<-stalling.took
				d.Stop()
			}()
			t.Cleanup(func() { d.Stop(); <-served })
			// As two addresses of one node, they are tried in this order.
			a.reg.setRemote([]string{"grpc://" + l.Addr().String(), b.url})

			rt, err := a.router.Route(context.Background(), 1)
			if err != nil {
				t.Fatal(err)
			}
			req, _ := http.NewRequest(tt.method, "http://agent/echo", strings.NewReader("body"))
			resp, err := rt.RoundTrip(req)
			if !tt.wantRetry {
				if err == nil {
					resp.Body.Close()
					t.Fatal("request sent again after the node that took it was lost")
				}
				if errors.Is(err, registry.ErrNoTunnel) {
					t.Errorf("error %q claims no node holds a tunnel", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var got echo
			if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
				t.Fatal(err)
			}
			if got.Agent != "b" {
				t.Fatalf("served by %q, want b", got.Agent)
			}
		})
	}
}
