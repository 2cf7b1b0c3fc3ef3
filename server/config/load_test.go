package config

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

// wantDefaults is the configuration with no file, spelled out here
// independently of defaults.yaml: GitLab KAS's defaults.
func wantDefaults() *Config {
	listen := func(address string) Listen { return Listen{Network: "tcp", Address: address} }
	return &Config{
		GitLab: GitLab{ClientTimeout: Duration(10 * time.Second)},
		Agent: Agent{
			Listen: AgentListen{
				Listen:                       listen("127.0.0.1:8150"),
				ConnectionsPerTokenPerMinute: 40000,
				MaxConnectionAge:             Duration(2 * time.Hour),
				ListenGracePeriod:            Duration(5 * time.Second),
				PingInterval:                 Duration(30 * time.Second),
				PingTimeout:                  Duration(10 * time.Second),
			},
			Configuration: Configuration{
				PollPeriod:               Duration(300 * time.Second),
				MaxConfigurationFileSize: 131072,
			},
			InfoCacheTTL:         Duration(300 * time.Second),
			InfoCacheErrorTTL:    Duration(60 * time.Second),
			RedisConnInfoTTL:     Duration(300 * time.Second),
			RedisConnInfoRefresh: Duration(240 * time.Second),
			RedisConnInfoGC:      Duration(600 * time.Second),
			KubernetesAPI: KubernetesAPI{
				Listen:                    Listen{Network: "tcp"},
				URLPathPrefix:             "/",
				AllowedAgentCacheTTL:      Duration(60 * time.Second),
				AllowedAgentCacheErrorTTL: Duration(10 * time.Second),
				AgentWaitTimeout:          Duration(10 * time.Second),
			},
			Receptive: Receptive{
				PollPeriod:          Duration(60 * time.Second),
				ConnectionsPerAgent: 2,
				LeasePeriod:         Duration(20 * time.Second),
			},
		},
		Observability: Observability{
			Listen:               listen("127.0.0.1:8151"),
			UsageReportingPeriod: Duration(60 * time.Second),
			Prometheus:           URLPath{URLPath: "/metrics"},
			LivenessProbe:        URLPath{URLPath: "/liveness"},
			ReadinessProbe:       URLPath{URLPath: "/readiness"},
			Logging:              Logging{Level: "info"},
		},
		API: API{Listen: APIListen{
			Listen:           listen("127.0.0.1:8153"),
			MaxConnectionAge: Duration(2 * time.Hour),
		}},
		PrivateAPI: PrivateAPI{
			Listen: PrivateAPIListen{
				Listen:           listen("127.0.0.1:8155"),
				MaxConnectionAge: Duration(2 * time.Hour),
			},
			AcceptTimeout: Duration(2 * time.Second),
		},
	}
}

func wantRedisDefaults() Redis {
	return Redis{
		Network:      "tcp",
		KeyPrefix:    "gitlab-kas",
		DialTimeout:  Duration(5 * time.Second),
		ReadTimeout:  Duration(1 * time.Second),
		WriteTimeout: Duration(3 * time.Second),
		IdleTimeout:  Duration(50 * time.Second),
		CacheTTL:     Duration(5 * time.Second),
	}
}

func TestLoadDefaults(t *testing.T) {
	got, err := Load("", nil)
	if err != nil {
		t.Fatalf("Load with no file: %v", err)
	}
	if want := wantDefaults(); !reflect.DeepEqual(got, want) {
		t.Errorf("defaults:\n got %+v\nwant %+v", got, want)
	}
}

func TestLoadRedisDefaultsOnlyWithRedis(t *testing.T) {
	f := newFixtures(t)
	cfg, problems := f.load(t, multiNode+"  database_index: 3\n", nil)
	if problems != nil {
		t.Fatalf("want no problems, got:\n%s", formatProblems(problems))
	}
	want := wantRedisDefaults()
	want.Server = &RedisServer{Address: "redis:6379"}
	want.DatabaseIndex = 3
	if !reflect.DeepEqual(*cfg.Redis, want) {
		t.Errorf("redis:\n got %+v\nwant %+v", *cfg.Redis, want)
	}

	for _, text := range []string{"", "redis:\n", "redis: ~\n"} {
		cfg, problems := f.load(t, text, nil)
		if problems != nil {
			t.Fatalf("%q: want no problems, got:\n%s", text, formatProblems(problems))
		}
		if cfg.Redis != nil {
			t.Errorf("%q: want no redis (a single node), got %+v", text, *cfg.Redis)
		}
	}
}

