// Package config defines kas's configuration file, fills in GitLab KAS's
// defaults, and validates it, reporting every problem at once by key.
package config

// The YAML keys follow GitLab KAS's own configuration file (kas_config_example.yaml)
// wherever a setting exists there, so an administrator can carry a file over.

// Config is the whole kas configuration file.
type Config struct {
	GitLab        GitLab        `yaml:"gitlab"`
	Agent         Agent         `yaml:"agent"`
	Observability Observability `yaml:"observability"`
	Redis         *Redis        `yaml:"redis,omitempty"`
	API           API           `yaml:"api"`
	PrivateAPI    PrivateAPI    `yaml:"private_api"`
	Standalone    Standalone    `yaml:"standalone"`
	TLS           TLS           `yaml:"tls"`

	// Env holds the OWN_PRIVATE_API_* and SSL_CERT_DIR environment variables,
	// read by Load (not from YAML) so validation can report them with the file.
	Env Env `yaml:"-"`
}

// GitLab is how kas reaches GitLab Rails. With no Address, kas runs standalone.
type GitLab struct {
	// Address is the URL kas uses to call GitLab's API
	// (gitlab_kas['gitlab_address']), e.g. http://gitlab.internal:8080.
	Address string `yaml:"address,omitempty"`
	// ExternalURL is GitLab's public URL (gitlab_rails['external_url']), shown in messages.
	ExternalURL string `yaml:"external_url,omitempty"`
	// AuthenticationSecretFile holds the API secret (gitlab_kas['api_secret_key']):
	// base64 of exactly 32 bytes, shared with GitLab Rails.
	AuthenticationSecretFile string `yaml:"authentication_secret_file,omitempty"`
	// CACertificateFile is a PEM bundle trusted for GitLab's TLS certificate,
	// in addition to the system pool and SSL_CERT_DIR.
	CACertificateFile string `yaml:"ca_certificate_file,omitempty"`
	// ClientTimeout bounds each call to GitLab.
	ClientTimeout Duration `yaml:"client_timeout,omitempty"`
	// RepositoryTokenFile holds a token for GitLab's repository files API,
	// used to fetch agent configuration files.
	RepositoryTokenFile string `yaml:"repository_token_file,omitempty"`
}

// Agent configures the agent-facing listener and everything per agent.
type Agent struct {
	Listen        AgentListen   `yaml:"listen"`
	Configuration Configuration `yaml:"configuration"`
	// InfoCacheTTL and InfoCacheErrorTTL cache agent_info answers (success, failure).
	InfoCacheTTL      Duration `yaml:"info_cache_ttl,omitempty"`
	InfoCacheErrorTTL Duration `yaml:"info_cache_error_ttl,omitempty"`
	// RedisConnInfo* control how tunnel records live in Redis.
	RedisConnInfoTTL     Duration      `yaml:"redis_conn_info_ttl,omitempty"`
	RedisConnInfoRefresh Duration      `yaml:"redis_conn_info_refresh,omitempty"`
	RedisConnInfoGC      Duration      `yaml:"redis_conn_info_gc,omitempty"`
	KubernetesAPI        KubernetesAPI `yaml:"kubernetes_api"`
	// TrustedProxies are the load balancers and reverse proxies in front of
	// agent.listen and agent.kubernetes_api.listen (CIDRs or addresses)
	// whose X-Forwarded-For names the client: the address kas forwards to
	// the API server as X-Forwarded-For and limits unauthenticated agent
	// connections by. Empty: the connection's own address, no header believed.
	TrustedProxies []string `yaml:"trusted_proxies,omitempty"`
	// Receptive configures receptive agents, which kas dials.
	Receptive Receptive `yaml:"receptive"`
}

// Receptive configures receptive agents: agents in clusters that cannot
// reach kas but that kas can reach, so kas dials them.
type Receptive struct {
	// Enabled is GitLab's admin setting "Enable receptive mode": off, kas
	// never dials an agent.
	Enabled bool `yaml:"enabled,omitempty"`
	// PollPeriod is how often kas asks GitLab (or reads the standalone
	// file) for the list of receptive agents; ±10% jitter.
	PollPeriod Duration `yaml:"poll_period,omitempty"`
	// ConnectionsPerAgent is how many nodes hold a connection to each
	// receptive agent (capped at the number of live nodes).
	ConnectionsPerAgent int `yaml:"connections_per_agent,omitempty"`
	// LeasePeriod bounds how long a dead node's agents stay without it:
	// another node takes its place within one lease period.
	LeasePeriod Duration `yaml:"lease_period,omitempty"`
}

