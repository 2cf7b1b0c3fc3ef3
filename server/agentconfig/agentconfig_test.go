package agentconfig_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kasproject/kas/protocol"
	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server/agentconfig"
	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/gitlab/gitlabtest"
	"github.com/kasproject/kas/server/standalone"
)

var (
	_ agentconfig.Source = (*gitlab.Client)(nil)
	_ agentconfig.Source = (*standalone.Backend)(nil)
)

var secret = []byte("0123456789abcdef0123456789abcdef")

const (
	prodFile = ".gitlab/agents/prod/config.yaml"
	// prodRawPath is the repository files API path as the fake records it
	// (unescaped), for injecting failures.
	prodRawPath = "/api/v4/projects/100/repository/files/" + prodFile + "/raw"
	maxSize     = 1024
)

var prod = gitlab.AgentInfo{AgentID: 1, ProjectID: 100, AgentName: "prod", DefaultBranch: "main"}

// Configuration files and their JSON as GitLab receives it.
const (
	v1 = "ci_access:\n  projects:\n    - id: acme/app\n"
	j1 = `{"ci_access":{"projects":[{"id":"acme/app"}]}}`
	v2 = "user_access:\n  access_as: {agent: {}}\n  projects: [{id: acme/app}]\n"
	j2 = `{"user_access":{"access_as":{"agent":{}},"projects":[{"id":"acme/app"}]}}`
	// final marks the end of a scenario: once it reaches the agent, every
	// earlier fetch has been fully processed.
	final     = "observability:\n  logging: {level: debug}\n"
	finalJSON = `{"observability":{"logging":{"level":"debug"}}}`
	malformed = "ci_access:\n  projects:\n    - id: acme/app\n      acess_as: {agent: {}}\n"
)

// fakeTunnel is an agent connection that records the configurations it
// receives and checks that each is a proper internal request.
type fakeTunnel struct {
	t      *testing.T
	info   registry.TunnelInfo
	pushed chan string
	status int // the agent's answer; 0 means 204
}

func newFakeTunnel(t *testing.T, agentID, connectionID int64) *fakeTunnel {
	return &fakeTunnel{t: t, info: registry.TunnelInfo{AgentID: agentID, ConnectionID: connectionID}, pushed: make(chan string, 100)}
}

func (f *fakeTunnel) Info() registry.TunnelInfo { return f.info }

func (f *fakeTunnel) RoundTrip(req *http.Request) (*http.Response, error) {
	body, err := io.ReadAll(req.Body)
	if err != nil {
		return nil, err
	}
	if req.Method != http.MethodPost || req.URL.Path != protocol.ConfigurationPath || req.Header.Get(protocol.HeaderInternal) != "1" {
		f.t.Errorf("agent got %s %s with %s=%q, want POST %s with %s=1",
			req.Method, req.URL.Path, protocol.HeaderInternal, req.Header.Get(protocol.HeaderInternal), protocol.ConfigurationPath, protocol.HeaderInternal)
	}
	status := f.status
	if status == 0 {
		status = http.StatusNoContent
	}
	if status == http.StatusNoContent {
		f.pushed <- string(body)
	}
	return &http.Response{StatusCode: status, Status: http.StatusText(status), Body: io.NopCloser(strings.NewReader("agent says no"))}, nil
}

// next waits for the next configuration the agent accepts.
func (f *fakeTunnel) next(t *testing.T) string {
	t.Helper()
	select {
	case body := <-f.pushed:
		return body
	case <-time.After(5 * time.Second):
		t.Fatalf("connection %d got no configuration", f.info.ConnectionID)
		return ""
	}
}

// none checks that the agent got nothing more so far.
func (f *fakeTunnel) none(t *testing.T) {
	t.Helper()
	select {
	case body := <-f.pushed:
		t.Fatalf("connection %d got an unexpected configuration %q", f.info.ConnectionID, body)
	default:
	}
}

// countingSource counts finished fetches and can hold fetches at a gate.
type countingSource struct {
	agentconfig.Source
	gate    chan struct{} // if not nil, each fetch takes a value from it first
	started chan struct{} // receives a value when a fetch starts, if not nil

	mu                  sync.Mutex
	done                int
	inFlight, maxFlight int
	doneCh              chan struct{}
}

func newCountingSource(s agentconfig.Source) *countingSource {
	return &countingSource{Source: s, doneCh: make(chan struct{}, 1000)}
}

