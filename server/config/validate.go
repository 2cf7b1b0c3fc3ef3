package config

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/mail"
	"net/netip"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// minLeasePeriod is the shortest agent.receptive.lease_period: a quarter of
// it must leave time for a round trip to Redis.
const minLeasePeriod = time.Second

// validator checks a decoded Config, adding one problem per thing wrong.
type validator struct {
	*problems
}

// validate checks everything that comes from the file, and how the
// environment fits with it.
func validate(cfg *Config, ps *problems) {
	v := validator{ps}
	v.gitlab(cfg)
	v.agent(cfg)
	v.observability(cfg)
	v.api(cfg)
	v.privateAPI(cfg)
	if cfg.Standalone.File != "" {
		v.readableFile("standalone.file", cfg.Standalone.File)
	}
	if cfg.Redis != nil {
		v.redis(cfg.Redis)
		v.multiNode(cfg)
	}
	if cfg.TLS.ACME != nil {
		v.acme(cfg)
	}
	v.listenerClashes(cfg)
}

func (v validator) gitlab(cfg *Config) {
	g := cfg.GitLab
	if g.Address != "" {
		v.httpURL("gitlab.address", g.Address, "http://gitlab.internal:8080")
		if g.AuthenticationSecretFile == "" {
			v.add("gitlab.authentication_secret_file", "required when gitlab.address is set: the file holding GitLab's gitlab_kas['api_secret_key'] (base64 of exactly 32 bytes); generate one with `kas secret generate`")
		}
	}
	if g.ExternalURL != "" {
		v.httpURL("gitlab.external_url", g.ExternalURL, "https://gitlab.example.com")
	}
	if g.AuthenticationSecretFile != "" {
		v.secretFile("gitlab.authentication_secret_file", g.AuthenticationSecretFile)
	}
	if g.CACertificateFile != "" {
		v.pemCertificates("gitlab.ca_certificate_file", g.CACertificateFile)
	}
	if g.RepositoryTokenFile != "" {
		v.readableFile("gitlab.repository_token_file", g.RepositoryTokenFile)
	}
	v.positive("gitlab.client_timeout", g.ClientTimeout)
}

func (v validator) agent(cfg *Config) {
	a := cfg.Agent
	l := a.Listen
	v.listen("agent.listen", l.Listen, true)
	if l.ConnectionsPerTokenPerMinute < 1 {
		v.add("agent.listen.connections_per_token_per_minute", "must be at least 1, got %d", l.ConnectionsPerTokenPerMinute)
	}
	v.positive("agent.listen.max_connection_age", l.MaxConnectionAge)
	v.notNegative("agent.listen.listen_grace_period", l.ListenGracePeriod)
	v.positive("agent.listen.ping_interval", l.PingInterval)
	v.positive("agent.listen.ping_timeout", l.PingTimeout)
	if l.PingTimeout > 0 && l.PingInterval > 0 && l.PingTimeout >= l.PingInterval {
		v.add("agent.listen.ping_timeout", "must be shorter than agent.listen.ping_interval (%s), got %s", l.PingInterval, l.PingTimeout)
	}

	v.positive("agent.configuration.poll_period", a.Configuration.PollPeriod)
	if a.Configuration.MaxConfigurationFileSize <= 0 {
		v.add("agent.configuration.max_configuration_file_size", "must be more than 0 bytes, got %d", a.Configuration.MaxConfigurationFileSize)
	}
	v.positive("agent.info_cache_ttl", a.InfoCacheTTL)
	v.positive("agent.info_cache_error_ttl", a.InfoCacheErrorTTL)
	v.positive("agent.redis_conn_info_ttl", a.RedisConnInfoTTL)
	v.positive("agent.redis_conn_info_refresh", a.RedisConnInfoRefresh)
	v.positive("agent.redis_conn_info_gc", a.RedisConnInfoGC)
	if a.RedisConnInfoRefresh > 0 && a.RedisConnInfoTTL > 0 && a.RedisConnInfoRefresh >= a.RedisConnInfoTTL {
		v.add("agent.redis_conn_info_refresh", "must be shorter than agent.redis_conn_info_ttl (%s), or records expire before they are refreshed; got %s",
			a.RedisConnInfoTTL, a.RedisConnInfoRefresh)
	}

	r := a.Receptive
	v.positive("agent.receptive.poll_period", r.PollPeriod)
	if r.ConnectionsPerAgent < 1 {
		v.add("agent.receptive.connections_per_agent", "must be at least 1, got %d", r.ConnectionsPerAgent)
	}
	if r.LeasePeriod < Duration(minLeasePeriod) {
		v.add("agent.receptive.lease_period", "must be at least %s (nodes renew their leases four times per period), got %s", minLeasePeriod, r.LeasePeriod)
	}

	k := a.KubernetesAPI
	v.listen("agent.kubernetes_api.listen", k.Listen, false)
	v.urlPath("agent.kubernetes_api.url_path_prefix", k.URLPathPrefix)
	v.positive("agent.kubernetes_api.allowed_agent_cache_ttl", k.AllowedAgentCacheTTL)
	v.positive("agent.kubernetes_api.allowed_agent_cache_error_ttl", k.AllowedAgentCacheErrorTTL)
	v.notNegative("agent.kubernetes_api.agent_wait_timeout", k.AgentWaitTimeout)
	for i, origin := range k.AllowedOrigins {
		v.origin(fmt.Sprintf("agent.kubernetes_api.allowed_origins[%d]", i), origin)
	}
	for i, p := range a.TrustedProxies {
		if _, err := ParseTrustedProxy(p); err != nil {
			v.add(fmt.Sprintf("agent.trusted_proxies[%d]", i), "%v", err)
		}
	}
}

