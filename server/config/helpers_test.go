package config

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"
)

// fixtures is a directory of files the test configurations point at by
// relative path, and the secret text in them that must never be printed.
type fixtures struct {
	dir string
	// secrets holds the content of every secret-like file, encoded and
	// decoded, for asserting that none of it leaks into messages or output.
	secrets []string
}

func newFixtures(t *testing.T) *fixtures {
	t.Helper()
	f := &fixtures{dir: t.TempDir()}
	f.writeSecret(t, "secret", 32)
	f.writeSecret(t, "secret-b", 32)
	f.writeSecret(t, "secret31", 31)
	f.writeSecret(t, "secret33", 33)
	f.writeFile(t, "notbase64", "this is !!! not base64 at all\n", true)
	f.writeFile(t, "empty", "\n", false)
	f.writeFile(t, "password", "redis-password-do-not-print\n", true)
	f.writeFile(t, "token", "glpat-token-do-not-print\n", true)
	f.writeFile(t, "notpem.txt", "plain text\n", false)
	f.writeFile(t, "standalone.yaml", "agents: []\n", false)
	if err := os.Mkdir(filepath.Join(f.dir, "dir"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(f.dir, "dir2"), 0o700); err != nil {
		t.Fatal(err)
	}
	certPEM, keyPEM := newCertificate(t)
	_, otherKeyPEM := newCertificate(t)
	f.writeFile(t, "cert.pem", certPEM, false)
	f.writeFile(t, "ca.pem", certPEM, false)
	f.writeFile(t, "key.pem", keyPEM, true)
	f.writeFile(t, "other-key.pem", otherKeyPEM, true)
	return f
}

func (f *fixtures) path(name string) string { return filepath.Join(f.dir, name) }

// writeSecret writes base64 of n random bytes, with surrounding whitespace
// that ReadSecretFile must ignore.
func (f *fixtures) writeSecret(t *testing.T, name string, n int) {
	t.Helper()
	raw := make([]byte, n)
	if _, err := rand.Read(raw); err != nil {
		t.Fatal(err)
	}
	text := base64.StdEncoding.EncodeToString(raw)
	f.writeFile(t, name, "  "+text+"\n\n", true)
	f.secrets = append(f.secrets, string(raw))
}

func (f *fixtures) writeFile(t *testing.T, name, content string, secret bool) {
	t.Helper()
	if err := os.WriteFile(f.path(name), []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	if secret {
		f.secrets = append(f.secrets, strings.TrimSpace(content))
	}
}

// load writes yamlText as kas.yaml in the fixtures directory and loads it.
// It returns the problems found (nil if valid) and fails the test on any
// other error or if a secret leaks into the error text.
func (f *fixtures) load(t *testing.T, yamlText string, env map[string]string) (*Config, []Problem) {
	t.Helper()
	path := f.path("kas.yaml")
	if err := os.WriteFile(path, []byte(yamlText), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := Load(path, func(name string) string { return env[name] })
	if err == nil {
		return cfg, nil
	}
	var verr *ValidationError
	if !errors.As(err, &verr) {
		t.Fatalf("Load: want a *ValidationError, got %T: %v", err, err)
	}
	f.assertNoSecrets(t, "the error", err.Error())
	return cfg, verr.Problems
}

func (f *fixtures) assertNoSecrets(t *testing.T, what, text string) {
	t.Helper()
	for _, s := range f.secrets {
		if strings.Contains(text, s) {
			t.Errorf("%s contains secret material %q:\n%s", what, s, text)
		}
	}
}

// findProblem returns the problem with key whose message contains msg.
func findProblem(problems []Problem, key, msg string) (Problem, bool) {
	for _, p := range problems {
		if p.Key == key && strings.Contains(p.Message, msg) {
			return p, true
		}
	}
	return Problem{}, false
}

func formatProblems(problems []Problem) string {
	return (&ValidationError{Problems: problems}).Error()
}

// newCertificate makes a self-signed certificate and its key, PEM-encoded.
func newCertificate(t *testing.T) (certPEM, keyPEM string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "kas.test"},
		DNSNames:              []string{"kas.test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})),
		string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}))
}

func scalarNode(value string) *yaml.Node {
	return &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: value}
}
