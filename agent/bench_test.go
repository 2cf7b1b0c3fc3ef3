package agent

import (
	"fmt"
	"io"
	"net/http"
	"strconv"
	"testing"
)

// BenchmarkTunnel moves 256 MiB bodies through kas stand-in ⇄ agent ⇄ fake
// API server on loopback; MB/s is the end-to-end rate.
func BenchmarkTunnel(b *testing.B) {
	const size = 256 << 20
	chunk := make([]byte, 1<<20)
	api := newAPIServer(b, map[string]http.HandlerFunc{
		"/download": func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Length", strconv.Itoa(size))
			for range size / len(chunk) {
				if _, err := w.Write(chunk); err != nil {
					return
				}
			}
		},
		"/upload": func(w http.ResponseWriter, r *http.Request) {
			n, _ := io.Copy(io.Discard, r.Body)
			_, _ = fmt.Fprint(w, n)
		},
	})
	_, kas := connect(b, api, nil)

	// kas copies with large buffers: every read of an HTTP/2 body sends a
	// WINDOW_UPDATE, so small reads cost a tunnel write each.
	buf := make([]byte, 1<<20)
	b.Run("download direct", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			resp, err := http.Get(api.URL + "/download")
			if err != nil {
				b.Fatal(err)
			}
			n, err := io.CopyBuffer(onlyWriter{io.Discard}, resp.Body, buf)
			_ = resp.Body.Close()
			if err != nil || n != size {
				b.Fatalf("downloaded %d bytes: %v", n, err)
			}
		}
	})
	b.Run("download", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			resp, err := kas.cc.RoundTrip(newRequest(b, http.MethodGet, "/download", nil, nil))
			if err != nil {
				b.Fatal(err)
			}
			n, err := io.CopyBuffer(onlyWriter{io.Discard}, resp.Body, buf)
			_ = resp.Body.Close()
			if err != nil || n != size {
				b.Fatalf("downloaded %d bytes: %v", n, err)
			}
		}
	})
	b.Run("upload", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			body := io.LimitReader(zeroReader{}, size)
			resp, err := kas.cc.RoundTrip(newRequest(b, http.MethodPut, "/upload", body, nil))
			if err != nil {
				b.Fatal(err)
			}
			got, _ := io.ReadAll(resp.Body)
			_ = resp.Body.Close()
			if string(got) != strconv.Itoa(size) {
				b.Fatalf("API server received %s bytes", got)
			}
		}
	})
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// onlyWriter hides io.Discard's ReadFrom, which reads in 8 KiB pieces.
type onlyWriter struct{ io.Writer }
