package peer

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"

	"github.com/kasproject/kas/internal/reflectclient"
	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/kasjwt"
	"github.com/kasproject/kas/server/peer/peerpb"
)

// dialPlain connects to n's private API without any credentials of its own.
func dialPlain(t *testing.T, n *node) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient("passthrough:///"+strings.TrimPrefix(n.url, "grpc://"),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	return cc
}

func signToken(t *testing.T, secret []byte, issuer, audience string) string {
	t.Helper()
	token, err := kasjwt.Sign(secret, issuer, audience, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	return token
}

// dayLongToken is a correct private API token valid for a day, longer than
// kasjwt.MaxAPILifetime.
func dayLongToken(t *testing.T) string {
	t.Helper()
	token, err := kasjwt.Sign(testSecret, kasjwt.IssuerPrivateAPI, kasjwt.AudiencePrivateAPI, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return token
}

func expiredToken(t *testing.T) string {
	t.Helper()
	now := time.Now()
	token, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.RegisteredClaims{
		Issuer:    kasjwt.IssuerPrivateAPI,
		Audience:  jwt.ClaimStrings{kasjwt.AudiencePrivateAPI},
		IssuedAt:  jwt.NewNumericDate(now.Add(-2 * time.Hour)),
		NotBefore: jwt.NewNumericDate(now.Add(-2 * time.Hour)),
		ExpiresAt: jwt.NewNumericDate(now.Add(-time.Hour)),
	}).SignedString(testSecret)
	if err != nil {
		t.Fatal(err)
	}
	return token
}

func TestServerAuthenticatesCalls(t *testing.T) {
	b := newNode(t, nodeConfig{})
	client := peerpb.NewForwardClient(dialPlain(t, b))
	otherSecret := []byte("another secret of 32 bytes......")
	tests := []struct {
		name          string
		authorization string
		wantCode      codes.Code
		wantMsg       string
	}{
		{"missing", "", codes.Unauthenticated, "missing private API token"},
		{"not bearer", "Basic dXNlcjpwYXNz", codes.Unauthenticated, `must be "bearer <JWT>"`},
		{"malformed", "Bearer not.a.jwt", codes.Unauthenticated, "malformed"},
		{"wrong secret", "Bearer " + signToken(t, otherSecret, kasjwt.IssuerPrivateAPI, kasjwt.AudiencePrivateAPI),
			codes.Unauthenticated, "signature is invalid"},
		{"expired", "Bearer " + expiredToken(t), codes.Unauthenticated, "expired"},
		{"valid for a day", "Bearer " + dayLongToken(t), codes.Unauthenticated, "valid for too long"},
		{"wrong audience", "Bearer " + signToken(t, testSecret, kasjwt.IssuerPrivateAPI, kasjwt.AudienceKAS),
			codes.Unauthenticated, "wrong audience"},
		{"wrong issuer", "Bearer " + signToken(t, testSecret, kasjwt.IssuerKAS, kasjwt.AudiencePrivateAPI),
			codes.Unauthenticated, "wrong issuer"},
		{"valid", "bearer " + signToken(t, testSecret, kasjwt.IssuerPrivateAPI, kasjwt.AudiencePrivateAPI),
			codes.NotFound, "no tunnel for agent 7 on this node"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
			defer cancel()
			if tt.authorization != "" {
				ctx = metadata.AppendToOutgoingContext(ctx, "authorization", tt.authorization)
			}
			stream, err := client.RoundTrip(ctx)
			if err != nil {
				t.Fatal(err)
			}
			head := &peerpb.RequestHead{AgentId: 7, Method: "GET", Path: []byte("/"), EndOfBody: true}
			_ = stream.Send(&peerpb.ClientMessage{Msg: &peerpb.ClientMessage_Head{Head: head}})
			_ = stream.CloseSend()
			_, err = stream.Recv()
			st := status.Convert(err)
			if st.Code() != tt.wantCode || !strings.Contains(st.Message(), tt.wantMsg) {
				t.Fatalf("got %v %q; want %v containing %q", st.Code(), st.Message(), tt.wantCode, tt.wantMsg)
			}
			if token, _ := strings.CutPrefix(tt.authorization, "Bearer "); token != "" && strings.Contains(st.Message(), token) {
				t.Fatal("the refusal echoes the token")
			}
		})
	}
}