// ParseTrustedProxy parses one agent.trusted_proxies entry: a CIDR
// (10.0.0.0/8, fd00::/64) or a single address (10.0.0.5, ::1).
func ParseTrustedProxy(s string) (netip.Prefix, error) {
	if p, err := netip.ParsePrefix(s); err == nil {
		return p.Masked(), nil
	}
	if a, err := netip.ParseAddr(s); err == nil {
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	return netip.Prefix{}, fmt.Errorf("want a CIDR such as 10.0.0.0/8 or an IP address such as 10.0.0.5, got %q", s)
}

// ParsedTrustedProxies parses agent.trusted_proxies, which validation has
// checked; an entry that does not parse is left out.
func (a Agent) ParsedTrustedProxies() []netip.Prefix {
	var out []netip.Prefix
	for _, s := range a.TrustedProxies {
		if p, err := ParseTrustedProxy(s); err == nil {
			out = append(out, p)
		}
	}
	return out
}

func (v validator) observability(cfg *Config) {
	o := cfg.Observability
	v.listen("observability.listen", o.Listen, true)
	v.positive("observability.usage_reporting_period", o.UsageReportingPeriod)
	paths := []struct{ key, path string }{
		{"observability.prometheus.url_path", o.Prometheus.URLPath},
		{"observability.liveness_probe.url_path", o.LivenessProbe.URLPath},
		{"observability.readiness_probe.url_path", o.ReadinessProbe.URLPath},
	}
	for i, p := range paths {
		v.urlPath(p.key, p.path)
		for _, earlier := range paths[:i] {
			if p.path != "" && p.path == earlier.path {
				v.add(p.key, "%s is already used by %s; give each endpoint its own path", p.path, earlier.key)
			}
		}
	}
	switch o.Logging.Level {
	case "debug", "info", "warn", "error":
	default:
		v.add("observability.logging.level", "want debug, info, warn or error, got %q", o.Logging.Level)
	}
}

func (v validator) api(cfg *Config) {
	l := cfg.API.Listen
	v.listen("api.listen", l.Listen, true)
	// When it is the same file as gitlab.authentication_secret_file (the
	// default), a problem with it is already reported there.
	if l.AuthenticationSecretFile != "" && l.AuthenticationSecretFile != cfg.GitLab.AuthenticationSecretFile {
		v.secretFile("api.listen.authentication_secret_file", l.AuthenticationSecretFile)
	}
	v.positive("api.listen.max_connection_age", l.MaxConnectionAge)
}

func (v validator) privateAPI(cfg *Config) {
	l := cfg.PrivateAPI.Listen
	v.listen("private_api.listen", l.Listen, true)
	switch {
	case l.AuthenticationSecretFile != "":
		v.secretFile("private_api.listen.authentication_secret_file", l.AuthenticationSecretFile)
	case cfg.Redis != nil:
		v.add("private_api.listen.authentication_secret_file", "required when redis is configured: kas nodes sign their calls to each other with it (GitLab's gitlab_kas['private_api_secret_key'], base64 of exactly 32 bytes); generate one with `kas secret generate`")
	}
	if l.CACertificateFile != "" {
		v.pemCertificates("private_api.listen.ca_certificate_file", l.CACertificateFile)
	}
	v.positive("private_api.listen.max_connection_age", l.MaxConnectionAge)
	v.positive("private_api.accept_timeout", cfg.PrivateAPI.AcceptTimeout)
}

func (v validator) redis(r *Redis) {
	var modes []string
	if r.Server != nil {
		modes = append(modes, "redis.server")
	}
	if r.Sentinel != nil {
		modes = append(modes, "redis.sentinel")
	}
	if r.Cluster != nil {
		modes = append(modes, "redis.cluster")
	}
	switch len(modes) {
	case 0:
		v.add("redis", "set one of redis.server, redis.sentinel or redis.cluster")
	case 1:
	default:
		v.add("redis", "set only one of redis.server, redis.sentinel and redis.cluster, found %s", strings.Join(modes, " and "))
	}
	networkOK := v.network("redis.network", r.Network)
	if s := r.Server; s != nil && networkOK {
		switch {
		case s.Address == "":
			v.add("redis.server.address", "required: host:port of the Redis server, or a socket path with redis.network unix")
		case r.Network != "unix":
			v.hostPort("redis.server.address", s.Address, false)
		}
	}
	if s := r.Sentinel; s != nil {
		if s.MasterName == "" {
			v.add("redis.sentinel.master_name", "required: the name Sentinel knows the primary by (GitLab's redis_sentinels_master_name)")
		}
		v.redisAddresses("redis.sentinel.addresses", s.Addresses)
		if s.SentinelPasswordFile != "" {
			v.readableFile("redis.sentinel.sentinel_password_file", s.SentinelPasswordFile)
		}
	}
	if c := r.Cluster; c != nil {
		v.redisAddresses("redis.cluster.addresses", c.Addresses)
		if r.DatabaseIndex != 0 {
			v.add("redis.database_index", "must be 0 with redis.cluster: Redis Cluster has only database 0")
		}
	}
	if r.PasswordFile != "" {
		v.readableFile("redis.password_file", r.PasswordFile)
	}
	if r.DatabaseIndex < 0 {
		v.add("redis.database_index", "must be 0 or more, got %d", r.DatabaseIndex)
	}
	if r.PoolSize < 0 {
		v.add("redis.pool_size", "must be 0 (the client's default) or more, got %d", r.PoolSize)
	}
	if r.KeyPrefix == "" {
		v.add("redis.key_prefix", "must not be empty: kas's keys would mix with other data in the database")
	}
	v.positive("redis.dial_timeout", r.DialTimeout)
	v.positive("redis.read_timeout", r.ReadTimeout)
	v.positive("redis.write_timeout", r.WriteTimeout)
	v.positive("redis.idle_timeout", r.IdleTimeout)
	v.positive("redis.lookup_cache_ttl", r.CacheTTL)

	t := r.TLS
	if !t.Enabled && (t.CertificateFile != "" || t.KeyFile != "" || t.CACertificateFile != "") {
		v.add("redis.tls.enabled", "files are set under redis.tls but TLS is off; set redis.tls.enabled: true or remove them")
	}
	v.keyPair("redis.tls", t.CertificateFile, t.KeyFile)
	if t.CACertificateFile != "" {
		v.pemCertificates("redis.tls.ca_certificate_file", t.CACertificateFile)
	}
}

func (v validator) redisAddresses(key string, addrs []string) {
	if len(addrs) == 0 {
		v.add(key, "at least one host:port required")
	}
	for i, a := range addrs {
		v.hostPort(fmt.Sprintf("%s[%d]", key, i), a, false)
	}
}

// multiNode checks what only matters when several nodes share Redis: every
// node must be able to reach every other's private API (DESIGN §7).
func (v validator) multiNode(cfg *Config) {
	l := cfg.PrivateAPI.Listen
	env := cfg.Env
	if !cfg.Redis.AllowLoopback {
		const why = "with redis configured, other kas nodes must reach this node's private API"
		const fix = "listen on an address the other nodes can reach, or set redis.allow_loopback_private_api: true to run several nodes on one machine"
		switch {
		case l.Network == "unix":
			v.add("private_api.listen.network", "%s, but a Unix socket is only reachable from this machine; %s", why, fix)
		case validNetwork(l.Network):
			if host, _, err := net.SplitHostPort(l.Address); err == nil && isLoopback(host) {
				v.add("private_api.listen.address", "%s, but %s (in %s) is only reachable from this machine; %s", why, host, l.Address, fix)
			}
		}
		if u, err := url.Parse(env.OwnPrivateAPIURL); env.OwnPrivateAPIURL != "" && err == nil && isLoopback(u.Hostname()) {
			v.add(EnvOwnPrivateAPIURL, "%s, but %s (in %s) is only reachable from this machine; publish an address the other nodes can reach", why, u.Hostname(), env.OwnPrivateAPIURL)
		}
		if prefixes, err := ParseCIDRs(env.OwnPrivateAPICIDR); env.OwnPrivateAPICIDR != "" && err == nil {
			for _, p := range prefixes {
				if isLoopbackPrefix(p) {
					v.add(EnvOwnPrivateAPICIDR, "%s, but %s holds only loopback addresses, reachable from this machine alone; name the network the nodes share", why, p)
				}
			}
		}
	}

	// The scheme other nodes are told must match what the listener serves.
	scheme, schemeKey := env.OwnPrivateAPIScheme, EnvOwnPrivateAPIScheme
	if env.OwnPrivateAPIURL != "" {
		scheme, schemeKey = "", EnvOwnPrivateAPIURL
		if u, err := url.Parse(env.OwnPrivateAPIURL); err == nil {
			scheme = u.Scheme
		}
	}
	if scheme == "" {
		scheme = "grpc"
	}
	servesTLS := l.CertificateFile != ""
	switch {
	case scheme == "grpcs" && !servesTLS:
		v.add(schemeKey, "grpcs needs private_api.listen.certificate_file and key_file, or other nodes will try TLS on a plain-text listener")
	case scheme == "grpc" && servesTLS:
		v.add("private_api.listen.certificate_file", "the private API serves TLS, but other nodes are told grpc:// (plain text); set %s=grpcs (or a grpcs:// %s) and %s", EnvOwnPrivateAPIScheme, EnvOwnPrivateAPIURL, EnvOwnPrivateAPIHost)
	}
}

func (v validator) acme(cfg *Config) {
	a := cfg.TLS.ACME
	if a.Email == "" {
		v.add("tls.acme.email", "required: the CA sends notices about the certificates to it")
	} else if _, err := mail.ParseAddress(a.Email); err != nil {
		v.add("tls.acme.email", "want an email address such as admin@example.com, got %q", a.Email)
	}
	if len(a.Domains) == 0 {
		v.add("tls.acme.domains", "at least one domain required: the names agents and users reach kas by")
	}
	for i, d := range a.Domains {
		if d == "" || strings.ContainsAny(d, ":/ ") {
			v.add(fmt.Sprintf("tls.acme.domains[%d]", i), "want a domain name such as kas.example.com, got %q", d)
		}
	}
	if a.CA != "" {
		v.httpURL("tls.acme.ca", a.CA, "https://acme-v02.api.letsencrypt.org/directory")
	}
	if a.CARootFile != "" {
		v.pemCertificates("tls.acme.ca_root_file", a.CARootFile)
	}
	for i, c := range a.Challenges {
		if c != "http-01" && c != "tls-alpn-01" {
			v.add(fmt.Sprintf("tls.acme.challenges[%d]", i), "want http-01 or tls-alpn-01, got %q", c)
		}
	}
	if a.HTTPAddress != "" {
		v.hostPort("tls.acme.http_address", a.HTTPAddress, true)
	}
	if cfg.Agent.Listen.CertificateFile != "" || cfg.Agent.Listen.KeyFile != "" {
		v.add("tls.acme", "the agent listener gets its certificate either from tls.acme or from agent.listen.certificate_file and key_file, not both; remove one")
	}
}

// listenerClashes reports two listeners set to the same address.
func (v validator) listenerClashes(cfg *Config) {
	type listener struct {
		key string
		l   Listen
	}
	all := []listener{
		{"agent.listen", cfg.Agent.Listen.Listen},
		{"agent.kubernetes_api.listen", cfg.Agent.KubernetesAPI.Listen},
		{"observability.listen", cfg.Observability.Listen},
		{"api.listen", cfg.API.Listen.Listen},
		{"private_api.listen", cfg.PrivateAPI.Listen.Listen},
	}
	for i, a := range all {
		for _, b := range all[:i] {
			if listenersClash(a.l, b.l) {
				v.add(a.key+".address", "%s is already used by %s.address; each listener needs its own address", a.l.Address, b.key)
				break
			}
		}
	}
}

func listenersClash(a, b Listen) bool {
	if a.Address == "" || b.Address == "" || !validNetwork(a.Network) || !validNetwork(b.Network) {
		return false
	}
	if a.Network == "unix" || b.Network == "unix" {
		return a.Network == b.Network && a.Address == b.Address
	}
	if (a.Network == "tcp4" && b.Network == "tcp6") || (a.Network == "tcp6" && b.Network == "tcp4") {
		return false
	}
	hostA, portA, errA := net.SplitHostPort(a.Address)
	hostB, portB, errB := net.SplitHostPort(b.Address)
	if errA != nil || errB != nil || portA != portB || portA == "0" {
		return false
	}
	return hostA == hostB || isUnspecified(hostA) || isUnspecified(hostB)
}

// validateEnv checks the environment variables on their own.
func validateEnv(env Env, ps *problems) {
	v := validator{ps}
	if env.OwnPrivateAPIURL != "" && env.OwnPrivateAPICIDR != "" {
		v.add(EnvOwnPrivateAPICIDR, "set either %s or %s, not both", EnvOwnPrivateAPIURL, EnvOwnPrivateAPICIDR)
	}
	urlHostIsName := false
	urlScheme := ""
	if env.OwnPrivateAPIURL != "" {
		urlScheme, urlHostIsName = v.ownPrivateAPIURL(env.OwnPrivateAPIURL)
		// The URL is used as is, so a port or scheme given beside it would
		// silently not apply.
		if env.OwnPrivateAPIPort != "" {
			v.add(EnvOwnPrivateAPIPort, "has no effect when %s is set, which is used as is; put the port in the URL and unset %s", EnvOwnPrivateAPIURL, EnvOwnPrivateAPIPort)
		}
		if env.OwnPrivateAPIScheme != "" {
			v.add(EnvOwnPrivateAPIScheme, "has no effect when %s is set, which is used as is; put the scheme in the URL and unset %s", EnvOwnPrivateAPIURL, EnvOwnPrivateAPIScheme)
		}
	}
	if env.OwnPrivateAPICIDR != "" {
		if _, err := ParseCIDRs(env.OwnPrivateAPICIDR); err != nil {
			v.add(EnvOwnPrivateAPICIDR, "%v", err)
		}
	}
	if env.OwnPrivateAPIPort != "" {
		if p, err := strconv.Atoi(env.OwnPrivateAPIPort); err != nil || p < 1 || p > 65535 {
			v.add(EnvOwnPrivateAPIPort, "want a port number from 1 to 65535, got %q", env.OwnPrivateAPIPort)
		}
	}
	switch env.OwnPrivateAPIScheme {
	case "", "grpc", "grpcs":
	default:
		v.add(EnvOwnPrivateAPIScheme, "want grpc or grpcs, got %q", env.OwnPrivateAPIScheme)
	}
	if env.OwnPrivateAPIHost != "" && strings.ContainsAny(env.OwnPrivateAPIHost, ":/ ") {
		v.add(EnvOwnPrivateAPIHost, "want the server name in the other nodes' TLS certificates, such as kas.internal (no scheme or port), got %q", env.OwnPrivateAPIHost)
	}
	grpcs := urlScheme == "grpcs" || (env.OwnPrivateAPIURL == "" && env.OwnPrivateAPIScheme == "grpcs")
	if grpcs && env.OwnPrivateAPIHost == "" && !urlHostIsName {
		v.add(EnvOwnPrivateAPIHost, "required with grpcs unless %s names a host: the server name checked in the other nodes' TLS certificates", EnvOwnPrivateAPIURL)
	}
	if env.SSLCertDir != "" {
		// Like Go's crypto/x509, accept a colon-separated list.
		for dir := range strings.SplitSeq(env.SSLCertDir, ":") {
			info, err := os.Stat(dir)
			switch {
			case err != nil:
				v.add(EnvSSLCertDir, "%s", describeFileError(err))
			case !info.IsDir():
				v.add(EnvSSLCertDir, "%s is not a directory; SSL_CERT_DIR names directories of CA certificates", dir)
			}
		}
	}
}

// ownPrivateAPIURL checks OWN_PRIVATE_API_URL and returns its scheme and
// whether its host is a name (rather than an IP address).
func (v validator) ownPrivateAPIURL(raw string) (scheme string, hostIsName bool) {
	u, err := url.Parse(raw)
	if err != nil {
		v.add(EnvOwnPrivateAPIURL, "want grpc://host:port or grpcs://host:port, got %q", raw)
		return "", false
	}
	switch u.Scheme {
	case "grpc", "grpcs":
	case "unix":
		v.add(EnvOwnPrivateAPIURL, "unix:// is not supported: a single node (no redis) needs no %s, so unset it; several nodes need a grpc:// or grpcs:// address the others can reach", EnvOwnPrivateAPIURL)
		return "", false
	default:
		v.add(EnvOwnPrivateAPIURL, "want grpc://host:port or grpcs://host:port, got %q", raw)
		return "", false
	}
	host, port, err := net.SplitHostPort(u.Host)
	if err != nil || host == "" {
		v.add(EnvOwnPrivateAPIURL, "want %s://host:port with both host and port, got %q", u.Scheme, raw)
		return u.Scheme, false
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		v.add(EnvOwnPrivateAPIURL, "port %q is not a number from 1 to 65535", port)
	}
	if u.User != nil || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
		v.add(EnvOwnPrivateAPIURL, "want only %s://host:port, got %q", u.Scheme, raw)
	}
	_, ipErr := netip.ParseAddr(host)
	return u.Scheme, ipErr != nil
}

