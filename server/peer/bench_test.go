package peer

import (
	"context"
	"io"
	"net/http"
	"runtime"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// BenchmarkForward compares a request through a local tunnel with the same
// request forwarded to the node holding the tunnel (one private API hop),
// both nodes and the agent in this process.
func BenchmarkForward(b *testing.B) {
	a := newNode(b, nodeConfig{})
	tb := newNode(b, nodeConfig{})
	tb.connectAgent(b, 1, newTestAgent("b"))
	a.reg.setRemote([]string{tb.url})
	routes := []struct {
		name string
		node *node
	}{{"local", tb}, {"peer", a}}
	const streamSize = 4 << 20
	for _, route := range routes {
		rt, err := route.node.router.Route(context.Background(), 1)
		if err != nil {
			b.Fatal(err)
		}
		b.Run(route.name+"/small-64-concurrent", func(b *testing.B) {
			b.ReportAllocs()
			// RunParallel runs GOMAXPROCS × parallelism goroutines.
			b.SetParallelism(max(1, 64/runtime.GOMAXPROCS(0)))
			defer reportCPU(b)()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					get(b, rt, "http://agent/small")
				}
			})
		})
		client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
		b.Run(route.name+"/proxy-small-64-concurrent", func(b *testing.B) {
			b.ReportAllocs()
			b.SetParallelism(max(1, 64/runtime.GOMAXPROCS(0)))
			defer reportCPU(b)()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					get(b, client.Transport, route.node.proxy.URL+"/small")
				}
			})
		})
		b.Run(route.name+"/stream-4MiB", func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(streamSize)
			defer reportCPU(b)()
			for b.Loop() {
				get(b, rt, "http://agent/bytes?n="+strconv.Itoa(streamSize))
			}
		})
	}
}

func get(b *testing.B, rt http.RoundTripper, url string) {
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	resp, err := rt.RoundTrip(req)
	if err != nil {
		b.Error(err)
		return
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		b.Errorf("status %d, %v", resp.StatusCode, err)
	}
}

// reportCPU reports the process's CPU time per operation, which unlike
// wall time does not depend on what else the machine is running.
func reportCPU(b *testing.B) func() {
	start := cpuTime()
	return func() {
		b.ReportMetric(float64(cpuTime()-start)/float64(b.N), "cpu-ns/op")
	}
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