func TestServerRefusesBadRequestHeads(t *testing.T) {
	b := newNode(t, nodeConfig{})
	b.connectAgent(t, 1, newTestAgent("b"))
	client := peerpb.NewForwardClient(dialPlain(t, b))
	token := signToken(t, testSecret, kasjwt.IssuerPrivateAPI, kasjwt.AudiencePrivateAPI)
	tests := []struct {
		name    string
		first   *peerpb.ClientMessage
		wantMsg string
	}{
		{"data first", &peerpb.ClientMessage{Msg: &peerpb.ClientMessage_Data{Data: []byte("x")}}, "must be a request head"},
		{"no agent", headMsg(&peerpb.RequestHead{Method: "GET", Path: []byte("/")}), "agent ID 0"},
		{"bad method", headMsg(&peerpb.RequestHead{AgentId: 1, Method: "GE T", Path: []byte("/")}), "invalid method"},
		{"relative path", headMsg(&peerpb.RequestHead{AgentId: 1, Method: "GET", Path: []byte("api")}), "absolute path"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
			defer cancel()
			ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
			stream, err := client.RoundTrip(ctx)
			if err != nil {
				t.Fatal(err)
			}
			_ = stream.Send(tt.first)
			_ = stream.CloseSend()
			_, err = stream.Recv()
			if st := status.Convert(err); st.Code() != codes.InvalidArgument || !strings.Contains(st.Message(), tt.wantMsg) {
				t.Fatalf("got %v %q; want InvalidArgument containing %q", st.Code(), st.Message(), tt.wantMsg)
			}
		})
	}
}

func headMsg(h *peerpb.RequestHead) *peerpb.ClientMessage {
	return &peerpb.ClientMessage{Msg: &peerpb.ClientMessage_Head{Head: h}}
}

func TestRouterWithWrongSecretIsRefused(t *testing.T) {
	a := newNode(t, nodeConfig{routerOpts: func(o *RouterOptions) { o.Secret = []byte("another secret of 32 bytes......") }})
	b := newNode(t, nodeConfig{})
	b.connectAgent(t, 1, newTestAgent("b"))
	a.reg.setRemote([]string{b.url})
	rt, err := a.router.Route(context.Background(), 1)
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest(http.MethodGet, "http://agent/echo", nil)
	_, err = rt.RoundTrip(req)
	if !errors.Is(err, registry.ErrNodeUnreachable) || !strings.Contains(err.Error(), "same private API secret") {
		t.Fatalf("error %v; want the node unreachable, saying the secrets differ", err)
	}
	if n := counterValue(a.router.metrics.failRefused); n != 1 {
		t.Errorf("refusals counted: %v, want 1", n)
	}
	if n := counterValue(b.server.results.unauthenticated); n != 1 {
		t.Errorf("node B counted %v unauthenticated calls, want 1", n)
	}
}

func TestHealthAnswersWithoutToken(t *testing.T) {
	b := newNode(t, nodeConfig{})
	health := healthpb.NewHealthClient(dialPlain(t, b))
	for _, service := range []string{"", peerpb.Forward_ServiceDesc.ServiceName} {
		ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
		resp, err := health.Check(ctx, &healthpb.HealthCheckRequest{Service: service})
		cancel()
		if err != nil {
			t.Fatalf("check %q: %v", service, err)
		}
		if resp.Status != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("check %q: %v, want SERVING", service, resp.Status)
		}
	}
}

