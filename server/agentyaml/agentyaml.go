// Package agentyaml parses an agent's configuration file, the
// .gitlab/agents/<agent name>/config.yaml of its configuration project, and
// validates the two sections kas enforces itself: ci_access (which CI jobs may
// use the agent, and as whom) and user_access (which users may, and as whom).
//
// The schema follows GitLab's agent configuration reference. Other top-level
// sections (gitops, observability, remote_development, …) belong to the agent
// or to GitLab and pass through unchecked, so a configuration written for
// GitLab parses unchanged.
package agentyaml

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/kasproject/kas/internal/suggest"
)

// Config is the part of an agent's configuration file that kas enforces.
// A missing file, an empty one and one without these sections all mean the
// same: no ci_access and no user_access.
type Config struct {
	CIAccess   *CIAccess   `yaml:"ci_access,omitempty"`
	UserAccess *UserAccess `yaml:"user_access,omitempty"`
}

// CIAccess lists the projects and groups whose CI jobs may use the agent.
type CIAccess struct {
	Projects []CIAccessEntry `yaml:"projects,omitempty"`
	Groups   []CIAccessEntry `yaml:"groups,omitempty"`
}

// CIAccessEntry authorizes the CI jobs of one project, or of every project in
// one group and its subgroups.
type CIAccessEntry struct {
	// ID is the project's or group's full path, e.g. "acme/app".
	ID string `yaml:"id"`
	// DefaultNamespace is the Kubernetes namespace the job's kubeconfig context uses.
	DefaultNamespace string `yaml:"default_namespace,omitempty"`
	// AccessAs is whom the agent acts as; nil means the agent itself.
	AccessAs *CIAccessAs `yaml:"access_as,omitempty"`
	// Environments, when set, limit the entry to jobs whose environment name
	// matches one of them (see MatchesEnvironment).
	Environments []string `yaml:"environments,omitempty"`
	// ProtectedBranchesOnly limits the entry to jobs running on protected refs.
	ProtectedBranchesOnly bool `yaml:"protected_branches_only,omitempty"`
}

// CIAccessAs is at most one of Agent, Impersonate and CIJob; none means Agent.
type CIAccessAs struct {
	Agent       *struct{}    `yaml:"agent,omitempty"`
	Impersonate *Impersonate `yaml:"impersonate,omitempty"`
	CIJob       *struct{}    `yaml:"ci_job,omitempty"`
}

// Impersonate is a static identity the agent impersonates.
type Impersonate struct {
	Username string             `yaml:"username"`
	Groups   []string           `yaml:"groups,omitempty"`
	UID      string             `yaml:"uid,omitempty"`
	Extra    []ImpersonateExtra `yaml:"extra,omitempty"`
}

// ImpersonateExtra is one Impersonate-Extra-<Key> header's values.
type ImpersonateExtra struct {
	Key    string   `yaml:"key"`
	Values []string `yaml:"val"`
}

// UserAccess lists the projects and groups whose members may use the agent
// through the Kubernetes API proxy, and whom the agent acts as for them.
type UserAccess struct {
	// AccessAs is required by GitLab: without it every user is refused.
	AccessAs *UserAccessAs `yaml:"access_as,omitempty"`
	Projects []Ref         `yaml:"projects,omitempty"`
	Groups   []Ref         `yaml:"groups,omitempty"`
}

// UserAccessAs is exactly one of Agent and User.
type UserAccessAs struct {
	Agent *struct{} `yaml:"agent,omitempty"`
	User  *struct{} `yaml:"user,omitempty"`
}

// Ref names a project or group by its full path.
type Ref struct {
	ID string `yaml:"id"`
}

// MatchesEnvironment reports whether the entry applies to a CI job whose
// environment is named env ("" for a job without an environment).
//
// This is GitLab's rule (Gitlab::Ci::EnvironmentMatcher): an entry without
// environments applies to every job; otherwise a pattern matches a name equal
// to it, and a pattern containing * is also tried as a regular expression with
// each * standing for any characters, unanchored — so "review/*" matches
// "review/feature-1" and also "x-review/1", exactly as GitLab decides.
func (e *CIAccessEntry) MatchesEnvironment(env string) bool {
	if len(e.Environments) == 0 {
		return true
	}
	if env == "" {
		return false
	}
	for _, pattern := range e.Environments {
		if pattern == env {
			return true
		}
		if re, err := environmentRegexp(pattern); err == nil && re != nil && re.MatchString(env) {
			return true
		}
	}
	return false
}

