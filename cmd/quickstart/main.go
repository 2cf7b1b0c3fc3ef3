// Command quickstart runs kas on one machine with everything it needs: kas in
// standalone mode on its default ports (agents and tokens from
// testdata/standalone), an agentk connected to it, and a sample Kubernetes API
// server (internal/fakekube) standing in for a cluster. The public listener
// serves HTTPS with a certificate made for the occasion, because kubectl only
// sends a token over TLS. It checks the path end to end the way kubectl
// would, prints curl and kubectl command lines that work, and runs until
// interrupted.
//
//	go run ./cmd/quickstart            # run until Ctrl-C
//	go run ./cmd/quickstart --check    # check once and exit (0 = works)
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

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
	dir := flag.String("dir", filepath.Join(os.TempDir(), "kas-quickstart"), "`directory` for the logs, the certificate and the kubeconfig")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *configFile, *dir, *check); err != nil {
		fmt.Fprintln(os.Stderr, "quickstart:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, configFile, dir string, check bool) error {
	cfg, err := config.Load(configFile, os.Getenv)
	if err != nil {
		return fmt.Errorf("load %s (run from the repository's top folder): %w", configFile, err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	files := quickstartFiles{
		log:        filepath.Join(dir, "kas.log"),
		cert:       filepath.Join(dir, "kas.crt"),
		key:        filepath.Join(dir, "kas.key"),
		kubeconfig: filepath.Join(dir, "kubeconfig"),
	}
	if err := writeCertificate(files.cert, files.key); err != nil {
		return err
	}
	cfg.Agent.Listen.CertificateFile, cfg.Agent.Listen.KeyFile = files.cert, files.key

	logOut, err := os.Create(files.log)
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

	roots, err := certPool(files.cert)
	if err != nil {
		return err
	}
	agentk, err := agent.New(agent.Options{
		KASAddress:   "wss://" + public,
		Token:        agentToken,
		TLS:          &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12},
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
		return fmt.Errorf("agentk did not connect to kas within 15s; see %s", files.log)
	case <-ctx.Done():
		return nil
	}

	proxyURL := "https://" + public + "/k8s-proxy"
	if err := writeKubeconfig(files.kubeconfig, proxyURL, files.cert); err != nil {
		return err
	}
	names, err := listNamespaces(ctx, files.kubeconfig)
	if err != nil {
		return fmt.Errorf("check the proxy as kubectl would: %w (logs: %s)", err, files.log)
	}
	fmt.Printf(`kas is running in standalone mode; agent "prod" (id 1) is connected to it.
  public listener:        https://%[1]s  (agents, Kubernetes API proxy; certificate %[2]s)
  observability listener: http://%[3]s  (metrics, readiness, status page)
  sample cluster API:     %[4]s
  logs:                   %[5]s

Checked: listing namespaces through the proxy as alice, with the kubeconfig below, found %[6]v.
Try it yourself:
  curl --cacert %[2]s -H "Authorization: Bearer %[7]s" %[8]s/api/v1/namespaces
  kubectl --kubeconfig %[9]s get namespaces
  kubectl --server %[8]s --certificate-authority %[2]s --token %[7]s get namespaces
  curl http://%[3]s/readiness
`, public, files.cert, observability, clusterURL, files.log, names, userPAT, proxyURL, files.kubeconfig)

	if check {
		cancel()
	} else {
		fmt.Println("\nPress Ctrl-C to stop.")
	}
	return errors.Join(<-agentDone, <-kasDone)
}

type quickstartFiles struct {
	log, cert, key, kubeconfig string
}

// listNamespaces loads the kubeconfig with client-go's clientcmd — the
// loader kubectl uses — and lists namespaces through the proxy.
func listNamespaces(ctx context.Context, kubeconfig string) ([]string, error) {
	restConfig, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("load kubeconfig %s: %w", kubeconfig, err)
	}
	client, err := kubernetes.NewForConfig(restConfig)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	list, err := client.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	names := make([]string, 0, len(list.Items))
	for _, ns := range list.Items {
		names = append(names, ns.Name)
	}
	return names, nil
}

func writeKubeconfig(path, server, caFile string) error {
	content := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: kas-quickstart
  cluster:
    server: %s
    certificate-authority: %s
users:
- name: alice
  user:
    token: %s
contexts:
- name: kas-quickstart
  context: {cluster: kas-quickstart, user: alice}
current-context: kas-quickstart
`, server, caFile, userPAT)
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		return fmt.Errorf("write kubeconfig: %w", err)
	}
	return nil
}

// writeCertificate makes a self-signed certificate for 127.0.0.1 and
// localhost, valid for a week: it is its own CA for curl and kubectl.
func writeCertificate(certFile, keyFile string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generate key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		return fmt.Errorf("generate serial: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "kas quickstart"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(7 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return fmt.Errorf("create certificate: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("encode key: %w", err)
	}
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return fmt.Errorf("write certificate: %w", err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return fmt.Errorf("write key: %w", err)
	}
	return nil
}

func certPool(certFile string) (*x509.CertPool, error) {
	pemBytes, err := os.ReadFile(certFile)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", certFile, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pemBytes) {
		return nil, fmt.Errorf("%s holds no certificate", certFile)
	}
	return pool, nil
}
