package config

import (
	"bytes"
	"os"
	"reflect"
	"strings"
	"testing"
)

func TestWriteEffectiveShowsNoSecrets(t *testing.T) {
	f := newFixtures(t)
	env := map[string]string{EnvOwnPrivateAPICIDR: "10.0.0.0/8", EnvOwnPrivateAPIPort: "8155"}
	cfg, problems := f.load(t, `
gitlab:
  address: http://gitlab.internal:8080
  authentication_secret_file: secret
  repository_token_file: token
agent:
  listen:
    address: 0.0.0.0:8150
    certificate_file: cert.pem
    key_file: key.pem
api:
  listen:
    address: 0.0.0.0:8153
private_api:
  listen:
    address: 0.0.0.0:8155
    authentication_secret_file: secret-b
redis:
  sentinel:
    master_name: gitlab-redis
    addresses: [s1:26379]
    sentinel_password_file: password
  password_file: password
`, env)
	if problems != nil {
		t.Fatalf("want no problems, got:\n%s", formatProblems(problems))
	}
	var out bytes.Buffer
	if err := cfg.WriteEffective(&out); err != nil {
		t.Fatalf("WriteEffective: %v", err)
	}
	text := out.String()
	f.assertNoSecrets(t, "the effective configuration", text)
	for _, want := range []string{
		"# gitlab.authentication_secret_file: 32-byte secret (redacted)\n",
		"# api.listen.authentication_secret_file: 32-byte secret (redacted)\n",
		"# private_api.listen.authentication_secret_file: 32-byte secret (redacted)\n",
		"# redis.password_file: contents not shown\n",
		"# redis.sentinel.sentinel_password_file: contents not shown\n",
		"# gitlab.repository_token_file: contents not shown\n",
		"# agent.listen.key_file: contents not shown\n",
		"#   OWN_PRIVATE_API_CIDR=10.0.0.0/8\n",
		"#   OWN_PRIVATE_API_URL is not set\n",
		"  authentication_secret_file: " + f.path("secret") + "\n",
		"    ping_interval: 30s\n",
		"    max_connection_age: 2h\n",
		"  key_prefix: gitlab-kas\n",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("output does not contain %q:\n%s", want, text)
		}
	}

	// What kas config check prints loads back to the same configuration.
	path := f.path("effective.yaml")
	if err := os.WriteFile(path, out.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	again, err := Load(path, func(name string) string { return env[name] })
	if err != nil {
		t.Fatalf("Load the effective configuration: %v", err)
	}
	if !reflect.DeepEqual(again, cfg) {
		t.Errorf("the effective configuration loads back differently:\n got %+v\nwant %+v", again, cfg)
	}
}

func TestWriteEffectiveNamesUnusableSecret(t *testing.T) {
	f := newFixtures(t)
	cfg, err := Load("", nil)
	if err != nil {
		t.Fatal(err)
	}
	// A Config changed after Load, e.g. the secret file replaced since.
	cfg.GitLab.AuthenticationSecretFile = f.path("secret31")
	var out bytes.Buffer
	if err := cfg.WriteEffective(&out); err != nil {
		t.Fatalf("WriteEffective: %v", err)
	}
	if want := "# gitlab.authentication_secret_file: unusable: secret file " + f.path("secret31") + " decodes to 31 bytes"; !strings.Contains(out.String(), want) {
		t.Errorf("output does not contain %q:\n%s", want, out.String())
	}
	f.assertNoSecrets(t, "the effective configuration", out.String())
}

func TestDurationString(t *testing.T) {
	for in, want := range map[string]string{
		"2h": "2h", "300s": "5m", "90s": "1m30s", "10s": "10s", "0s": "0s",
		"1h0m5s": "1h0m5s", "1h30m": "1h30m", "1500ms": "1.5s",
	} {
		var d Duration
		if err := d.UnmarshalYAML(scalarNode(in)); err != nil {
			t.Fatalf("%s: %v", in, err)
		}
		if got := d.String(); got != want {
			t.Errorf("%s: got %s, want %s", in, got, want)
		}
	}
}
