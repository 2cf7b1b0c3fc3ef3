package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kasproject/kas/internal/fakekube"
)

func TestListThroughProxy(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.startAgent(t, asAgent)

	// The proxy answers on both of its mount points.
	for _, prefix := range []string{"/k8s-proxy", "/-/kubernetes-agent/k8s-proxy"} {
		t.Run(prefix, func(t *testing.T) {
			cs := clientsetFor(t, "http://"+e.kas.public+prefix, e.transport, pat(asAgent.id, alicePAT))
			ctx, cancel := context.WithTimeout(context.Background(), waitFor)
			defer cancel()
			list, err := cs.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
			if err != nil {
				t.Fatalf("list namespaces: %v", err)
			}
			var names []string
			for _, ns := range list.Items {
				names = append(names, ns.Name)
			}
			if want := []string{"default", "kube-system"}; !slices.Equal(names, want) {
				t.Fatalf("namespaces %v, want %v", names, want)
			}
			got, ok := e.kube.LastRequest("/api/v1/namespaces")
			if !ok {
				t.Fatal("the list never reached the cluster")
			}
			if got.Method != http.MethodGet || got.Header.Get("Authorization") != "Bearer "+agentSAToken {
				t.Fatalf("the cluster saw %s with Authorization %q, want GET with the agent's own token",
					got.Method, got.Header.Get("Authorization"))
			}
		})
	}
}

func TestWatchStreamsEventsAsTheyHappen(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.startAgent(t, asAgent)
	cs := e.clientset(t, pat(asAgent.id, alicePAT))

	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	w, err := cs.CoreV1().Namespaces().Watch(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatalf("watch namespaces: %v", err)
	}
	defer w.Stop()
	eventually(t, func() bool { return e.kube.Watchers() == 1 },
		func() string { return fmt.Sprintf("the cluster has %d watches open, want 1", e.kube.Watchers()) })

	// Each event must reach the client before the next one exists: nothing
	// on the way may hold a chunk back waiting for more.
	for i, ev := range []fakekube.Event{
		{Type: "ADDED", Name: "team-a"},
		{Type: "MODIFIED", Name: "team-a"},
		{Type: "ADDED", Name: "team-b"},
		{Type: "DELETED", Name: "team-a"},
	} {
		e.kube.Emit(ev)
		select {
		case got, ok := <-w.ResultChan():
			if !ok {
				t.Fatalf("event %d: the watch ended", i)
			}
			ns, isNS := got.Object.(*corev1.Namespace)
			if !isNS || string(got.Type) != ev.Type || ns.Name != ev.Name {
				t.Fatalf("event %d: got %s %#v, want %s of namespace %s", i, got.Type, got.Object, ev.Type, ev.Name)
			}
		case <-time.After(waitFor):
			t.Fatalf("event %d (%s %s) did not arrive", i, ev.Type, ev.Name)
		}
	}
}

func TestCancelledWatchCancelsUpstream(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.startAgent(t, asAgent)
	cs := e.clientset(t, pat(asAgent.id, alicePAT))

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	w, err := cs.CoreV1().Namespaces().Watch(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatalf("watch namespaces: %v", err)
	}
	defer w.Stop()
	eventually(t, func() bool { return e.kube.Watchers() == 1 },
		func() string { return fmt.Sprintf("the cluster has %d watches open, want 1", e.kube.Watchers()) })

	cancel() // the caller gives up
	select {
	case path := <-e.kube.Cancelled():
		if path != "/api/v1/namespaces" {
			t.Fatalf("the cluster saw %s cancelled, want the watch", path)
		}
	case <-time.After(waitFor):
		t.Fatal("the cancellation never reached the cluster: its watch is still open")
	}
	if n := e.kube.Watchers(); n != 0 {
		t.Fatalf("the cluster still has %d watches open", n)
	}
	// client-go ends the watch too.
	timeout := time.After(waitFor)
	for {
		select {
		case _, ok := <-w.ResultChan():
			if !ok {
				return
			}
		case <-timeout:
			t.Fatal("client-go did not end the cancelled watch")
		}
	}
}