func TestLoadKeepsDefaultForKeyWithoutValue(t *testing.T) {
	f := newFixtures(t)
	cfg, problems := f.load(t, "agent:\n  listen:\n    address:\n    ping_interval: 20s\n", nil)
	if problems != nil {
		t.Fatalf("want no problems, got:\n%s", formatProblems(problems))
	}
	if cfg.Agent.Listen.Address != "127.0.0.1:8150" || cfg.Agent.Listen.Network != "tcp" {
		t.Errorf("agent.listen: want the default tcp 127.0.0.1:8150, got %s %s", cfg.Agent.Listen.Network, cfg.Agent.Listen.Address)
	}
	if cfg.Agent.Listen.PingInterval.D() != 20*time.Second {
		t.Errorf("agent.listen.ping_interval: want 20s, got %s", cfg.Agent.Listen.PingInterval)
	}
}

func TestLoadAPISecretDefaultsToGitLabs(t *testing.T) {
	f := newFixtures(t)
	cfg, problems := f.load(t, "gitlab:\n  authentication_secret_file: secret\n", nil)
	if problems != nil {
		t.Fatalf("want no problems, got:\n%s", formatProblems(problems))
	}
	if got, want := cfg.API.Listen.AuthenticationSecretFile, f.path("secret"); got != want {
		t.Errorf("api.listen.authentication_secret_file: got %q, want %q", got, want)
	}

	cfg, problems = f.load(t, "gitlab:\n  authentication_secret_file: secret\napi:\n  listen:\n    authentication_secret_file: secret-b\n", nil)
	if problems != nil {
		t.Fatalf("want no problems, got:\n%s", formatProblems(problems))
	}
	if got, want := cfg.API.Listen.AuthenticationSecretFile, f.path("secret-b"); got != want {
		t.Errorf("api.listen.authentication_secret_file: got %q, want %q", got, want)
	}
}

func TestLoadResolvesRelativePathsAgainstTheFile(t *testing.T) {
	f := newFixtures(t)
	abs := f.path("secret-b")
	cfg, problems := f.load(t, "gitlab:\n  authentication_secret_file: secret\n  ca_certificate_file: ./ca.pem\nprivate_api:\n  listen:\n    authentication_secret_file: "+abs+"\n", nil)
	if problems != nil {
		t.Fatalf("want no problems, got:\n%s", formatProblems(problems))
	}
	for key, got := range map[string]string{
		"gitlab.authentication_secret_file":             cfg.GitLab.AuthenticationSecretFile,
		"gitlab.ca_certificate_file":                    cfg.GitLab.CACertificateFile,
		"private_api.listen.authentication_secret_file": cfg.PrivateAPI.Listen.AuthenticationSecretFile,
	} {
		if !filepath.IsAbs(got) || !strings.HasPrefix(got, f.dir) {
			t.Errorf("%s: want an absolute path in %s, got %q", key, f.dir, got)
		}
	}
}

func TestLoadReadsEnvironment(t *testing.T) {
	env := map[string]string{
		EnvOwnPrivateAPICIDR:   " 10.0.0.0/8 ",
		EnvOwnPrivateAPIPort:   "8155",
		EnvOwnPrivateAPIScheme: "grpcs",
		EnvOwnPrivateAPIHost:   "kas.internal",
		EnvSSLCertDir:          t.TempDir(),
		"UNRELATED":            "x",
	}
	cfg, err := Load("", func(name string) string { return env[name] })
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	want := Env{
		OwnPrivateAPICIDR:   "10.0.0.0/8",
		OwnPrivateAPIPort:   "8155",
		OwnPrivateAPIScheme: "grpcs",
		OwnPrivateAPIHost:   "kas.internal",
		SSLCertDir:          env[EnvSSLCertDir],
	}
	if cfg.Env != want {
		t.Errorf("Env:\n got %+v\nwant %+v", cfg.Env, want)
	}
}