// listen checks one listener. An optional listener may have no address,
// which means it is off.
func (v validator) listen(key string, l Listen, addressRequired bool) {
	if !v.network(key+".network", l.Network) {
		return
	}
	switch {
	case l.Address == "":
		if addressRequired {
			v.add(key+".address", "required: host:port such as 127.0.0.1:8150, or a socket path with network unix")
		} else if l.CertificateFile != "" || l.KeyFile != "" {
			v.add(key+".address", "certificate_file and key_file are set but the listener is off (no address); set an address or remove them")
		}
	case l.Network != "unix":
		v.hostPort(key+".address", l.Address, true)
	}
	v.keyPair(key, l.CertificateFile, l.KeyFile)
}

// network checks a network name and reports whether it is valid.
func (v validator) network(key, network string) bool {
	if !validNetwork(network) {
		v.add(key, "want tcp, tcp4, tcp6 or unix, got %q", network)
		return false
	}
	return true
}

func validNetwork(network string) bool {
	switch network {
	case "tcp", "tcp4", "tcp6", "unix":
		return true
	}
	return false
}

// hostPort checks a host:port address. The host may be empty (every
// interface); port 0 (a port the kernel picks) only if allowZeroPort.
func (v validator) hostPort(key, addr string, allowZeroPort bool) {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		v.add(key, "want host:port such as 127.0.0.1:8150, :8150 or [::1]:8150, got %q", addr)
		return
	}
	lowest := 1
	if allowZeroPort {
		lowest = 0
	}
	if p, err := strconv.Atoi(port); err != nil || p < lowest || p > 65535 {
		v.add(key, "port %q in %q is not a number from %d to 65535", port, addr, lowest)
	}
}

