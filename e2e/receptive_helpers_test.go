package e2e

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"k8s.io/client-go/rest"

	"github.com/kasproject/kas/agent"
	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/web"
)

// testCA is a certificate authority that issues the certificates of
// receptive agents (server) and of kas towards them (client), as PEM files.
type testCA struct {
	name   string
	dir    string
	cert   *x509.Certificate
	key    *ecdsa.PrivateKey
	file   string // the CA certificate
	serial atomic.Int64
}

func newTestCA(t *testing.T, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	ca := &testCA{name: name, dir: t.TempDir(), cert: cert, key: key}
	ca.serial.Store(1)
	ca.file = writePEM(t, filepath.Join(ca.dir, "ca.crt"), "CERTIFICATE", der)
	return ca
}

// pool is a pool holding only this CA.
func (ca *testCA) pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.cert)
	return p
}

// issue makes a certificate for cn: a server certificate for dnsNames, or
// a client certificate; it returns the certificate and key files.
func (ca *testCA) issue(t *testing.T, cn string, client bool, dnsNames ...string) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	usage := x509.ExtKeyUsageServerAuth
	if client {
		usage = x509.ExtKeyUsageClientAuth
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(ca.serial.Add(1)),
		Subject:      pkix.Name{CommonName: cn},
		DNSNames:     dnsNames,
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	base := filepath.Join(ca.dir, strings.ReplaceAll(cn, " ", "-"))
	return writePEM(t, base+".crt", "CERTIFICATE", der), writePEM(t, base+".key", "PRIVATE KEY", keyDER)
}

func writePEM(t *testing.T, path, typ string, der []byte) string {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// jwtKeys is an agent's Ed25519 key pair: kas signs with the private key
// (a PEM file, as the standalone file names it), agentk checks with the
// public one.
type jwtKeys struct {
	public      ed25519.PublicKey
	private     ed25519.PrivateKey
	privateFile string
}

func newJWTKeys(t *testing.T) jwtKeys {
	t.Helper()
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	return jwtKeys{public: pub, private: priv, privateFile: writePEM(t, filepath.Join(t.TempDir(), "jwt.key"), "PRIVATE KEY", der)}
}

// connections lists every tunnel the status page shows, of every agent.
func connections(st web.Status) []registry.TunnelInfo {
	var out []registry.TunnelInfo
	for _, a := range st.Agents {
		out = append(out, a.Connections...)
	}
	return out
}

// receptiveName is the name in receptive agents' certificates: the tests
// reach them by IP address, so kas checks this name (tls_host).
const receptiveName = "agentk.receptive.test"

// receptiveSetup is how one receptive agentk accepts kas.
type receptiveSetup struct {
	// serverCA issues agentk's certificate for receptiveName; nil means
	// plaintext (ws://).
	serverCA *testCA
	// jwt, if set, is the key pair kas signs its JWT with.
	jwt *jwtKeys
	// clientCA, if set, must have issued kas's client certificate (mTLS).
	clientCA *testCA
	// withToken makes agentk hand kas its agent token.
	withToken bool
}

// receptiveAgentOptions are the options of an in-process agentk for a in
// receptive mode, accepting kas on ln (127.0.0.1:0 when nil) and serving
// the cluster kube.
func (e *env) receptiveAgentOptions(t *testing.T, a testAgent, s receptiveSetup, ln net.Listener, kube string) agent.Options {
	t.Helper()
	if ln == nil {
		var err error
		if ln, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
	}
	r := &agent.ReceptiveOptions{AgentID: a.id}
	if s.jwt != nil {
		r.JWTPublicKey = s.jwt.public
	}
	if s.clientCA != nil {
		r.ClientCAs = s.clientCA.pool()
	}
	if s.serverCA != nil {
		certFile, keyFile := s.serverCA.issue(t, "agentk "+a.name, false, receptiveName)
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			t.Fatal(err)
		}
		ln = tls.NewListener(ln, agent.ServerTLS(cert, s.clientCA != nil))
	}
	r.Listener = ln
	opts := agent.Options{
		Receptive:     r,
		RESTConfig:    &rest.Config{Host: kube, BearerToken: agentSAToken},
		Logger:        e.log.With("component", "agentk", "agent", a.name),
		AgentVersion:  "e2e",
		PodName:       "agentk-" + a.name,
		PodNamespace:  "gitlab-agent",
		ShutdownGrace: 2 * time.Second,
	}
	if s.withToken {
		opts.Token = a.token
	}
	return opts
}

// receptiveURL is the URL kas dials to reach agentk on ln's address.
func receptiveURL(addr string, s receptiveSetup) string {
	if s.serverCA != nil {
		return "grpcs://" + addr
	}
	return "grpc://" + addr
}

// entry is the standalone file's receptive section for an agentk set up
// with s, listening on addr; clientCert and clientKey are kas's mTLS
// certificate, if any.
func (s receptiveSetup) entry(addr, clientCert, clientKey string) *scenarioReceptive {
	r := &scenarioReceptive{URL: receptiveURL(addr, s), ClientCertificateFile: clientCert, ClientKeyFile: clientKey}
	if s.serverCA != nil {
		r.CACertificateFile = s.serverCA.file
		r.TLSHost = receptiveName
	}
	if s.jwt != nil {
		r.JWTPrivateKeyFile = s.jwt.privateFile
	}
	return r
}
