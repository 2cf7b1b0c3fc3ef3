package agent

import (
	"bufio"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/kasproject/kas/protocol"
)

// upgradeEcho is an API server endpoint that switches protocols like exec
// does and then echoes every byte back.
func upgradeEcho(t *testing.T, seen chan<- http.Header) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		seen <- r.Header.Clone()
		if !strings.EqualFold(r.Header.Get("Connection"), "Upgrade") || r.Header.Get("Upgrade") == "" {
			http.Error(w, "expected an upgrade", http.StatusBadRequest)
			return
		}
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Errorf("hijack: %v", err)
			return
		}
		defer conn.Close()
		_, _ = io.WriteString(conn, "HTTP/1.1 101 Switching Protocols\r\n"+
			"Connection: Upgrade\r\n"+
			"Upgrade: "+r.Header.Get("Upgrade")+"\r\n"+
			"X-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n")
		_, _ = io.Copy(conn, brw) // echo until the agent closes
	}
}

func TestUpgradeCarriesBytesBothWays(t *testing.T) {
	seen := make(chan http.Header, 10)
	api := newAPIServer(t, map[string]http.HandlerFunc{
		"/api/v1/namespaces/default/pods/web/exec": upgradeEcho(t, seen),
		"/api/v1/namespaces/default/pods/gone/exec": func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusNotFound)
			_, _ = io.WriteString(w, `{"kind":"Status","code":404}`)
		},
	})
	a, kas := connect(t, api, nil)
	identity := mustEncodeIdentity(t, protocol.Identity{Username: "gitlab:user:alice", Groups: []string{"gitlab:user"}})

	for _, upgrade := range []string{"SPDY/3.1", "websocket"} {
		t.Run(upgrade, func(t *testing.T) {
			fromKAS, toAgent := io.Pipe()
			defer toAgent.Close()
			resp := kas.roundTrip(t, newRequest(t, http.MethodPost, "/api/v1/namespaces/default/pods/web/exec?command=sh&stdin=true", fromKAS, http.Header{
				protocol.HeaderUpgrade:      {upgrade},
				protocol.HeaderIdentity:     {identity},
				"Authorization":             {"Bearer caller"},
				"X-Stream-Protocol-Version": {"v4.channel.k8s.io"},
			}))
			if resp.StatusCode != http.StatusOK || resp.Header.Get(protocol.HeaderUpgradeStatus) != "101" {
				t.Fatalf("got %d with %s=%q, want 200 with 101", resp.StatusCode, protocol.HeaderUpgradeStatus, resp.Header.Get(protocol.HeaderUpgradeStatus))
			}
			if got := resp.Header.Get(protocol.HeaderUpgrade); got != upgrade {
				t.Errorf("response %s = %q, want %q", protocol.HeaderUpgrade, got, upgrade)
			}
			if got := resp.Header.Get("X-Stream-Protocol-Version"); got != "v4.channel.k8s.io" {
				t.Errorf("API server's X-Stream-Protocol-Version = %q, want it passed on", got)
			}
			h := recv(t, seen)
			if h.Get("Upgrade") != upgrade || h.Get("Impersonate-User") != "gitlab:user:alice" ||
				h.Get("Authorization") != "Bearer "+testSAToken || h.Get(protocol.HeaderUpgrade) != "" || h.Get(protocol.HeaderIdentity) != "" {
				t.Errorf("API server saw headers %v", h)
			}

			echo := bufio.NewReader(resp.Body)
			for _, msg := range []string{"ls -l\n", strings.Repeat("x", 300<<10), "exit\n"} {
				if _, err := io.WriteString(toAgent, msg); err != nil {
					t.Fatalf("write to the upgraded stream: %v", err)
				}
				got := make([]byte, len(msg))
				if _, err := io.ReadFull(echo, got); err != nil {
					t.Fatalf("read the echo: %v", err)
				}
				if string(got) != msg {
					t.Fatalf("echo = %.40q, want %.40q", got, msg)
				}
			}
			_ = toAgent.Close() // kas's side ends: the agent closes the upgraded connection
			if rest, err := io.ReadAll(echo); len(rest) != 0 {
				t.Errorf("after close read %q, %v; want the end", rest, err)
			}
		})
	}

	t.Run("refused upgrade passes through", func(t *testing.T) {
		resp := kas.roundTrip(t, newRequest(t, http.MethodPost, "/api/v1/namespaces/default/pods/gone/exec", http.NoBody, http.Header{
			protocol.HeaderUpgrade: {"SPDY/3.1"},
		}))
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusNotFound || resp.Header.Get(protocol.HeaderUpgradeStatus) != "" || string(body) != `{"kind":"Status","code":404}` {
			t.Errorf("got %d %q with upgrade status %q, want the API server's 404 as is", resp.StatusCode, body, resp.Header.Get(protocol.HeaderUpgradeStatus))
		}
	})

	if metrics := scrape(t, a); !strings.Contains(metrics, `agentk_requests_total{code="101"} 2`) {
		t.Errorf("upgrades not counted as 101:\n%s", metrics)
	}
}
