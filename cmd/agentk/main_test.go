package main

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestRun(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write([]byte(`{"gitVersion":"v1.31.0"}`))
	}))
	t.Cleanup(api.Close)
	kubeconfig := write("kubeconfig", `apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "`+api.URL+`"}}]
users: [{name: u, user: {token: sa}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
`)
	token := write("token", "  the-agent-token\n")
	empty := write("empty", " \n")
	notPEM := write("ca.pem", "not a certificate")
	base := []string{"--kas-address", "ws://127.0.0.1:1", "--token-file", token, "--kubeconfig", kubeconfig, "--observability-listen", "127.0.0.1:0"}
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	publicKey := write("jwt.pub", base64.StdEncoding.EncodeToString(pub)) // as GitLab shows it
	receptive := []string{"--receptive-listen-address", "127.0.0.1:0", "--receptive-allow-plaintext",
		"--receptive-jwt-public-key-file", publicKey, "--receptive-agent-id", "7", "--kubeconfig", kubeconfig, "--observability-listen", ""}

	tests := []struct {
		name       string
		args       []string
		env        map[string]string
		wantCode   int
		wantStdout string
		wantStderr string
	}{
		{name: "version", args: []string{"--version"}, wantCode: exitOK, wantStdout: "agentk 0.0.0-dev"},
		{name: "help", args: []string{"--help"}, wantCode: exitOK, wantStderr: "--kas-address"},
		{name: "unknown flag", args: []string{"--nope"}, wantCode: exitUsage, wantStderr: "flag provided but not defined: -nope"},
		{name: "stray argument", args: append(base, "extra"), wantCode: exitUsage, wantStderr: "unexpected arguments"},
		{name: "nothing given", wantCode: exitUsage, wantStderr: "--kas-address (or KAS_ADDRESS) is required"},
		{name: "bad log level", args: append(base, "--log-level", "loud"), wantCode: exitUsage, wantStderr: "log-level"},
		{name: "missing token file", args: append(base, "--token-file", filepath.Join(dir, "nope")), wantCode: exitFailure, wantStderr: "read the agent token"},
		{name: "empty token file", args: append(base, "--token-file", empty), wantCode: exitFailure, wantStderr: "is empty"},
		{name: "bad kas address", args: append(base, "--kas-address", "https://kas"), wantCode: exitFailure, wantStderr: "ws:// or wss://"},
		{name: "CA file without certificates", args: append(base, "--ca-cert-file", notPEM), wantCode: exitFailure, wantStderr: "no PEM certificates"},
		{name: "busy observability port", args: append(base, "--observability-listen", api.Listener.Addr().String()), wantCode: exitFailure, wantStderr: "observability listener"},
		{name: "starts and stops cleanly", args: base, wantCode: exitOK, wantStderr: `"msg":"agentk stopped"`},
		{name: "receptive only", args: receptive, wantCode: exitOK, wantStderr: `"msg":"accepting kas's connections (receptive mode)"`},
		{name: "receptive and dialling kas", args: append(slices.Clone(receptive), "--kas-address", "ws://127.0.0.1:1", "--token-file", token), wantCode: exitOK, wantStderr: `"kas_url":"ws://127.0.0.1:1/-/kubernetes-agent/"`},
		{
			name:       "GitLab's flag names",
			args:       []string{"--api-listen-address", "127.0.0.1:0", "--receptive-allow-plaintext", "--api-jwt-file", publicKey, "--receptive-agent-id", "7", "--kubeconfig", kubeconfig, "--observability-listen", ""},
			wantCode:   exitOK,
			wantStderr: `"msg":"accepting kas's connections (receptive mode)"`,
		},
		{
			name:       "receptive without authentication or TLS",
			args:       []string{"--receptive-listen-address", "127.0.0.1:0", "--kubeconfig", kubeconfig},
			wantCode:   exitUsage,
			wantStderr: "receptive mode needs TLS",
		},
		{name: "receptive JWT without agent ID", args: []string{"--receptive-listen-address", ":0", "--receptive-allow-plaintext", "--receptive-jwt-public-key-file", publicKey}, wantCode: exitUsage, wantStderr: "needs --receptive-agent-id"},
		{name: "mTLS without TLS", args: []string{"--receptive-listen-address", ":0", "--receptive-allow-plaintext", "--receptive-client-ca-file", notPEM}, wantCode: exitUsage, wantStderr: "needs TLS on the listener"},
		{name: "receptive flags without receptive mode", args: append(slices.Clone(base), "--receptive-cert-file", notPEM), wantCode: exitUsage, wantStderr: "only apply in receptive mode"},
		{name: "bad receptive public key", args: append(slices.Clone(receptive), "--receptive-jwt-public-key-file", notPEM), wantCode: exitFailure, wantStderr: "neither PEM nor base64"},
		{name: "bad receptive agent ID from the environment", args: receptive, env: map[string]string{"AGENTK_RECEPTIVE_AGENT_ID": "seven"}, wantCode: exitUsage, wantStderr: "AGENTK_RECEPTIVE_AGENT_ID"},
		{
			name:       "receptive from the environment",
			args:       []string{"--kubeconfig", kubeconfig, "--observability-listen", ""},
			env:        map[string]string{"AGENTK_RECEPTIVE_LISTEN_ADDRESS": "127.0.0.1:0", "AGENTK_RECEPTIVE_ALLOW_PLAINTEXT": "true", "AGENTK_RECEPTIVE_JWT_PUBLIC_KEY_FILE": publicKey, "AGENTK_RECEPTIVE_AGENT_ID": "7"},
			wantCode:   exitOK,
			wantStderr: `"msg":"accepting kas's connections (receptive mode)"`,
		},
		{
			name:       "flags from the environment",
			args:       []string{"--kubeconfig", kubeconfig, "--observability-listen", ""},
			env:        map[string]string{"KAS_ADDRESS": "ws://127.0.0.1:1", "AGENTK_TOKEN_FILE": token},
			wantCode:   exitOK,
			wantStderr: `"msg":"agentk stopped"`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// A cancelled context: the agent starts, then shuts down at once.
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			var stdout, stderr bytes.Buffer
			code := run(ctx, tt.args, func(k string) string { return tt.env[k] }, &stdout, &stderr)
			if code != tt.wantCode || !strings.Contains(stdout.String(), tt.wantStdout) || !strings.Contains(stderr.String(), tt.wantStderr) {
				t.Errorf("exit %d, stdout %q, stderr %q; want exit %d with %q / %q", code, stdout.String(), stderr.String(), tt.wantCode, tt.wantStdout, tt.wantStderr)
			}
			if strings.Contains(stderr.String(), "the-agent-token") {
				t.Error("the token appeared in the output")
			}
		})
	}
}