func TestLoadFileProblems(t *testing.T) {
	f := newFixtures(t)
	tests := []struct {
		name string
		yaml string
		key  string
		line int
		msg  string
	}{
		{"unknown top-level key", "gitlab: {}\ngitlb:\n  address: http://x\n",
			"gitlb", 2, "unknown key gitlb; did you mean gitlab?"},
		{"unknown nested key", "agent:\n  listen:\n    adress: 0.0.0.0:8150\n",
			"agent.listen.adress", 3, "unknown key agent.listen.adress; did you mean agent.listen.address?"},
		{"unknown key beside an inline struct", "api:\n  listen:\n    max_conection_age: 1h\n",
			"api.listen.max_conection_age", 3, "did you mean api.listen.max_connection_age?"},
		{"unknown key with nothing close", "observability:\n  tracing:\n    connection_string: x\n",
			"observability.tracing", 2, "the keys under observability are listen, usage_reporting_period, prometheus, liveness_probe, readiness_probe, logging"},
		{"unknown key in redis", "redis:\n  server:\n    adress: r:6379\n",
			"redis.server.adress", 3, "did you mean redis.server.address?"},
		{"string for a number", "agent:\n  listen:\n    connections_per_token_per_minute: many\n",
			"agent.listen.connections_per_token_per_minute", 3, `want a whole number, got "many"`},
		{"string for a boolean", "agent:\n  listen:\n    websocket: maybe\n",
			"agent.listen.websocket", 3, `want true or false, got "maybe"`},
		{"list for a string", "gitlab:\n  address: [a, b]\n",
			"gitlab.address", 2, "want a string, got a list"},
		{"string for a list", "tls:\n  acme:\n    domains: kas.example.com\n",
			"tls.acme.domains", 3, `want a list, got "kas.example.com"`},
		{"scalar for a section", "agent: 5\n",
			"agent", 1, `want a mapping of keys to values, got "5"`},
		{"bad duration", "agent:\n  listen:\n    ping_interval: 5 minutes\n",
			"agent.listen.ping_interval", 3, `want a duration such as "300s", "1m30s" or "2h", got "5 minutes"`},
		{"duration without a unit", "gitlab:\n  client_timeout: 30\n",
			"gitlab.client_timeout", 2, `add a unit (ns, us, ms, s, m, h), e.g. "30s"`},
		{"mapping for a duration", "gitlab:\n  client_timeout: {seconds: 30}\n",
			"gitlab.client_timeout", 2, `want a duration such as "300s", got a mapping`},
		{"key set twice", "gitlab:\n  client_timeout: 1s\n  client_timeout: 2s\n",
			"gitlab.client_timeout", 3, "set twice (first on line 2)"},
		{"merge key", "base: &base\n  network: tcp\n",
			"base", 1, "unknown key base"},
		{"YAML merge", "agent:\n  listen:\n    <<: {network: tcp}\n",
			"agent.listen", 3, "merge keys (<<) are not supported"},
		{"not a mapping at the top", "- a\n- b\n",
			"(top level)", 1, "want a mapping of keys to values, got a list"},
		{"syntax error", "agent:\n  listen:\n address: x\n    network: tcp\n",
			f.path("kas.yaml"), 0, "line 2: did not find expected key"},
		{"two documents", "agent: {}\n---\ngitlab: {}\n",
			f.path("kas.yaml"), 2, "holds more than one YAML document"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, problems := f.load(t, tt.yaml, nil)
			p, ok := findProblem(problems, tt.key, tt.msg)
			if !ok {
				t.Fatalf("want a problem %s: …%s…, got:\n%s", tt.key, tt.msg, formatProblems(problems))
			}
			if p.Line != tt.line {
				t.Errorf("%s: want line %d, got %d", tt.key, tt.line, p.Line)
			}
		})
	}
}

func TestLoadAliasesAreFollowed(t *testing.T) {
	f := newFixtures(t)
	cfg, problems := f.load(t, "agent:\n  listen:\n    ping_timeout: &t 7s\n  kubernetes_api:\n    agent_wait_timeout: *t\n", nil)
	if problems != nil {
		t.Fatalf("want no problems, got:\n%s", formatProblems(problems))
	}
	if got := cfg.Agent.KubernetesAPI.AgentWaitTimeout.D(); got != 7*time.Second {
		t.Errorf("agent.kubernetes_api.agent_wait_timeout: want 7s, got %s", got)
	}
}

func TestLoadSyntaxErrorStillChecksEnvironment(t *testing.T) {
	f := newFixtures(t)
	_, problems := f.load(t, "agent: [\n", map[string]string{EnvOwnPrivateAPIScheme: "tcp"})
	if len(problems) != 2 {
		t.Fatalf("want the syntax error and the environment problem, got:\n%s", formatProblems(problems))
	}
	if problems[0].Key != f.path("kas.yaml") || problems[1].Key != EnvOwnPrivateAPIScheme {
		t.Errorf("got:\n%s", formatProblems(problems))
	}
}

func TestLoadMissingFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "missing.yaml")
	_, err := Load(path, nil)
	if !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("want a not-exist error, got %v", err)
	}
	if !strings.Contains(err.Error(), path) {
		t.Errorf("error %q does not name the file", err)
	}
}

