package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"runtime"
	"slices"
	"testing"
)

const (
	// bodySize is the size of the bodies streamed each way.
	bodySize = 64 << 20
	// heapBudget is how much more live heap the whole path (client, kas,
	// agentk, cluster: all in this process) may hold while a body streams.
	// HTTP/2 flow control lets a few MiB be in flight per hop; a hop that
	// buffers the body holds all of it.
	heapBudget = bodySize / 4
	// checkEvery is how often, in bytes moved, the live heap is measured.
	checkEvery = 8 << 20
)

// heapProbe measures how far the live heap grows above where it started.
// Live heap (HeapAlloc right after a collection) rather than HeapInuse or
// process memory, so garbage waiting for the collector does not count, and
// a buffered body, which is live until it has been sent, does.
type heapProbe struct {
	base, peak uint64
}

func newHeapProbe() *heapProbe {
	p := &heapProbe{}
	p.base = liveHeap()
	return p
}

func liveHeap() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

func (p *heapProbe) check() {
	if h := liveHeap(); h > p.base {
		p.peak = max(p.peak, h-p.base)
	}
}

// meteredBody is an upload of n bytes that measures the heap as it is read.
type meteredBody struct {
	left, sinceCheck int
	probe            *heapProbe
}

func (b *meteredBody) Read(p []byte) (int, error) {
	if b.left == 0 {
		return 0, io.EOF
	}
	n := min(len(p), b.left, checkEvery-b.sinceCheck)
	clear(p[:n])
	b.left -= n
	if b.sinceCheck += n; b.sinceCheck == checkEvery {
		b.sinceCheck = 0
		b.probe.check()
	}
	return n, nil
}

// Not parallel: the heap is the whole process's, so nothing else may run.
func TestLargeBodiesStreamWithBoundedMemory(t *testing.T) {
	e := newEnv(t, nil)
	e.startAgent(t, asAgent)
	cred := pat(asAgent.id, alicePAT)

	t.Run("download", func(t *testing.T) {
		probe := newHeapProbe()
		resp := e.do(t, http.MethodGet, fmt.Sprintf("/bytes?size=%d&chunked=true", bodySize), cred, nil, nil)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("got %s", resp.Status)
		}
		if !slices.Equal(resp.TransferEncoding, []string{"chunked"}) {
			t.Errorf("Transfer-Encoding %v, want the cluster's chunked stream passed on as one", resp.TransferEncoding)
		}
		var got int64
		for {
			n, err := io.CopyN(io.Discard, resp.Body, checkEvery)
			got += n
			probe.check()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("after %d bytes: %v", got, err)
			}
		}
		if got != bodySize {
			t.Fatalf("received %d bytes, want %d", got, bodySize)
		}
		t.Logf("live heap grew by at most %.1f MiB while %d MiB streamed", float64(probe.peak)/(1<<20), bodySize>>20)
		if probe.peak > heapBudget {
			t.Fatalf("live heap grew by %d MiB while a %d MiB body streamed: something buffers it", probe.peak>>20, bodySize>>20)
		}
	})

	t.Run("upload", func(t *testing.T) {
		probe := newHeapProbe()
		// Of unknown length, the body goes out chunked.
		resp := e.do(t, http.MethodPost, "/bytes", cred, nil, &meteredBody{left: bodySize, probe: probe})
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("got %s", resp.Status)
		}
		var counted struct{ Bytes int64 }
		if err := json.NewDecoder(resp.Body).Decode(&counted); err != nil {
			t.Fatal(err)
		}
		if counted.Bytes != bodySize {
			t.Fatalf("the cluster received %d bytes, want %d", counted.Bytes, bodySize)
		}
		got, _ := e.kube.LastRequest("/bytes")
		if got.Method != http.MethodPost {
			t.Fatalf("the cluster saw %s, want POST", got.Method)
		}
		t.Logf("live heap grew by at most %.1f MiB while %d MiB streamed", float64(probe.peak)/(1<<20), bodySize>>20)
		if probe.peak > heapBudget {
			t.Fatalf("live heap grew by %d MiB while a %d MiB body streamed: something buffers it", probe.peak>>20, bodySize>>20)
		}
	})
}
