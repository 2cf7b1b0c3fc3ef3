package config

import (
	"testing"
)

// multiNode is a Redis setup that passes validation, for cases that need
// redis configured but test something else.
const multiNode = `
private_api:
  listen:
    address: 10.0.0.5:8155
    authentication_secret_file: secret
redis:
  server:
    address: redis:6379
`

func TestValidationProblems(t *testing.T) {
	f := newFixtures(t)
	tests := []struct {
		name string
		yaml string
		env  map[string]string
		key  string
		msg  string
	}{
		// Listeners.
		{"network not known", "agent:\n  listen:\n    network: udp\n", nil,
			"agent.listen.network", `want tcp, tcp4, tcp6 or unix, got "udp"`},
		{"tcp address without port", "api:\n  listen:\n    address: localhost\n", nil,
			"api.listen.address", `want host:port such as 127.0.0.1:8150`},
		{"port out of range", "observability:\n  listen:\n    address: :70000\n", nil,
			"observability.listen.address", `port "70000" in ":70000" is not a number from 0 to 65535`},
		{"port not a number", "observability:\n  listen:\n    address: 127.0.0.1:http\n", nil,
			"observability.listen.address", `port "http"`},
		{"unix socket without path", "private_api:\n  listen:\n    network: unix\n    address: ''\n", nil,
			"private_api.listen.address", "required"},
		{"certificate without key", "agent:\n  listen:\n    certificate_file: cert.pem\n", nil,
			"agent.listen.key_file", "required when agent.listen.certificate_file is set"},
		{"key without certificate", "api:\n  listen:\n    key_file: key.pem\n", nil,
			"api.listen.certificate_file", "required when api.listen.key_file is set"},
		{"certificate missing", "agent:\n  listen:\n    certificate_file: missing.pem\n    key_file: key.pem\n", nil,
			"agent.listen.certificate_file", "cannot read " + f.path("missing.pem") + ": no such file or directory"},
		{"key is a directory", "agent:\n  listen:\n    certificate_file: cert.pem\n    key_file: dir\n", nil,
			"agent.listen.key_file", "is a directory, want a file"},
		{"certificate and key do not match", "observability:\n  listen:\n    certificate_file: cert.pem\n    key_file: other-key.pem\n", nil,
			"observability.listen.certificate_file", "are not a usable TLS certificate and key"},
		{"certificate on a listener that is off", "agent:\n  kubernetes_api:\n    listen:\n      certificate_file: cert.pem\n      key_file: key.pem\n", nil,
			"agent.kubernetes_api.listen.address", "the listener is off"},
		{"two listeners on one address", "api:\n  listen:\n    address: 127.0.0.1:8150\n", nil,
			"api.listen.address", "127.0.0.1:8150 is already used by agent.listen.address"},
		{"listener on every interface clashes", "observability:\n  listen:\n    address: :8150\n", nil,
			"observability.listen.address", "already used by agent.listen.address"},
		{"listener on every IPv4 interface clashes", "agent:\n  listen:\n    address: 0.0.0.0:8150\napi:\n  listen:\n    network: tcp4\n    address: 127.0.0.1:8150\n", nil,
			"api.listen.address", "already used by agent.listen.address"},
		{"two unix sockets on one path", "api:\n  listen:\n    network: unix\n    address: /run/kas.sock\nprivate_api:\n  listen:\n    network: unix\n    address: /run/kas.sock\n", nil,
			"private_api.listen.address", "/run/kas.sock is already used by api.listen.address"},

		// Receptive agents.
		{"receptive poll period zero", "agent:\n  receptive:\n    poll_period: 0s\n", nil,
			"agent.receptive.poll_period", "must be more than 0"},
		{"no connection per receptive agent", "agent:\n  receptive:\n    connections_per_agent: 0\n", nil,
			"agent.receptive.connections_per_agent", "must be at least 1, got 0"},
		{"lease period too short", "agent:\n  receptive:\n    lease_period: 500ms\n", nil,
			"agent.receptive.lease_period", "must be at least 1s"},
		{"receptive key misspelt", "agent:\n  receptive:\n    enable: true\n", nil,
			"agent.receptive.enable", "did you mean agent.receptive.enabled?"},

		// GitLab.
		{"gitlab address without scheme", "gitlab:\n  address: gitlab.internal:8080\n  authentication_secret_file: secret\n", nil,
			"gitlab.address", `want an http:// or https:// URL such as http://gitlab.internal:8080, got "gitlab.internal:8080"`},
		{"gitlab address not http", "gitlab:\n  address: ftp://gitlab\n  authentication_secret_file: secret\n", nil,
			"gitlab.address", "want an http:// or https:// URL"},
		{"gitlab address without host", "gitlab:\n  address: 'http://'\n  authentication_secret_file: secret\n", nil,
			"gitlab.address", "want an http:// or https:// URL"},
		{"external url not http", "gitlab:\n  external_url: gitlab.example.com\n", nil,
			"gitlab.external_url", "want an http:// or https:// URL"},
		{"gitlab address needs a secret", "gitlab:\n  address: http://gitlab:8080\n", nil,
			"gitlab.authentication_secret_file", "required when gitlab.address is set"},
		{"secret of 31 bytes", "gitlab:\n  authentication_secret_file: secret31\n", nil,
			"gitlab.authentication_secret_file", "decodes to 31 bytes, want exactly 32; generate one with `kas secret generate`"},
		{"secret of 33 bytes", "gitlab:\n  authentication_secret_file: secret33\n", nil,
			"gitlab.authentication_secret_file", "decodes to 33 bytes, want exactly 32"},
		{"secret not base64", "gitlab:\n  authentication_secret_file: notbase64\n", nil,
			"gitlab.authentication_secret_file", "is not base64"},
		{"secret file empty", "gitlab:\n  authentication_secret_file: empty\n", nil,
			"gitlab.authentication_secret_file", "is empty"},
		{"secret file missing", "gitlab:\n  authentication_secret_file: missing\n", nil,
			"gitlab.authentication_secret_file", "no such file or directory"},
		{"api secret of 33 bytes", "api:\n  listen:\n    authentication_secret_file: secret33\n", nil,
			"api.listen.authentication_secret_file", "decodes to 33 bytes, want exactly 32"},
		{"private api secret of 31 bytes", "private_api:\n  listen:\n    authentication_secret_file: secret31\n", nil,
			"private_api.listen.authentication_secret_file", "decodes to 31 bytes, want exactly 32"},
		{"gitlab CA not PEM", "gitlab:\n  ca_certificate_file: notpem.txt\n", nil,
			"gitlab.ca_certificate_file", "holds no PEM certificate"},
		{"gitlab CA a directory", "gitlab:\n  ca_certificate_file: dir\n", nil,
			"gitlab.ca_certificate_file", "is a directory"},
		{"client timeout zero", "gitlab:\n  client_timeout: 0s\n", nil,
			"gitlab.client_timeout", "must be more than 0, got 0s"},
		{"repository token missing", "gitlab:\n  repository_token_file: missing\n", nil,
			"gitlab.repository_token_file", "no such file or directory"},

		// Agent.
		{"no connections allowed", "agent:\n  listen:\n    connections_per_token_per_minute: 0\n", nil,
			"agent.listen.connections_per_token_per_minute", "must be at least 1, got 0"},
		{"max connection age zero", "agent:\n  listen:\n    max_connection_age: 0s\n", nil,
			"agent.listen.max_connection_age", "must be more than 0"},
		{"grace period negative", "agent:\n  listen:\n    listen_grace_period: -1s\n", nil,
			"agent.listen.listen_grace_period", "must not be negative, got -1s"},
		{"ping interval zero", "agent:\n  listen:\n    ping_interval: 0s\n", nil,
			"agent.listen.ping_interval", "must be more than 0"},
		{"ping timeout zero", "agent:\n  listen:\n    ping_timeout: 0s\n", nil,
			"agent.listen.ping_timeout", "must be more than 0"},
		{"ping timeout not below interval", "agent:\n  listen:\n    ping_interval: 10s\n    ping_timeout: 10s\n", nil,
			"agent.listen.ping_timeout", "must be shorter than agent.listen.ping_interval (10s), got 10s"},
		{"poll period zero", "agent:\n  configuration:\n    poll_period: 0s\n", nil,
			"agent.configuration.poll_period", "must be more than 0"},
		{"configuration file size zero", "agent:\n  configuration:\n    max_configuration_file_size: 0\n", nil,
			"agent.configuration.max_configuration_file_size", "must be more than 0 bytes"},
		{"info cache ttl zero", "agent:\n  info_cache_ttl: 0s\n", nil,
			"agent.info_cache_ttl", "must be more than 0"},
		{"info cache error ttl negative", "agent:\n  info_cache_error_ttl: -5s\n", nil,
			"agent.info_cache_error_ttl", "must be more than 0"},
		{"redis conn info ttl zero", "agent:\n  redis_conn_info_ttl: 0s\n", nil,
			"agent.redis_conn_info_ttl", "must be more than 0"},
		{"redis conn info gc zero", "agent:\n  redis_conn_info_gc: 0s\n", nil,
			"agent.redis_conn_info_gc", "must be more than 0"},
		{"refresh not below ttl", "agent:\n  redis_conn_info_ttl: 60s\n  redis_conn_info_refresh: 90s\n", nil,
			"agent.redis_conn_info_refresh", "must be shorter than agent.redis_conn_info_ttl (1m)"},
		{"proxy prefix without slash", "agent:\n  kubernetes_api:\n    url_path_prefix: k8s-proxy\n", nil,
			"agent.kubernetes_api.url_path_prefix", `want a path starting with /, got "k8s-proxy"`},
		{"allowed agent cache ttl zero", "agent:\n  kubernetes_api:\n    allowed_agent_cache_ttl: 0s\n", nil,
			"agent.kubernetes_api.allowed_agent_cache_ttl", "must be more than 0"},
		{"allowed agent cache error ttl zero", "agent:\n  kubernetes_api:\n    allowed_agent_cache_error_ttl: 0s\n", nil,
			"agent.kubernetes_api.allowed_agent_cache_error_ttl", "must be more than 0"},
		{"agent wait timeout negative", "agent:\n  kubernetes_api:\n    agent_wait_timeout: -1s\n", nil,
			"agent.kubernetes_api.agent_wait_timeout", "must not be negative"},
		{"origin with a path", "agent:\n  kubernetes_api:\n    allowed_origins: [https://gitlab.example.com, https://gitlab.example.com/-/x]\n", nil,
			"agent.kubernetes_api.allowed_origins[1]", "want an origin such as https://gitlab.example.com"},
		{"trusted proxy not an address", "agent:\n  trusted_proxies: [10.0.0.0/8, lb.internal]\n", nil,
			"agent.trusted_proxies[1]", `want a CIDR such as 10.0.0.0/8 or an IP address such as 10.0.0.5, got "lb.internal"`},
		{"trusted proxy with a bad mask", "agent:\n  trusted_proxies: [10.0.0.0/33]\n", nil,
			"agent.trusted_proxies[0]", "want a CIDR"},

		// Observability.
		{"metrics path without slash", "observability:\n  prometheus:\n    url_path: metrics\n", nil,
			"observability.prometheus.url_path", "want a path starting with /"},
		{"two probes on one path", "observability:\n  readiness_probe:\n    url_path: /liveness\n", nil,
			"observability.readiness_probe.url_path", "/liveness is already used by observability.liveness_probe.url_path"},
		{"usage reporting zero", "observability:\n  usage_reporting_period: 0s\n", nil,
			"observability.usage_reporting_period", "must be more than 0"},
		{"log level unknown", "observability:\n  logging:\n    level: verbose\n", nil,
			"observability.logging.level", `want debug, info, warn or error, got "verbose"`},

		// Internal and private API.
		{"api max connection age zero", "api:\n  listen:\n    max_connection_age: 0s\n", nil,
			"api.listen.max_connection_age", "must be more than 0"},
		{"private api max connection age zero", "private_api:\n  listen:\n    max_connection_age: 0s\n", nil,
			"private_api.listen.max_connection_age", "must be more than 0"},
		{"private api accept timeout zero", "private_api:\n  accept_timeout: 0s\n", nil,
			"private_api.accept_timeout", "must be more than 0"},
		{"private api accept timeout not a duration", "private_api:\n  accept_timeout: soon\n", nil,
			"private_api.accept_timeout", ""},
		{"private api CA missing", "private_api:\n  listen:\n    ca_certificate_file: missing.pem\n", nil,
			"private_api.listen.ca_certificate_file", "no such file or directory"},
		{"standalone file missing", "standalone:\n  file: missing.yaml\n", nil,
			"standalone.file", "no such file or directory"},

		// Redis.
		{"redis with no kind", "redis: {}\nprivate_api:\n  listen:\n    address: 10.0.0.5:8155\n    authentication_secret_file: secret\n", nil,
			"redis", "set one of redis.server, redis.sentinel or redis.cluster"},
		{"redis of two kinds", multiNode + "  cluster:\n    addresses: [redis-1:6379]\n", nil,
			"redis", "set only one of redis.server, redis.sentinel and redis.cluster, found redis.server and redis.cluster"},
		{"redis server without address", "redis:\n  server: {}\nprivate_api:\n  listen:\n    address: 10.0.0.5:8155\n    authentication_secret_file: secret\n", nil,
			"redis.server.address", "required"},
		{"redis server address without port", "private_api:\n  listen:\n    address: 10.0.0.5:8155\n    authentication_secret_file: secret\nredis:\n  server:\n    address: redis\n", nil,
			"redis.server.address", "want host:port"},
		{"redis network unknown", multiNode + "  network: udp\n", nil,
			"redis.network", `want tcp, tcp4, tcp6 or unix, got "udp"`},
		{"redis password file missing", multiNode + "  password_file: missing\n", nil,
			"redis.password_file", "no such file or directory"},
		{"redis database index negative", multiNode + "  database_index: -1\n", nil,
			"redis.database_index", "must be 0 or more, got -1"},
		{"redis pool size negative", multiNode + "  pool_size: -1\n", nil,
			"redis.pool_size", "must be 0"},
		{"redis key prefix empty", multiNode + "  key_prefix: ''\n", nil,
			"redis.key_prefix", "must not be empty"},
		{"redis dial timeout zero", multiNode + "  dial_timeout: 0s\n", nil,
			"redis.dial_timeout", "must be more than 0"},
		{"redis read timeout zero", multiNode + "  read_timeout: 0s\n", nil,
			"redis.read_timeout", "must be more than 0"},
		{"redis write timeout zero", multiNode + "  write_timeout: 0s\n", nil,
			"redis.write_timeout", "must be more than 0"},
		{"redis idle timeout zero", multiNode + "  idle_timeout: 0s\n", nil,
			"redis.idle_timeout", "must be more than 0"},
		{"redis lookup cache ttl zero", multiNode + "  lookup_cache_ttl: 0s\n", nil,
			"redis.lookup_cache_ttl", "must be more than 0"},
		{"redis TLS files while off", multiNode + "  tls:\n    ca_certificate_file: ca.pem\n", nil,
			"redis.tls.enabled", "TLS is off"},
		{"redis TLS certificate without key", multiNode + "  tls:\n    enabled: true\n    certificate_file: cert.pem\n", nil,
			"redis.tls.key_file", "required when redis.tls.certificate_file is set"},
		{"sentinel without master name", "private_api:\n  listen:\n    address: 10.0.0.5:8155\n    authentication_secret_file: secret\nredis:\n  sentinel:\n    addresses: [s1:26379]\n", nil,
			"redis.sentinel.master_name", "required"},
		{"sentinel without addresses", "private_api:\n  listen:\n    address: 10.0.0.5:8155\n    authentication_secret_file: secret\nredis:\n  sentinel:\n    master_name: gitlab-redis\n", nil,
			"redis.sentinel.addresses", "at least one host:port required"},
		{"sentinel address without port", "private_api:\n  listen:\n    address: 10.0.0.5:8155\n    authentication_secret_file: secret\nredis:\n  sentinel:\n    master_name: m\n    addresses: [s1:26379, s2]\n", nil,
			"redis.sentinel.addresses[1]", "want host:port"},
		{"sentinel password file missing", "private_api:\n  listen:\n    address: 10.0.0.5:8155\n    authentication_secret_file: secret\nredis:\n  sentinel:\n    master_name: m\n    addresses: [s1:26379]\n    sentinel_password_file: missing\n", nil,
			"redis.sentinel.sentinel_password_file", "no such file or directory"},
		{"cluster without addresses", "private_api:\n  listen:\n    address: 10.0.0.5:8155\n    authentication_secret_file: secret\nredis:\n  cluster: {}\n", nil,
			"redis.cluster.addresses", "at least one host:port required"},
		{"cluster with a database index", "private_api:\n  listen:\n    address: 10.0.0.5:8155\n    authentication_secret_file: secret\nredis:\n  cluster:\n    addresses: [r1:6379]\n  database_index: 1\n", nil,
			"redis.database_index", "must be 0 with redis.cluster"},
		{"redis port zero", "private_api:\n  listen:\n    address: 10.0.0.5:8155\n    authentication_secret_file: secret\nredis:\n  server:\n    address: redis:0\n", nil,
			"redis.server.address", "not a number from 1 to 65535"},

		// Several nodes.
		{"private api secret required with redis", "private_api:\n  listen:\n    address: 10.0.0.5:8155\nredis:\n  server:\n    address: redis:6379\n", nil,
			"private_api.listen.authentication_secret_file", "required when redis is configured"},
		{"private api on loopback with redis", "private_api:\n  listen:\n    authentication_secret_file: secret\nredis:\n  server:\n    address: redis:6379\n", nil,
			"private_api.listen.address", "127.0.0.1 (in 127.0.0.1:8155) is only reachable from this machine"},
		{"private api on localhost with redis", "private_api:\n  listen:\n    address: localhost:8155\n    authentication_secret_file: secret\nredis:\n  server:\n    address: redis:6379\n", nil,
			"private_api.listen.address", "localhost (in localhost:8155) is only reachable from this machine"},
		{"private api on IPv6 loopback with redis", "private_api:\n  listen:\n    address: '[::1]:8155'\n    authentication_secret_file: secret\nredis:\n  server:\n    address: redis:6379\n", nil,
			"private_api.listen.address", "::1"},
		{"private api on a unix socket with redis", "private_api:\n  listen:\n    network: unix\n    address: /run/kas/private.sock\n    authentication_secret_file: secret\nredis:\n  server:\n    address: redis:6379\n", nil,
			"private_api.listen.network", "a Unix socket is only reachable from this machine"},
		{"own URL on loopback with redis", multiNode, map[string]string{EnvOwnPrivateAPIURL: "grpc://127.0.0.1:8155"},
			EnvOwnPrivateAPIURL, "127.0.0.1 (in grpc://127.0.0.1:8155) is only reachable from this machine"},
		{"own CIDR of loopback with redis", multiNode, map[string]string{EnvOwnPrivateAPICIDR: "10.0.0.0/8,127.0.0.0/8"},
			EnvOwnPrivateAPICIDR, "127.0.0.0/8 holds only loopback addresses"},
		{"grpcs scheme without a certificate", multiNode, map[string]string{EnvOwnPrivateAPIScheme: "grpcs", EnvOwnPrivateAPIHost: "kas.internal"},
			EnvOwnPrivateAPIScheme, "grpcs needs private_api.listen.certificate_file and key_file"},
		{"grpcs URL without a certificate", multiNode, map[string]string{EnvOwnPrivateAPIURL: "grpcs://kas1.internal:8155"},
			EnvOwnPrivateAPIURL, "grpcs needs private_api.listen.certificate_file"},
		{"certificate but plain grpc", "private_api:\n  listen:\n    address: 10.0.0.5:8155\n    authentication_secret_file: secret\n    certificate_file: cert.pem\n    key_file: key.pem\nredis:\n  server:\n    address: redis:6379\n", nil,
			"private_api.listen.certificate_file", "other nodes are told grpc:// (plain text)"},

		// ACME.
		{"acme without email", "tls:\n  acme:\n    domains: [kas.example.com]\n", nil,
			"tls.acme.email", "required"},
		{"acme email not an address", "tls:\n  acme:\n    email: admin\n    domains: [kas.example.com]\n", nil,
			"tls.acme.email", `want an email address such as admin@example.com, got "admin"`},
		{"acme without domains", "tls:\n  acme:\n    email: admin@example.com\n", nil,
			"tls.acme.domains", "at least one domain required"},
		{"acme domain with scheme", "tls:\n  acme:\n    email: admin@example.com\n    domains: [kas.example.com, 'https://kas.example.com']\n", nil,
			"tls.acme.domains[1]", "want a domain name such as kas.example.com"},
		{"acme CA not a URL", "tls:\n  acme:\n    email: admin@example.com\n    domains: [kas.example.com]\n    ca: acme.example.com/directory\n", nil,
			"tls.acme.ca", "want an http:// or https:// URL"},
		{"acme CA root missing", "tls:\n  acme:\n    email: admin@example.com\n    domains: [kas.example.com]\n    ca_root_file: missing.pem\n", nil,
			"tls.acme.ca_root_file", "no such file or directory"},
		{"acme challenge unknown", "tls:\n  acme:\n    email: admin@example.com\n    domains: [kas.example.com]\n    challenges: [http-01, dns-01]\n", nil,
			"tls.acme.challenges[1]", `want http-01 or tls-alpn-01, got "dns-01"`},
		{"acme http address bad", "tls:\n  acme:\n    email: admin@example.com\n    domains: [kas.example.com]\n    http_address: '80'\n", nil,
			"tls.acme.http_address", "want host:port"},
		{"acme and a static certificate", "agent:\n  listen:\n    certificate_file: cert.pem\n    key_file: key.pem\ntls:\n  acme:\n    email: admin@example.com\n    domains: [kas.example.com]\n", nil,
			"tls.acme", "either from tls.acme or from agent.listen.certificate_file"},

		// Environment.
		{"own URL and CIDR both", "", map[string]string{EnvOwnPrivateAPIURL: "grpc://10.0.0.5:8155", EnvOwnPrivateAPICIDR: "10.0.0.0/8"},
			EnvOwnPrivateAPICIDR, "set either OWN_PRIVATE_API_URL or OWN_PRIVATE_API_CIDR, not both"},
		{"own URL http", "", map[string]string{EnvOwnPrivateAPIURL: "http://10.0.0.5:8155"},
			EnvOwnPrivateAPIURL, `want grpc://host:port or grpcs://host:port, got "http://10.0.0.5:8155"`},
		{"own URL unix", "", map[string]string{EnvOwnPrivateAPIURL: "unix:///var/opt/gitlab/gitlab-kas/sockets/private-api.socket"},
			EnvOwnPrivateAPIURL, "unix:// is not supported"},
		{"own URL without port", "", map[string]string{EnvOwnPrivateAPIURL: "grpc://10.0.0.5"},
			EnvOwnPrivateAPIURL, "with both host and port"},
		{"own URL port zero", "", map[string]string{EnvOwnPrivateAPIURL: "grpc://10.0.0.5:0"},
			EnvOwnPrivateAPIURL, `port "0" is not a number from 1 to 65535`},
		{"own URL with a path", "", map[string]string{EnvOwnPrivateAPIURL: "grpc://10.0.0.5:8155/x"},
			EnvOwnPrivateAPIURL, "want only grpc://host:port"},
		{"own port beside URL", "", map[string]string{EnvOwnPrivateAPIURL: "grpc://10.0.0.5:8155", EnvOwnPrivateAPIPort: "8155"},
			EnvOwnPrivateAPIPort, "has no effect when OWN_PRIVATE_API_URL is set"},
		{"own scheme beside URL", "", map[string]string{EnvOwnPrivateAPIURL: "grpc://10.0.0.5:8155", EnvOwnPrivateAPIScheme: "grpcs"},
			EnvOwnPrivateAPIScheme, "has no effect when OWN_PRIVATE_API_URL is set"},
		{"own CIDR not a CIDR", "", map[string]string{EnvOwnPrivateAPICIDR: "10.0.0.0/8, 10.0.0.1, fd00::/300"},
			EnvOwnPrivateAPICIDR, `"10.0.0.1", "fd00::/300": not a CIDR`},
		{"own CIDR only commas", "", map[string]string{EnvOwnPrivateAPICIDR: " , ,"},
			EnvOwnPrivateAPICIDR, "no CIDR given"},
		{"own port zero", "", map[string]string{EnvOwnPrivateAPIPort: "0"},
			EnvOwnPrivateAPIPort, `want a port number from 1 to 65535, got "0"`},
		{"own port too large", "", map[string]string{EnvOwnPrivateAPIPort: "65536"},
			EnvOwnPrivateAPIPort, "want a port number from 1 to 65535"},
		{"own port not a number", "", map[string]string{EnvOwnPrivateAPIPort: "grpc"},
			EnvOwnPrivateAPIPort, "want a port number from 1 to 65535"},
		{"own scheme https", "", map[string]string{EnvOwnPrivateAPIScheme: "https"},
			EnvOwnPrivateAPIScheme, `want grpc or grpcs, got "https"`},
		{"grpcs scheme without host", "", map[string]string{EnvOwnPrivateAPIScheme: "grpcs"},
			EnvOwnPrivateAPIHost, "required with grpcs"},
		{"grpcs URL with an IP and no host", "", map[string]string{EnvOwnPrivateAPIURL: "grpcs://10.0.0.5:8155"},
			EnvOwnPrivateAPIHost, "required with grpcs"},
		{"own host with a port", "", map[string]string{EnvOwnPrivateAPIHost: "kas.internal:8155"},
			EnvOwnPrivateAPIHost, "no scheme or port"},
		{"SSL_CERT_DIR missing", "", map[string]string{EnvSSLCertDir: f.path("no-such-dir")},
			EnvSSLCertDir, "no such file or directory"},
		{"SSL_CERT_DIR a file", "", map[string]string{EnvSSLCertDir: f.path("dir") + ":" + f.path("ca.pem")},
			EnvSSLCertDir, "is not a directory"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, problems := f.load(t, tt.yaml, tt.env)
			if _, ok := findProblem(problems, tt.key, tt.msg); !ok {
				t.Errorf("want a problem %s: …%s…, got:\n%s", tt.key, tt.msg, formatProblems(problems))
			}
		})
	}
}