// keyPair checks a certificate_file/key_file pair under key.
func (v validator) keyPair(key, certFile, keyFile string) {
	switch {
	case certFile == "" && keyFile == "":
		return
	case keyFile == "":
		v.add(key+".key_file", "required when %s.certificate_file is set", key)
		return
	case certFile == "":
		v.add(key+".certificate_file", "required when %s.key_file is set", key)
		return
	}
	certOK := v.readableFile(key+".certificate_file", certFile)
	keyOK := v.readableFile(key+".key_file", keyFile)
	if !certOK || !keyOK {
		return
	}
	if _, err := tls.LoadX509KeyPair(certFile, keyFile); err != nil {
		v.add(key+".certificate_file", "%s and %s.key_file are not a usable TLS certificate and key: %v", certFile, key, err)
	}
}

// secretFile checks a secret file with ReadSecretFile.
func (v validator) secretFile(key, path string) {
	if _, err := ReadSecretFile(path); err != nil {
		v.add(key, "%v", err)
	}
}

// readableFile checks that path is a file kas can open, and reports whether it is.
func (v validator) readableFile(key, path string) bool {
	f, err := os.Open(path)
	if err != nil {
		v.add(key, "%s", describeFileError(err))
		return false
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		v.add(key, "%s", describeFileError(err))
		return false
	}
	if info.IsDir() {
		v.add(key, "%s is a directory, want a file", path)
		return false
	}
	return true
}

