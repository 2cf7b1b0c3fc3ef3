package internalapi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/kasproject/kas/internal/healthreflection"
	"github.com/kasproject/kas/server/kasjwt"
)

// Why a call was refused. None of them contains the caller's token.
var (
	errNoSecret = errors.New("the internal API is disabled because kas has no API secret: " +
		"set api.listen.authentication_secret_file (or gitlab.authentication_secret_file) " +
		"to the file holding GitLab's API secret (gitlab_kas['api_secret_key'])")
	errNoCredentials = errors.New("missing credentials: send \"authorization: bearer <JWT>\" " +
		"with a JWT signed with the API secret for audience gitlab-kas " +
		"(mint one with: kas token --secret-file <API secret file> --audience gitlab-kas)")
	errNotBearer = errors.New("authorization must be \"bearer <JWT>\"")
)

// healthMethodPrefix names the health service, which answers without a
// token so probes (Kubernetes gRPC probes cannot send headers) and
// load balancers can ask; it says nothing but SERVING or NOT_SERVING.
const healthMethodPrefix = "/grpc.health.v1.Health/"

// authenticator checks the JWT GitLab Rails sends: HS256 with the API
// secret, audience gitlab-kas, valid for at most kasjwt.MaxAPILifetime (Rails
// sends a minute). Rails sets the issuer to its own host name, which kas
// does not know, so the issuer is not checked. Tokens for the
// private API fail: they are signed with the private API secret and
// addressed to another audience.
type authenticator struct {
	secret []byte
	// healthReflection describes the health service to callers without a
	// token, so grpcurl can call it as probes do.
	healthReflection *healthreflection.Reflection
}

// authenticate checks an authorization value ("Bearer <JWT>"; the scheme
// is case-insensitive).
func (a authenticator) authenticate(authorization string) error {
	if len(a.secret) == 0 {
		return errNoSecret
	}
	if authorization == "" {
		return errNoCredentials
	}
	scheme, token, ok := strings.Cut(authorization, " ")
	if !ok || !strings.EqualFold(scheme, "bearer") {
		return errNotBearer
	}
	if err := kasjwt.Verify(a.secret, strings.TrimSpace(token), kasjwt.AudienceKAS, "", kasjwt.MaxLifetime(kasjwt.MaxAPILifetime)); err != nil {
		return fmt.Errorf("invalid API token: %w", err)
	}
	return nil
}

// authenticateRPC checks a gRPC call's authorization metadata.
func (a authenticator) authenticateRPC(ctx context.Context, method string) error {
	if strings.HasPrefix(method, healthMethodPrefix) {
		return nil
	}
	var authorization string
	if values := metadata.ValueFromIncomingContext(ctx, "authorization"); len(values) > 0 {
		authorization = values[0]
	}
	if err := a.authenticate(authorization); err != nil {
		return status.Error(codes.Unauthenticated, err.Error())
	}
	return nil
}

func (a authenticator) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if err := a.authenticateRPC(ctx, info.FullMethod); err != nil {
		return nil, err
	}
	return handler(ctx, req)
}

func (a authenticator) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if served, err := a.healthReflection.Serve(ss, info.FullMethod); served {
		return err
	}
	if err := a.authenticateRPC(ss.Context(), info.FullMethod); err != nil {
		return err
	}
	return handler(srv, ss)
}

// middleware is the JSON routes' check of Authorization: Bearer <JWT>.
func (a authenticator) middleware(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := a.authenticate(r.Header.Get("Authorization")); err != nil {
			w.Header().Set("WWW-Authenticate", `Bearer realm="kas internal API"`)
			writeError(w, status.Error(codes.Unauthenticated, err.Error()))
			return
		}
		next.ServeHTTP(w, r)
	})
}

// callLogger writes one line per gRPC call, like the access log of the
// HTTP routes: method, status code, duration and, for failures, the
// status message (which never contains a token).
type callLogger struct {
	log *slog.Logger
}

func (l callLogger) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	start := time.Now()
	resp, err := handler(ctx, req)
	l.record(ctx, info.FullMethod, start, err)
	return resp, err
}

func (l callLogger) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	start := time.Now()
	err := handler(srv, ss)
	l.record(ss.Context(), info.FullMethod, start, err)
	return err
}

func (l callLogger) record(ctx context.Context, method string, start time.Time, err error) {
	st := status.Convert(err)
	attrs := []slog.Attr{
		slog.String("listener", "internal_api"),
		slog.String("method", method),
		slog.String("code", st.Code().String()),
		slog.Float64("duration_s", time.Since(start).Seconds()),
	}
	if err != nil {
		attrs = append(attrs, slog.String("error", st.Message()))
	}
	l.log.LogAttrs(ctx, slog.LevelInfo, "gRPC call", attrs...)
}
