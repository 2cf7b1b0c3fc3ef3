// Package buildinfo says which build of kas or agentk is running: the
// version and commit set at link time (-ldflags "-X main.version=…"), or
// else what the Go toolchain recorded in the binary (the main module's
// version and the VCS revision, runtime/debug.ReadBuildInfo).
//
// The version always has the form GitLab Rails parses (Gem::Version, as
// Gitlab::VersionInfo does): X.Y.Z with an optional -suffix, no leading
// "v" and no "+". A build with no version of its own (go build or go run
// in a checkout without a tag, or a build without VCS information) is
// 0.0.0-dev, followed by the commit when it is known.
package buildinfo

import (
	"runtime/debug"
	"strings"
)

// Info describes one build.
type Info struct {
	// Version is X.Y.Z[-suffix], e.g. 17.2.0, 0.0.0-20260101120000-0123abcd4567
	// (a Go pseudo-version) or 0.0.0-dev-0123abcd4567.
	Version string
	// Commit is the full VCS revision the binary was built from, "" if
	// unknown.
	Commit string
	// Modified is true when the working tree had uncommitted changes.
	Modified bool
}

// devVersion is the version of a build that has none.
const devVersion = "0.0.0-dev"

// Read returns this binary's build information. linkVersion and linkCommit
// are what -ldflags set, if anything ("" or "dev" for the version means
// unset).
func Read(linkVersion, linkCommit string) Info {
	bi, _ := debug.ReadBuildInfo() // nil without build information: tests, stripped binaries
	return fromBuildInfo(bi, linkVersion, linkCommit)
}

func fromBuildInfo(bi *debug.BuildInfo, linkVersion, linkCommit string) Info {
	var info Info
	var moduleVersion string
	if bi != nil {
		moduleVersion = bi.Main.Version
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				info.Commit = s.Value
			case "vcs.modified":
				info.Modified = s.Value == "true"
			}
		}
	}
	if linkCommit != "" && linkCommit != "unknown" {
		info.Commit = linkCommit
	}
	switch {
	case linkVersion != "" && linkVersion != "dev":
		info.Version = parseable(linkVersion)
	case moduleVersion != "" && moduleVersion != "(devel)":
		info.Version = parseable(moduleVersion)
	default:
		info.Version = devVersion
		if info.Commit != "" {
			info.Version += "-" + short(info.Commit)
		}
		if info.Modified {
			info.Version += "-dirty"
		}
	}
	return info
}

// parseable turns a Go module version (v1.2.3, v1.2.3-rc.1,
// v0.0.0-20260101120000-0123abcd4567+dirty) into Rails' form: no leading
// "v", build metadata ("+dirty") as one more suffix part.
func parseable(v string) string {
	v = strings.TrimPrefix(v, "v")
	return strings.ReplaceAll(v, "+", "-")
}

// short is the 12-character prefix of a revision, as Go's pseudo-versions
// use.
func short(rev string) string {
	if len(rev) > 12 {
		return rev[:12]
	}
	return rev
}