// environmentRegexp compiles a wildcard pattern the way GitLab does
// (pattern.gsub('*', '.*')); it returns nil for a pattern without *.
func environmentRegexp(pattern string) (*regexp.Regexp, error) {
	if !strings.Contains(pattern, "*") {
		return nil, nil
	}
	return regexp.Compile(strings.ReplaceAll(pattern, "*", ".*"))
}

// Problem is one thing wrong with a configuration file.
type Problem struct {
	// Line is the line of the file the problem is on (1-based), or 0 when the
	// YAML parser could not tell.
	Line int
	// Message names the key, e.g. "ci_access.projects[0].access_as", and says what is wrong.
	Message string
}

func (p Problem) String() string {
	if p.Line == 0 {
		return p.Message
	}
	return fmt.Sprintf("line %d: %s", p.Line, p.Message)
}

// Error lists every problem found in a configuration file.
type Error struct {
	Problems []Problem
}

func (e *Error) Error() string {
	lines := make([]string, len(e.Problems))
	for i, p := range e.Problems {
		lines[i] = p.String()
	}
	return strings.Join(lines, "; ")
}

// Parse parses an agent configuration file. An empty file is an empty
// configuration. On failure the error is an *Error listing every problem with
// its line.
func Parse(data []byte) (*Config, error) {
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, &Error{Problems: []Problem{syntaxProblem(err)}}
	}
	var doc document
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true) // typos inside ci_access/user_access must not widen access silently
	err := dec.Decode(&doc)
	if errors.Is(err, io.EOF) {
		return &Config{}, nil
	}
	ps := &problems{root: &root}
	var typeErr *yaml.TypeError
	switch {
	case errors.As(err, &typeErr):
		for _, msg := range typeErr.Errors {
			ps.list = append(ps.list, yamlMessageProblem(msg))
		}
	case err != nil:
		return nil, &Error{Problems: []Problem{syntaxProblem(err)}}
	}
	cfg := &Config{CIAccess: doc.CIAccess, UserAccess: doc.UserAccess}
	validateTopLevel(ps, doc.Rest)
	validate(ps, cfg)
	if len(ps.list) > 0 {
		return nil, &Error{Problems: ps.sorted()}
	}
	return cfg, nil
}

// document is the whole file: the sections kas enforces, decoded strictly,
// and everything else, kept loose.
type document struct {
	CIAccess   *CIAccess      `yaml:"ci_access"`
	UserAccess *UserAccess    `yaml:"user_access"`
	Rest       map[string]any `yaml:",inline"`
}

// validateTopLevel catches misspellings of the enforced sections: an unknown
// top-level key is otherwise fine, but "ci_acess" silently dropping every CI
// authorization would be a surprise.
func validateTopLevel(ps *problems, rest map[string]any) {
	for key := range rest {
		normalized := strings.ReplaceAll(strings.ToLower(key), "-", "_")
		for _, known := range []string{"ci_access", "user_access"} {
			if normalized == known || suggest.Distance(normalized, known) <= 2 {
				ps.add(path{key}, "unknown key %q: did you mean %s?", key, known)
			}
		}
	}
}

func validate(ps *problems, cfg *Config) {
	if ci := cfg.CIAccess; ci != nil {
		for i := range ci.Projects {
			validateCIEntry(ps, path{"ci_access", "projects", i}, &ci.Projects[i])
		}
		for i := range ci.Groups {
			validateCIEntry(ps, path{"ci_access", "groups", i}, &ci.Groups[i])
		}
	}
	if ua := cfg.UserAccess; ua != nil {
		if as := ua.AccessAs; as != nil {
			if set := setNames(map[string]bool{"agent": as.Agent != nil, "user": as.User != nil}); len(set) > 1 {
				ps.add(path{"user_access", "access_as"}, "user_access.access_as: set exactly one of agent, user; found %s", strings.Join(set, " and "))
			}
		}
		for i, ref := range ua.Projects {
			if ref.ID == "" {
				ps.add(path{"user_access", "projects", i}, "user_access.projects[%d].id: the project's full path is required", i)
			}
		}
		for i, ref := range ua.Groups {
			if ref.ID == "" {
				ps.add(path{"user_access", "groups", i}, "user_access.groups[%d].id: the group's full path is required", i)
			}
		}
	}
}

