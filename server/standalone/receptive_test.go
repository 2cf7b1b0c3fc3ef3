package standalone

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// receptiveFiles writes a JWT private key, a CA certificate and a client
// certificate with its key into dir.
func receptiveFiles(t *testing.T, dir string) (seed []byte) {
	t.Helper()
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	der, _ := x509.MarshalPKCS8PrivateKey(priv)
	write := func(name, typ string, der []byte) {
		if err := os.WriteFile(filepath.Join(dir, name), pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("jwt.key", "PRIVATE KEY", der)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "kas"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true}
	certDER, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalPKCS8PrivateKey(key)
	write("ca.crt", "CERTIFICATE", certDER)
	write("client.crt", "CERTIFICATE", certDER)
	write("client.key", "PRIVATE KEY", keyDER)
	return priv.Seed()
}

const receptivePrefix = `groups: [{id: 10, path: acme}]
projects: [{id: 100, path: acme/infra, repository: repo}]
agents:
`

func TestReceptiveAgents(t *testing.T) {
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "repo"), 0o755); err != nil {
		t.Fatal(err)
	}
	seed := receptiveFiles(t, dir)
	file := filepath.Join(dir, "standalone.yaml")
	if err := os.WriteFile(file, []byte(receptivePrefix+`  - id: 1
    name: edge
    project: acme/infra
    receptive:            # no token: kas knows it by id
      url: grpcs://10.0.0.5:8182
      ca_certificate_file: ca.crt
      tls_host: agentk.example.com
      jwt_private_key_file: jwt.key
  - id: 2
    name: edge-mtls
    project: acme/infra
    token_sha256: 1111111111111111111111111111111111111111111111111111111111111111
    receptive:
      url: wss://agentk.example.com:8182/
      client_certificate_file: client.crt
      client_key_file: client.key
  - {id: 3, name: dial-in, project: acme/infra, token_sha256: 2222222222222222222222222222222222222222222222222222222222222222}
`), 0o600); err != nil {
		t.Fatal(err)
	}
	b, err := Open(file)
	if err != nil {
		t.Fatal(err)
	}
	list, err := b.GetReceptiveAgents(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 2 {
		t.Fatalf("got %d receptive agents, want 2: %+v", len(list), list)
	}
	jwt, mtls := list[0], list[1]
	if jwt.ID != 1 || jwt.URL != "grpcs://10.0.0.5:8182" || jwt.TLSHost != "agentk.example.com" || !strings.Contains(jwt.CACert, "BEGIN CERTIFICATE") ||
		jwt.JWT == nil || jwt.JWT.PrivateKey != base64.StdEncoding.EncodeToString(seed) || jwt.MTLS != nil {
		t.Errorf("agent 1 is %+v, want GitLab's shape with the key's seed", jwt)
	}
	if mtls.ID != 2 || mtls.MTLS == nil || !strings.Contains(mtls.MTLS.ClientCert, "BEGIN CERTIFICATE") || !strings.Contains(mtls.MTLS.ClientKey, "PRIVATE KEY") || mtls.JWT != nil {
		t.Errorf("agent 2 is %+v, want its client certificate and key", mtls)
	}

	info, err := b.AgentInfoByID(context.Background(), 1)
	if err != nil || info.AgentID != 1 || info.ProjectID != 100 || info.AgentName != "edge" || info.DefaultBranch != "main" {
		t.Errorf("AgentInfoByID(1) = %+v, %v", info, err)
	}
	_, err = b.AgentInfoByID(context.Background(), 9)
	checkErr(t, err, &wantErr{status: 404, text: "no agent 9"})

	// A rotated key is read at the next call, without touching the file.
	receptiveFiles(t, dir)
	again, err := b.GetReceptiveAgents(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if again[0].JWT.PrivateKey == jwt.JWT.PrivateKey {
		t.Error("the rotated JWT key was not read")
	}
	// A key file that became unreadable fails the call rather than drop the agent.
	if err := os.Remove(filepath.Join(dir, "jwt.key")); err != nil {
		t.Fatal(err)
	}
	if _, err := b.GetReceptiveAgents(context.Background()); err == nil || !strings.Contains(err.Error(), "agent 1 (edge): jwt_private_key_file") {
		t.Errorf("got %v, want the unreadable key file named", err)
	}
}

func TestReceptiveProblems(t *testing.T) {
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "repo"), 0o755); err != nil {
		t.Fatal(err)
	}
	receptiveFiles(t, dir)
	if err := os.WriteFile(filepath.Join(dir, "not-a-key"), []byte("hello"), 0o600); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(dir, "standalone.yaml")
	content := receptivePrefix + `  - {id: 1, name: a, project: acme/infra, receptive: {url: "https://x:1", jwt_private_key_file: jwt.key}}
  - {id: 2, name: b, project: acme/infra, receptive: {url: "grpcs://x:1"}}
  - {id: 3, name: c, project: acme/infra, receptive: {url: "grpcs://x:1", jwt_private_key_file: jwt.key, client_certificate_file: client.crt, client_key_file: client.key}}
  - {id: 4, name: d, project: acme/infra, receptive: {url: "grpc://x:1", client_certificate_file: client.crt, client_key_file: client.key}}
  - {id: 5, name: e, project: acme/infra, receptive: {url: "grpcs://x:1", jwt_private_key_file: not-a-key}}
  - {id: 6, name: f, project: acme/infra, receptive: {url: "grpcs://x:1", jwt_private_key_file: missing.key}}
  - {id: 7, name: g, project: acme/infra, receptive: {url: "grpcs://x:1", client_certificate_file: client.crt}}
  - {id: 8, name: h, project: acme/infra, receptive: {jwt_private_key_file: jwt.key, ca_certificate_file: not-a-key}}
  - {id: 9, name: i, project: acme/infra}
`
	if err := os.WriteFile(file, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Open(file)
	if err == nil {
		t.Fatal("Open accepted the file")
	}
	for _, want := range []string{
		"standalone.yaml:4: agents[0].receptive.url: URL \"https://x:1\": scheme must be grpcs, wss, grpc or ws",
		"standalone.yaml:5: agents[1].receptive: how kas authenticates to the agent is missing",
		"standalone.yaml:6: agents[2].receptive: jwt_private_key_file and client_certificate_file are alternatives",
		"standalone.yaml:7: agents[3].receptive.url: mTLS needs TLS",
		"standalone.yaml:8: agents[4].receptive: jwt_private_key_file",
		"neither PEM nor base64",
		"standalone.yaml:9: agents[5].receptive: jwt_private_key_file: open",
		"standalone.yaml:10: agents[6].receptive: client_certificate_file and client_key_file go together",
		"standalone.yaml:11: agents[7].receptive.url: required",
		"standalone.yaml:12: agents[8].token_sha256: required",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("the report lacks %q:\n%v", want, err)
		}
	}
	if strings.Contains(err.Error(), "BEGIN") {
		t.Error("the report shows key material")
	}
}