func TestUpgradeCarriesBytesBothWays(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.startAgent(t, asAgent)

	for _, tc := range []struct {
		name    string
		upgrade string
		path    string
		header  string // extra request header lines
	}{
		{
			name:    "SPDY exec",
			upgrade: "SPDY/3.1",
			path:    "/api/v1/namespaces/default/pods/web/exec?command=sh&stdin=true&stdout=true",
			header:  "X-Stream-Protocol-Version: v4.channel.k8s.io\r\n",
		},
		{
			name:    "WebSocket attach",
			upgrade: "websocket",
			path:    "/api/v1/namespaces/default/pods/web/attach?stdin=true&stdout=true",
			header:  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: v5.channel.k8s.io\r\n",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conn, err := net.DialTimeout("tcp", e.kas.public, waitFor)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			_ = conn.SetDeadline(time.Now().Add(waitFor))
			fmt.Fprintf(conn, "POST /k8s-proxy%s HTTP/1.1\r\nHost: %s\r\nAuthorization: %s\r\nConnection: Upgrade\r\nUpgrade: %s\r\n%s\r\n",
				tc.path, e.kas.public, pat(asAgent.id, alicePAT).authorization, tc.upgrade, tc.header)
			br := bufio.NewReader(conn)
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("read the answer to the upgrade: %v", err)
			}
			if resp.StatusCode != http.StatusSwitchingProtocols || !strings.EqualFold(resp.Header.Get("Upgrade"), tc.upgrade) ||
				resp.Header.Get("X-Fakekube-Upgrade") != "echo" {
				body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
				t.Fatalf("got %s %v %s, want 101 switching to %s with the cluster's headers", resp.Status, resp.Header, body, tc.upgrade)
			}

			path, _, _ := strings.Cut(tc.path, "?")
			got, _ := e.kube.LastRequest(path)
			if got.Header.Get("Upgrade") != tc.upgrade || !strings.EqualFold(got.Header.Get("Connection"), "Upgrade") ||
				got.Header.Get("Authorization") != "Bearer "+agentSAToken {
				t.Fatalf("the cluster saw headers %v: want Connection: Upgrade, Upgrade: %s and the agent's own token", got.Header, tc.upgrade)
			}
			for _, line := range strings.Split(strings.TrimSpace(tc.header), "\r\n") {
				name, value, _ := strings.Cut(line, ": ")
				if got.Header.Get(name) != value {
					t.Errorf("the cluster saw %s %q, want %q", name, got.Header.Get(name), value)
				}
			}

			// Interactive: each line comes back before the next is sent.
			for _, line := range []string{"ls\n", "echo hello\n", "exit\n"} {
				if _, err := io.WriteString(conn, line); err != nil {
					t.Fatal(err)
				}
				echo := make([]byte, len(line))
				if _, err := io.ReadFull(br, echo); err != nil || string(echo) != line {
					t.Fatalf("echo of %q: got %q, %v", line, echo, err)
				}
			}
			// Bulk, full duplex: send 1 MiB while reading it back.
			payload := make([]byte, 1<<20)
			_, _ = rand.Read(payload)
			sent := make(chan error, 1)
			go func() {
				_, err := conn.Write(payload)
				sent <- err
			}()
			echo := make([]byte, len(payload))
			if _, err := io.ReadFull(br, echo); err != nil {
				t.Fatalf("read the echo of 1 MiB: %v", err)
			}
			if err := <-sent; err != nil {
				t.Fatalf("send 1 MiB: %v", err)
			}
			if !bytes.Equal(echo, payload) {
				t.Fatal("the 1 MiB came back changed")
			}

			// The caller ending its side ends the session.
			if err := conn.(*net.TCPConn).CloseWrite(); err != nil {
				t.Fatal(err)
			}
			if rest, err := io.ReadAll(br); err != nil || len(rest) != 0 {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					t.Fatal("the session stayed open after the caller closed its side")
				}
				t.Fatalf("after closing: got %q, %v; want the end of the stream", rest, err)
			}
		})
	}
}