func validateCIEntry(ps *problems, at path, e *CIAccessEntry) {
	name := at.String()
	if e.ID == "" {
		ps.add(at, "%s.id: the full path is required, e.g. id: acme/app", name)
	}
	if as := e.AccessAs; as != nil {
		set := setNames(map[string]bool{"agent": as.Agent != nil, "impersonate": as.Impersonate != nil, "ci_job": as.CIJob != nil})
		if len(set) > 1 {
			ps.add(at.with("access_as"), "%s.access_as: set exactly one of agent, impersonate, ci_job; found %s", name, strings.Join(set, " and "))
		}
		if imp := as.Impersonate; imp != nil {
			impAt := at.with("access_as", "impersonate")
			if imp.Username == "" {
				ps.add(impAt, "%s.access_as.impersonate.username: required (Kubernetes cannot impersonate groups or extras without a user)", name)
			}
			for j, extra := range imp.Extra {
				if extra.Key == "" {
					ps.add(impAt.with("extra", j), "%s.access_as.impersonate.extra[%d].key: required", name, j)
				}
			}
		}
	}
	for j, pattern := range e.Environments {
		envAt := at.with("environments", j)
		if pattern == "" {
			ps.add(envAt, "%s.environments[%d]: an environment name or pattern is required", name, j)
			continue
		}
		if _, err := environmentRegexp(pattern); err != nil {
			ps.add(envAt, "%s.environments[%d]: %q is not a usable pattern (GitLab turns each * into .* and reads the rest as a regular expression): %v", name, j, pattern, err)
		}
	}
}

// setNames returns the names whose flag is true, in a fixed order.
func setNames(flags map[string]bool) []string {
	var names []string
	for _, name := range []string{"agent", "impersonate", "ci_job", "user"} {
		if flags[name] {
			names = append(names, name)
		}
	}
	return names
}

// path addresses a node: string elements are mapping keys, ints are list indexes.
type path []any

// with returns a new path extending p; p itself is never modified.
func (p path) with(els ...any) path {
	return append(append(path(nil), p...), els...)
}

func (p path) String() string {
	var b strings.Builder
	for _, el := range p {
		switch el := el.(type) {
		case int:
			fmt.Fprintf(&b, "[%d]", el)
		case string:
			if b.Len() > 0 {
				b.WriteByte('.')
			}
			b.WriteString(el)
		}
	}
	return b.String()
}

// problems collects Problems, finding their lines in the parsed document.
type problems struct {
	root *yaml.Node
	list []Problem
}

func (ps *problems) add(at path, format string, args ...any) {
	ps.list = append(ps.list, Problem{Line: lineOf(ps.root, at), Message: fmt.Sprintf(format, args...)})
}

func (ps *problems) sorted() []Problem {
	list := append([]Problem(nil), ps.list...)
	for i := 1; i < len(list); i++ { // insertion sort: stable, and lists are short
		for j := i; j > 0 && list[j].Line < list[j-1].Line; j-- {
			list[j], list[j-1] = list[j-1], list[j]
		}
	}
	return list
}

// lineOf returns the line of the node at p, or of its deepest existing ancestor.
func lineOf(root *yaml.Node, p path) int {
	n := root
	if n.Kind == yaml.DocumentNode && len(n.Content) > 0 {
		n = n.Content[0]
	}
	line := n.Line
	for _, el := range p {
		var next *yaml.Node
		switch el := el.(type) {
		case string:
			if n.Kind == yaml.MappingNode {
				for i := 0; i+1 < len(n.Content); i += 2 {
					if n.Content[i].Value == el {
						next = n.Content[i+1]
						line = n.Content[i].Line
						break
					}
				}
			}
		case int:
			if n.Kind == yaml.SequenceNode && el < len(n.Content) {
				next = n.Content[el]
				line = next.Line
			}
		}
		if next == nil {
			break
		}
		n = next
	}
	return line
}

var yamlLinePrefix = regexp.MustCompile(`^(?:yaml: )?line (\d+): `)

// yamlMessageProblem turns one of yaml.v3's "line N: …" messages into a Problem.
func yamlMessageProblem(msg string) Problem {
	m := yamlLinePrefix.FindStringSubmatch(msg)
	if m == nil {
		return Problem{Message: strings.TrimPrefix(msg, "yaml: ")}
	}
	line, _ := strconv.Atoi(m[1])
	return Problem{Line: line, Message: msg[len(m[0]):]}
}

func syntaxProblem(err error) Problem {
	return yamlMessageProblem(err.Error())
}
