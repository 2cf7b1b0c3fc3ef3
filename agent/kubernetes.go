package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"

	"k8s.io/apimachinery/pkg/version"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// LoadRESTConfig builds the agent's Kubernetes client configuration: the
// in-cluster service account when neither kubeconfig nor contextName is given
// and KUBERNETES_SERVICE_HOST is set, otherwise the kubeconfig at path (or
// the usual $KUBECONFIG / ~/.kube/config) with contextName (or its current
// context).
func LoadRESTConfig(kubeconfig, contextName string) (*rest.Config, error) {
	if kubeconfig == "" && contextName == "" && os.Getenv("KUBERNETES_SERVICE_HOST") != "" {
		cfg, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("load in-cluster Kubernetes configuration: %w", err)
		}
		return cfg, nil
	}
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = kubeconfig
	cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules,
		&clientcmd.ConfigOverrides{CurrentContext: contextName}).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("load kubeconfig (pass --kubeconfig, or run in a cluster): %w", err)
	}
	return cfg, nil
}

// setUpAPIServer prepares the transports and reverse proxy that reach the API
// server with the agent's own credentials.
func (a *Agent) setUpAPIServer(cfg *rest.Config) error {
	cfg = rest.CopyConfig(cfg)
	// Pass the caller's Accept-Encoding through untouched rather than have
	// the transport ask for gzip and decompress behind the caller's back.
	cfg.DisableCompression = true
	u, _, err := rest.DefaultServerUrlFor(cfg)
	if err != nil {
		return fmt.Errorf("Kubernetes API server address %q: %w", cfg.Host, err)
	}
	a.apiServer = u
	// Upgrades need HTTP/1.1: SPDY cannot run over HTTP/2, and an HTTP/2
	// connection cannot be switched to another protocol.
	h1 := rest.CopyConfig(cfg)
	h1.NextProtos = []string{"http/1.1"}
	shared, err := usesDefaultTransport(cfg)
	if err != nil {
		return fmt.Errorf("TLS settings for the Kubernetes API server: %w", err)
	}
	if shared {
		cfg.Transport = newPlainAPITransport()
	}
	if a.apiTransport, err = rest.TransportFor(cfg); err != nil {
		return fmt.Errorf("build the Kubernetes API client: %w", err)
	}
	if a.upgradeTransport, err = rest.TransportFor(h1); err != nil {
		return fmt.Errorf("build the Kubernetes API client for upgrades: %w", err)
	}
	a.bulkProxy = newReverseProxy(a, a.bulkBuffers)
	a.streamProxy = newReverseProxy(a, a.streamBuffers)
	return nil
}

// usesDefaultTransport reports whether client-go would send cfg's requests
// through the process-wide http.DefaultTransport: a configuration with no TLS
// settings, dialer or proxy of its own (an http:// API server, or https://
// trusted through the system roots).
func usesDefaultTransport(cfg *rest.Config) (bool, error) {
	if cfg.Transport != nil || cfg.Dial != nil || cfg.Proxy != nil {
		return false, nil
	}
	tlsConfig, err := rest.TLSConfigFor(cfg)
	return tlsConfig == nil, err
}

// newPlainAPITransport replaces http.DefaultTransport for the API server.
// The default keeps two idle connections per host: with more requests in
// flight over HTTP/1.1, every answer closes a connection and the next request
// dials a new one. This one keeps as many as the tunnel has streams.
func newPlainAPITransport() *http.Transport {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.MaxIdleConns = maxConcurrentStreams
	t.MaxIdleConnsPerHost = maxConcurrentStreams
	t.DisableCompression = true // as client-go would for cfg.DisableCompression
	return t
}

// kubernetesVersionTimeout bounds the start-up query; the version only
// informs kas, so the agent does not wait long for it.
const kubernetesVersionTimeout = 5 * time.Second

// kubernetesVersion asks the API server for its version, best effort: a
// failure is logged and yields "".
func (a *Agent) kubernetesVersion(ctx context.Context) string {
	ctx, cancel := context.WithTimeout(ctx, kubernetesVersionTimeout)
	defer cancel()
	v, err := a.fetchKubernetesVersion(ctx)
	if err != nil {
		a.logger.Warn("could not read the Kubernetes version; kas will not be told it", "error", err.Error())
		return ""
	}
	return v
}

func (a *Agent) fetchKubernetesVersion(ctx context.Context) (string, error) {
	u := a.apiServer.JoinPath("/version")
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return "", fmt.Errorf("request %s: %w", u.Redacted(), err)
	}
	resp, err := (&http.Client{Transport: a.apiTransport}).Do(req)
	if err != nil {
		return "", fmt.Errorf("get %s: %w", u.Redacted(), err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("get %s: HTTP %d", u.Redacted(), resp.StatusCode)
	}
	var info version.Info
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&info); err != nil {
		return "", fmt.Errorf("decode %s: %w", u.Redacted(), err)
	}
	return info.GitVersion, nil
}
