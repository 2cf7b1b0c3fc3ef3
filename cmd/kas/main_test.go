package main

import (
	"bytes"
	"encoding/base64"
	"strings"
	"testing"

	"github.com/kasproject/kas/server/config"
	"github.com/kasproject/kas/server/kasjwt"
)

func TestCommands(t *testing.T) {
	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantStdout []string
		wantStderr []string
	}{
		{name: "version", args: []string{"version"}, wantStdout: []string{"kas 0.0.0-dev"}}, // go test records no version
		{name: "help", args: []string{"help"}, wantStdout: []string{"kas config check", "kas secret generate", "kas token"}},
		{name: "unknown command", args: []string{"frobnicate"}, wantCode: exitUsage, wantStderr: []string{`unknown command "frobnicate"`}},
		{name: "config without check", args: []string{"config"}, wantCode: exitUsage, wantStderr: []string{"usage: kas config check"}},
		{
			name: "config check valid", args: []string{"config", "check", "--configuration-file", "../../testdata/config/valid.yaml"},
			wantStdout: []string{"agent:", "32-byte secret (redacted)"}, wantStderr: []string{"is valid"},
		},
		{
			name: "config check invalid lists every problem", args: []string{"config", "check", "--configuration-file", "../../testdata/config/invalid.yaml"},
			wantCode: 1,
			wantStderr: []string{
				"is not valid", "gitlab.address", "gitlab.authentication_secret_file", "decodes to 31 bytes",
				"agent.listen.netwrk", "did you mean agent.listen.network", "agent.listen.address",
				"agent.listen.ping_timeout", "agent.listen.max_connection_age", "observability.logging.level", "privat_api",
			},
		},
		{name: "config check missing file", args: []string{"config", "check", "--configuration-file", "nope.yaml"}, wantCode: 1, wantStderr: []string{"nope.yaml"}},
		{name: "secret generate extra args", args: []string{"secret", "generate", "x"}, wantCode: exitUsage},
		{name: "token without flags", args: []string{"token"}, wantCode: exitUsage, wantStderr: []string{"--secret-file is required", "--audience is required"}},
		{
			name: "token with short secret", args: []string{"token", "--secret-file", "../../testdata/config/short-secret", "--audience", "gitlab-kas"},
			wantCode: 1, wantStderr: []string{"31 bytes"},
		},
		{name: "run with bad flag", args: []string{"run", "--no-such-flag"}, wantCode: exitUsage},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(tc.args, &stdout, &stderr)
			if code != tc.wantCode {
				t.Errorf("exit code %d, want %d\nstdout: %s\nstderr: %s", code, tc.wantCode, &stdout, &stderr)
			}
			for _, w := range tc.wantStdout {
				if !strings.Contains(stdout.String(), w) {
					t.Errorf("stdout lacks %q:\n%s", w, &stdout)
				}
			}
			for _, w := range tc.wantStderr {
				if !strings.Contains(stderr.String(), w) {
					t.Errorf("stderr lacks %q:\n%s", w, &stderr)
				}
			}
		})
	}
}

func TestSecretGenerate(t *testing.T) {
	seen := map[string]bool{}
	for range 3 {
		var stdout, stderr bytes.Buffer
		if code := run([]string{"secret", "generate"}, &stdout, &stderr); code != 0 {
			t.Fatalf("exit %d: %s", code, &stderr)
		}
		s := strings.TrimSpace(stdout.String())
		b, err := base64.StdEncoding.DecodeString(s)
		if err != nil || len(b) != 32 {
			t.Fatalf("%q decodes to %d bytes (%v), want 32", s, len(b), err)
		}
		if seen[s] {
			t.Fatal("the same secret twice")
		}
		seen[s] = true
	}
}

func TestTokenVerifies(t *testing.T) {
	const secretFile = "../../testdata/config/api-secret"
	var stdout, stderr bytes.Buffer
	code := run([]string{"token", "--secret-file", secretFile, "--audience", kasjwt.AudienceKAS, "--ttl", "1m"}, &stdout, &stderr)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, &stderr)
	}
	secret, err := config.ReadSecretFile(secretFile)
	if err != nil {
		t.Fatal(err)
	}
	tok := strings.TrimSpace(stdout.String())
	if err := kasjwt.Verify(secret, tok, kasjwt.AudienceKAS, ""); err != nil {
		t.Fatalf("minted token does not verify: %v", err)
	}
	if err := kasjwt.Verify(secret, tok, kasjwt.AudienceGitLab, ""); err == nil {
		t.Fatal("minted token verifies for another audience")
	}
}

// TestTokenRefusesLongLifetimes: kas's APIs refuse tokens valid for more
// than kasjwt.MaxAPILifetime, so kas token does not mint them.
func TestTokenRefusesLongLifetimes(t *testing.T) {
	var stdout, stderr bytes.Buffer
	code := run([]string{"token", "--secret-file", "../../testdata/config/api-secret", "--audience", kasjwt.AudienceKAS, "--ttl", "1h"}, &stdout, &stderr)
	if code != exitUsage || stdout.Len() != 0 || !strings.Contains(stderr.String(), "longer than the 5m0s") {
		t.Fatalf("exit %d, stdout %q, stderr %q; want a usage error naming the bound", code, &stdout, &stderr)
	}
}
