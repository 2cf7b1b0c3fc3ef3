package tlsutil

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultReloadInterval is how often kas looks at a listener's certificate
// and key files for changes: often enough that a renewed certificate is
// served within seconds, rarely enough that two stat calls cost nothing.
const DefaultReloadInterval = 5 * time.Second

// ServerConfig returns the TLS configuration of a kas listener: TLS 1.2+,
// ALPN offering h2 and http/1.1, and the certificate chosen by getCertificate
// for every handshake, so a replaced certificate is served to new connections
// while open ones keep theirs.
func ServerConfig(getCertificate func(*tls.ClientHelloInfo) (*tls.Certificate, error)) *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS12,
		NextProtos:     []string{"h2", "http/1.1"},
		GetCertificate: getCertificate,
	}
}

// CertReloader serves a certificate and key from files and loads them again
// when they change (Run) or when asked (Reload, e.g. on SIGHUP). A pair that
// fails to load (a half-written file, a key that does not match) is logged
// and the previous certificate stays in use.
type CertReloader struct {
	certFile, keyFile string
	log               *slog.Logger

	current atomic.Pointer[tls.Certificate]

	mu sync.Mutex // serializes loads; guards seen
	// seen is the state of the files at the last load, successful or not, so
	// polling retries a failed pair only once the files change again.
	seen filesState
}

// NewCertReloader loads certFile and keyFile (PEM) and returns a reloader
// serving them. The first load must succeed: a listener without a
// certificate cannot start.
func NewCertReloader(certFile, keyFile string, logger *slog.Logger) (*CertReloader, error) {
	r := &CertReloader{certFile: certFile, keyFile: keyFile, log: logger}
	if err := r.load(); err != nil {
		return nil, err
	}
	return r, nil
}

// GetCertificate returns the current certificate; it is the
// tls.Config.GetCertificate of the listener.
func (r *CertReloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return r.current.Load(), nil
}

// Reload loads the files now, whether or not they changed. On failure the
// previous certificate stays in use and the error says why.
func (r *CertReloader) Reload() error {
	if err := r.load(); err != nil {
		r.log.Error("Reloading the TLS certificate failed; still serving the previous one", "certificate_file", r.certFile, "key_file", r.keyFile, "error", err.Error())
		return err
	}
	return nil
}

// Run checks the files every interval and reloads them when their size,
// modification time or identity (a symlink swapped to a new file, as
// Kubernetes does for mounted secrets) changed and then stayed the same for
// one more interval, so a certificate and key copied one after the other are
// loaded as a pair, not half-written. It returns when ctx ends.
func (r *CertReloader) Run(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	var settling *filesState // changed files waiting to stay unchanged for a tick
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		state, err := statFiles(r.certFile, r.keyFile)
		r.mu.Lock()
		changed := err == nil && !state.same(r.seen)
		r.mu.Unlock()
		switch {
		case !changed:
			settling = nil
		case settling == nil || !state.same(*settling):
			settling = &state
		default:
			settling = nil
			_ = r.Reload() // logged by Reload
		}
	}
}

// load reads the pair and makes it current if it is a usable certificate.
func (r *CertReloader) load() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	// Stat before reading: a write landing in between is seen as a change
	// at the next poll instead of being missed.
	state, statErr := statFiles(r.certFile, r.keyFile)
	cert, err := tls.LoadX509KeyPair(r.certFile, r.keyFile)
	if statErr == nil {
		r.seen = state
	}
	if err != nil {
		return fmt.Errorf("load certificate_file %s and key_file %s: %w", r.certFile, r.keyFile, err)
	}
	if len(cert.Certificate) == 0 {
		return fmt.Errorf("load certificate_file %s: no certificate in it", r.certFile)
	}
	old := r.current.Swap(&cert)
	if old != nil {
		r.log.Info("Reloaded the TLS certificate", "certificate_file", r.certFile, "not_after", cert.Leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	return nil
}

// filesState is what polling compares to notice a changed file: os.Stat
// follows symlinks, so a link pointed at a new file shows as another file.
type filesState struct {
	cert, key os.FileInfo
}

func statFiles(certFile, keyFile string) (filesState, error) {
	c, err1 := os.Stat(certFile)
	k, err2 := os.Stat(keyFile)
	return filesState{cert: c, key: k}, errors.Join(err1, err2)
}

func (s filesState) same(o filesState) bool {
	return sameFile(s.cert, o.cert) && sameFile(s.key, o.key)
}

func sameFile(a, b os.FileInfo) bool {
	if a == nil || b == nil {
		return a == b
	}
	return os.SameFile(a, b) && a.Size() == b.Size() && a.ModTime().Equal(b.ModTime())
}