// Listen is one listening socket.
type Listen struct {
	// Network is tcp, tcp4, tcp6 or unix.
	Network string `yaml:"network,omitempty"`
	// Address is host:port for tcp networks, a path for unix.
	Address string `yaml:"address,omitempty"`
	// CertificateFile and KeyFile enable TLS with a static certificate.
	CertificateFile string `yaml:"certificate_file,omitempty"`
	KeyFile         string `yaml:"key_file,omitempty"`
}

// AgentListen is the public listener agents connect to (gitlab_kas['listen_address']).
type AgentListen struct {
	Listen `yaml:",inline"`
	// Websocket is accepted for compatibility with GitLab KAS configs. kas
	// serves agents over WebSocket and, for GitLab's agentk, over gRPC
	// (grpc://) on the same listener either way, so it changes nothing.
	Websocket *bool `yaml:"websocket,omitempty"`
	// ConnectionsPerTokenPerMinute limits how often one agent token may connect.
	ConnectionsPerTokenPerMinute int `yaml:"connections_per_token_per_minute,omitempty"`
	// MaxConnectionAge closes an agent's connection gracefully so load rebalances.
	MaxConnectionAge Duration `yaml:"max_connection_age,omitempty"`
	// ListenGracePeriod is how long shutdown waits for in-flight requests.
	ListenGracePeriod Duration `yaml:"listen_grace_period,omitempty"`
	// PingInterval is how often kas pings each tunnel; a tunnel that does not
	// answer within PingTimeout is closed.
	PingInterval Duration `yaml:"ping_interval,omitempty"`
	PingTimeout  Duration `yaml:"ping_timeout,omitempty"`
}

// Configuration controls how agent configuration files are fetched.
type Configuration struct {
	PollPeriod               Duration `yaml:"poll_period,omitempty"`
	MaxConfigurationFileSize int64    `yaml:"max_configuration_file_size,omitempty"`
}

// KubernetesAPI configures the Kubernetes API proxy.
type KubernetesAPI struct {
	// Listen is an optional extra listener for the proxy
	// (gitlab_kas['kubernetes_api_listen_address'], GitLab's :8154). The proxy
	// is always also served on the agent listener under /k8s-proxy/ and
	// /-/kubernetes-agent/k8s-proxy/.
	Listen Listen `yaml:"listen"`
	// URLPathPrefix is where the proxy is mounted on the extra listener.
	URLPathPrefix string `yaml:"url_path_prefix,omitempty"`
	// AllowedAgentCacheTTL and AllowedAgentCacheErrorTTL cache authorization answers.
	AllowedAgentCacheTTL      Duration `yaml:"allowed_agent_cache_ttl,omitempty"`
	AllowedAgentCacheErrorTTL Duration `yaml:"allowed_agent_cache_error_ttl,omitempty"`
	// AgentWaitTimeout is how long a request waits for its agent to connect
	// before answering 503; 0 answers at once.
	AgentWaitTimeout Duration `yaml:"agent_wait_timeout,omitempty"`
	// AllowedOrigins are the browser origins (GitLab's UI) answered by CORS.
	AllowedOrigins []string `yaml:"allowed_origins,omitempty"`
}

// Observability configures metrics, probes, logs and the status page.
type Observability struct {
	Listen               Listen   `yaml:"listen"`
	UsageReportingPeriod Duration `yaml:"usage_reporting_period,omitempty"`
	Prometheus           URLPath  `yaml:"prometheus"`
	LivenessProbe        URLPath  `yaml:"liveness_probe"`
	ReadinessProbe       URLPath  `yaml:"readiness_probe"`
	Logging              Logging  `yaml:"logging"`
}

// URLPath is where an observability endpoint is mounted.
type URLPath struct {
	URLPath string `yaml:"url_path,omitempty"`
}

// Logging sets the log level: debug, info, warn or error.
type Logging struct {
	Level string `yaml:"level,omitempty"`
}

// Redis configures the shared registry for several kas nodes.
type Redis struct {
	// Exactly one of Server, Sentinel and Cluster.
	Server   *RedisServer   `yaml:"server,omitempty"`
	Sentinel *RedisSentinel `yaml:"sentinel,omitempty"`
	Cluster  *RedisCluster  `yaml:"cluster,omitempty"`

	Network       string   `yaml:"network,omitempty"`
	PasswordFile  string   `yaml:"password_file,omitempty"`
	Username      string   `yaml:"username,omitempty"`
	DatabaseIndex int      `yaml:"database_index,omitempty"`
	KeyPrefix     string   `yaml:"key_prefix,omitempty"`
	PoolSize      int      `yaml:"pool_size,omitempty"`
	DialTimeout   Duration `yaml:"dial_timeout,omitempty"`
	ReadTimeout   Duration `yaml:"read_timeout,omitempty"`
	WriteTimeout  Duration `yaml:"write_timeout,omitempty"`
	IdleTimeout   Duration `yaml:"idle_timeout,omitempty"`
	TLS           RedisTLS `yaml:"tls"`
	// AllowLoopback lets the private API listen on a loopback address or Unix
	// socket although Redis is configured: several nodes on one machine (tests).
	AllowLoopback bool     `yaml:"allow_loopback_private_api,omitempty"`
	CacheTTL      Duration `yaml:"lookup_cache_ttl,omitempty"`
}

