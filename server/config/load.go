package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"

	"gopkg.in/yaml.v3"
)

// The environment variables kas reads (see DESIGN §7, "Own private API URL").
const (
	EnvOwnPrivateAPIURL    = "OWN_PRIVATE_API_URL"
	EnvOwnPrivateAPICIDR   = "OWN_PRIVATE_API_CIDR"
	EnvOwnPrivateAPIPort   = "OWN_PRIVATE_API_PORT"
	EnvOwnPrivateAPIScheme = "OWN_PRIVATE_API_SCHEME"
	EnvOwnPrivateAPIHost   = "OWN_PRIVATE_API_HOST"
	EnvSSLCertDir          = "SSL_CERT_DIR"
)

// Load reads the configuration file at path ("" means no file: every
// default), reads kas's environment variables through getenv (nil reads
// none), fills in the defaults and validates the result.
//
// If the configuration is invalid, the error is a *ValidationError listing
// every problem, each naming its key. Relative file paths in the file are
// taken relative to the file's directory, and the returned Config holds them
// made absolute.
func Load(path string, getenv func(string) string) (*Config, error) {
	ps := newProblems()
	root, err := readFile(path, ps)
	if err != nil {
		return nil, err
	}
	cfg := new(Config)
	if err := applyDefaults(cfg, configuresRedis(root)); err != nil {
		return nil, err
	}
	parsed := len(ps.list) == 0
	if root != nil {
		(&nodeDecoder{problems: ps}).decode("", root, reflect.ValueOf(cfg).Elem())
	}
	deriveDefaults(cfg)
	if path != "" {
		if err := resolveRelativePaths(cfg, filepath.Dir(path)); err != nil {
			return nil, err
		}
	}
	cfg.Env = readEnv(getenv)
	// After a YAML syntax error nothing from the file is known, so checking
	// the defaults in its place would only mislead.
	if parsed {
		validate(cfg, ps)
	}
	validateEnv(cfg.Env, ps)
	if err := ps.err(); err != nil {
		return nil, err
	}
	return cfg, nil
}

// readFile parses the YAML file at path and returns its top-level node, or nil
// for no file or an empty one. YAML syntax errors become problems keyed by the
// path; only failing to read the file is an error.
func readFile(path string, ps *problems) (*yaml.Node, error) {
	if path == "" {
		return nil, nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read configuration file: %w", err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, nil
		}
		ps.addAt(path, 0, "%s", strings.TrimPrefix(err.Error(), "yaml: "))
		return nil, nil
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); err == nil {
		ps.addAt(path, extra.Line, "holds more than one YAML document (---); kas reads exactly one")
		return nil, nil
	} else if !errors.Is(err, io.EOF) {
		ps.addAt(path, 0, "%s", strings.TrimPrefix(err.Error(), "yaml: "))
		return nil, nil
	}
	if len(doc.Content) == 0 {
		return nil, nil
	}
	return doc.Content[0], nil
}

// configuresRedis reports whether the file has a non-empty redis section,
// which is what switches kas to several nodes sharing state.
func configuresRedis(root *yaml.Node) bool {
	if root == nil || root.Kind != yaml.MappingNode {
		return false
	}
	for i := 0; i+1 < len(root.Content); i += 2 {
		if root.Content[i].Value == "redis" {
			return resolveAlias(root.Content[i+1]).ShortTag() != "!!null"
		}
	}
	return false
}

// resolveRelativePaths makes every relative file path absolute against dir,
// so kas finds its files wherever it is started from.
func resolveRelativePaths(cfg *Config, dir string) error {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return fmt.Errorf("find the configuration file's directory: %w", err)
	}
	for _, f := range cfg.fileSettings() {
		if *f.path != "" && !filepath.IsAbs(*f.path) {
			*f.path = filepath.Join(abs, *f.path)
		}
	}
	return nil
}