func (c *countingSource) GetRepositoryFile(ctx context.Context, projectID int64, ref, filePath string) ([]byte, error) {
	c.mu.Lock()
	c.inFlight++
	c.maxFlight = max(c.maxFlight, c.inFlight)
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.inFlight--
		c.done++
		c.mu.Unlock()
		c.doneCh <- struct{}{}
	}()
	if c.started != nil {
		c.started <- struct{}{}
	}
	if c.gate != nil {
		select {
		case <-c.gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return c.Source.GetRepositoryFile(ctx, projectID, ref, filePath)
}

// waitDone waits until n fetches have finished in all.
func (c *countingSource) waitDone(t *testing.T, n int) {
	t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		c.mu.Lock()
		done := c.done
		c.mu.Unlock()
		if done >= n {
			return
		}
		select {
		case <-c.doneCh:
		case <-deadline:
			t.Fatalf("%d fetches finished, want %d", done, n)
		}
	}
}

func (c *countingSource) fetches() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.done
}

// logSink collects JSON log records.
type logSink struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logSink) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logSink) records(t *testing.T, msg string) []map[string]any {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []map[string]any
	for line := range strings.Lines(l.buf.String()) {
		var r map[string]any
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		if r["msg"] == msg {
			out = append(out, r)
		}
	}
	return out
}

// fetchErrors returns the error attribute of every "Config: failed to fetch".
func (l *logSink) fetchErrors(t *testing.T) []string {
	t.Helper()
	var errs []string
	for _, r := range l.records(t, "Config: failed to fetch") {
		errs = append(errs, r["error"].(string))
	}
	return errs
}

// env is a fake GitLab with the prod agent's configuration project, a
// client for it, and a manager fetching through a countingSource.
type env struct {
	gitlab *gitlabtest.Server
	source *countingSource
	logs   *logSink
	mgr    *agentconfig.Manager
}