func TestLoadTestdataValid(t *testing.T) {
	dir := filepath.Join("..", "..", "testdata", "config")
	cfg, err := Load(filepath.Join(dir, "valid.yaml"), nil)
	if err != nil {
		t.Fatalf("Load valid.yaml: %v", err)
	}
	absDir, err := filepath.Abs(dir)
	if err != nil {
		t.Fatal(err)
	}
	checks := []struct {
		key       string
		got, want any
	}{
		{"gitlab.address", cfg.GitLab.Address, "http://gitlab.internal:8080"},
		{"gitlab.authentication_secret_file", cfg.GitLab.AuthenticationSecretFile, filepath.Join(absDir, "api-secret")},
		{"gitlab.client_timeout", cfg.GitLab.ClientTimeout.D(), 15 * time.Second},
		{"api.listen.authentication_secret_file", cfg.API.Listen.AuthenticationSecretFile, filepath.Join(absDir, "api-secret")},
		{"agent.listen.address", cfg.Agent.Listen.Address, "0.0.0.0:8150"},
		{"agent.listen.ping_interval", cfg.Agent.Listen.PingInterval.D(), 20 * time.Second},
		{"agent.listen.ping_timeout", cfg.Agent.Listen.PingTimeout.D(), 10 * time.Second},
		{"agent.configuration.poll_period", cfg.Agent.Configuration.PollPeriod.D(), time.Minute},
		{"agent.kubernetes_api.listen.address", cfg.Agent.KubernetesAPI.Listen.Address, "0.0.0.0:8154"},
		{"agent.kubernetes_api.allowed_origins", cfg.Agent.KubernetesAPI.AllowedOrigins, []string{"https://gitlab.example.com"}},
		{"observability.logging.level", cfg.Observability.Logging.Level, "debug"},
		{"private_api.listen.address", cfg.PrivateAPI.Listen.Address, "10.0.0.5:8155"},
		{"redis.server.address", cfg.Redis.Server.Address, "redis.internal:6379"},
		{"redis.database_index", cfg.Redis.DatabaseIndex, 2},
		{"redis.key_prefix", cfg.Redis.KeyPrefix, "gitlab-kas"},
	}
	for _, c := range checks {
		if !reflect.DeepEqual(c.got, c.want) {
			t.Errorf("%s: got %v, want %v", c.key, c.got, c.want)
		}
	}
}

func TestLoadTestdataInvalidReportsEveryProblem(t *testing.T) {
	_, err := Load(filepath.Join("..", "..", "testdata", "config", "invalid.yaml"), nil)
	var verr *ValidationError
	if !errors.As(err, &verr) {
		t.Fatalf("want a *ValidationError, got %v", err)
	}
	want := []string{
		"gitlab.address",
		"gitlab.authentication_secret_file",
		"agent.listen.netwrk",
		"agent.listen.address",
		"agent.listen.ping_timeout",
		"agent.listen.max_connection_age",
		"agent.configuration.max_configuration_file_size",
		"observability.logging.level",
		"privat_api",
		"redis",
		// private_api is misspelt, so it keeps its defaults, which do not
		// do for several nodes.
		"private_api.listen.authentication_secret_file",
		"private_api.listen.address",
	}
	var got []string
	for _, p := range verr.Problems {
		got = append(got, p.Key)
	}
	if !slices.Equal(got, want) {
		t.Errorf("problem keys:\n got %q\nwant %q\nerror:\n%s", got, want, err)
	}
	lines := strings.Split(err.Error(), "\n")
	if len(lines) != len(want) {
		t.Errorf("want one line per problem, got %d lines for %d problems", len(lines), len(want))
	}
	for i, line := range lines {
		if !strings.HasPrefix(line, want[i]+" (line ") && !strings.HasPrefix(line, want[i]+": ") {
			t.Errorf("line %d %q does not start with its key %s", i, line, want[i])
		}
	}
}

// TestDocumentationCoversEveryKey keeps docs/configuration.md in step with
// the schema.
func TestDocumentationCoversEveryKey(t *testing.T) {
	doc, err := os.ReadFile(filepath.Join("..", "..", "docs", "configuration.md"))
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	var walk func(typ reflect.Type, prefix string)
	walk = func(typ reflect.Type, prefix string) {
		fields, names := structFields(typ)
		for _, name := range names {
			key := joinKey(prefix, name)
			keys = append(keys, key)
			ft := typ.FieldByIndex(fields[name]).Type
			if ft.Kind() == reflect.Pointer {
				ft = ft.Elem()
			}
			if ft.Kind() == reflect.Struct && ft != reflect.TypeFor[Duration]() {
				walk(ft, key)
			}
		}
	}
	walk(reflect.TypeFor[Config](), "")
	keys = append(keys, EnvOwnPrivateAPIURL, EnvOwnPrivateAPICIDR, EnvOwnPrivateAPIPort, EnvOwnPrivateAPIScheme, EnvOwnPrivateAPIHost, EnvSSLCertDir)
	for _, key := range keys {
		if !strings.Contains(string(doc), "`"+key+"`") {
			t.Errorf("docs/configuration.md does not document `%s`", key)
		}
	}
}
