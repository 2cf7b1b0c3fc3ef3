package e2e

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Not parallel: the goroutine check must see this test's goroutines only.
func TestAgentGoneMidRequestIsBadGatewayWithoutLeaks(t *testing.T) {
	for _, tc := range []struct {
		name string
		// kill takes the agent away while a request waits in the cluster.
		kill func(a *agentNode, r *relay)
	}{
		{"connection cut", func(a *agentNode, r *relay) { r.cut() }},
		{"agentk stopped", func(a *agentNode, r *relay) { _ = a.stop() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, nil)
			// Everything the test starts from here on must be gone at the end.
			before := goleak.IgnoreCurrent()

			r := startRelay(t, e.kas.public)
			opts := e.agentOptions(asAgent, r.addr())
			opts.ShutdownGrace = 10 * time.Millisecond // stopped means gone, not draining
			a := runAgent(t, opts)
			waitConnected(t, a.agent)
			waitTunnels(t, e.kas.observability, asAgent.id, 1)

			answer := make(chan *http.Response, 1)
			failed := make(chan error, 1)
			go func() {
				req, _ := http.NewRequest(http.MethodGet, e.proxyURL()+"/slow", nil)
				pat(asAgent.id, alicePAT).apply(req.Header)
				resp, err := e.client.Do(req)
				if err != nil {
					failed <- err
					return
				}
				answer <- resp
			}()
			eventually(t, func() bool { return e.kube.Slow() == 1 },
				func() string { return "the request never reached the cluster" })

			tc.kill(a, r)
			var resp *http.Response
			select {
			case resp = <-answer:
			case err := <-failed:
				t.Fatalf("the caller got no answer: %v", err)
			case <-time.After(waitFor):
				t.Fatal("the caller got no answer after the agent went away")
			}
			defer resp.Body.Close()
			expectStatus(t, resp, http.StatusBadGateway, metav1.StatusReasonInternalError)

			// The cluster's side of the request ends too.
			select {
			case path := <-e.kube.Cancelled():
				if path != "/slow" {
					t.Errorf("the cluster saw %s cancelled, want /slow", path)
				}
			case <-time.After(waitFor):
				t.Fatal("the request still runs in the cluster after its agent went away")
			}
			waitTunnels(t, e.kas.observability, asAgent.id, 0)

			// kas keeps running: whatever it started for the agent and the
			// request must be gone. Idle keep-alive connections are not leaks.
			if err := a.stop(); err != nil {
				t.Fatal(err)
			}
			r.cut()
			e.transport.CloseIdleConnections()
			http.DefaultTransport.(*http.Transport).CloseIdleConnections() // agentk's to the cluster
			e.kubeServer.CloseClientConnections()
			goleak.VerifyNone(t, before)
		})
	}
}

func TestReplicasShareTheTraffic(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	// Two replicas of one agent, told apart by their credentials to the cluster.
	replicas := []string{"replica-a-token", "replica-b-token"}
	for _, token := range replicas {
		opts := e.agentOptions(asAgent, e.kas.public)
		opts.RESTConfig.BearerToken = token
		opts.PodName += "-" + token[:9]
		waitConnected(t, runAgent(t, opts).agent)
	}
	waitTunnels(t, e.kas.observability, asAgent.id, 2)

	cs := e.clientset(t, pat(asAgent.id, alicePAT))
	served := map[string]int{}
	for i := range 20 {
		ctx, cancel := context.WithTimeout(context.Background(), waitFor)
		_, err := cs.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
		cancel()
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		got, _ := e.kube.LastRequest("/api/v1/namespaces")
		served[strings.TrimPrefix(got.Header.Get("Authorization"), "Bearer ")]++
	}
	for _, token := range replicas {
		if served[token] == 0 {
			t.Errorf("replica %s served none of the requests (%v)", token, served)
		}
	}
	if len(served) != len(replicas) {
		t.Errorf("requests served with %v, want only the replicas' tokens", served)
	}
}

func TestAgentReconnectsAfterKASRestarts(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.startAgent(t, asAgent)
	list := func(host string) error {
		cs := clientsetFor(t, "http://"+host+"/k8s-proxy", e.transport, pat(asAgent.id, alicePAT))
		ctx, cancel := context.WithTimeout(context.Background(), waitFor)
		defer cancel()
		_, err := cs.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
		return err
	}
	if err := list(e.kas.public); err != nil {
		t.Fatalf("before the restart: %v", err)
	}

	if err := e.kas.stop(); err != nil {
		t.Fatalf("stop kas: %v", err)
	}
	e.transport.CloseIdleConnections()
	// A new kas on the same address, where the agent keeps dialling.
	cfg := kasConfig(t)
	cfg.Standalone.File = e.scenarioFile
	cfg.Agent.Listen.Address = e.kas.public
	restarted := startKAS(t, cfg, e.log.With("component", "kas", "generation", 2))
	if restarted.public != e.kas.public {
		t.Fatalf("the new kas listens on %s, want %s", restarted.public, e.kas.public)
	}
	waitTunnels(t, restarted.observability, asAgent.id, 1)
	if err := list(restarted.public); err != nil {
		t.Fatalf("after the restart: %v", err)
	}
}
