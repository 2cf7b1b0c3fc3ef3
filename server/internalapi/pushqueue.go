package internalapi

import (
	"context"
	"log/slog"
	"runtime/debug"
	"sync"
)

// pushQueue hands git push events to the notifier on its own goroutines,
// so GitPushEvent answers at once however slow the notifier is.
//
// Pushes coalesce by project: while a project waits, more pushes to it
// only update its path, so a burst of pushes to one project is one
// refetch. A push that arrives while the project's notification runs
// queues it again, because that refetch may have read the repository
// before the push. When maxPending distinct projects wait, pushes to
// further projects are dropped with a warning; their agents still pick
// the change up at the next configuration poll.
type pushQueue struct {
	notify     PushNotifier
	log        *slog.Logger
	maxPending int

	mu      sync.Mutex
	pending map[int64]string // project ID → latest full path
	closed  bool
	// ready carries each pending project's ID once; its capacity is
	// maxPending, so sends (made with mu held, after checking the bound)
	// never block.
	ready chan int64

	ctx    context.Context // cancelled by close; given to notify
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

func newPushQueue(notify PushNotifier, maxPending, workers int, log *slog.Logger) *pushQueue {
	ctx, cancel := context.WithCancel(context.Background())
	q := &pushQueue{
		notify:     notify,
		log:        log,
		maxPending: maxPending,
		pending:    make(map[int64]string),
		ready:      make(chan int64, maxPending),
		ctx:        ctx,
		cancel:     cancel,
	}
	q.wg.Add(workers)
	for range workers {
		go q.work()
	}
	return q
}

// enqueue records a push; it never blocks.
func (q *pushQueue) enqueue(projectID int64, projectPath string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return
	}
	if _, waiting := q.pending[projectID]; waiting {
		q.pending[projectID] = projectPath
		return
	}
	if len(q.pending) >= q.maxPending {
		q.log.Warn("Git push notification dropped: too many projects waiting; their agents get the change at the next configuration poll",
			"project_id", projectID, "project_path", projectPath, "waiting_projects", len(q.pending))
		return
	}
	q.pending[projectID] = projectPath
	q.ready <- projectID
}

func (q *pushQueue) work() {
	defer q.wg.Done()
	for {
		select {
		case <-q.ctx.Done():
			return
		case id := <-q.ready:
			if q.ctx.Err() != nil {
				return // closing: select picked ready over Done
			}
			q.mu.Lock()
			path := q.pending[id]
			delete(q.pending, id)
			q.mu.Unlock()
			q.deliver(id, path)
		}
	}
}

// deliver calls the notifier; a panic in it is logged and the worker
// goes on with the next project.
func (q *pushQueue) deliver(projectID int64, projectPath string) {
	defer func() {
		if v := recover(); v != nil {
			q.log.Error("Git push notifier panicked", "project_id", projectID, "project_path", projectPath,
				"panic", v, "stack", string(debug.Stack()))
		}
	}()
	q.notify(q.ctx, projectID, projectPath)
}

// close stops the workers, cancelling the context running notifier calls
// got, and waits for them to return. Projects still waiting are dropped.
func (q *pushQueue) close() {
	q.mu.Lock()
	q.closed = true
	dropped := len(q.pending)
	q.mu.Unlock()
	q.cancel()
	q.wg.Wait()
	if dropped > 0 {
		q.log.Info("Git push notifications dropped at shutdown", "projects", dropped)
	}
}