func readEnv(getenv func(string) string) Env {
	if getenv == nil {
		return Env{}
	}
	get := func(name string) string { return strings.TrimSpace(getenv(name)) }
	return Env{
		OwnPrivateAPIURL:    get(EnvOwnPrivateAPIURL),
		OwnPrivateAPICIDR:   get(EnvOwnPrivateAPICIDR),
		OwnPrivateAPIPort:   get(EnvOwnPrivateAPIPort),
		OwnPrivateAPIScheme: get(EnvOwnPrivateAPIScheme),
		OwnPrivateAPIHost:   get(EnvOwnPrivateAPIHost),
		SSLCertDir:          get(EnvSSLCertDir),
	}
}

// fileContent says what a file setting holds, which decides how
// WriteEffective describes it.
type fileContent int

const (
	plainFile  fileContent = iota // certificates, CA bundles, the standalone file
	apiSecret                     // base64 of exactly 32 bytes (ReadSecretFile)
	credential                    // a password, token or private key
)

// fileSetting is a key whose value is a path.
type fileSetting struct {
	key     string
	path    *string
	content fileContent
}

// fileSettings lists every key that names a file or directory.
func (c *Config) fileSettings() []fileSetting {
	s := []fileSetting{
		{"gitlab.authentication_secret_file", &c.GitLab.AuthenticationSecretFile, apiSecret},
		{"gitlab.ca_certificate_file", &c.GitLab.CACertificateFile, plainFile},
		{"gitlab.repository_token_file", &c.GitLab.RepositoryTokenFile, credential},
		{"agent.listen.certificate_file", &c.Agent.Listen.CertificateFile, plainFile},
		{"agent.listen.key_file", &c.Agent.Listen.KeyFile, credential},
		{"agent.kubernetes_api.listen.certificate_file", &c.Agent.KubernetesAPI.Listen.CertificateFile, plainFile},
		{"agent.kubernetes_api.listen.key_file", &c.Agent.KubernetesAPI.Listen.KeyFile, credential},
		{"observability.listen.certificate_file", &c.Observability.Listen.CertificateFile, plainFile},
		{"observability.listen.key_file", &c.Observability.Listen.KeyFile, credential},
		{"api.listen.certificate_file", &c.API.Listen.CertificateFile, plainFile},
		{"api.listen.key_file", &c.API.Listen.KeyFile, credential},
		{"api.listen.authentication_secret_file", &c.API.Listen.AuthenticationSecretFile, apiSecret},
		{"private_api.listen.certificate_file", &c.PrivateAPI.Listen.CertificateFile, plainFile},
		{"private_api.listen.key_file", &c.PrivateAPI.Listen.KeyFile, credential},
		{"private_api.listen.authentication_secret_file", &c.PrivateAPI.Listen.AuthenticationSecretFile, apiSecret},
		{"private_api.listen.ca_certificate_file", &c.PrivateAPI.Listen.CACertificateFile, plainFile},
		{"standalone.file", &c.Standalone.File, plainFile},
	}
	if r := c.Redis; r != nil {
		s = append(s,
			fileSetting{"redis.password_file", &r.PasswordFile, credential},
			fileSetting{"redis.tls.certificate_file", &r.TLS.CertificateFile, plainFile},
			fileSetting{"redis.tls.key_file", &r.TLS.KeyFile, credential},
			fileSetting{"redis.tls.ca_certificate_file", &r.TLS.CACertificateFile, plainFile},
		)
		if r.Sentinel != nil {
			s = append(s, fileSetting{"redis.sentinel.sentinel_password_file", &r.Sentinel.SentinelPasswordFile, credential})
		}
	}
	if a := c.TLS.ACME; a != nil {
		s = append(s,
			fileSetting{"tls.acme.ca_root_file", &a.CARootFile, plainFile},
			fileSetting{"tls.acme.storage_path", &a.StoragePath, plainFile},
		)
	}
	return s
}
