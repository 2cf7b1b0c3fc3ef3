package e2e

import (
	"context"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestGitLabAgentkWebSocket connects GitLab's real agentk over ws:// and
// lists namespaces through it with client-go.
func TestGitLabAgentkWebSocket(t *testing.T) {
	e := newEnv(t, nil)
	startGitLabAgentk(t, gitlabAgentkOptions{
		kasAddress: "ws://" + e.kas.public + "/-/kubernetes-agent/",
		token:      asAgent.token,
		kubeURL:    e.kubeServer.URL,
	})
	waitTunnels(t, e.kas.observability, asAgent.id, 1)
	cs := e.clientset(t, pat(asAgent.id, alicePAT))
	ns, err := cs.CoreV1().Namespaces().List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("namespaces: %d", len(ns.Items))
}
