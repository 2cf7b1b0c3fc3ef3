package config

import (
	"bytes"
	"fmt"
	"io"

	"gopkg.in/yaml.v3"
)

// WriteEffective writes the configuration as YAML with every default filled
// in, for `kas config check`. The output loads back to the same
// configuration. Secrets appear only as file paths: a comment says what each
// secret file holds (its length, or why it cannot be used), and nothing read
// from a secret, password, token or key file is ever written.
func (c *Config) WriteEffective(w io.Writer) error {
	var b bytes.Buffer
	b.WriteString("# kas effective configuration: the configuration file with every default filled in.\n")
	b.WriteString("# Secret files are shown by path; their contents are never printed.\n")
	for _, f := range c.fileSettings() {
		if *f.path == "" {
			continue
		}
		switch f.content {
		case apiSecret:
			if secret, err := ReadSecretFile(*f.path); err != nil {
				fmt.Fprintf(&b, "# %s: unusable: %v\n", f.key, err)
			} else {
				fmt.Fprintf(&b, "# %s: %d-byte secret (redacted)\n", f.key, len(secret))
			}
		case credential:
			fmt.Fprintf(&b, "# %s: contents not shown\n", f.key)
		}
	}
	b.WriteString("#\n# Environment:\n")
	for _, e := range []struct{ name, value string }{
		{EnvOwnPrivateAPIURL, c.Env.OwnPrivateAPIURL},
		{EnvOwnPrivateAPICIDR, c.Env.OwnPrivateAPICIDR},
		{EnvOwnPrivateAPIPort, c.Env.OwnPrivateAPIPort},
		{EnvOwnPrivateAPIScheme, c.Env.OwnPrivateAPIScheme},
		{EnvOwnPrivateAPIHost, c.Env.OwnPrivateAPIHost},
		{EnvSSLCertDir, c.Env.SSLCertDir},
	} {
		if e.value == "" {
			fmt.Fprintf(&b, "#   %s is not set\n", e.name)
		} else {
			fmt.Fprintf(&b, "#   %s=%s\n", e.name, e.value)
		}
	}
	b.WriteString("\n")
	enc := yaml.NewEncoder(&b)
	enc.SetIndent(2)
	if err := enc.Encode(c); err != nil {
		return fmt.Errorf("write effective configuration: %w", err)
	}
	if err := enc.Close(); err != nil {
		return fmt.Errorf("write effective configuration: %w", err)
	}
	if _, err := w.Write(b.Bytes()); err != nil {
		return fmt.Errorf("write effective configuration: %w", err)
	}
	return nil
}