// pemCertificates checks that path holds at least one PEM certificate.
func (v validator) pemCertificates(key, path string) {
	if !v.readableFile(key, path) {
		return
	}
	data, err := os.ReadFile(path)
	if err != nil {
		v.add(key, "%s", describeFileError(err))
		return
	}
	if !x509.NewCertPool().AppendCertsFromPEM(data) {
		v.add(key, "%s holds no PEM certificate (-----BEGIN CERTIFICATE-----)", path)
	}
}

// httpURL checks an http:// or https:// URL with a host.
func (v validator) httpURL(key, raw, example string) {
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		v.add(key, "want an http:// or https:// URL such as %s, got %q", example, raw)
	}
}

// origin checks a browser origin: scheme://host[:port] and nothing else.
func (v validator) origin(key, raw string) {
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" ||
		(u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.User != nil {
		v.add(key, "want an origin such as https://gitlab.example.com (scheme and host, no path), got %q", raw)
	}
}

func (v validator) urlPath(key, path string) {
	if !strings.HasPrefix(path, "/") {
		v.add(key, "want a path starting with /, got %q", path)
	}
}

func (v validator) positive(key string, d Duration) {
	if d <= 0 {
		v.add(key, "must be more than 0, got %s", d)
	}
}

func (v validator) notNegative(key string, d Duration) {
	if d < 0 {
		v.add(key, "must not be negative, got %s", d)
	}
}

// describeFileError words a failure to open a file without repeating Go's
// "open" prefix.
func describeFileError(err error) string {
	var pathErr *fs.PathError
	if errors.As(err, &pathErr) {
		return fmt.Sprintf("cannot read %s: %v", pathErr.Path, pathErr.Err)
	}
	return err.Error()
}

func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") || strings.HasSuffix(strings.ToLower(host), ".localhost") {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.IsLoopback()
}

func isUnspecified(host string) bool {
	if host == "" {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.IsUnspecified()
}

// isLoopbackPrefix reports whether every address in p is a loopback address.
func isLoopbackPrefix(p netip.Prefix) bool {
	loopback := []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")}
	return slices.ContainsFunc(loopback, func(l netip.Prefix) bool {
		return l.Bits() <= p.Bits() && l.Contains(p.Addr())
	})
}
