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
	api := newAPIServer(&testing.T{}, map[string]http.HandlerFunc{
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
	defer api.Close()
	t := &testing.T{}
	_, kas := connect(t, api, nil)
	defer kas.close()

	b.Run("download", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			resp, err := kas.cc.RoundTrip(newRequest(t, http.MethodGet, "/download", nil, nil))
			if err != nil {
				b.Fatal(err)
			}
			n, err := io.Copy(io.Discard, resp.Body)
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
			resp, err := kas.cc.RoundTrip(newRequest(t, http.MethodPut, "/upload", body, nil))
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
