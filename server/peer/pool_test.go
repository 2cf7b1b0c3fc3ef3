package peer

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

func TestConnPoolReusesAndClosesIdleConnections(t *testing.T) {
	gauge := prometheus.NewGauge(prometheus.GaugeOpts{Name: "test"})
	p := newConnPool(newTokenSource(testSecret), nil, "", gauge)
	now := time.Now()
	p.now = func() time.Time { return now }

	first, err := p.get("grpc://127.0.0.1:1")
	if err != nil {
		t.Fatal(err)
	}
	again, err := p.get("grpc://127.0.0.1:1")
	if err != nil {
		t.Fatal(err)
	}
	if again != first {
		t.Fatal("a second call to the same URL made a second connection")
	}
	p.release(first)
	p.release(again)
	busy, err := p.get("grpc://127.0.0.1:2")
	if err != nil {
		t.Fatal(err)
	}

	now = now.Add(idleConnTimeout + time.Second)
	if _, err := p.get("grpc://127.0.0.1:3"); err != nil {
		t.Fatal(err)
	}
	if _, ok := p.conns["grpc://127.0.0.1:1"]; ok {
		t.Error("idle connection kept")
	}
	if _, ok := p.conns[busy.url]; !ok {
		t.Error("connection in use closed")
	}
	if got := counterValue(gauge); got != 2 {
		t.Errorf("gauge = %v, want 2", got)
	}

	if err := p.close(); err != nil {
		t.Fatal(err)
	}
	if _, err := p.get("grpc://127.0.0.1:1"); err == nil {
		t.Fatal("get after close succeeded")
	}
	if got := counterValue(gauge); got != 0 {
		t.Errorf("gauge after close = %v, want 0", got)
	}
}

func TestConnPoolRefusesBadURLs(t *testing.T) {
	p := newConnPool(newTokenSource(testSecret), nil, "", prometheus.NewGauge(prometheus.GaugeOpts{Name: "test"}))
	defer p.close()
	tests := []struct{ url, wantErr string }{
		{"grpc://10.0.0.1", "want grpc://host:port"},
		{"grpc://10.0.0.1:8155/path", "want grpc://host:port"},
		{"grpc://user@10.0.0.1:8155", "want grpc://host:port"},
		{"https://10.0.0.1:8155", "scheme must be grpc or grpcs"},
		{"grpc://[::1", "kas node URL"},
	}
	for _, tt := range tests {
		t.Run(tt.url, func(t *testing.T) {
			_, err := p.get(tt.url)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("get(%q) = %v, want an error containing %q", tt.url, err, tt.wantErr)
			}
		})
	}
}
