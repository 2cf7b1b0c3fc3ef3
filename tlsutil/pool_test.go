package tlsutil

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kasproject/kas/server/config"
)

// testCA is a CA made for a test, able to sign server certificates.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newCA(t *testing.T, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// leaf signs a server certificate for 127.0.0.1.
func (ca *testCA) leaf(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: "127.0.0.1"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// verifies reports whether a certificate signed by ca verifies against pool.
func verifies(t *testing.T, pool *x509.CertPool, ca *testCA) bool {
	t.Helper()
	leaf, err := x509.ParseCertificate(ca.leaf(t).Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	_, err = leaf.Verify(x509.VerifyOptions{Roots: pool})
	return err == nil
}

func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

func symlink(t *testing.T, target, link string) {
	t.Helper()
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
}

func TestCertPool(t *testing.T) {
	plain := newCA(t, "plain file")            // a regular file in the directory
	sameDirLink := newCA(t, "same-dir link")   // c_rehash link to a file beside it
	otherDirLink := newCA(t, "other-dir link") // link into another directory, like /etc/ssl/certs
	secondDir := newCA(t, "second directory")  // in the second of two SSL_CERT_DIR entries
	caFile := newCA(t, "CA file")
	stranger := newCA(t, "never added")

	certDir := t.TempDir()
	writeFile(t, filepath.Join(certDir, "plain.pem"), plain.pem)
	writeFile(t, filepath.Join(certDir, "same-dir.crt"), sameDirLink.pem)
	symlink(t, "same-dir.crt", filepath.Join(certDir, "1a2b3c4d.0"))
	shared := t.TempDir()
	writeFile(t, filepath.Join(shared, "other.crt"), otherDirLink.pem)
	symlink(t, filepath.Join(shared, "other.crt"), filepath.Join(certDir, "5e6f7a8b.0"))
	writeFile(t, filepath.Join(certDir, "README"), []byte("not a certificate\n"))
	symlink(t, "missing.pem", filepath.Join(certDir, "dangling.0"))
	if err := os.Mkdir(filepath.Join(certDir, "subdir"), 0o755); err != nil {
		t.Fatal(err)
	}
	certDir2 := t.TempDir()
	writeFile(t, filepath.Join(certDir2, "second.pem"), secondDir.pem)
	caPath := filepath.Join(t.TempDir(), "ca.pem")
	writeFile(t, caPath, caFile.pem)

	pool, err := CertPool(certDir+":"+certDir2, caPath, "")
	if err != nil {
		t.Fatalf("CertPool: %v", err)
	}
	tests := []struct {
		ca   *testCA
		want bool
	}{
		{plain, true},
		{sameDirLink, true},
		{otherDirLink, true},
		{secondDir, true},
		{caFile, true},
		{stranger, false},
	}
	for _, tt := range tests {
		if got := verifies(t, pool, tt.ca); got != tt.want {
			t.Errorf("certificate from CA %q verifies = %v, want %v", tt.ca.cert.Subject.CommonName, got, tt.want)
		}
	}
}

// TestCertPoolOnlyHashLinks is a directory made only of c_rehash links to
// files elsewhere, the layout of /etc/ssl/certs on Debian.
func TestCertPoolOnlyHashLinks(t *testing.T) {
	ca := newCA(t, "linked")
	store := t.TempDir()
	writeFile(t, filepath.Join(store, "ca.crt"), ca.pem)
	certDir := t.TempDir()
	symlink(t, filepath.Join(store, "ca.crt"), filepath.Join(certDir, "0badc0de.0"))

	pool, err := CertPool(certDir)
	if err != nil {
		t.Fatal(err)
	}
	if !verifies(t, pool, ca) {
		t.Error("certificate behind a hash link not trusted")
	}
}

func TestCertPoolErrors(t *testing.T) {
	dir := t.TempDir()
	garbage := filepath.Join(dir, "garbage.pem")
	writeFile(t, garbage, []byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"))
	missing := filepath.Join(dir, "missing.pem")
	missingDir := filepath.Join(dir, "no-such-dir")

	tests := []struct {
		name    string
		certDir string
		files   []string
		mention string
	}{
		{"missing CA file", "", []string{missing}, missing},
		{"CA file without certificate", "", []string{garbage}, garbage},
		{"missing SSL_CERT_DIR", missingDir, nil, missingDir},
		{"SSL_CERT_DIR is a file", garbage, nil, garbage},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := CertPool(tt.certDir, tt.files...)
			if err == nil {
				t.Fatal("no error")
			}
			if !strings.Contains(err.Error(), tt.mention) {
				t.Errorf("error %q does not name %s", err, tt.mention)
			}
			if _, err := ClientConfig(tt.certDir, tt.files...); err == nil {
				t.Error("ClientConfig: no error")
			}
		})
	}
}

func TestClientConfig(t *testing.T) {
	ca := newCA(t, "server CA")
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{ca.leaf(t)}}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	caPath := filepath.Join(t.TempDir(), "ca.pem")
	writeFile(t, caPath, ca.pem)

	get := func(cfg *tls.Config) error {
		client := &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}}
		defer client.CloseIdleConnections()
		resp, err := client.Get(srv.URL)
		if err != nil {
			return err
		}
		return resp.Body.Close()
	}

	trusting, err := ClientConfig("", caPath)
	if err != nil {
		t.Fatal(err)
	}
	if trusting.MinVersion != tls.VersionTLS12 {
		t.Errorf("MinVersion = %x, want TLS 1.2", trusting.MinVersion)
	}
	if err := get(trusting); err != nil {
		t.Errorf("with the CA file: %v", err)
	}

	untrusting, err := ClientConfig("")
	if err != nil {
		t.Fatal(err)
	}
	err = get(untrusting)
	if !IsUnknownAuthority(err) {
		t.Errorf("without the CA file: IsUnknownAuthority(%v) = false", err)
	}
}