// RedisServer is a single Redis server.
type RedisServer struct {
	Address string `yaml:"address"`
}

// RedisSentinel is a Sentinel-managed Redis.
type RedisSentinel struct {
	MasterName           string   `yaml:"master_name"`
	Addresses            []string `yaml:"addresses"`
	SentinelPasswordFile string   `yaml:"sentinel_password_file,omitempty"`
}

// RedisCluster is a Redis Cluster.
type RedisCluster struct {
	Addresses []string `yaml:"addresses"`
}

// RedisTLS enables TLS to Redis.
type RedisTLS struct {
	Enabled           bool   `yaml:"enabled,omitempty"`
	CertificateFile   string `yaml:"certificate_file,omitempty"`
	KeyFile           string `yaml:"key_file,omitempty"`
	CACertificateFile string `yaml:"ca_certificate_file,omitempty"`
}

// API is the internal API GitLab Rails calls (gitlab_kas['internal_api_listen_address']).
type API struct {
	Listen APIListen `yaml:"listen"`
}

// APIListen is the internal API listener.
type APIListen struct {
	Listen `yaml:",inline"`
	// AuthenticationSecretFile holds the API secret; defaults to gitlab.authentication_secret_file.
	AuthenticationSecretFile string   `yaml:"authentication_secret_file,omitempty"`
	MaxConnectionAge         Duration `yaml:"max_connection_age,omitempty"`
}

// PrivateAPI is the kas-to-kas API (gitlab_kas['private_api_listen_address']).
type PrivateAPI struct {
	Listen PrivateAPIListen `yaml:"listen"`
	// AcceptTimeout bounds how long a node forwarding a request waits for
	// the node holding the agent's tunnel to be connected to and to take
	// the request; a node that has not by then is skipped for a while and
	// the request goes to another node holding the agent.
	AcceptTimeout Duration `yaml:"accept_timeout,omitempty"`
}

// PrivateAPIListen is the private API listener.
type PrivateAPIListen struct {
	Listen `yaml:",inline"`
	// AuthenticationSecretFile holds the private API secret
	// (gitlab_kas['private_api_secret_key']): base64 of exactly 32 bytes.
	AuthenticationSecretFile string `yaml:"authentication_secret_file,omitempty"`
	// CACertificateFile is trusted for other nodes' certificates (grpcs).
	CACertificateFile string   `yaml:"ca_certificate_file,omitempty"`
	MaxConnectionAge  Duration `yaml:"max_connection_age,omitempty"`
}

// Standalone configures the local-files mode used when gitlab.address is empty.
type Standalone struct {
	// File lists agents, users, CI jobs, projects and groups (see testdata/standalone).
	File string `yaml:"file,omitempty"`
}

// TLS configures ACME certificates for the public listener.
type TLS struct {
	ACME *ACME `yaml:"acme,omitempty"`
}

// ACME obtains certificates with certmagic.
type ACME struct {
	Email      string   `yaml:"email,omitempty"`
	Domains    []string `yaml:"domains,omitempty"`
	CA         string   `yaml:"ca,omitempty"`
	CARootFile string   `yaml:"ca_root_file,omitempty"`
	// Challenges is a subset of http-01 and tls-alpn-01.
	Challenges  []string `yaml:"challenges,omitempty"`
	HTTPAddress string   `yaml:"http_address,omitempty"`
	StoragePath string   `yaml:"storage_path,omitempty"`
}

// Env is what kas reads from its environment.
type Env struct {
	OwnPrivateAPIURL    string // OWN_PRIVATE_API_URL
	OwnPrivateAPICIDR   string // OWN_PRIVATE_API_CIDR
	OwnPrivateAPIPort   string // OWN_PRIVATE_API_PORT
	OwnPrivateAPIScheme string // OWN_PRIVATE_API_SCHEME
	OwnPrivateAPIHost   string // OWN_PRIVATE_API_HOST
	SSLCertDir          string // SSL_CERT_DIR
}
