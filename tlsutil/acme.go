package tlsutil

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/mholt/acmez/v3"

	"github.com/kasproject/kas/server/config"
)

// DefaultACMEStartTimeout bounds how long Manage may take to load or obtain
// the certificates at start-up, including waiting for another node that is
// ordering them.
const DefaultACMEStartTimeout = 3 * time.Minute

// The ACME challenges kas answers.
const (
	ChallengeHTTP01    = "http-01"
	ChallengeTLSALPN01 = "tls-alpn-01"
)

// ACMEOptions are what NewACME needs besides the tls.acme section.
type ACMEOptions struct {
	// Storage holds the certificates, the ACME account, challenge tokens and
	// locks. Several nodes serving the same domains must share it (a
	// RedisStorage); nil means a certmagic.FileStorage in tls.acme.storage_path,
	// or in certmagic's default directory ($XDG_DATA_HOME/certmagic) without one.
	Storage certmagic.Storage
	// TLSAddress is the host:port of the listener serving the certificates
	// (agent.listen); the tls-alpn-01 challenge is answered there, so it must
	// be reachable as port 443 of every domain. Empty disables tls-alpn-01.
	TLSAddress string
	// SSLCertDir is SSL_CERT_DIR: with the system pool and
	// tls.acme.ca_root_file, the CAs trusted for the ACME server's HTTPS.
	SSLCertDir string
	Logger     *slog.Logger
	// StartTimeout bounds Manage; 0 means DefaultACMEStartTimeout.
	StartTimeout time.Duration
}

// ACME serves certificates obtained from an ACME CA (tls.acme) with
// certmagic and renews them in the background. Lifecycle: NewACME, then
// Manage once the listeners answering the challenges are open (it obtains or
// loads the certificates), then Close when the server stops.
type ACME struct {
	domains      []string
	ca           string
	challenges   []string
	httpAddress  string
	tlsAddress   string
	startTimeout time.Duration

	cache     *certmagic.Cache
	magic     *certmagic.Config
	issuer    *certmagic.ACMEIssuer
	events    acmeEvents // the last obtain/renew outcome per domain (status page)
	closeOnce sync.Once
}

// NewACME prepares certificate management for cfg. It contacts nobody;
// Manage does. Which challenges are used: tls.acme.challenges, or by default
// tls-alpn-01 plus http-01 when tls.acme.http_address is set.
func NewACME(cfg config.ACME, opts ACMEOptions) (*ACME, error) {
	if len(cfg.Domains) == 0 {
		return nil, errors.New("tls.acme.domains: at least one domain required")
	}
	challenges, err := acmeChallenges(cfg, opts.TLSAddress)
	if err != nil {
		return nil, err
	}
	roots, err := CertPool(opts.SSLCertDir, cfg.CARootFile)
	if err != nil {
		return nil, fmt.Errorf("tls.acme: CAs trusted for the ACME server: %w", err)
	}
	ca := cfg.CA
	if ca == "" {
		ca = certmagic.LetsEncryptProductionCA
	}
	storage := opts.Storage
	if storage == nil && cfg.StoragePath != "" {
		storage = &certmagic.FileStorage{Path: cfg.StoragePath}
	}
	a := &ACME{
		domains:      slices.Clone(cfg.Domains),
		ca:           ca,
		challenges:   challenges,
		httpAddress:  cfg.HTTPAddress,
		tlsAddress:   opts.TLSAddress,
		startTimeout: orDefault(opts.StartTimeout, DefaultACMEStartTimeout),
	}

	// certmagic binds a challenge port itself when nothing listens there;
	// pointing it at kas's own addresses makes it find them taken by kas's
	// listeners, which answer instead, and never wander to :80 or :443.
	template := certmagic.ACMEIssuer{
		CA:                      ca,
		Email:                   cfg.Email,
		Agreed:                  true, // configuring tls.acme is agreeing to the CA's terms
		TrustedRoots:            roots,
		DisableHTTPChallenge:    !slices.Contains(challenges, ChallengeHTTP01),
		DisableTLSALPNChallenge: !slices.Contains(challenges, ChallengeTLSALPN01),
	}
	if !template.DisableTLSALPNChallenge {
		if template.ListenHost, template.AltTLSALPNPort, err = splitPort("agent.listen.address", opts.TLSAddress); err != nil {
			return nil, err
		}
	}
	if !template.DisableHTTPChallenge {
		host, port, err := splitPort("tls.acme.http_address", cfg.HTTPAddress)
		if err != nil {
			return nil, err
		}
		template.AltHTTPPort = port
		if template.DisableTLSALPNChallenge {
			template.ListenHost = host
		}
	}

	logger := zapLogger(opts.Logger)
	template.Logger = logger
	// The cache's maintenance goroutine renews the certificates; Close stops it.
	a.cache = certmagic.NewCache(certmagic.CacheOptions{
		GetConfigForCert: func(certmagic.Certificate) (*certmagic.Config, error) { return a.magic, nil },
		Logger:           logger,
	})
	a.magic = certmagic.New(a.cache, certmagic.Config{
		Storage: storage,
		Logger:  logger,
		// Clients that send no SNI (dialing an IP address) still get a
		// certificate, and an error naming it instead of a bare alert.
		DefaultServerName: cfg.Domains[0],
		OnEvent:           a.events.onEvent,
	})
	a.issuer = certmagic.NewACMEIssuer(a.magic, template)
	a.magic.Issuers = []certmagic.Issuer{a.issuer}
	opts.Logger.Info("ACME certificates", "domains", strings.Join(cfg.Domains, ","), "ca", ca, "challenges", strings.Join(challenges, ","), "storage", fmt.Sprint(a.magic.Storage))
	return a, nil
}

