//go:build linux

package e2e

import (
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kasproject/kas/internal/fakekube"
	"github.com/kasproject/kas/server/logging"
	"github.com/kasproject/kas/web"
)

// The addresses of TestReceptiveAgentCannotDialOut's namespaces. kas
// listens on kasListenIP, on its namespace's loopback, and dials agents
// from kasDialIP; the agent's namespace has a route to kasDialIP only, so
// nothing in it can reach kas's listeners.
const (
	kasDialIP   = "10.232.0.1"
	agentIP     = "10.232.0.2"
	kasListenIP = "10.232.1.1"
)

// buildAgentk builds the agentk command into a temporary directory.
func buildAgentk(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "agentk")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/kasproject/kas/cmd/agentk").CombinedOutput()
	if err != nil {
		t.Fatalf("go build ./cmd/agentk: %v\n%s", err, out)
	}
	return bin
}

// TestReceptiveAgentCannotDialOut runs kas and four receptive agentk as
// processes in two network namespaces joined by a veth pair. The agents'
// namespace has no route to kas's listeners, so agentk truly cannot dial
// kas; kas dials each agentk (JWT with GitLab's base64 public key, JWT with
// a PEM key, mTLS), and client-go lists pods through kas with each
// identity kind.
func TestReceptiveAgentCannotDialOut(t *testing.T) {
	t.Parallel()
	ip := requireNetworkNamespaces(t)
	prefix := fmt.Sprintf("kas-e2e-%d-", os.Getpid())
	kasNS, agentNS := newNetns(t, ip, prefix+"kas"), newNetns(t, ip, prefix+"agent")
	kasNS.ip(t, ip, "link", "add", "veth0", "type", "veth", "peer", "name", "veth0", "netns", string(agentNS))
	kasNS.ip(t, ip, "addr", "add", kasDialIP+"/32", "dev", "veth0")
	kasNS.ip(t, ip, "addr", "add", kasListenIP+"/32", "dev", "lo")
	agentNS.ip(t, ip, "addr", "add", agentIP+"/32", "dev", "veth0")
	kasNS.ip(t, ip, "link", "set", "veth0", "up")
	agentNS.ip(t, ip, "link", "set", "veth0", "up")
	kasNS.ip(t, ip, "route", "add", agentIP+"/32", "dev", "veth0", "src", kasDialIP)
	agentNS.ip(t, ip, "route", "add", kasDialIP+"/32", "dev", "veth0")

	kasBin, agentkBin := buildKAS(t), buildAgentk(t)
	dir := t.TempDir()

	// The cluster's API server, listening inside the agents' namespace, on
	// HTTPS as kubeconfig credentials need.
	kube := fakekube.New()
	kubeServer := httptest.NewUnstartedServer(kube)
	_ = kubeServer.Listener.Close()
	kubeServer.Listener = agentNS.listen(t, "127.0.0.1:0")
	kubeServer.StartTLS()
	t.Cleanup(func() {
		kube.Release()
		kubeServer.CloseClientConnections()
		kubeServer.Close()
	})
	e := &env{logs: newLogBuffer(t), kube: kube, kubeServer: kubeServer}
	e.log = logging.New(e.logs, slog.LevelDebug, nil)
	e.transport = &http.Transport{DialContext: kasNS.dial}
	t.Cleanup(e.transport.CloseIdleConnections)
	e.client = &http.Client{Transport: e.transport}

	// kas, in its namespace, with no receptive agent yet.
	sc := newScenario()
	e.scenarioFile = sc.write(t, dir)
	kasConfig := filepath.Join(dir, "kas.yaml")
	listen := map[string]any{"address": kasListenIP + ":0"}
	writeYAML(t, kasConfig, map[string]any{
		"agent": map[string]any{
			"listen":    listen,
			"receptive": map[string]any{"enabled": true, "poll_period": "200ms"},
		},
		"observability": map[string]any{"listen": listen},
		"api":           map[string]any{"listen": listen},
		"private_api":   map[string]any{"listen": listen},
		"standalone":    map[string]any{"file": e.scenarioFile},
	})
	kas := startLogged(t, kasNS.command(ip, kasBin, "--configuration-file", kasConfig), "kas (network namespace)", "kas is ready")
	e.kas = &kasNode{public: kas.address(t, "agent.listen"), observability: kas.address(t, "observability.listen")}

	// Nothing in the agents' namespace reaches kas.
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	if conn, err := agentNS.dial(ctx, "tcp", e.kas.public); !errors.Is(err, syscall.ENETUNREACH) {
		if conn != nil {
			_ = conn.Close()
		}
		t.Fatalf("dial kas at %s from the agents' namespace: %v; want network is unreachable", e.kas.public, err)
	}

	kubeconfig := filepath.Join(dir, "kubeconfig")
	writeYAML(t, kubeconfig, map[string]any{
		"apiVersion": "v1",
		"kind":       "Config",
		"clusters": []any{map[string]any{"name": "c", "cluster": map[string]any{
			"server":                     kubeServer.URL,
			"certificate-authority-data": base64.StdEncoding.EncodeToString(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: kubeServer.Certificate().Raw})),
		}}},
		"users":           []any{map[string]any{"name": "agentk", "user": map[string]any{"token": agentSAToken}}},
		"contexts":        []any{map[string]any{"name": "c", "context": map[string]any{"cluster": "c", "user": "agentk"}}},
		"current-context": "c",
	})
	serverCA, clientCA := newTestCA(t, "receptive agents CA"), newTestCA(t, "kas client CA")
	kasCert, kasKey := clientCA.issue(t, "kas", true)
	write := func(name string, content []byte) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, content, 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	type auth int
	const (
		gitlabPublicKey auth = iota // base64 of the raw key, as GitLab shows public_key
		pemPublicKey
		mtls
	)
	var agentks []*kasProcess
	for _, tc := range []struct {
		a    testAgent
		auth auth
	}{{asAgent, gitlabPublicKey}, {asImpersonate, pemPublicKey}, {asCIJob, mtls}, {asUser, gitlabPublicKey}} {
		certFile, keyFile := serverCA.issue(t, "agentk "+tc.a.name, false, receptiveName)
		args := []string{
			"--receptive-listen-address", agentIP + ":0",
			"--receptive-cert-file", certFile, "--receptive-key-file", keyFile,
			"--kubeconfig", kubeconfig, "--observability-listen", "",
		}
		entry := &scenarioReceptive{CACertificateFile: serverCA.file, TLSHost: receptiveName}
		switch tc.auth {
		case gitlabPublicKey, pemPublicKey:
			keys := newJWTKeys(t)
			public := []byte(base64.StdEncoding.EncodeToString(keys.public))
			if tc.auth == pemPublicKey {
				der, err := x509.MarshalPKIXPublicKey(keys.public)
				if err != nil {
					t.Fatal(err)
				}
				public = pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
			}
			args = append(args, "--receptive-jwt-public-key-file", write(tc.a.name+".pub", public), "--receptive-agent-id", strconv.FormatInt(tc.a.id, 10))
			entry.JWTPrivateKeyFile = keys.privateFile
		case mtls:
			args = append(args, "--receptive-client-ca-file", clientCA.file)
			entry.ClientCertificateFile, entry.ClientKeyFile = kasCert, kasKey
		}
		if tc.a == asAgent {
			// It also tries to dial kas, which its network does not allow.
			args = append(args, "--kas-address", "ws://"+e.kas.public, "--token-file", write("token", []byte(tc.a.token)))
		}
		p := startLogged(t, agentNS.command(ip, agentkBin, args...), "agentk "+tc.a.name, "accepting kas's connections (receptive mode)")
		addr, _ := p.waitLog(t, "accepting kas's connections (receptive mode)")["address"].(string)
		entry.URL = "grpcs://" + addr
		sc.setReceptive(tc.a.id, entry)
		agentks = append(agentks, p)
	}
	listed := time.Now()
	sc.write(t, dir)

	agentks[0].waitLog(t, "connect to kas failed")
	if line := agentks[0].waitLog(t, "connect to kas failed"); !strings.Contains(fmt.Sprint(line["error"]), "network is unreachable") {
		t.Errorf("agentk's own dial to kas failed with %v, want network is unreachable", line["error"])
	}
	for _, p := range agentks {
		p.waitLog(t, "kas connected (receptive mode)")
	}
	eventually(t, func() bool {
		st, err := statusThrough(e.client, e.kas.observability)
		conns := connections(st)
		if err != nil || len(conns) != 4 {
			return false
		}
		for _, info := range conns {
			if !info.Receptive || info.ProjectID != infraProjectID {
				return false
			}
		}
		return true
	}, func() string { return "kas does not list the four agents' receptive tunnels" })
	t.Logf("listed in the standalone file → all four agents connected: %s", time.Since(listed).Round(time.Millisecond))

	checkEveryIdentity(t, e)
	// No JWT ever reaches a log.
	for _, p := range append(agentks, kas) {
		if strings.Contains(p.logs(), "eyJ") {
			t.Errorf("the logs of %s contain what looks like a JWT", p.what)
		}
	}
}

// statusThrough reads kas's status page with client.
func statusThrough(client *http.Client, observability string) (web.Status, error) {
	var st web.Status
	resp, err := client.Get("http://" + observability + "/debug/status")
	if err != nil {
		return st, err
	}
	defer resp.Body.Close()
	err = json.NewDecoder(resp.Body).Decode(&st)
	return st, err
}
