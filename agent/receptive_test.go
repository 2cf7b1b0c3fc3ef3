package agent

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/gorilla/websocket"
	"golang.org/x/net/http2"

	"github.com/kasproject/kas/protocol"
)

// testCA issues certificates in memory.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newTestCA(t *testing.T, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert: cert, key: key}
}

func (ca *testCA) pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.cert)
	return p
}

// issue makes a server certificate for dnsNames, or a client certificate.
func (ca *testCA) issue(t *testing.T, client bool, dnsNames ...string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	usage := x509.ExtKeyUsageServerAuth
	if client {
		usage = x509.ExtKeyUsageClientAuth
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: "test"}, DNSNames: dnsNames,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

const (
	receptiveTestID   = 42
	receptiveTestName = "agentk.receptive.test"
)

// receptiveAgent is an agent in receptive mode only, with TLS from
// serverCA, and how to reach it.
type receptiveAgent struct {
	*runningAgent
	addr     string
	serverCA *testCA
}

func startReceptive(t *testing.T, api *fakeAPIServer, jwtKey ed25519.PublicKey, clientCAs *x509.CertPool, token string) *receptiveAgent {
	t.Helper()
	serverCA := newTestCA(t, "server CA")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln = tls.NewListener(ln, ServerTLS(serverCA.issue(t, false, receptiveTestName), clientCAs != nil))
	a := startAgent(t, "", api, func(o *Options) {
		o.KASAddress, o.Token = "", token
		o.ShutdownGrace = 200 * time.Millisecond
		o.Receptive = &ReceptiveOptions{Listener: ln, JWTPublicKey: jwtKey, AgentID: receptiveTestID, ClientCAs: clientCAs}
	})
	return &receptiveAgent{runningAgent: a, addr: addr, serverCA: serverCA}
}

// dial connects to the agent as kas would, with an Authorization header
// (none if empty) and a client certificate (none if nil).
func (r *receptiveAgent) dial(t *testing.T, authorization string, clientCert *tls.Certificate) (*websocket.Conn, *http.Response, error) {
	t.Helper()
	tlsConfig := &tls.Config{RootCAs: r.serverCA.pool(), ServerName: receptiveTestName, NextProtos: []string{"http/1.1"}}
	if clientCert != nil {
		tlsConfig.Certificates = []tls.Certificate{*clientCert}
	}
	d := websocket.Dialer{TLSClientConfig: tlsConfig, Subprotocols: []string{protocol.Subprotocol}, HandshakeTimeout: testTimeout}
	h := http.Header{}
	if authorization != "" {
		h.Set("Authorization", authorization)
	}
	return d.Dial("wss://"+r.addr+"/", h)
}

func TestReceptiveAuthentication(t *testing.T) {
	api := newAPIServer(t, nil)
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	_, otherPriv, _ := ed25519.GenerateKey(rand.Reader)
	clientCA, otherCA := newTestCA(t, "kas client CA"), newTestCA(t, "another CA")
	kasCert, strangerCert := clientCA.issue(t, true), otherCA.issue(t, true)
	bearer := func(key ed25519.PrivateKey, id int64) string {
		token, err := protocol.SignReceptiveJWT(key, id)
		if err != nil {
			t.Fatal(err)
		}
		return "Bearer " + token
	}
	now := time.Now()
	expired, err := jwt.NewWithClaims(jwt.SigningMethodEdDSA, jwt.RegisteredClaims{
		Issuer: protocol.ReceptiveJWTIssuer, Audience: jwt.ClaimStrings{"42"},
		IssuedAt: jwt.NewNumericDate(now.Add(-3 * time.Minute)), ExpiresAt: jwt.NewNumericDate(now.Add(-2 * time.Minute)),
	}).SignedString(priv)
	if err != nil {
		t.Fatal(err)
	}

	jwtAgent := startReceptive(t, api, pub, nil, testToken)
	mtlsAgent := startReceptive(t, api, nil, clientCA.pool(), "")
	bothAgent := startReceptive(t, api, pub, clientCA.pool(), "")

	tests := []struct {
		name          string
		agent         *receptiveAgent
		authorization string
		cert          *tls.Certificate
		wantRefusal   string // "" when kas must be accepted
	}{
		{"JWT signed with the agent's key", jwtAgent, bearer(priv, receptiveTestID), nil, ""},
		{"JWT signed with another key", jwtAgent, bearer(otherPriv, receptiveTestID), nil, "signature does not match the public key"},
		{"expired JWT", jwtAgent, "Bearer " + expired, nil, "the JWT expired at"},
		{"JWT for another agent", jwtAgent, bearer(priv, 43), nil, "the JWT is for agent 43, this agentk is agent 42"},
		{"no credentials", jwtAgent, "", nil, "no credentials: kas must present a JWT (Authorization: Bearer)"},
		// Without client CAs agentk does not ask for a certificate.
		{"client certificate to a JWT-only agent", jwtAgent, "", &kasCert, "no credentials: kas must present a JWT"},
		{"client certificate from the agent's CA", mtlsAgent, "", &kasCert, ""},
		{"client certificate from another CA", mtlsAgent, "", &strangerCert, `signed by "CN=another CA", which --receptive-client-ca-file does not hold`},
		{"JWT to an mTLS-only agent", mtlsAgent, bearer(priv, receptiveTestID), nil, "has no --receptive-jwt-public-key-file"},
		{"no client certificate", mtlsAgent, "", nil, "no credentials: kas must present a client certificate"},
		{"both configured, JWT only", bothAgent, bearer(priv, receptiveTestID), nil, ""},
		{"both configured, certificate only", bothAgent, "", &kasCert, ""},
		{"both configured, neither valid", bothAgent, bearer(otherPriv, receptiveTestID), &strangerCert, "client certificate: signed by"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ws, resp, err := tc.agent.dial(t, tc.authorization, tc.cert)
			if tc.wantRefusal == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				defer ws.Close()
				if resp.Header.Get(protocol.HeaderAgentVersion) != testAgentVersion || resp.Header.Get(protocol.HeaderKubernetesVersion) != testK8sVersion {
					t.Errorf("the answer lacks the agent's description: %v", resp.Header)
				}
				if got, want := resp.Header.Get(protocol.HeaderAgentToken), tc.agent.token; got != want {
					t.Errorf("the answer hands over token %q, want %q", got, want)
				}
				if resp.Header.Get("Authorization") != "" {
					t.Error("the answer carries an Authorization header")
				}
				// kas is the HTTP/2 client, as over a tunnel the agent dialled.
				cc, err := (&http2.Transport{}).NewClientConn(protocol.NewConn(ws))
				if err != nil {
					t.Fatal(err)
				}
				defer cc.Close()
				s := &kasSession{cc: cc}
				got := s.roundTrip(t, newRequest(t, http.MethodGet, "/api/v1/namespaces", nil, nil))
				if e := decodeJSON[echoed](t, got.Body); e.Header.Get("Authorization") != "Bearer "+testSAToken {
					t.Errorf("the API server saw %v, want the agent's own credentials", e.Header)
				}
				return
			}
			if err == nil {
				_ = ws.Close()
				t.Fatal("accepted")
			}
			if resp == nil || resp.StatusCode != http.StatusUnauthorized {
				t.Fatalf("got %v, %v; want HTTP 401", resp, err)
			}
			body, _ := io.ReadAll(resp.Body)
			if !strings.Contains(string(body), tc.wantRefusal) {
				t.Errorf("the refusal says %q, want it to contain %q", body, tc.wantRefusal)
			}
			logs := tc.agent.logs.String()
			quoted, _ := json.Marshal(tc.wantRefusal) // as the JSON log line holds it
			if !strings.Contains(logs, "refused a connection that did not authenticate as kas") || !strings.Contains(logs, strings.Trim(string(quoted), `"`)) {
				t.Errorf("the agent did not log the refusal with %q:\n%s", tc.wantRefusal, logs)
			}
			if tc.authorization != "" && strings.Contains(logs, strings.TrimPrefix(tc.authorization, "Bearer ")) {
				t.Error("the JWT appears in the logs")
			}
		})
	}
}

