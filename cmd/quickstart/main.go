// Command quickstart runs kas on one machine with everything it needs: kas in
// standalone mode on its default ports (agents and tokens from
// testdata/standalone), an agentk connected to it, and a sample Kubernetes API
// server (internal/fakekube) standing in for a cluster. It checks the path
// end to end, prints curl and kubectl command lines that work, and runs until
// interrupted.
//
//	go run ./cmd/quickstart            # run until Ctrl-C
//	go run ./cmd/quickstart --check    # check once and exit (0 = works)
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"k8s.io/client-go/rest"

	"github.com/kasproject/kas/agent"
	"github.com/kasproject/kas/internal/fakekube"
	"github.com/kasproject/kas/server"
	"github.com/kasproject/kas/server/config"
	"github.com/kasproject/kas/server/logging"
)

// The demo credentials of testdata/standalone/README.md.
const (
	agentToken = "glagent-demo-prod-7b3f9c2e1a5d4f60"
	userPAT    = "pat:1:glpat-demo-alice-4f8a2c91e7"
)

func main() {
	configFile := flag.String("configuration-file", "testdata/quickstart/kas.yaml", "kas configuration `file`")
	check := flag.Bool("check", false, "check the proxy once and exit instead of running until interrupted")
	logFile := flag.String("log-file", filepath.Join(os.TempDir(), "kas-quickstart.log"), "where kas and agentk write their JSON logs")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *configFile, *logFile, *check); err != nil {
		fmt.Fprintln(os.Stderr, "quickstart:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, configFile, logFile string, check bool) error {
	cfg, err := config.Load(configFile, os.Getenv)
	if err != nil {
		return fmt.Errorf("load %s (run from the repository's top folder): %w", configFile, err)
	}
	logOut, err := os.Create(logFile)
	if err != nil {
		return fmt.Errorf("create log file: %w", err)
	}
	defer logOut.Close()
	log := logging.New(logOut, slog.LevelInfo, nil)

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	// The sample cluster: a fake kube-apiserver on a free loopback port.
	cluster := &http.Server{Handler: fakekube.New(), ReadHeaderTimeout: 10 * time.Second}
	clusterLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("listen for the sample cluster API: %w", err)
	}
	go func() { _ = cluster.Serve(clusterLn) }()
	defer cluster.Close()
	clusterURL := "http://" + clusterLn.Addr().String()

	kas, err := server.New(cfg, server.Options{Logger: log.With("component", "kas"), Version: "quickstart"})
	if err != nil {
		return fmt.Errorf("build kas: %w", err)
	}
	kasDone := make(chan error, 1)
	go func() { kasDone <- kas.Run(ctx) }()
	select {
	case <-kas.Ready():
	case err := <-kasDone:
		return fmt.Errorf("start kas: %w", err)
	}
	public := kas.Addr("agent.listen").String()
	observability := kas.Addr("observability.listen").String()

	agentk, err := agent.New(agent.Options{
		KASAddress:   "ws://" + public,
		Token:        agentToken,
		RESTConfig:   &rest.Config{Host: clusterURL},
		Logger:       log.With("component", "agentk"),
		AgentVersion: "quickstart",
		PodName:      "agentk-quickstart",
		PodNamespace: "gitlab-agent",
	})
	if err != nil {
		return fmt.Errorf("build agentk: %w", err)
	}
	agentDone := make(chan error, 1)
	go func() { agentDone <- agentk.Run(ctx) }()
	select {
	case <-agentk.Connected():
	case <-time.After(15 * time.Second):
		return fmt.Errorf("agentk did not connect to kas within 15s; see %s", logFile)
	case <-ctx.Done():
		return nil
	}

	proxyURL := "http://" + public + "/k8s-proxy"
	body, err := get(ctx, proxyURL+"/api/v1/namespaces", userPAT)
	if err != nil {
		return fmt.Errorf("check the proxy: %w (logs: %s)", err, logFile)
	}
	fmt.Printf(`kas is running in standalone mode; agent "prod" (id 1) is connected to it.
  public listener:        %[1]s  (agents, Kubernetes API proxy)
  observability listener: %[2]s  (metrics, readiness, status page)
  sample cluster API:     %[3]s
  logs:                   %[4]s

Checked: GET /api/v1/namespaces through the proxy as alice answered:
  %[5]s
Try it yourself:
  curl -H "Authorization: Bearer %[6]s" %[7]s/api/v1/namespaces
  kubectl --server %[7]s --token %[6]s get namespaces
  curl http://%[2]s/readiness
`, public, observability, clusterURL, logFile, truncate(body, 160), userPAT, proxyURL)

	if check {
		cancel()
	} else {
		fmt.Println("\nPress Ctrl-C to stop.")
	}
	return errors.Join(<-agentDone, <-kasDone)
}

func get(ctx context.Context, url, token string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("%s answered %s: %s", url, resp.Status, b)
	}
	return string(b), nil
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}
