package peer

import (
	"context"
	"testing"
	"time"
)

func TestProbe(t *testing.T) {
	a := newNode(t, nodeConfig{})
	b := newNode(t, nodeConfig{})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := a.router.Probe(ctx, b.url); err != nil {
		t.Fatalf("probe a live node: %v", err)
	}
	short, cancelShort := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancelShort()
	if err := a.router.Probe(short, closedURL(t)); err == nil {
		t.Fatal("probe of a URL nothing listens on succeeded")
	}
	if err := a.router.Probe(ctx, "http://not-grpc"); err == nil {
		t.Fatal("probe of a non-gRPC URL succeeded")
	}
}