// acmeChallenges decides which challenges to answer and checks that kas has
// a listener for each.
func acmeChallenges(cfg config.ACME, tlsAddress string) ([]string, error) {
	challenges := cfg.Challenges
	if len(challenges) == 0 {
		if tlsAddress != "" {
			challenges = append(challenges, ChallengeTLSALPN01)
		}
		if cfg.HTTPAddress != "" {
			challenges = append(challenges, ChallengeHTTP01)
		}
		if len(challenges) == 0 {
			return nil, errors.New("tls.acme: no challenge can be answered: the agent listener has no TCP address for tls-alpn-01 and tls.acme.http_address is not set for http-01")
		}
	}
	for _, c := range challenges {
		switch c {
		case ChallengeHTTP01:
			if cfg.HTTPAddress == "" {
				return nil, errors.New("tls.acme.challenges: http-01 needs tls.acme.http_address, the plain-HTTP listener the CA reaches as port 80 of each domain (e.g. :80)")
			}
		case ChallengeTLSALPN01:
			if tlsAddress == "" {
				return nil, errors.New("tls.acme.challenges: tls-alpn-01 is answered on the agent listener, which has no TCP address; use http-01 with tls.acme.http_address")
			}
		default:
			return nil, fmt.Errorf("tls.acme.challenges: want http-01 or tls-alpn-01, got %q", c)
		}
	}
	return challenges, nil
}

func splitPort(key, address string) (string, int, error) {
	host, portText, err := net.SplitHostPort(address)
	if err != nil {
		return "", 0, fmt.Errorf("%s: want host:port, got %q: %w", key, address, err)
	}
	port, err := strconv.Atoi(portText)
	if err != nil || port <= 0 || port > 65535 {
		return "", 0, fmt.Errorf("%s: ACME challenges need a fixed port the CA can reach, got %q", key, address)
	}
	return host, port, nil
}

func orDefault(d, fallback time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return fallback
}

// Manage loads each domain's certificate from storage, or obtains it from
// the CA, before it returns; from then on the certificates are renewed in
// the background. Call it once the listeners answering the challenges are
// serving. It fails, naming the domain, when a certificate cannot be had
// within the start timeout.
func (a *ACME) Manage(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, a.startTimeout)
	defer cancel()
	for _, d := range a.domains {
		if err := a.magic.ManageSync(ctx, []string{d}); err != nil {
			return fmt.Errorf("tls.acme: get a certificate for %s from %s: %w (check that %s resolves to this kas and that %s)",
				d, a.ca, err, d, a.reachHint())
		}
	}
	return nil
}

// reachHint says which ports the CA must reach for the challenges in use.
func (a *ACME) reachHint() string {
	var hints []string
	if slices.Contains(a.challenges, ChallengeTLSALPN01) {
		hints = append(hints, "port 443 reaches agent.listen ("+a.tlsAddress+") for tls-alpn-01")
	}
	if slices.Contains(a.challenges, ChallengeHTTP01) {
		hints = append(hints, "port 80 reaches tls.acme.http_address ("+a.httpAddress+") for http-01")
	}
	return strings.Join(hints, ", or ")
}

// TLSConfig is the configuration of the listener serving the certificates:
// TLS 1.2+, ALPN h2 and http/1.1, plus acme-tls/1 to answer tls-alpn-01.
func (a *ACME) TLSConfig() *tls.Config {
	c := ServerConfig(a.magic.GetCertificate)
	c.NextProtos = append(c.NextProtos, acmez.ACMETLS1Protocol)
	return c
}

// HTTPHandler answers http-01 challenges, this node's or (through the
// shared storage) any other node's, and passes every other request to next.
func (a *ACME) HTTPHandler(next http.Handler) http.Handler {
	return a.issuer.HTTPChallengeHandler(next)
}

// RedirectHandler redirects every request to the same path over HTTPS on
// httpsPort (left out when 443). The host is the requested one when it is
// one of the domains, otherwise the first domain, so a forged Host header
// cannot send a visitor elsewhere.
func (a *ACME) RedirectHandler(httpsPort string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host := r.Host
		if h, _, err := net.SplitHostPort(host); err == nil {
			host = h
		}
		if !slices.ContainsFunc(a.domains, func(d string) bool { return strings.EqualFold(d, host) }) {
			host = a.domains[0]
		}
		if httpsPort != "" && httpsPort != "443" {
			host = net.JoinHostPort(host, httpsPort)
		}
		target := url.URL{Scheme: "https", Host: host, Path: r.URL.Path, RawPath: r.URL.RawPath, RawQuery: r.URL.RawQuery}
		http.Redirect(w, r, target.String(), http.StatusPermanentRedirect)
	})
}

// Close stops the background renewals. Certificates stay in storage.
func (a *ACME) Close() {
	a.closeOnce.Do(a.cache.Stop)
}
