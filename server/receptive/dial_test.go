package receptive

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/kasproject/kas/protocol"
	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/tunnel"
)

// testPKI is a CA with PEM output, for agentk's certificate and kas's
// client certificate.
type testPKI struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  string
}

func newPKI(t *testing.T) *testPKI {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testPKI{cert: cert, key: key, pem: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))}
}

// issue returns a certificate and key as PEM, and as a tls.Certificate.
func (p *testPKI) issue(t *testing.T, client bool, names ...string) (certPEM, keyPEM string, cert tls.Certificate) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	usage := x509.ExtKeyUsageServerAuth
	if client {
		usage = x509.ExtKeyUsageClientAuth
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: "leaf"}, DNSNames: names,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.cert, &key.PublicKey, p.key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalPKCS8PrivateKey(key)
	certPEM = string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	keyPEM = string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}))
	cert, err = tls.X509KeyPair([]byte(certPEM), []byte(keyPEM))
	if err != nil {
		t.Fatal(err)
	}
	return certPEM, keyPEM, cert
}

// standIn is as much of a receptive agentk as kas's dialling needs: it
// checks kas's JWT, upgrades, and answers with description headers.
type standIn struct {
	srv    *httptest.Server
	key    ed25519.PublicKey
	token  string // handed to kas, if set
	status int    // when set, every attempt is refused with it
	proto  string // the subprotocol accepted; protocol.Subprotocol by default

	mu    sync.Mutex
	conns []*websocket.Conn
}

func newStandIn(t *testing.T, pub ed25519.PublicKey, tlsCert *tls.Certificate, configure func(*standIn)) *standIn {
	t.Helper()
	s := &standIn{key: pub, proto: protocol.Subprotocol}
	if configure != nil {
		configure(s)
	}
	s.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if s.status != 0 {
			http.Error(w, "refused on purpose", s.status)
			return
		}
		token, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if err := protocol.VerifyReceptiveJWT(s.key, token, 7); err != nil {
			http.Error(w, "agentk refused the connection: "+err.Error(), http.StatusUnauthorized)
			return
		}
		answer := http.Header{}
		answer.Set(protocol.HeaderAgentVersion, "v-test")
		if s.token != "" {
			answer.Set(protocol.HeaderAgentToken, s.token)
		}
		up := websocket.Upgrader{Subprotocols: []string{s.proto}}
		ws, err := up.Upgrade(w, r, answer)
		if err != nil {
			return
		}
		s.mu.Lock()
		s.conns = append(s.conns, ws)
		s.mu.Unlock()
	}))
	if tlsCert != nil {
		s.srv.TLS = &tls.Config{Certificates: []tls.Certificate{*tlsCert}}
		s.srv.StartTLS()
	} else {
		s.srv.Start()
	}
	t.Cleanup(func() {
		s.mu.Lock()
		for _, c := range s.conns {
			_ = c.Close()
		}
		s.mu.Unlock()
		s.srv.Close()
	})
	return s
}

func (s *standIn) addr() string { return s.srv.Listener.Addr().String() }

// fakeAPI identifies agents by token.
type fakeAPI struct{ gitlab.API }

func (fakeAPI) GetAgentInfo(_ context.Context, token string) (*gitlab.AgentInfo, error) {
	switch token {
	case "token-of-7":
		return &gitlab.AgentInfo{AgentID: 7, ProjectID: 100, AgentName: "edge"}, nil
	case "token-of-8":
		return &gitlab.AgentInfo{AgentID: 8, ProjectID: 100, AgentName: "other"}, nil
	}
	return nil, &gitlab.Error{Op: "get agent info", StatusCode: 401, Err: gitlab.ErrUnauthorized, Message: "401 Unauthorized"}
}

func newTestManager(t *testing.T, logs *strings.Builder, mu *sync.Mutex) *Manager {
	t.Helper()
	var w slogWriter = func(p []byte) (int, error) { mu.Lock(); defer mu.Unlock(); return logs.Write(p) }
	m, err := NewManager(Options{
		Source: sourceFunc(func(context.Context) ([]gitlab.ReceptiveAgent, error) { return nil, nil }),
		API:    fakeAPI{}, Server: nopServer{}, Logger: slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug})),
		DialTimeout: 5 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

type slogWriter func([]byte) (int, error)

func (f slogWriter) Write(p []byte) (int, error) { return f(p) }

type sourceFunc func(context.Context) ([]gitlab.ReceptiveAgent, error)

func (f sourceFunc) GetReceptiveAgents(ctx context.Context) ([]gitlab.ReceptiveAgent, error) {
	return f(ctx)
}

type nopServer struct{}

func (nopServer) ServeReceptive(context.Context, *slog.Logger, tunnel.ReceptiveConn) error {
	return nil
}

