package tlsutil

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/kasproject/kas/server/config"
)

// CertPool returns the pool kas trusts for outbound TLS (GitLab, peers,
// Redis): the system pool, plus every PEM certificate in the directories of
// sslCertDir (the SSL_CERT_DIR variable: one directory or several separated
// by ":", as OpenSSL and Go read it), plus each of caFiles.
//
// A directory is read the way Go reads SSL_CERT_DIR: every entry, following
// symlinks (so both plain files and the hash-named links c_rehash makes,
// pointing within the directory or elsewhere, count); entries that are not
// PEM certificates are skipped, since certificate directories often hold
// other files. Unlike Go, a directory that cannot be read is an error, because
// a mistyped SSL_CERT_DIR otherwise only shows up later as an unknown
// authority. Each CA file must be readable and hold at least one certificate;
// empty names are ignored so optional configuration keys can be passed as is.
func CertPool(sslCertDir string, caFiles ...string) (*x509.CertPool, error) {
	pool, err := x509.SystemCertPool()
	if err != nil {
		return nil, fmt.Errorf("load the system certificate pool: %w", err)
	}
	for _, dir := range strings.Split(sslCertDir, ":") {
		if dir == "" {
			continue
		}
		if err := appendDir(pool, dir); err != nil {
			return nil, err
		}
	}
	for _, file := range caFiles {
		if file == "" {
			continue
		}
		data, err := os.ReadFile(file)
		if err != nil {
			return nil, fmt.Errorf("read CA certificate file: %w", err)
		}
		if !pool.AppendCertsFromPEM(data) {
			return nil, fmt.Errorf("CA certificate file %s holds no PEM certificate (want -----BEGIN CERTIFICATE-----)", file)
		}
	}
	return pool, nil
}

// appendDir adds the certificates of one SSL_CERT_DIR directory. The pool
// ignores certificates it already holds, so a file and the hash links to it
// add it once.
func appendDir(pool *x509.CertPool, dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("read SSL_CERT_DIR directory: %w", err)
	}
	for _, e := range entries {
		if e.IsDir() {
			continue
		}
		// ReadFile follows symlinks; dangling links and unreadable
		// entries are skipped like any other non-certificate.
		data, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			continue
		}
		pool.AppendCertsFromPEM(data)
	}
	return nil
}

// ClientConfig returns a TLS 1.2+ client configuration trusting
// CertPool(sslCertDir, caFiles...). Callers set ServerName when it differs
// from the host they dial.
func ClientConfig(sslCertDir string, caFiles ...string) (*tls.Config, error) {
	pool, err := CertPool(sslCertDir, caFiles...)
	if err != nil {
		return nil, err
	}
	return &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}, nil
}

// IsUnknownAuthority reports whether err, however wrapped (*url.Error,
// *tls.CertificateVerificationError, fmt.Errorf), comes from a server
// certificate signed by a CA kas does not trust: the failure whose fix is to
// add the CA to SSL_CERT_DIR or a ca_certificate_file.
func IsUnknownAuthority(err error) bool {
	if err == nil {
		return false
	}
	var unknown x509.UnknownAuthorityError
	if errors.As(err, &unknown) {
		return true
	}
	// gRPC reports handshake failures as status errors that keep only the
	// text, so the type is lost on the peer path; the message is stable.
	return strings.Contains(err.Error(), "certificate signed by unknown authority")
}

// RedisClientConfig returns the TLS configuration for Redis described by
// redis.tls, or nil when TLS is off: ClientConfig's trust plus the
// ca_certificate_file, and the client certificate when one is set.
func RedisClientConfig(t config.RedisTLS, sslCertDir string) (*tls.Config, error) {
	if !t.Enabled {
		return nil, nil
	}
	c, err := ClientConfig(sslCertDir, t.CACertificateFile)
	if err != nil {
		return nil, fmt.Errorf("redis.tls: %w", err)
	}
	if t.CertificateFile != "" || t.KeyFile != "" {
		cert, err := tls.LoadX509KeyPair(t.CertificateFile, t.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("redis.tls: load certificate_file %s and key_file %s: %w", t.CertificateFile, t.KeyFile, err)
		}
		c.Certificates = []tls.Certificate{cert}
	}
	return c, nil
}
