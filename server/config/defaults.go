package config

import (
	_ "embed"
	"fmt"
	"reflect"

	"gopkg.in/yaml.v3"
)

// defaultsYAML holds every default in one readable file.
//
//go:embed defaults.yaml
var defaultsYAML []byte

// applyDefaults decodes defaults.yaml into cfg, leaving out the redis
// defaults unless withRedis (the administrator configured Redis). It fails
// only if defaults.yaml itself is broken, which the tests rule out.
func applyDefaults(cfg *Config, withRedis bool) error {
	var doc yaml.Node
	if err := yaml.Unmarshal(defaultsYAML, &doc); err != nil {
		return fmt.Errorf("built-in defaults: %w", err)
	}
	ps := newProblems()
	(&nodeDecoder{problems: ps}).decode("", doc.Content[0], reflect.ValueOf(cfg).Elem())
	if err := ps.err(); err != nil {
		return fmt.Errorf("built-in defaults: %w", err)
	}
	if !withRedis {
		cfg.Redis = nil
	}
	return nil
}

// deriveDefaults fills in the defaults that follow from other keys.
func deriveDefaults(cfg *Config) {
	// Rails signs its calls to the internal API with the same secret kas
	// uses to call Rails, so one file serves both unless told otherwise.
	if cfg.API.Listen.AuthenticationSecretFile == "" {
		cfg.API.Listen.AuthenticationSecretFile = cfg.GitLab.AuthenticationSecretFile
	}
}