func newEnv(t *testing.T, modify func(*agentconfig.Options)) *env {
	t.Helper()
	srv := gitlabtest.New(t, secret, nil)
	client, err := gitlab.NewClient(gitlab.ClientOptions{BaseURL: srv.URL, Secret: secret, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(client.CloseIdleConnections)
	e := &env{gitlab: srv, source: newCountingSource(client), logs: &logSink{}}
	opts := agentconfig.Options{
		Source:                   e.source,
		Reporter:                 client,
		Logger:                   slog.New(slog.NewJSONHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		PollPeriod:               time.Hour,
		RetryPeriod:              10 * time.Millisecond,
		MaxConfigurationFileSize: maxSize,
	}
	if modify != nil {
		modify(&opts)
	}
	e.mgr, err = agentconfig.NewManager(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.mgr.Close)
	return e
}

// setFile writes the prod agent's configuration file; nil removes it.
func (e *env) setFile(content *string) {
	if content == nil {
		e.gitlab.SetRepositoryFile(prod.ProjectID, prod.DefaultBranch, prodFile, nil)
		return
	}
	e.gitlab.SetRepositoryFile(prod.ProjectID, prod.DefaultBranch, prodFile, []byte(*content))
}

// posted waits until GitLab has received n configurations and returns
// them as strings.
func (e *env) posted(t *testing.T, n int) []string {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := e.gitlab.Configurations()
		if len(got) >= n || time.Now().After(deadline) {
			out := make([]string, len(got))
			for i, c := range got {
				if c.AgentID != prod.AgentID {
					t.Errorf("configuration posted for agent %d, want %d", c.AgentID, prod.AgentID)
				}
				out[i] = string(c.AgentConfig)
			}
			return out
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func ptr(s string) *string { return &s }

func TestConfigurationVersions(t *testing.T) {
	large := "# " + strings.Repeat("x", maxSize) + "\n"
	notFound := `configuration file not found: ".gitlab/agents/prod/config.yaml"`
	tests := []struct {
		name string
		// files are the successive contents of the configuration file
		// (nil: missing): the agent connects with the first, and a git
		// push is reported for each of the others.
		files      []*string
		wantPushed []string // what the agent receives, in order
		wantPosted []string // what GitLab receives, in order
		wantErrors []string // "Config: failed to fetch" errors (prefixes)
	}{
		{
			name:       "found",
			files:      []*string{ptr(v1)},
			wantPushed: []string{v1},
			wantPosted: []string{j1},
		},
		{
			name:       "missing is an empty configuration",
			files:      []*string{nil},
			wantPushed: []string{""},
			wantPosted: []string{"{}"},
			wantErrors: []string{notFound},
		},
		{
			name:       "changed on push",
			files:      []*string{ptr(v1), ptr(v2)},
			wantPushed: []string{v1, v2},
			wantPosted: []string{j1, j2},
		},
		{
			name:       "unchanged is neither sent nor posted",
			files:      []*string{ptr(v1), ptr(v1)},
			wantPushed: []string{v1},
			wantPosted: []string{j1},
		},
		{
			name:       "a comment alone is no change",
			files:      []*string{ptr(v1), ptr("# reviewed\n" + v1)},
			wantPushed: []string{v1},
			wantPosted: []string{j1},
		},
		{
			name:       "malformed keeps the last good",
			files:      []*string{ptr(v1), ptr(malformed)},
			wantPushed: []string{v1},
			wantPosted: []string{j1},
			wantErrors: []string{`invalid configuration file ".gitlab/agents/prod/config.yaml": line 4: field acess_as not found`},
		},
		{
			name:       "too large keeps the last good",
			files:      []*string{ptr(v1), ptr(large)},
			wantPushed: []string{v1},
			wantPosted: []string{j1},
			wantErrors: []string{`configuration file ".gitlab/agents/prod/config.yaml" is 1027 bytes, more than agent.configuration.max_configuration_file_size (1024 bytes)`},
		},
		{
			name:       "malformed before any good one sends nothing",
			files:      []*string{ptr("ci_access: [\n")},
			wantErrors: []string{`invalid configuration file ".gitlab/agents/prod/config.yaml": line 1:`},
		},
		{
			name:       "removed becomes empty",
			files:      []*string{ptr(v1), nil},
			wantPushed: []string{v1, ""},
			wantPosted: []string{j1, "{}"},
			wantErrors: []string{notFound},
		},
		{
			name:       "missing twice is one empty configuration",
			files:      []*string{nil, nil},
			wantPushed: []string{""},
			wantPosted: []string{"{}"},
			wantErrors: []string{notFound, notFound},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, nil)
			agent := newFakeTunnel(t, prod.AgentID, 1)
			for i, content := range tt.files {
				e.setFile(content)
				if i == 0 {
					e.mgr.Connect(prod, agent)
				} else {
					e.mgr.NotifyPush(context.Background(), prod.ProjectID)
				}
				// The next file is written only after this fetch read the
				// repository, so every version is seen.
				e.source.waitDone(t, i+1)
			}
			e.setFile(ptr(final))
			e.mgr.NotifyPush(context.Background(), prod.ProjectID)

			var pushed []string
			for {
				body := agent.next(t)
				if body == final {
					break
				}
				pushed = append(pushed, body)
			}
			if !reflect.DeepEqual(pushed, tt.wantPushed) {
				t.Errorf("agent received %q, want %q", pushed, tt.wantPushed)
			}
			posted := e.posted(t, len(tt.wantPosted)+1)
			if want := append(tt.wantPosted, finalJSON); !reflect.DeepEqual(posted, want) {
				t.Errorf("GitLab received %q, want %q", posted, want)
			}
			errs := e.logs.fetchErrors(t)
			if len(errs) != len(tt.wantErrors) {
				t.Fatalf("fetch errors logged: %q, want %q", errs, tt.wantErrors)
			}
			for i := range errs {
				if !strings.HasPrefix(errs[i], tt.wantErrors[i]) {
					t.Errorf("fetch error %q, want it to start with %q", errs[i], tt.wantErrors[i])
				}
			}
		})
	}
}

func TestMissingFileLogLine(t *testing.T) {
	e := newEnv(t, nil)
	agent := newFakeTunnel(t, prod.AgentID, 1)
	e.setFile(nil)
	e.mgr.Connect(prod, agent)
	if got := agent.next(t); got != "" {
		t.Fatalf("agent received %q, want the empty configuration", got)
	}
	records := e.logs.records(t, "Config: failed to fetch")
	if len(records) != 1 {
		t.Fatalf("%d records, want 1", len(records))
	}
	r := records[0]
	delete(r, "time")
	want := map[string]any{
		"level":    "WARN",
		"msg":      "Config: failed to fetch",
		"agent_id": float64(prod.AgentID),
		"error":    `configuration file not found: ".gitlab/agents/prod/config.yaml"`,
	}
	if !reflect.DeepEqual(r, want) {
		t.Fatalf("log record %v, want %v", r, want)
	}
}

func TestReplicas(t *testing.T) {
	e := newEnv(t, nil)
	e.setFile(ptr(v1))
	first, second := newFakeTunnel(t, prod.AgentID, 1), newFakeTunnel(t, prod.AgentID, 2)

	e.mgr.Connect(prod, first)
	if got := first.next(t); got != v1 {
		t.Fatalf("first replica received %q", got)
	}
	// A replica connecting later gets the known configuration, unfetched.
	e.mgr.Connect(prod, second)
	if got := second.next(t); got != v1 {
		t.Fatalf("second replica received %q", got)
	}
	if n := e.source.fetches(); n != 1 {
		t.Fatalf("%d fetches for one agent with two replicas, want 1", n)
	}

	// A change reaches both, from one fetch.
	e.setFile(ptr(v2))
	e.mgr.NotifyPush(context.Background(), prod.ProjectID)
	if a, b := first.next(t), second.next(t); a != v2 || b != v2 {
		t.Fatalf("replicas received %q and %q, want v2", a, b)
	}
	if n := e.source.fetches(); n != 2 {
		t.Fatalf("%d fetches, want 2", n)
	}

	// A disconnected replica gets nothing more.
	e.mgr.Disconnect(first)
	e.setFile(ptr(v1))
	e.mgr.NotifyPush(context.Background(), prod.ProjectID)
	if got := second.next(t); got != v1 {
		t.Fatalf("remaining replica received %q", got)
	}
	first.none(t)

	// With no replica left the agent is forgotten: pushes fetch nothing.
	e.mgr.Disconnect(second)
	e.mgr.NotifyPush(context.Background(), prod.ProjectID)
	e.mgr.NotifyPush(context.Background(), 999) // no agent there at all

	// It connects again: fetched again, and GitLab hears of it again.
	third := newFakeTunnel(t, prod.AgentID, 3)
	e.mgr.Connect(prod, third)
	if got := third.next(t); got != v1 {
		t.Fatalf("reconnected replica received %q", got)
	}
	if n := e.source.fetches(); n != 4 {
		t.Fatalf("%d fetches, want 4 (connect, push, push, reconnect)", n)
	}
}

func TestNotifyPushDoesNotWaitForSlowFetch(t *testing.T) {
	e := newEnv(t, func(o *agentconfig.Options) { o.Fetchers = 1 })
	e.source.gate = make(chan struct{})
	e.source.started = make(chan struct{}, 10)
	e.setFile(ptr(v1))
	agent := newFakeTunnel(t, prod.AgentID, 1)
	e.mgr.Connect(prod, agent)
	<-e.source.started // the fetch now waits at the gate

	for range 100 {
		start := time.Now()
		e.mgr.NotifyPush(context.Background(), prod.ProjectID)
		e.mgr.NotifyPush(context.Background(), 555)
		if d := time.Since(start); d > 10*time.Millisecond {
			t.Fatalf("NotifyPush took %s while a fetch was slow", d)
		}
	}
	e.setFile(ptr(v2))
	close(e.source.gate)
	// The slow fetch may have read v1 or v2; the pushes during it bring
	// one more fetch, which reads v2.
	got := agent.next(t)
	if got == v1 {
		got = agent.next(t)
	}
	if got != v2 {
		t.Fatalf("agent received %q, want v2", got)
	}
	e.source.waitDone(t, 2)
}

func TestFetchesAreBounded(t *testing.T) {
	const fetchers, agents = 2, 6
	e := newEnv(t, func(o *agentconfig.Options) { o.Fetchers = fetchers })
	e.source.gate = make(chan struct{})
	e.source.started = make(chan struct{}, agents)
	var tunnels []*fakeTunnel
	for i := range int64(agents) {
		info := gitlab.AgentInfo{AgentID: 10 + i, ProjectID: 100, AgentName: "prod", DefaultBranch: "main"}
		tun := newFakeTunnel(t, info.AgentID, i)
		tunnels = append(tunnels, tun)
		e.mgr.Connect(info, tun)
	}
	e.setFile(ptr(v1))
	for range fetchers {
		<-e.source.started // every worker waits at the gate
	}
	for i := range agents {
		e.source.gate <- struct{}{} // let one fetch through…
		if i+fetchers < agents {
			<-e.source.started // …and its worker takes the next agent
		}
	}
	for _, tun := range tunnels {
		if got := tun.next(t); got != v1 {
			t.Fatalf("agent %d received %q", tun.info.AgentID, got)
		}
	}
	e.source.mu.Lock()
	defer e.source.mu.Unlock()
	if e.source.maxFlight != fetchers {
		t.Fatalf("%d fetches ran at once, want at most (and here exactly) %d", e.source.maxFlight, fetchers)
	}
}

func TestPolling(t *testing.T) {
	e := newEnv(t, func(o *agentconfig.Options) { o.PollPeriod = 20 * time.Millisecond })
	e.setFile(ptr(v1))
	agent := newFakeTunnel(t, prod.AgentID, 1)
	e.mgr.Connect(prod, agent)
	if got := agent.next(t); got != v1 {
		t.Fatalf("agent received %q", got)
	}
	e.setFile(ptr(v2)) // no push reported: the poll finds it
	if got := agent.next(t); got != v2 {
		t.Fatalf("agent received %q, want v2", got)
	}
}

func TestFailuresAreRetried(t *testing.T) {
	tests := []struct {
		name     string
		path     string
		wantWarn string
	}{
		{name: "fetch", path: prodRawPath, wantWarn: "Config: failed to fetch"},
		{name: "report to GitLab", path: gitlab.PathAgentConfiguration, wantWarn: "Config: failed to send to GitLab"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, nil) // polls hourly, retries after 10 ms
			e.setFile(ptr(v1))
			e.gitlab.Fail(tt.path, gitlabtest.Failure{Status: http.StatusBadGateway, Times: 1})
			agent := newFakeTunnel(t, prod.AgentID, 1)
			e.mgr.Connect(prod, agent)
			if got := agent.next(t); got != v1 {
				t.Fatalf("agent received %q", got)
			}
			if got := e.posted(t, 1); !reflect.DeepEqual(got, []string{j1}) {
				t.Fatalf("GitLab received %q", got)
			}
			if n := len(e.logs.records(t, tt.wantWarn)); n != 1 {
				t.Fatalf("%d %q records, want 1", n, tt.wantWarn)
			}
			agent.none(t) // the retry did not send the same configuration again
		})
	}
}

func TestAgentRefusingIsRetried(t *testing.T) {
	e := newEnv(t, nil)
	e.setFile(ptr(v1))
	agent := newFakeTunnel(t, prod.AgentID, 1)
	agent.status = http.StatusNotFound // an agentk without the endpoint
	e.mgr.Connect(prod, agent)
	deadline := time.Now().Add(5 * time.Second)
	for len(e.logs.records(t, "Config: failed to send to agent")) < 2 {
		if time.Now().After(deadline) {
			t.Fatal("a refused configuration was not sent again")
		}
		time.Sleep(5 * time.Millisecond)
	}
	r := e.logs.records(t, "Config: failed to send to agent")[0]
	if msg := r["error"].(string); !strings.Contains(msg, "upgrade it") {
		t.Errorf("error %q gives no hint", msg)
	}
	if n := len(e.gitlab.Configurations()); n != 1 {
		t.Errorf("GitLab received %d configurations, want 1", n)
	}
}

func TestCloseStopsFetches(t *testing.T) {
	e := newEnv(t, nil)
	e.source.gate = make(chan struct{}) // never opened
	e.source.started = make(chan struct{}, 1)
	agent := newFakeTunnel(t, prod.AgentID, 1)
	e.mgr.Connect(prod, agent)
	<-e.source.started
	closed := make(chan struct{})
	go func() { e.mgr.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("Close waited for a stuck fetch")
	}
	e.mgr.Connect(prod, newFakeTunnel(t, prod.AgentID, 2)) // ignored
	e.mgr.NotifyPush(context.Background(), prod.ProjectID)
	e.mgr.Close()
	if n := len(e.logs.records(t, "Config: failed to fetch")); n != 0 {
		t.Errorf("shutdown logged %d fetch failures", n)
	}
}

func TestNewManagerValidates(t *testing.T) {
	tests := []struct {
		name string
		opts agentconfig.Options
		want string
	}{
		{"no source", agentconfig.Options{}, "Source is required"},
		{"negative poll period", agentconfig.Options{Source: newCountingSource(nil), PollPeriod: -time.Second}, "negative option"},
		{"negative size", agentconfig.Options{Source: newCountingSource(nil), MaxConfigurationFileSize: -1}, "negative option"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := agentconfig.NewManager(tt.opts)
			if err == nil {
				m.Close()
				t.Fatal("no error")
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %q, want %q", err, tt.want)
			}
		})
	}
}
