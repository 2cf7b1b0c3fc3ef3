package internalapi

import (
	"context"
	"path"
	"slices"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/kasproject/kas/server/internalapi/gitlabpb"
)

// latencyCalls are typical calls GitLab Rails makes.
var latencyCalls = []struct {
	method   string
	req, out proto.Message
}{
	{getServerInfo, &gitlabpb.GetServerInfoRequest{}, &gitlabpb.GetServerInfoResponse{}},
	{byAgentIDs, &gitlabpb.GetConnectedAgentsByAgentIDsRequest{AgentIds: []int64{1, 2}}, &gitlabpb.GetConnectedAgentsByAgentIDsResponse{}},
	{gitPushEvent, &gitlabpb.GitPushEventRequest{Event: &gitlabpb.GitPushEvent{Project: &gitlabpb.Project{Id: 10, FullPath: "group/config"}}}, &gitlabpb.GitPushEventResponse{}},
	{listAgentConfigFiles, &gitlabpb.ListAgentConfigFilesRequest{Repository: &gitlabpb.GitalyRepository{GlRepository: "project-10"}}, &gitlabpb.ListAgentConfigFilesResponse{}},
}

// TestLatency measures calls through a real listener, JWT check
// included, and requires them to answer far inside GitLab's 5 s deadline.
func TestLatency(t *testing.T) {
	pushes := make(chan push, 1000)
	conn := dial(t, serve(t, testOptions(t, pushes)))
	ctx := withToken(callCtx(t), goodToken(t))
	const calls = 200
	for _, c := range latencyCalls {
		if err := conn.Invoke(ctx, c.method, c.req, c.out); err != nil { // warm up
			t.Fatal(err)
		}
		took := make([]time.Duration, calls)
		for i := range took {
			start := time.Now()
			if err := conn.Invoke(ctx, c.method, c.req, c.out); err != nil {
				t.Fatal(err)
			}
			took[i] = time.Since(start)
		}
		slices.Sort(took)
		p50, p99 := took[calls/2], took[calls*99/100]
		t.Logf("%s: p50 %s, p99 %s, max %s over %d calls", c.method, p50, p99, took[calls-1], calls)
		if p99 > time.Second {
			t.Errorf("%s: p99 %s; GitLab gives up after 5 s and kas should answer in milliseconds", c.method, p99)
		}
	}
}

func BenchmarkCalls(b *testing.B) {
	opts := testOptions(b, nil)
	opts.OnGitPush = func(context.Context, int64, string) {}
	conn := dial(b, serve(b, opts))
	ctx := withToken(callCtx(b), goodToken(b))
	for _, c := range latencyCalls {
		b.Run(path.Base(c.method), func(b *testing.B) {
			for b.Loop() {
				if err := conn.Invoke(ctx, c.method, c.req, c.out); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