func TestValidConfigurations(t *testing.T) {
	f := newFixtures(t)
	tests := []struct {
		name string
		yaml string
		env  map[string]string
	}{
		{"empty file", "", nil},
		{"only comments", "# nothing set\n", nil},
		{"every section empty", "gitlab:\nagent:\nobservability:\napi:\nprivate_api:\nstandalone:\ntls:\nredis:\n", nil},
		{"gitlab with secrets and CA", "gitlab:\n  address: https://gitlab.example.com\n  external_url: https://gitlab.example.com\n  authentication_secret_file: secret\n  ca_certificate_file: ca.pem\n  repository_token_file: token\napi:\n  listen:\n    authentication_secret_file: secret-b\n", nil},
		{"standalone file", "standalone:\n  file: standalone.yaml\n", nil},
		{"unix sockets on a single node",
			"agent:\n  listen:\n    network: unix\n    address: /run/kas/agent.sock\napi:\n  listen:\n    network: unix\n    address: /run/kas/api.sock\nprivate_api:\n  listen:\n    network: unix\n    address: /run/kas/private.sock\n", nil},
		{"kernel-chosen ports and IPv6",
			"agent:\n  listen:\n    network: tcp6\n    address: '[::1]:0'\n  kubernetes_api:\n    listen:\n      network: tcp4\n      address: 127.0.0.1:0\nobservability:\n  listen:\n    address: 127.0.0.1:0\napi:\n  listen:\n    address: 127.0.0.1:0\nprivate_api:\n  listen:\n    address: 127.0.0.1:0\n", nil},
		{"IPv4 and IPv6 listeners on one port",
			"agent:\n  listen:\n    network: tcp4\n    address: 0.0.0.0:8150\napi:\n  listen:\n    network: tcp6\n    address: '[::]:8150'\n", nil},
		{"TLS on every listener",
			"agent:\n  listen:\n    certificate_file: cert.pem\n    key_file: key.pem\n  kubernetes_api:\n    listen:\n      address: 127.0.0.1:8154\n      certificate_file: cert.pem\n      key_file: key.pem\n", nil},
		{"redis server", multiNode, nil},
		{"redis over a unix socket", "private_api:\n  listen:\n    address: :8155\n    authentication_secret_file: secret\nredis:\n  network: unix\n  server:\n    address: /var/opt/gitlab/redis/redis.socket\n", nil},
		{"redis sentinel with TLS", "private_api:\n  listen:\n    address: 0.0.0.0:8155\n    authentication_secret_file: secret\nredis:\n  sentinel:\n    master_name: gitlab-redis\n    addresses: [s1:26379, s2:26379]\n    sentinel_password_file: password\n  password_file: password\n  tls:\n    enabled: true\n    certificate_file: cert.pem\n    key_file: key.pem\n    ca_certificate_file: ca.pem\n", nil},
		{"redis cluster", "private_api:\n  listen:\n    address: '[::]:8155'\n    authentication_secret_file: secret\nredis:\n  cluster:\n    addresses: [r1:6379, r2:6379]\n", nil},
		{"several nodes on one machine", "private_api:\n  listen:\n    authentication_secret_file: secret\nredis:\n  allow_loopback_private_api: true\n  server:\n    address: 127.0.0.1:6379\n", nil},
		{"grpcs URL naming a host", "", map[string]string{EnvOwnPrivateAPIURL: "grpcs://kas1.internal:8155"}},
		{"grpcs with TLS and a server name",
			"private_api:\n  listen:\n    address: 10.0.0.5:8155\n    authentication_secret_file: secret\n    certificate_file: cert.pem\n    key_file: key.pem\n    ca_certificate_file: ca.pem\nredis:\n  server:\n    address: redis:6379\n",
			map[string]string{EnvOwnPrivateAPICIDR: "10.0.0.0/8, fd00::/8", EnvOwnPrivateAPIPort: "18155", EnvOwnPrivateAPIScheme: "grpcs", EnvOwnPrivateAPIHost: "kas.internal"}},
		{"CIDR with port and scheme", "", map[string]string{EnvOwnPrivateAPICIDR: "192.168.0.0/16", EnvOwnPrivateAPIPort: "8155", EnvOwnPrivateAPIScheme: "grpc"}},
		{"SSL_CERT_DIR with two directories", "", map[string]string{EnvSSLCertDir: f.path("dir") + ":" + f.path("dir2")}},
		{"acme", "tls:\n  acme:\n    email: admin@example.com\n    domains: [kas.example.com]\n    ca: http://127.0.0.1:14000/dir\n    ca_root_file: ca.pem\n    challenges: [http-01, tls-alpn-01]\n    http_address: :80\n    storage_path: acme\n", nil},
		{"allowed origins", "agent:\n  kubernetes_api:\n    allowed_origins: [https://gitlab.example.com, 'http://localhost:3000/']\n", nil},
		{"trusted proxies", "agent:\n  trusted_proxies: [10.0.0.0/8, 192.0.2.7, 'fd00::/64', '::1']\n", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, problems := f.load(t, tt.yaml, tt.env)
			if problems != nil {
				t.Fatalf("want no problems, got:\n%s", formatProblems(problems))
			}
			if cfg == nil {
				t.Fatal("Load returned neither a Config nor an error")
			}
		})
	}
}
