package protocol

import (
	"bytes"
	"errors"
	"io"
	"testing"
	"testing/iotest"
)

// countingBody records the sizes of the reads made on it.
type countingBody struct {
	r      io.Reader
	reads  []int
	closed bool
}

func (b *countingBody) Read(p []byte) (int, error) {
	b.reads = append(b.reads, len(p))
	return b.r.Read(p)
}

func (b *countingBody) Close() error { b.closed = true; return nil }

func TestBulkBodies(t *testing.T) {
	data := make([]byte, 3*BulkReadSize+123)
	for i := range data {
		data[i] = byte(i * 31)
	}
	errBroken := errors.New("tunnel broke")
	tests := []struct {
		name          string
		contentLength int64
		body          io.Reader
		readSize      int
		wantWrapped   bool
		wantData      []byte
		wantErr       error
		wantMaxReads  int // reads on the underlying body, at most
	}{
		{"small bodies pass through", BulkReadSize - 1, bytes.NewReader(data[:100]), 32 << 10, false, data[:100], nil, 2},
		{"open-ended bodies pass through", -1, bytes.NewReader(data), 32 << 10, false, data, nil, len(data)/(32<<10) + 2},
		{"large bodies are read in bulk", int64(len(data)), bytes.NewReader(data), 32 << 10, true, data, nil, 5},
		{"one byte at a time from below", int64(len(data)), iotest.OneByteReader(bytes.NewReader(data[:5000])), 32 << 10, true, data[:5000], nil, 5001},
		{"large reads go straight through", int64(len(data)), bytes.NewReader(data), BulkReadSize, true, data, nil, 5},
		{"data before an error is delivered", int64(len(data)), io.MultiReader(bytes.NewReader(data[:1000]), iotest.ErrReader(errBroken)), 32 << 10, true, data[:1000], errBroken, 3},
		{"data and EOF together", int64(len(data)), iotest.DataErrReader(bytes.NewReader(data)), 32 << 10, true, data, nil, len(data)},
	}
	var bodies BulkBodies
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			under := &countingBody{r: tt.body}
			rc := bodies.Wrap(under, tt.contentLength)
			if wrapped := rc != io.ReadCloser(under); wrapped != tt.wantWrapped {
				t.Fatalf("wrapped %v, want %v", wrapped, tt.wantWrapped)
			}
			var got bytes.Buffer
			buf := make([]byte, tt.readSize)
			var err error
			for {
				var n int
				n, err = rc.Read(buf)
				got.Write(buf[:n])
				if err != nil {
					break
				}
			}
			if tt.wantErr == nil && err != io.EOF || tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Errorf("ended with %v, want %v", err, tt.wantErr)
			}
			if !bytes.Equal(got.Bytes(), tt.wantData) {
				t.Errorf("read %d bytes, want %d (or different content)", got.Len(), len(tt.wantData))
			}
			if len(under.reads) > tt.wantMaxReads {
				t.Errorf("%d reads on the body, want at most %d", len(under.reads), tt.wantMaxReads)
			}
			if err := rc.Close(); err != nil || !under.closed {
				t.Errorf("Close: %v, body closed %v", err, under.closed)
			}
		})
	}
}

func TestBulkBodiesNil(t *testing.T) {
	var bodies BulkBodies
	if rc := bodies.Wrap(nil, 1<<30); rc != nil {
		t.Errorf("Wrap(nil) = %v, want nil", rc)
	}
}
