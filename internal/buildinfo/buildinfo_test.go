package buildinfo

import (
	"regexp"
	"runtime/debug"
	"testing"
)

// gemVersion is what Rails' Gem::Version accepts (its ANCHORED_VERSION_PATTERN).
var gemVersion = regexp.MustCompile(`^[0-9]+(\.[0-9a-zA-Z]+)*(-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?$`)

func TestFromBuildInfo(t *testing.T) {
	const rev = "0123abcd4567890123abcd4567890123abcd4567"
	settings := func(modified string) []debug.BuildSetting {
		return []debug.BuildSetting{{Key: "vcs.revision", Value: rev}, {Key: "vcs.modified", Value: modified}}
	}
	tests := []struct {
		name                    string
		bi                      *debug.BuildInfo
		linkVersion, linkCommit string
		want                    Info
	}{
		{"no build information (go test)", nil, "dev", "", Info{Version: "0.0.0-dev"}},
		{"-ldflags version wins", &debug.BuildInfo{Main: debug.Module{Version: "v1.2.3"}, Settings: settings("false")}, "v17.2.0", "",
			Info{Version: "17.2.0", Commit: rev}},
		{"-ldflags commit wins", &debug.BuildInfo{Main: debug.Module{Version: "(devel)"}, Settings: settings("false")}, "17.2.0-rc1", "abc123",
			Info{Version: "17.2.0-rc1", Commit: "abc123"}},
		{"tagged module version", &debug.BuildInfo{Main: debug.Module{Version: "v1.4.0"}, Settings: settings("false")}, "dev", "",
			Info{Version: "1.4.0", Commit: rev}},
		{"pseudo-version of a dirty tree", &debug.BuildInfo{Main: debug.Module{Version: "v0.0.0-20260101120000-0123abcd4567+dirty"}, Settings: settings("true")}, "", "",
			Info{Version: "0.0.0-20260101120000-0123abcd4567-dirty", Commit: rev, Modified: true}},
		{"devel with VCS information", &debug.BuildInfo{Main: debug.Module{Version: "(devel)"}, Settings: settings("false")}, "dev", "unknown",
			Info{Version: "0.0.0-dev-0123abcd4567", Commit: rev}},
		{"devel, modified", &debug.BuildInfo{Main: debug.Module{Version: "(devel)"}, Settings: settings("true")}, "", "",
			Info{Version: "0.0.0-dev-0123abcd4567-dirty", Commit: rev, Modified: true}},
		{"devel without VCS information", &debug.BuildInfo{Main: debug.Module{Version: "(devel)"}}, "", "", Info{Version: "0.0.0-dev"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := fromBuildInfo(tt.bi, tt.linkVersion, tt.linkCommit)
			if got != tt.want {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
			if !gemVersion.MatchString(got.Version) {
				t.Fatalf("version %q is not one Rails' Gem::Version parses", got.Version)
			}
		})
	}
}

func TestReadInTests(t *testing.T) {
	if v := Read("dev", "").Version; !gemVersion.MatchString(v) {
		t.Fatalf("Read().Version = %q, not parseable", v)
	}
}
