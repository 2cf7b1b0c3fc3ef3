package agent

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const testKubeconfig = `apiVersion: v1
kind: Config
clusters:
- name: one
  cluster: {server: "https://one.example:6443"}
- name: two
  cluster: {server: "https://two.example:6443/prefix"}
users:
- name: u
  user: {token: t}
contexts:
- name: first
  context: {cluster: one, user: u}
- name: second
  context: {cluster: two, user: u}
current-context: first
`

func TestLoadRESTConfig(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(path, []byte(testKubeconfig), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, kubeconfig, context string
		serviceHost               string // KUBERNETES_SERVICE_HOST
		wantHost, wantErr         string
	}{
		{name: "current context", kubeconfig: path, wantHost: "https://one.example:6443"},
		{name: "chosen context", kubeconfig: path, context: "second", wantHost: "https://two.example:6443/prefix"},
		{name: "kubeconfig wins over in-cluster", kubeconfig: path, serviceHost: "10.0.0.1", wantHost: "https://one.example:6443"},
		{name: "unknown context", kubeconfig: path, context: "third", wantErr: "third"},
		{name: "missing file", kubeconfig: filepath.Join(dir, "nope"), wantErr: "nope"},
		{name: "in-cluster without a service account", serviceHost: "10.0.0.1", wantErr: "in-cluster"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("KUBERNETES_SERVICE_HOST", tt.serviceHost)
			t.Setenv("KUBERNETES_SERVICE_PORT", "443")
			t.Setenv("KUBECONFIG", "")
			cfg, err := LoadRESTConfig(tt.kubeconfig, tt.context)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("LoadRESTConfig: %v, want an error mentioning %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("LoadRESTConfig: %v", err)
			}
			if cfg.Host != tt.wantHost {
				t.Errorf("host %q, want %q", cfg.Host, tt.wantHost)
			}
		})
	}
}
