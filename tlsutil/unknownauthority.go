package tlsutil

import (
	"crypto/x509"
	"errors"
	"log/slog"
	"sync"
)

// maxRememberedCauses bounds the causes an UnknownAuthorityLogger remembers;
// past it, it forgets them all and may log each once more. Peers come and go,
// so their hosts must not grow the set forever.
const maxRememberedCauses = 1024

// UnknownAuthorityLogger logs a failure to verify a server's certificate
// because it is signed by a CA kas does not trust: once per host and issuer,
// not once per request, with the hint how to trust the CA. Safe for
// concurrent use; the zero value is not usable, use NewUnknownAuthorityLogger.
type UnknownAuthorityLogger struct {
	log       *slog.Logger
	caFileKey string

	mu   sync.Mutex
	seen map[unknownAuthorityCause]struct{}
}

type unknownAuthorityCause struct {
	host, issuer string
}

// NewUnknownAuthorityLogger returns a logger whose hint names caFileKey, the
// configuration key that adds a CA for this connection (e.g.
// gitlab.ca_certificate_file).
func NewUnknownAuthorityLogger(logger *slog.Logger, caFileKey string) *UnknownAuthorityLogger {
	return &UnknownAuthorityLogger{log: logger, caFileKey: caFileKey, seen: make(map[unknownAuthorityCause]struct{})}
}

// Log reports whether err (however wrapped) is an unknown-authority failure
// of a connection to host, and logs it the first time this host presents a
// certificate from this issuer. Call it with every error of the connection;
// other errors are ignored.
func (l *UnknownAuthorityLogger) Log(host string, err error) bool {
	if !IsUnknownAuthority(err) {
		return false
	}
	cause := unknownAuthorityCause{host: host}
	var unknown x509.UnknownAuthorityError
	if errors.As(err, &unknown) && unknown.Cert != nil {
		cause.issuer = unknown.Cert.Issuer.String()
	}
	l.mu.Lock()
	_, logged := l.seen[cause]
	if !logged {
		if len(l.seen) >= maxRememberedCauses {
			clear(l.seen)
		}
		l.seen[cause] = struct{}{}
	}
	l.mu.Unlock()
	if logged {
		return true
	}
	attrs := []any{"host", host, "error", err.Error(),
		"hint", "install the CA that signed this certificate in the system pool, put it in a directory named by SSL_CERT_DIR, or set " + l.caFileKey + " to a PEM file holding it; then restart kas"}
	if cause.issuer != "" {
		attrs = append(attrs, "issuer", cause.issuer)
	}
	l.log.Error("TLS: the server's certificate is signed by an unknown authority; kas logs this once per host and issuer", attrs...)
	return true
}
