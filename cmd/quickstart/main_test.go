package main

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestQuickstartChecks runs the quick start once, on free ports, and
// relies on its own end-to-end check: kubeconfig → HTTPS proxy → agentk →
// sample cluster.
func TestQuickstartChecks(t *testing.T) {
	dir := t.TempDir()
	example, err := filepath.Abs("../../testdata/standalone/example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "kas.yaml")
	content := "standalone:\n  file: " + example + "\n" +
		"agent:\n  listen:\n    address: 127.0.0.1:0\n" +
		"observability:\n  listen:\n    address: 127.0.0.1:0\n" +
		"api:\n  listen:\n    address: 127.0.0.1:0\n"
	if err := os.WriteFile(cfg, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := run(ctx, cfg, dir, true); err != nil {
		t.Fatalf("quick start failed: %v", err)
	}
	for _, f := range []string{"kas.crt", "kas.key", "kubeconfig", "kas.log"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Errorf("quick start left no %s: %v", f, err)
		}
	}
}
