package tunnel

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"golang.org/x/net/http2"

	"github.com/kasproject/kas/protocol"
	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/gitlab"
)

// receptiveStandIn accepts kas's WebSocket like a receptive agentk and
// serves HTTP/2 on it with handler.
func receptiveStandIn(t *testing.T, handler http.Handler) string {
	t.Helper()
	up := websocket.Upgrader{Subprotocols: []string{protocol.Subprotocol}}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		answer := http.Header{}
		answer.Set(protocol.HeaderPodName, "agentk-receptive")
		ws, err := up.Upgrade(w, r, answer)
		if err != nil {
			return
		}
		(&http2.Server{}).ServeConn(protocol.NewConn(ws), &http2.ServeConnOpts{Handler: handler})
	}))
	t.Cleanup(srv.Close)
	return "ws" + strings.TrimPrefix(srv.URL, "http") + "/"
}

func TestServeReceptiveConnection(t *testing.T) {
	var disconnected []registry.Tunnel
	f := newFixture(t, func(o *Options) {
		o.OnDisconnect = func(t registry.Tunnel) { disconnected = append(disconnected, t) }
	})
	url := receptiveStandIn(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "hello from "+r.URL.Path)
	}))
	ws, resp, err := (&websocket.Dialer{Subprotocols: []string{protocol.Subprotocol}}).Dial(url, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancelCause(context.Background())
	served := make(chan error, 1)
	go func() {
		served <- f.endpoint.ServeReceptive(ctx, slog.New(slog.DiscardHandler), ReceptiveConn{
			WS: ws, Agent: gitlab.AgentInfo{AgentID: 9, ProjectID: 100}, Description: resp.Header,
		})
	}()
	tun := f.waitTunnel(t, 9)
	info := tun.Info()
	if !info.Receptive || info.ProjectID != 100 || info.PodName != "agentk-receptive" {
		t.Errorf("registered %+v, want a receptive tunnel with agentk's description", info)
	}
	req, _ := http.NewRequest(http.MethodGet, "http://agentk/api/v1/namespaces", nil)
	got, err := tun.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(got.Body)
	_ = got.Body.Close()
	if string(body) != "hello from /api/v1/namespaces" {
		t.Errorf("got %q through the receptive tunnel", body)
	}

	// Cancelling closes it gracefully and unregisters it.
	cancel(errors.New("no longer listed"))
	select {
	case err := <-served:
		if err != nil {
			t.Errorf("ServeReceptive = %v, want nil after a graceful close", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ServeReceptive did not return after its context was cancelled")
	}
	f.waitGone(t, 9)
	if len(disconnected) != 1 {
		t.Errorf("OnDisconnect called %d times, want once", len(disconnected))
	}

	// A shutting-down endpoint serves nothing more.
	if err := f.endpoint.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	ws2, resp2, err := (&websocket.Dialer{Subprotocols: []string{protocol.Subprotocol}}).Dial(url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.endpoint.ServeReceptive(context.Background(), slog.New(slog.DiscardHandler), ReceptiveConn{WS: ws2, Agent: gitlab.AgentInfo{AgentID: 9}, Description: resp2.Header}); !errors.Is(err, ErrClosing) {
		t.Errorf("ServeReceptive after Shutdown = %v, want ErrClosing", err)
	}
}