// TestGRPCurlHealthCheckWithoutToken: "grpcurl -plaintext host:8155
// grpc.health.v1.Health/Check" asks reflection for the method before it
// calls, so reflection describes the health service (and nothing else)
// without a token.
func TestGRPCurlHealthCheckWithoutToken(t *testing.T) {
	b := newNode(t, nodeConfig{})
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	c := reflectclient.New(dialPlain(t, b))
	out, err := c.Invoke(ctx, "grpc.health.v1.Health/Check", "")
	if err != nil || out != `{"status":"SERVING"}` {
		t.Fatalf("health check through reflection: %s, %v", out, err)
	}
	services, err := c.ListServices(ctx)
	if err != nil || !slices.Equal(services, []string{"grpc.health.v1.Health"}) {
		t.Fatalf("reflection without a token lists %v (%v), want the health service alone", services, err)
	}
	if _, err := c.Describe(ctx, peerpb.Forward_ServiceDesc.ServiceName); err == nil {
		t.Fatal("reflection without a token describes the Forward service")
	}
}

func TestTokenSourceReusesTokenForHalfItsLife(t *testing.T) {
	ts := newTokenSource(testSecret)
	now := time.Now()
	ts.now = func() time.Time { return now }
	first, err := ts.GetRequestMetadata(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	token, ok := strings.CutPrefix(first[authorizationKey], "Bearer ")
	if !ok {
		t.Fatalf("metadata %v lacks a bearer token", first)
	}
	if err := kasjwt.Verify(testSecret, token, kasjwt.AudiencePrivateAPI, kasjwt.IssuerPrivateAPI); err != nil {
		t.Fatalf("minted token does not verify: %v", err)
	}
	now = now.Add(tokenTTL/2 - time.Second)
	if again, _ := ts.GetRequestMetadata(context.Background()); again[authorizationKey] != first[authorizationKey] {
		t.Fatal("token renewed before half its life")
	}
	now = now.Add(2 * time.Second)
	if renewed, _ := ts.GetRequestMetadata(context.Background()); renewed[authorizationKey] == first[authorizationKey] {
		t.Fatal("token not renewed after half its life")
	}
}

func TestVerifierRemembersTokensOnlyUntilExpiry(t *testing.T) {
	v := newVerifier(testSecret)
	token := expiredToken(t)
	exp := time.Now().Add(-time.Hour)
	// As if the token had been verified while it was valid.
	v.remember(token, exp, exp.Add(-time.Minute))
	v.now = func() time.Time { return exp.Add(-time.Second) }
	if err := v.verify(token); err != nil {
		t.Fatalf("remembered token refused before its expiry: %v", err)
	}
	v.now = time.Now
	if err := v.verify(token); !errors.Is(err, kasjwt.ErrExpired) {
		t.Fatalf("expired token: got %v, want kasjwt.ErrExpired", err)
	}
	good := signToken(t, testSecret, kasjwt.IssuerPrivateAPI, kasjwt.AudiencePrivateAPI)
	if err := v.verify(good); err != nil {
		t.Fatal(err)
	}
	if _, ok := v.verified[good]; !ok {
		t.Fatal("valid token not remembered")
	}
}

func TestReflectionListsServicesToAuthenticatedCallers(t *testing.T) {
	b := newNode(t, nodeConfig{})
	client := reflectionpb.NewServerReflectionClient(dialPlain(t, b))
	token := signToken(t, testSecret, kasjwt.IssuerPrivateAPI, kasjwt.AudiencePrivateAPI)
	list := func(ctx context.Context) (*reflectionpb.ServerReflectionResponse, error) {
		ctx, cancel := context.WithTimeout(ctx, testTimeout)
		defer cancel()
		stream, err := client.ServerReflectionInfo(ctx)
		if err != nil {
			return nil, err
		}
		req := &reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}
		_ = stream.Send(req) // an error means the stream ended; Recv says why
		return stream.Recv()
	}
	if _, err := list(metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+expiredToken(t))); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("with an expired token: %v, want Unauthenticated", err)
	}
	resp, err := list(metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+token))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		names = append(names, s.GetName())
	}
	if !slices.Contains(names, peerpb.Forward_ServiceDesc.ServiceName) {
		t.Fatalf("services %v lack %s", names, peerpb.Forward_ServiceDesc.ServiceName)
	}
}
