package usage_test

import (
	"context"
	"errors"
	"net/http"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/gitlab/gitlabtest"
	"github.com/kasproject/kas/server/proxyauth"
	"github.com/kasproject/kas/server/usage"
)

var secret = []byte("0123456789abcdef0123456789abcdef")

func newGitLab(t *testing.T) (*gitlabtest.Server, *gitlab.Client) {
	t.Helper()
	srv := gitlabtest.New(t, secret, nil)
	client, err := gitlab.NewClient(gitlab.ClientOptions{BaseURL: srv.URL, Secret: secret, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(client.CloseIdleConnections)
	return srv, client
}

func ci(agent, user int64) *proxyauth.Result {
	return &proxyauth.Result{Kind: proxyauth.KindCIJob, AgentID: agent, UserID: user}
}

func pat(agent, user int64) *proxyauth.Result {
	return &proxyauth.Result{Kind: proxyauth.KindPersonalAccessToken, AgentID: agent, UserID: user}
}

func session(agent, user int64) *proxyauth.Result {
	return &proxyauth.Result{Kind: proxyauth.KindSessionCookie, AgentID: agent, UserID: user}
}

func TestCounts(t *testing.T) {
	tests := []struct {
		name     string
		observed []*proxyauth.Result
		want     *gitlab.UsageMetrics // nil: nothing is sent
	}{
		{name: "nothing observed, nothing sent"},
		{name: "nil result is ignored", observed: []*proxyauth.Result{nil}},
		{
			name:     "CI job",
			observed: []*proxyauth.Result{ci(1, 10), ci(1, 10), ci(2, 11)},
			want: &gitlab.UsageMetrics{
				Counters: map[string]int64{usage.CounterRequests: 3, usage.CounterRequestsViaCIAccess: 3},
				UniqueCounters: map[string][]int64{
					usage.UniqueUsersViaCIAccess:   {10, 11},
					usage.UniqueAgentsViaCIAccess:  {1, 2},
					usage.UniqueUsersUsingCITunnel: {10, 11},
				},
			},
		},
		{
			name:     "personal access token",
			observed: []*proxyauth.Result{pat(3, 12)},
			want: &gitlab.UsageMetrics{
				Counters: map[string]int64{usage.CounterRequests: 1, usage.CounterRequestsViaPAT: 1},
				UniqueCounters: map[string][]int64{
					usage.UniqueUsersViaPATAccess:  {12},
					usage.UniqueAgentsViaPATAccess: {3},
					usage.UniqueUsersUsingCITunnel: {12},
				},
			},
		},
		{
			name:     "every kind, users unknown to GitLab are not unique users",
			observed: []*proxyauth.Result{session(4, 13), session(4, 0), ci(4, 0), pat(5, 13), session(5, 14)},
			want: &gitlab.UsageMetrics{
				Counters: map[string]int64{
					usage.CounterRequests:            5,
					usage.CounterRequestsViaUser:     3,
					usage.CounterRequestsViaCIAccess: 1,
					usage.CounterRequestsViaPAT:      1,
				},
				UniqueCounters: map[string][]int64{
					usage.UniqueUsersViaUserAccess:  {13, 14},
					usage.UniqueAgentsViaUserAccess: {4, 5},
					usage.UniqueAgentsViaCIAccess:   {4},
					usage.UniqueUsersViaPATAccess:   {13},
					usage.UniqueAgentsViaPATAccess:  {5},
					// GitLab's KAS adds every proxy user, whatever the kind.
					usage.UniqueUsersUsingCITunnel: {13, 14},
				},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv, client := newGitLab(t)
			tracker := usage.New(usage.Options{Reporter: client})
			for _, r := range tt.observed {
				tracker.Observe(r)
			}
			if err := tracker.Report(context.Background()); err != nil {
				t.Fatal(err)
			}
			got := srv.UsageMetrics()
			if tt.want == nil {
				if len(got) != 0 {
					t.Fatalf("sent %+v, want nothing", got)
				}
				return
			}
			if len(got) != 1 || !reflect.DeepEqual(got[0], *tt.want) {
				t.Fatalf("sent %+v, want %+v", got, *tt.want)
			}
			// Sent counts are gone: the next report has nothing to send.
			if err := tracker.Report(context.Background()); err != nil {
				t.Fatal(err)
			}
			if n := len(srv.UsageMetrics()); n != 1 {
				t.Fatalf("%d reports, want the counts sent once", n)
			}
		})
	}
}

func TestFailedReportIsSentNextTime(t *testing.T) {
	srv, client := newGitLab(t)
	tracker := usage.New(usage.Options{Reporter: client})
	tracker.Observe(ci(1, 10))
	tracker.Observe(pat(2, 10))

	srv.Fail(gitlab.PathUsageMetrics, gitlabtest.Failure{Status: http.StatusBadGateway, Times: 1})
	if err := tracker.Report(context.Background()); err == nil {
		t.Fatal("a failed report returned no error")
	}
	tracker.Observe(ci(1, 11))
	if err := tracker.Report(context.Background()); err != nil {
		t.Fatal(err)
	}
	got := srv.UsageMetrics()
	want := gitlab.UsageMetrics{
		Counters: map[string]int64{usage.CounterRequests: 3, usage.CounterRequestsViaCIAccess: 2, usage.CounterRequestsViaPAT: 1},
		UniqueCounters: map[string][]int64{
			usage.UniqueUsersViaCIAccess:   {10, 11},
			usage.UniqueAgentsViaCIAccess:  {1},
			usage.UniqueUsersViaPATAccess:  {10},
			usage.UniqueAgentsViaPATAccess: {2},
			usage.UniqueUsersUsingCITunnel: {10, 11},
		},
	}
	if len(got) != 1 || !reflect.DeepEqual(got[0], want) {
		t.Fatalf("sent %+v, want one report %+v", got, want)
	}
}

// flakyReporter fails every other report and sums what it accepted.
type flakyReporter struct {
	mu       sync.Mutex
	calls    int
	requests int64
}

func (f *flakyReporter) SendUsageMetrics(_ context.Context, m gitlab.UsageMetrics) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	if f.calls%2 == 1 {
		return errors.New("GitLab is down")
	}
	f.requests += m.Counters[usage.CounterRequests]
	return nil
}

func TestConcurrentObserveAndReport(t *testing.T) {
	const observers, each = 8, 500
	rep := &flakyReporter{}
	tracker := usage.New(usage.Options{Reporter: rep})
	var wg sync.WaitGroup
	for i := range observers {
		wg.Go(func() {
			for j := range each {
				tracker.Observe(ci(int64(i), int64(j)))
			}
		})
	}
	stop := make(chan struct{})
	reporting := make(chan struct{})
	go func() {
		defer close(reporting)
		for {
			select {
			case <-stop:
				return
			default:
				_ = tracker.Report(context.Background())
			}
		}
	}()
	wg.Wait()
	close(stop)
	<-reporting
	for range 2 { // one may fail
		_ = tracker.Report(context.Background())
	}
	rep.mu.Lock()
	defer rep.mu.Unlock()
	if rep.requests != observers*each {
		t.Fatalf("GitLab accepted %d requests in all, want exactly %d", rep.requests, observers*each)
	}
}

func TestRun(t *testing.T) {
	srv, client := newGitLab(t)
	tracker := usage.New(usage.Options{Reporter: client, Period: 10 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { tracker.Run(ctx); close(done) }()

	tracker.Observe(ci(1, 10))
	deadline := time.Now().Add(5 * time.Second)
	for len(srv.UsageMetrics()) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("nothing reported within the period")
		}
		time.Sleep(5 * time.Millisecond)
	}
	// Counted just before shutdown: sent by the last report.
	tracker.Observe(pat(2, 20))
	cancel()
	<-done
	var total int64
	for _, m := range srv.UsageMetrics() {
		total += m.Counters[usage.CounterRequests]
	}
	if total != 2 {
		t.Fatalf("%d requests reported in all, want 2", total)
	}
}

func TestWithoutReporter(t *testing.T) {
	tracker := usage.New(usage.Options{})
	tracker.Observe(ci(1, 10))
	if err := tracker.Report(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { tracker.Run(ctx); close(done) }()
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return when its context ended")
	}
}
