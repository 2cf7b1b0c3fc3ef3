package server

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"

	"github.com/caddyserver/certmagic"
	"github.com/redis/go-redis/v9"

	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/config"
	"github.com/kasproject/kas/tlsutil"
)

// publicListener is agent.listen, the listener ACME certificates are for.
const publicListener = "agent.listen"

// buildACME gets the public listener's certificates from tls.acme, when set:
// agent.listen serves them, and tls.acme.http_address, when set, answers
// http-01 challenges and redirects everything else to HTTPS.
func (s *Server) buildACME() error {
	a := s.cfg.TLS.ACME
	if a == nil {
		return nil
	}
	var public *listener
	for _, l := range s.listeners {
		if l.name == publicListener {
			public = l
		}
	}
	storage, err := s.acmeStorage()
	if err != nil {
		return err
	}
	var tlsAddress string
	if strings.HasPrefix(public.network, "tcp") {
		tlsAddress = public.address
	}
	acme, err := tlsutil.NewACME(*a, tlsutil.ACMEOptions{
		Storage:    storage,
		TLSAddress: tlsAddress,
		SSLCertDir: s.cfg.Env.SSLCertDir,
		Logger:     s.log,
	})
	if err != nil {
		return err
	}
	s.acme = acme
	public.tls = acme.TLSConfig()
	if a.HTTPAddress != "" {
		_, httpsPort, _ := net.SplitHostPort(tlsAddress)
		// addListener fails only on a certificate_file, which this has not.
		_ = s.addListener("tls.acme.http_address", config.Listen{Network: "tcp", Address: a.HTTPAddress},
			acme.HTTPHandler(acme.RedirectHandler(httpsPort)))
	}
	return nil
}

// acmeStorage is Redis when several nodes share it, so they share one
// certificate and one ACME account and never order at the same time; nil
// (tls.acme.storage_path) for a single node.
func (s *Server) acmeStorage() (certmagic.Storage, error) {
	if s.cfg.Redis == nil {
		return nil, nil
	}
	client, err := s.redisClient()
	if err != nil {
		return nil, err
	}
	return tlsutil.NewRedisStorage(client, s.cfg.Redis.KeyPrefix, s.log), nil
}

// redisClient returns the node's one Redis client, built on first use from
// the redis section; Run closes it after everything else.
func (s *Server) redisClient() (redis.UniversalClient, error) {
	if s.redis != nil {
		return s.redis, nil
	}
	tlsConfig, err := tlsutil.RedisClientConfig(s.cfg.Redis.TLS, s.cfg.Env.SSLCertDir)
	if err != nil {
		return nil, err
	}
	client, err := registry.NewRedisClient(s.cfg.Redis, tlsConfig)
	if err != nil {
		return nil, err
	}
	s.redis = client
	return client, nil
}

// manageCertificates loads or obtains the ACME certificates once the
// listeners answering the challenges serve. It returns nil without ACME or
// when ctx ended (the caller is shutting down anyway).
func (s *Server) manageCertificates(ctx context.Context) error {
	if s.acme == nil {
		return nil
	}
	if err := s.acme.Manage(ctx); err != nil && ctx.Err() == nil {
		return err
	}
	return nil
}

// ReloadCertificates loads every listener's certificate_file and key_file
// again, as kas does on SIGHUP; open connections keep their certificate. A
// listener whose files fail to load keeps its previous certificate, and the
// error names it. (Changed files are also picked up by themselves within
// seconds.)
func (s *Server) ReloadCertificates() error {
	var errs []error
	for _, l := range s.listeners {
		if l.certs != nil {
			if err := l.certs.Reload(); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", l.name, err))
			}
		}
	}
	return errors.Join(errs...)
}

// watchCertificates reloads each listener's certificate files when they
// change, until the returned stop is called.
func (s *Server) watchCertificates() (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for _, l := range s.listeners {
		if l.certs != nil {
			wg.Go(func() { l.certs.Run(ctx, tlsutil.DefaultReloadInterval) })
		}
	}
	return func() {
		cancel()
		wg.Wait()
	}
}

// closeTLS stops the ACME renewals, then closes the Redis client they used.
func (s *Server) closeTLS() {
	if s.acme != nil {
		s.acme.Close()
	}
	if s.redis != nil {
		if err := s.redis.Close(); err != nil {
			s.log.Warn("Close the Redis client", "error", err.Error())
		}
	}
}
