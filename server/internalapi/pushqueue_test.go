package internalapi

import (
	"bytes"
	"context"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// syncBuffer is a log destination the workers and the test share.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func TestPushQueueCoalescesByProjectAndBounds(t *testing.T) {
	var (
		mu        sync.Mutex
		delivered []push
	)
	running := make(chan struct{})
	release := make(chan struct{})
	notify := func(_ context.Context, projectID int64, path string) {
		if projectID == 1 && path == "first" {
			close(running)
			<-release
		}
		if projectID == 5 {
			panic("notifier bug")
		}
		mu.Lock()
		delivered = append(delivered, push{projectID, path})
		mu.Unlock()
	}
	var logs syncBuffer
	q := newPushQueue(notify, 3, 1, slog.New(slog.NewTextHandler(&logs, nil)))
	defer q.close()

	q.enqueue(1, "first")
	<-running // the only worker is busy with project 1
	q.enqueue(2, "old/path")
	q.enqueue(2, "new/path") // coalesces, keeping the latest path
	q.enqueue(2, "new/path")
	q.enqueue(3, "c")
	q.enqueue(1, "again") // project 1 again: its running refetch may predate this push
	q.enqueue(4, "d")     // three projects wait: dropped
	close(release)
	waitDelivered(t, &mu, &delivered, []push{{1, "first"}, {2, "new/path"}, {3, "c"}, {1, "again"}})

	q.enqueue(5, "panics")
	q.enqueue(6, "after the panic")
	waitDelivered(t, &mu, &delivered, []push{{1, "first"}, {2, "new/path"}, {3, "c"}, {1, "again"}, {6, "after the panic"}})
	for _, want := range []string{"Git push notification dropped", "project_id=4", "Git push notifier panicked"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, logs.String())
		}
	}
}

// waitDelivered waits until *delivered holds as many pushes as want and
// checks they are want.
func waitDelivered(t *testing.T, mu *sync.Mutex, delivered *[]push, want []push) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		mu.Lock()
		got := slices.Clone(*delivered)
		mu.Unlock()
		if len(got) >= len(want) || time.Now().After(deadline) {
			if !slices.Equal(got, want) {
				t.Fatalf("delivered %v, want %v", got, want)
			}
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
}