func TestIsUnknownAuthority(t *testing.T) {
	unknown := x509.UnknownAuthorityError{}
	tests := []struct {
		name string
		err  error
		want bool
	}{
		{"nil", nil, false},
		{"bare", unknown, true},
		{"wrapped by tls", &tls.CertificateVerificationError{Err: unknown}, true},
		{"wrapped by fmt", fmt.Errorf("connect to GitLab: %w", &tls.CertificateVerificationError{Err: unknown}), true},
		{"text only, as gRPC reports it", errors.New(`rpc error: code = Unavailable desc = connection error: desc = "transport: authentication handshake failed: tls: failed to verify certificate: x509: certificate signed by unknown authority"`), true},
		{"hostname mismatch", &tls.CertificateVerificationError{Err: x509.HostnameError{Host: "example.com", Certificate: &x509.Certificate{}}}, false},
		{"expired", x509.CertificateInvalidError{Reason: x509.Expired}, false},
		{"other", errors.New("connection refused"), false},
	}
	for _, tt := range tests {
		if got := IsUnknownAuthority(tt.err); got != tt.want {
			t.Errorf("%s: IsUnknownAuthority = %v, want %v", tt.name, got, tt.want)
		}
	}
}

func TestRedisClientConfig(t *testing.T) {
	ca := newCA(t, "Redis CA")
	dir := t.TempDir()
	caFile := filepath.Join(dir, "ca.pem")
	writeFile(t, caFile, ca.pem)
	certFile, keyFile := filepath.Join(dir, "client.crt"), filepath.Join(dir, "client.key")
	writePair(t, certFile, keyFile, ca.leaf(t))

	off, err := RedisClientConfig(config.RedisTLS{CACertificateFile: caFile}, "")
	if off != nil || err != nil {
		t.Errorf("TLS off: %v, %v; want nil, nil", off, err)
	}

	on, err := RedisClientConfig(config.RedisTLS{Enabled: true, CACertificateFile: caFile, CertificateFile: certFile, KeyFile: keyFile}, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(on.Certificates) != 1 {
		t.Errorf("client certificates: %d, want 1", len(on.Certificates))
	}
	if !verifies(t, on.RootCAs, ca) {
		t.Error("redis.tls.ca_certificate_file is not trusted")
	}

	missing := filepath.Join(dir, "missing.key")
	_, err = RedisClientConfig(config.RedisTLS{Enabled: true, CertificateFile: certFile, KeyFile: missing}, "")
	if err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("missing key file: error %v does not name %s", err, missing)
	}
}