func TestReceptiveServesSeveralKASConnections(t *testing.T) {
	api := newAPIServer(t, nil)
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	a := startReceptive(t, api, pub, nil, "")
	// Ready before any tunnel: a Service must send kas to a receptive agentk.
	readiness := func() int {
		rec := httptest.NewRecorder()
		a.ObservabilityHandler(a.registry).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/readiness", nil))
		return rec.Code
	}
	waitFor(t, func() bool { return readiness() == http.StatusOK }, "receptive agentk ready without a tunnel")
	token, err := protocol.SignReceptiveJWT(priv, receptiveTestID)
	if err != nil {
		t.Fatal(err)
	}
	var conns []*websocket.Conn
	for range 3 {
		ws, _, err := a.dial(t, "Bearer "+token, nil)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, ws)
	}
	waitFor(t, func() bool { return a.Tunnels() == 3 }, "three tunnels")
	recv(t, a.Connected())
	_ = conns[0].Close()
	waitFor(t, func() bool { return a.Tunnels() == 2 }, "two tunnels after kas closed one")

	// A plain request is told what the endpoint is.
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: a.serverCA.pool(), ServerName: receptiveTestName}}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Get("https://" + a.addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), "receptive endpoint") {
		t.Errorf("a plain GET got %d %q, want 400 explaining the endpoint", resp.StatusCode, body)
	}

	// Stopping the agent closes the listener and the tunnels.
	if err := a.stop(t); err != nil {
		t.Fatal(err)
	}
	if a.Tunnels() != 0 {
		t.Errorf("%d tunnels left after Run returned", a.Tunnels())
	}
	if code := readiness(); code != http.StatusServiceUnavailable {
		t.Errorf("/readiness after Run returned = %d, want 503", code)
	}
	if conn, err := net.DialTimeout("tcp", a.addr, time.Second); err == nil {
		_ = conn.Close()
		t.Error("the receptive listener still accepts after Run returned")
	}
	for _, ws := range conns[1:] {
		_ = ws.Close()
	}
}

func TestReceptiveOptionsAreChecked(t *testing.T) {
	api := newAPIServer(t, nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	pub, _, _ := ed25519.GenerateKey(rand.Reader)
	for _, tc := range []struct {
		name string
		r    *ReceptiveOptions
		want string
	}{
		{"no listener", &ReceptiveOptions{JWTPublicKey: pub, AgentID: 1}, "needs a listener"},
		{"no authentication", &ReceptiveOptions{Listener: ln}, "needs a way to authenticate kas"},
		{"JWT without agent ID", &ReceptiveOptions{Listener: ln, JWTPublicKey: pub}, "--receptive-agent-id"},
		{"short key", &ReceptiveOptions{Listener: ln, JWTPublicKey: pub[:10], AgentID: 1}, "has 10 bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(Options{Receptive: tc.r, RESTConfig: api.restConfig()})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
		})
	}
	// Receptive mode needs no kas address or token.
	if _, err := New(Options{Receptive: &ReceptiveOptions{Listener: ln, JWTPublicKey: pub, AgentID: 1}, RESTConfig: api.restConfig()}); err != nil {
		t.Fatalf("receptive only: %v", err)
	}
}

// waitFor polls cond until it holds, failing after testTimeout.
func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(testTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