func TestDialAndIdentify(t *testing.T) {
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	_, otherPriv, _ := ed25519.GenerateKey(rand.Reader)
	ca, otherCA := newPKI(t), newPKI(t)
	_, _, serverCert := ca.issue(t, false, "agentk.test")
	seed := base64.StdEncoding.EncodeToString(priv.Seed())
	tlsAgent := newStandIn(t, pub, &serverCert, nil)
	plainAgent := newStandIn(t, pub, nil, nil)
	withToken := newStandIn(t, pub, &serverCert, func(s *standIn) { s.token = "token-of-7" })
	wrongToken := newStandIn(t, pub, &serverCert, func(s *standIn) { s.token = "token-of-8" })
	badToken := newStandIn(t, pub, &serverCert, func(s *standIn) { s.token = "not-a-token" })
	otherProto := newStandIn(t, pub, &serverCert, func(s *standIn) { s.proto = "something-else" })
	notAgentk := newStandIn(t, pub, &serverCert, func(s *standIn) { s.status = http.StatusNotFound })
	closed, _ := net.Listen("tcp", "127.0.0.1:0")
	closedAddr := closed.Addr().String()
	_ = closed.Close()

	jwtAgent := func(url, caPEM, host, key string) gitlab.ReceptiveAgent {
		return gitlab.ReceptiveAgent{ID: 7, URL: url, CACert: caPEM, TLSHost: host, JWT: &gitlab.ReceptiveAgentJWT{PrivateKey: key}}
	}
	byID := func(_ context.Context, id int64) (*gitlab.AgentInfo, error) {
		return &gitlab.AgentInfo{AgentID: id, ProjectID: 100, AgentName: "from-the-file"}, nil
	}
	tests := []struct {
		name      string
		ra        gitlab.ReceptiveAgent
		agentByID func(context.Context, int64) (*gitlab.AgentInfo, error)
		wantCause string // "" for success
		wantInfo  string // the agent's name, on success
		wantText  string
	}{
		{name: "TLS, JWT, agent known by ID", ra: jwtAgent("grpcs://"+tlsAgent.addr(), ca.pem, "agentk.test", seed), agentByID: byID, wantInfo: "from-the-file"},
		{name: "plaintext", ra: jwtAgent("grpc://"+plainAgent.addr(), "", "", seed), agentByID: byID, wantInfo: "from-the-file"},
		{name: "agent known by its token", ra: jwtAgent("wss://"+withToken.addr()+"/", ca.pem, "agentk.test", seed), wantInfo: "edge"},
		{name: "no token, no lookup by ID", ra: jwtAgent("grpcs://"+tlsAgent.addr(), ca.pem, "agentk.test", seed), wantInfo: ""},
		{name: "another agent's token", ra: jwtAgent("grpcs://"+wrongToken.addr(), ca.pem, "agentk.test", seed), wantCause: causeIdentity, wantText: "holds the token of agent 8, but that URL is configured for agent 7"},
		{name: "invalid token", ra: jwtAgent("grpcs://"+badToken.addr(), ca.pem, "agentk.test", seed), wantCause: causeIdentity, wantText: "handed over is not valid"},
		{name: "unknown CA", ra: jwtAgent("grpcs://"+tlsAgent.addr(), otherCA.pem, "agentk.test", seed), wantCause: causeUnknownCA, wantText: "signed by an unknown authority"},
		{name: "wrong TLS name", ra: jwtAgent("grpcs://"+tlsAgent.addr(), ca.pem, "other.test", seed), wantCause: causeTLSName, wantText: `not valid for "other.test"`},
		{name: "TLS to a plaintext agentk", ra: jwtAgent("grpcs://"+plainAgent.addr(), ca.pem, "agentk.test", seed), wantCause: causeTLS, wantText: "does not speak TLS"},
		{name: "refused JWT", ra: jwtAgent("grpcs://"+tlsAgent.addr(), ca.pem, "agentk.test", base64.StdEncoding.EncodeToString(otherPriv.Seed())), wantCause: causeRefused, wantText: "refused kas (HTTP 401): agentk refused the connection: the JWT's signature does not match"},
		{name: "nothing listens", ra: jwtAgent("grpc://"+closedAddr, "", "", seed), wantCause: causeUnreachable, wantText: "connection refused"},
		{name: "not agentk", ra: jwtAgent("grpcs://"+notAgentk.addr(), ca.pem, "agentk.test", seed), wantCause: causeProtocol, wantText: "answered HTTP 404"},
		{name: "another subprotocol", ra: jwtAgent("grpcs://"+otherProto.addr(), ca.pem, "agentk.test", seed), wantCause: causeProtocol, wantText: "not the kas-tunnel.v1 protocol"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var logs strings.Builder
			var mu sync.Mutex
			m := newTestManager(t, &logs, &mu)
			m.agentByID = tc.agentByID
			s, err := parseSpec(tc.ra, m.baseTLS)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			hs, err := m.dial(ctx, s)
			var info *gitlab.AgentInfo
			if err == nil {
				info, err = m.identify(ctx, s, hs.answer)
				defer hs.ws.Close()
			}
			if tc.wantCause != "" {
				var de *dialError
				if !errors.As(err, &de) || de.cause != tc.wantCause || !strings.Contains(de.Error(), tc.wantText) {
					t.Fatalf("got %v, want cause %s with %q", err, tc.wantCause, tc.wantText)
				}
				if strings.Contains(de.Error(), seed) {
					t.Fatal("the error holds the private key")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if info.AgentID != 7 || info.AgentName != tc.wantInfo {
				t.Errorf("identified %+v, want agent 7 named %q", info, tc.wantInfo)
			}
			if hs.answer.Get(protocol.HeaderAgentVersion) != "v-test" {
				t.Errorf("agentk's description is lost: %v", hs.answer)
			}
			if tc.wantInfo == "" {
				mu.Lock()
				defer mu.Unlock()
				if !strings.Contains(logs.String(), "connected without its agent token") {
					t.Errorf("no warning that kas knows only the agent's ID:\n%s", logs.String())
				}
			}
		})
	}
}

func TestParseSpec(t *testing.T) {
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	seed := base64.StdEncoding.EncodeToString(priv.Seed())
	ca := newPKI(t)
	certPEM, keyPEM, _ := ca.issue(t, true)
	jwt := &gitlab.ReceptiveAgentJWT{PrivateKey: seed}
	mtls := &gitlab.ReceptiveAgentMTLS{ClientCert: certPEM, ClientKey: keyPEM}
	base := &tls.Config{MinVersion: tls.VersionTLS12}
	tests := []struct {
		name    string
		ra      gitlab.ReceptiveAgent
		wantErr string
		check   func(t *testing.T, s *spec)
	}{
		{name: "GitLab's grpcs URL", ra: gitlab.ReceptiveAgent{ID: 1, URL: "grpcs://agentk.example.com:4242", JWT: jwt}, check: func(t *testing.T, s *spec) {
			if s.url.String() != "wss://agentk.example.com:4242/" || s.tls == nil || s.tls.ServerName != "agentk.example.com" || s.jwtKey == nil {
				t.Errorf("got %v %+v", s.url, s.tls)
			}
		}},
		{name: "TLS host and CA", ra: gitlab.ReceptiveAgent{ID: 1, URL: "grpcs://10.0.0.5:4242", TLSHost: "agentk.internal", CACert: ca.pem, JWT: jwt}, check: func(t *testing.T, s *spec) {
			if s.tls.ServerName != "agentk.internal" || s.tls.RootCAs == nil {
				t.Errorf("server name %q, roots %v", s.tls.ServerName, s.tls.RootCAs)
			}
		}},
		{name: "mTLS", ra: gitlab.ReceptiveAgent{ID: 1, URL: "wss://agentk:1/", MTLS: mtls}, check: func(t *testing.T, s *spec) {
			if len(s.tls.Certificates) != 1 || s.jwtKey != nil {
				t.Errorf("client certificates %d, JWT key %v", len(s.tls.Certificates), s.jwtKey != nil)
			}
		}},
		{name: "no ID", ra: gitlab.ReceptiveAgent{URL: "grpcs://agentk:1", JWT: jwt}, wantErr: "not a GitLab agent ID"},
		{name: "no authentication", ra: gitlab.ReceptiveAgent{ID: 1, URL: "grpcs://agentk:1"}, wantErr: "neither a JWT private key nor an mTLS client certificate"},
		{name: "bad key", ra: gitlab.ReceptiveAgent{ID: 1, URL: "grpcs://agentk:1", JWT: &gitlab.ReceptiveAgentJWT{PrivateKey: "c2hvcnQ="}}, wantErr: "JWT private key: base64 decodes to 5 bytes"},
		{name: "bad CA", ra: gitlab.ReceptiveAgent{ID: 1, URL: "grpcs://agentk:1", CACert: "nope", JWT: jwt}, wantErr: "ca_cert holds no PEM certificate"},
		{name: "bad client key", ra: gitlab.ReceptiveAgent{ID: 1, URL: "grpcs://agentk:1", MTLS: &gitlab.ReceptiveAgentMTLS{ClientCert: certPEM, ClientKey: "nope"}}, wantErr: "mTLS client certificate and key"},
		{name: "mTLS in plaintext", ra: gitlab.ReceptiveAgent{ID: 1, URL: "grpc://agentk:1", MTLS: mtls}, wantErr: "mTLS needs TLS"},
		{name: "https URL", ra: gitlab.ReceptiveAgent{ID: 1, URL: "https://agentk:1", JWT: jwt}, wantErr: "scheme must be"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, err := parseSpec(tc.ra, base)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got %v, want an error containing %q", err, tc.wantErr)
				}
				if strings.Contains(err.Error(), seed) || strings.Contains(err.Error(), "PRIVATE KEY") {
					t.Fatal("the error holds key material")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tc.check(t, s)
		})
	}
	// A changed configuration is a new version; the same one is not.
	a, _ := parseSpec(gitlab.ReceptiveAgent{ID: 1, URL: "grpcs://agentk:1", JWT: jwt}, base)
	b, _ := parseSpec(gitlab.ReceptiveAgent{ID: 1, URL: "grpcs://agentk:1", JWT: jwt}, base)
	c, _ := parseSpec(gitlab.ReceptiveAgent{ID: 1, URL: "grpcs://agentk:2", JWT: jwt}, base)
	if a.version != b.version || a.version == c.version {
		t.Error("versions do not tell configurations apart")
	}
}
