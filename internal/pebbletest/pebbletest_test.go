package pebbletest

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"net/http"
	"os"
	"strings"
	"testing"
)

// TestDirectoryThroughProxy checks that the directory served through the
// counting proxy names the proxy, so clients keep going through it, and
// that CAFile and Roots are usable.
func TestDirectoryThroughProxy(t *testing.T) {
	s := Start(t, Options{HTTPPort: FreePort(t), TLSPort: FreePort(t)})
	caPEM, err := os.ReadFile(s.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		t.Fatal("CAFile holds no certificate")
	}
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	defer client.CloseIdleConnections()
	resp, err := client.Get(s.DirectoryURL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var dir map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&dir); err != nil {
		t.Fatal(err)
	}
	base := strings.TrimSuffix(s.DirectoryURL, "/dir")
	newOrder, _ := dir["newOrder"].(string)
	if newOrder != base+"/order-plz" {
		t.Errorf("newOrder = %q, want %s/order-plz (through the proxy, at the path it counts)", newOrder, base)
	}
	if s.Orders() != 0 {
		t.Errorf("Orders = %d before any order", s.Orders())
	}
	_ = s.Roots(t)
}
