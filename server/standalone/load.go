package standalone

import (
	"bytes"
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/kasproject/kas/protocol"
)

// fileData is the standalone file as written; see the package documentation.
type fileData struct {
	Groups   []groupEntry   `yaml:"groups"`
	Projects []projectEntry `yaml:"projects"`
	Agents   []agentEntry   `yaml:"agents"`
	Users    []userEntry    `yaml:"users"`
	Sessions []sessionEntry `yaml:"sessions"`
	CIJobs   []ciJobEntry   `yaml:"ci_jobs"`
}

type groupEntry struct {
	ID   int64  `yaml:"id"`
	Path string `yaml:"path"`
}

type projectEntry struct {
	ID            int64  `yaml:"id"`
	Path          string `yaml:"path"`
	DefaultBranch string `yaml:"default_branch"`
	Repository    string `yaml:"repository"`
}

type agentEntry struct {
	ID          int64  `yaml:"id"`
	Name        string `yaml:"name"`
	Project     string `yaml:"project"`
	TokenSHA256 string `yaml:"token_sha256"`
	// Receptive makes it a receptive agent, which kas dials.
	Receptive *receptiveEntry `yaml:"receptive"`
}

// receptiveEntry is where a receptive agent listens and how kas
// authenticates to it: GitLab's URL configuration, with files.
type receptiveEntry struct {
	URL                   string `yaml:"url"`
	CACertificateFile     string `yaml:"ca_certificate_file"`
	TLSHost               string `yaml:"tls_host"`
	JWTPrivateKeyFile     string `yaml:"jwt_private_key_file"`
	ClientCertificateFile string `yaml:"client_certificate_file"`
	ClientKeyFile         string `yaml:"client_key_file"`
}

type userEntry struct {
	ID                   int64              `yaml:"id"`
	Username             string             `yaml:"username"`
	PersonalAccessTokens []tokenEntry       `yaml:"personal_access_tokens"`
	Memberships          membershipsEntries `yaml:"memberships"`
}

type tokenEntry struct {
	TokenSHA256 string `yaml:"token_sha256"`
	// Scopes is nil when omitted (meaning [k8s_proxy]) and empty when written as [].
	Scopes []string `yaml:"scopes"`
}

type membershipsEntries struct {
	Projects map[string]string `yaml:"projects"`
	Groups   map[string]string `yaml:"groups"`
}

type sessionEntry struct {
	CookieSHA256    string `yaml:"cookie_sha256"`
	CSRFTokenSHA256 string `yaml:"csrf_token_sha256"`
	User            string `yaml:"user"`
}

type ciJobEntry struct {
	TokenSHA256  string            `yaml:"token_sha256"`
	ID           int64             `yaml:"id"`
	PipelineID   int64             `yaml:"pipeline_id"`
	Project      string            `yaml:"project"`
	User         string            `yaml:"user"`
	ProtectedRef bool              `yaml:"protected_ref"`
	Environment  *environmentEntry `yaml:"environment"`
}

type environmentEntry struct {
	Name string `yaml:"name"`
	Slug string `yaml:"slug"`
	Tier string `yaml:"tier"`
}

// state is a loaded, checked standalone file. It is never modified after
// load, so decisions read it without locks.
type state struct {
	info os.FileInfo

	groups        map[string]*group   // by lower-cased full path
	projects      map[string]*project // by lower-cased full path
	agents        []*agent            // ordered by id
	agentsByID    map[int64]*agent
	agentsByToken map[[sha256.Size]byte]*agent
	tokens        map[[sha256.Size]byte]*personalAccessToken
	sessions      map[[sha256.Size]byte]*session
	jobs          map[[sha256.Size]byte]*ciJob
}

type group struct {
	id     int64
	path   string
	parent *group
}

// topLevel returns the group's top-level ancestor (itself if it has no parent).
func (g *group) topLevel() *group {
	for g.parent != nil {
		g = g.parent
	}
	return g
}

type project struct {
	id            int64
	path          string
	group         *group
	defaultBranch string
	repository    string // absolute directory; "" for a project without agents
}

type agent struct {
	id      int64
	name    string
	project *project
	// receptive is set for a receptive agent, with absolute file paths.
	receptive *receptiveEntry
}

// configFile is where GitLab keeps the agent's configuration in its
// configuration project's repository.
func (a *agent) configFile() string {
	return filepath.Join(a.project.repository, ".gitlab", "agents", a.name, "config.yaml")
}

type user struct {
	id           int64
	username     string
	projectRoles map[*project]accessLevel
	groupRoles   map[*group]accessLevel
}

// projectAccess is the user's highest role in p: a direct membership, or a
// membership of p's group or any of its ancestors.
func (u *user) projectAccess(p *project) accessLevel {
	return max(u.projectRoles[p], u.groupAccess(p.group))
}

// groupAccess is the user's highest role in g: a membership of g or any of its ancestors.
func (u *user) groupAccess(g *group) accessLevel {
	var level accessLevel
	for ; g != nil; g = g.parent {
		level = max(level, u.groupRoles[g])
	}
	return level
}

type personalAccessToken struct {
	user   *user
	scopes []string
}

type session struct {
	user          *user
	csrfTokenHash [sha256.Size]byte
}

type ciJob struct {
	id           int64
	pipelineID   int64
	project      *project
	user         *user
	protectedRef bool
	environment  *environmentEntry
}

// accessLevel is a GitLab role's access level (Gitlab::Access).
type accessLevel int

// roles are GitLab's roles in increasing order of access.
var roles = []struct {
	name  string
	level accessLevel
}{
	{"guest", 10},
	{"planner", 15},
	{"reporter", 20},
	{"developer", 30},
	{"maintainer", 40},
	{"owner", 50},
}

// developerAccess is the least access that may use the Kubernetes API proxy.
const developerAccess accessLevel = 30

func roleLevel(name string) (accessLevel, bool) {
	for _, r := range roles {
		if r.name == name {
			return r.level, true
		}
	}
	return 0, false
}

// rolesUpTo lists every role at or below level, as GitLab's API does for a
// user's roles in a project or group.
func rolesUpTo(level accessLevel) []string {
	var names []string
	for _, r := range roles {
		if r.level <= level {
			names = append(names, r.name)
		}
	}
	return names
}

// k8sProxyScope is the personal access token scope GitLab requires for the
// Kubernetes API proxy.
const k8sProxyScope = "k8s_proxy"

// tokenScopes are GitLab's personal access token scopes; others are typos.
var tokenScopes = []string{
	"api", "read_api", "read_user", "create_runner", "manage_runner", k8sProxyScope,
	"self_rotate", "read_repository", "write_repository", "read_registry", "write_registry",
	"read_virtual_registry", "write_virtual_registry", "read_observability", "write_observability",
	"ai_features", "sudo", "admin_mode", "read_service_ping",
}

var environmentTiers = []string{"production", "staging", "testing", "development", "other"}

var (
	// pathSegment is one segment of a GitLab group or project path.
	pathSegment = regexp.MustCompile(`^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_-])?$`)
	// agentName is GitLab's rule for agent names (a DNS label).
	agentName = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)
)

// load reads and checks the standalone file; name is how messages call it.
func load(name, abs string) (*state, error) {
	// Stat before reading: if the file changes in between, the next check sees
	// a newer version than the one loaded and loads again.
	info, err := os.Stat(abs)
	if err != nil {
		return nil, fmt.Errorf("read standalone file: %w", err)
	}
	data, err := os.ReadFile(abs)
	if err != nil {
		return nil, fmt.Errorf("read standalone file: %w", err)
	}
	st, err := parse(name, filepath.Dir(abs), data)
	if err != nil {
		return nil, err
	}
	st.info = info
	return st, nil
}

// parse checks a standalone file's content; dir resolves relative repositories.
func parse(name, dir string, data []byte) (*state, error) {
	l := &loader{
		ps:  problems{file: name},
		dir: dir,
		st: &state{
			groups:        make(map[string]*group),
			projects:      make(map[string]*project),
			agentsByID:    make(map[int64]*agent),
			agentsByToken: make(map[[sha256.Size]byte]*agent),
			tokens:        make(map[[sha256.Size]byte]*personalAccessToken),
			sessions:      make(map[[sha256.Size]byte]*session),
			jobs:          make(map[[sha256.Size]byte]*ciJob),
		},
		users: make(map[string]*user),
	}
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		l.ps.addYAML(err.Error())
		return nil, l.ps.err()
	}
	l.ps.root = &root
	var f fileData
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil && !errors.Is(err, io.EOF) {
		var typeErr *yaml.TypeError
		if !errors.As(err, &typeErr) {
			l.ps.addYAML(err.Error())
			return nil, l.ps.err()
		}
		for _, msg := range typeErr.Errors {
			l.ps.addYAML(msg)
		}
	}
	l.loadGroups(f.Groups)
	l.loadProjects(f.Projects)
	l.loadAgents(f.Agents)
	l.loadUsers(f.Users)
	l.loadSessions(f.Sessions)
	l.loadCIJobs(f.CIJobs)
	if err := l.ps.err(); err != nil {
		return nil, err
	}
	slices.SortFunc(l.st.agents, func(a, b *agent) int { return cmp.Compare(a.id, b.id) })
	return l.st, nil
}

// loader turns fileData into a state, recording every problem on the way.
type loader struct {
	ps    problems
	dir   string
	st    *state
	users map[string]*user // by lower-cased username
}

func (l *loader) loadGroups(entries []groupEntry) {
	ids := make(map[int64]path)
	paths := make(map[string]path)
	var loaded []*group
	var at []path
	for i, e := range entries {
		p := path{"groups", i}
		okID := l.checkID(p, e.ID, ids, "group")
		okPath := l.checkPath(p.with("path"), e.Path, 1)
		if !okID || !okPath || !firstUse(l, paths, strings.ToLower(e.Path), p.with("path"), "path "+e.Path) {
			continue
		}
		g := &group{id: e.ID, path: e.Path}
		l.st.groups[strings.ToLower(e.Path)] = g
		loaded = append(loaded, g)
		at = append(at, p)
	}
	for i, g := range loaded {
		parentPath, _, nested := cutLast(g.path)
		if !nested {
			continue
		}
		parent := l.st.groups[strings.ToLower(parentPath)]
		if parent == nil {
			l.ps.add(at[i].with("path"), "its parent group %s is not listed under groups; add it", parentPath)
			continue
		}
		g.parent = parent
	}
}

func (l *loader) loadProjects(entries []projectEntry) {
	ids := make(map[int64]path)
	paths := make(map[string]path)
	for i, e := range entries {
		p := path{"projects", i}
		okID := l.checkID(p, e.ID, ids, "project")
		okPath := l.checkPath(p.with("path"), e.Path, 2)
		if !okID || !okPath || !firstUse(l, paths, strings.ToLower(e.Path), p.with("path"), "path "+e.Path) {
			continue
		}
		if l.st.groups[strings.ToLower(e.Path)] != nil {
			l.ps.add(p.with("path"), "%s is already a group's path; GitLab paths name one group or project", e.Path)
			continue
		}
		groupPath, _, _ := cutLast(e.Path)
		g := l.st.groups[strings.ToLower(groupPath)]
		if g == nil {
			l.ps.add(p.with("path"), "its group %s is not listed under groups; add it", groupPath)
			continue
		}
		pr := &project{id: e.ID, path: e.Path, group: g, defaultBranch: cmp.Or(e.DefaultBranch, "main")}
		if e.Repository != "" {
			repo := e.Repository
			if !filepath.IsAbs(repo) {
				repo = filepath.Join(l.dir, repo)
			}
			if info, err := os.Stat(repo); err != nil {
				l.ps.add(p.with("repository"), "%v", err)
			} else if !info.IsDir() {
				l.ps.add(p.with("repository"), "%s is not a directory", repo)
			}
			pr.repository = repo
		}
		l.st.projects[strings.ToLower(e.Path)] = pr
	}
}

func (l *loader) loadAgents(entries []agentEntry) {
	ids := make(map[int64]path)
	names := make(map[string]path)
	tokens := make(map[[sha256.Size]byte]path)
	for i, e := range entries {
		p := path{"agents", i}
		ok := l.checkID(p, e.ID, ids, "agent")
		if e.Name == "" || len(e.Name) > 63 || !agentName.MatchString(e.Name) {
			l.ps.add(p.with("name"), "%q is not a GitLab agent name: 1 to 63 lowercase letters, digits and '-', starting and ending with a letter or digit", e.Name)
			ok = false
		}
		pr := l.project(p.with("project"), e.Project)
		if pr != nil && pr.repository == "" {
			l.ps.add(p.with("project"), "project %s holds the agent's configuration, so it needs a repository: the local directory containing .gitlab/agents/%s/config.yaml", pr.path, e.Name)
			ok = false
		}
		if pr != nil && ok && !firstUse(l, names, strings.ToLower(pr.path)+"\x00"+e.Name, p.with("name"), "agent name "+e.Name+" in project "+pr.path) {
			ok = false
		}
		// A receptive agent needs no token: kas dials it and knows it by
		// its id. It may have one, for dialling kas as well.
		var hash [sha256.Size]byte
		okHash, hasToken := true, e.TokenSHA256 != "" || e.Receptive == nil
		if hasToken {
			hash, okHash = l.hash(p.with("token_sha256"), e.TokenSHA256, "agent token")
			if okHash && !firstUse(l, tokens, hash, p.with("token_sha256"), "agent token") {
				okHash = false
			}
		}
		var receptive *receptiveEntry
		if e.Receptive != nil {
			receptive = l.receptive(p.with("receptive"), *e.Receptive)
			ok = ok && receptive != nil
		}
		if !ok || pr == nil || !okHash {
			continue
		}
		a := &agent{id: e.ID, name: e.Name, project: pr, receptive: receptive}
		l.st.agents = append(l.st.agents, a)
		l.st.agentsByID[a.id] = a
		if hasToken {
			l.st.agentsByToken[hash] = a
		}
	}
}

// receptive checks a receptive agent's URL configuration, reading its
// files, and returns it with absolute paths; nil after a problem.
func (l *loader) receptive(at path, e receptiveEntry) *receptiveEntry {
	ok := true
	var secure bool
	if e.URL == "" {
		l.ps.add(at.with("url"), "required: where the agent listens, e.g. grpcs://agentk.example.com:8182 or wss://agentk.example.com:8182/")
		ok = false
	} else if _, tlsURL, err := protocol.ReceptiveURL(e.URL); err != nil {
		l.ps.add(at.with("url"), "%v", err)
		ok = false
	} else {
		secure = tlsURL
	}
	abs := func(f string) string {
		if f == "" || filepath.IsAbs(f) {
			return f
		}
		return filepath.Join(l.dir, f)
	}
	e.CACertificateFile, e.JWTPrivateKeyFile = abs(e.CACertificateFile), abs(e.JWTPrivateKeyFile)
	e.ClientCertificateFile, e.ClientKeyFile = abs(e.ClientCertificateFile), abs(e.ClientKeyFile)
	mtls := e.ClientCertificateFile != "" || e.ClientKeyFile != ""
	switch {
	case e.JWTPrivateKeyFile == "" && !mtls:
		l.ps.add(at, "how kas authenticates to the agent is missing: jwt_private_key_file (the Ed25519 key whose public half agentk's --receptive-jwt-public-key-file holds), or client_certificate_file and client_key_file (mTLS)")
		ok = false
	case e.JWTPrivateKeyFile != "" && mtls:
		l.ps.add(at, "jwt_private_key_file and client_certificate_file are alternatives, as in GitLab: set one")
		ok = false
	case mtls && (e.ClientCertificateFile == "" || e.ClientKeyFile == ""):
		l.ps.add(at, "client_certificate_file and client_key_file go together")
		ok = false
	case mtls && e.URL != "" && !secure:
		l.ps.add(at.with("url"), "mTLS needs TLS: use grpcs:// or wss://")
		ok = false
	}
	if !ok {
		return nil
	}
	if _, err := readReceptive(e); err != nil {
		l.ps.add(at, "%v", err)
		return nil
	}
	return &e
}

func (l *loader) loadUsers(entries []userEntry) {
	ids := make(map[int64]path)
	names := make(map[string]path)
	tokens := make(map[[sha256.Size]byte]path)
	for i, e := range entries {
		p := path{"users", i}
		ok := l.checkID(p, e.ID, ids, "user")
		if !pathSegment.MatchString(e.Username) {
			l.ps.add(p.with("username"), "%q is not a GitLab username: letters, digits, '_', '-' and '.', starting with a letter, digit or '_'", e.Username)
			ok = false
		} else if !firstUse(l, names, strings.ToLower(e.Username), p.with("username"), "username "+e.Username) {
			ok = false
		}
		u := &user{id: e.ID, username: e.Username, projectRoles: make(map[*project]accessLevel), groupRoles: make(map[*group]accessLevel)}
		for j, t := range e.PersonalAccessTokens {
			tp := p.with("personal_access_tokens", j)
			scopes := t.Scopes
			if scopes == nil {
				scopes = []string{k8sProxyScope}
			}
			okScopes := len(scopes) > 0
			if !okScopes {
				l.ps.add(tp.with("scopes"), "a personal access token has at least one scope; the Kubernetes API proxy needs %s", k8sProxyScope)
			}
			for k, s := range scopes {
				if !slices.Contains(tokenScopes, s) {
					l.ps.add(tp.with("scopes", k), "unknown scope %q; GitLab's scopes are %s", s, strings.Join(tokenScopes, ", "))
					okScopes = false
				}
			}
			hash, okHash := l.hash(tp.with("token_sha256"), t.TokenSHA256, "personal access token")
			if okHash && !firstUse(l, tokens, hash, tp.with("token_sha256"), "personal access token") {
				okHash = false
			}
			if okScopes && okHash {
				l.st.tokens[hash] = &personalAccessToken{user: u, scopes: slices.Clone(scopes)}
			}
		}
		for _, projectPath := range sortedKeys(e.Memberships.Projects) {
			mp := p.with("memberships", "projects", key(projectPath))
			pr := l.project(mp, projectPath)
			level, okRole := l.role(mp, e.Memberships.Projects[projectPath])
			if pr != nil && okRole {
				u.projectRoles[pr] = level
			}
		}
		for _, groupPath := range sortedKeys(e.Memberships.Groups) {
			mp := p.with("memberships", "groups", key(groupPath))
			g := l.st.groups[strings.ToLower(groupPath)]
			if g == nil {
				l.ps.add(mp, "no group %s under groups", groupPath)
			}
			level, okRole := l.role(mp, e.Memberships.Groups[groupPath])
			if g != nil && okRole {
				u.groupRoles[g] = level
			}
		}
		if ok {
			l.users[strings.ToLower(u.username)] = u
		}
	}
}

func (l *loader) loadSessions(entries []sessionEntry) {
	cookies := make(map[[sha256.Size]byte]path)
	for i, e := range entries {
		p := path{"sessions", i}
		hash, ok := l.hash(p.with("cookie_sha256"), e.CookieSHA256, "_gitlab_kas cookie value")
		if ok && !firstUse(l, cookies, hash, p.with("cookie_sha256"), "session cookie") {
			ok = false
		}
		csrf, okCSRF := l.hash(p.with("csrf_token_sha256"), e.CSRFTokenSHA256, "CSRF token")
		u := l.user(p.with("user"), e.User)
		if ok && okCSRF && u != nil {
			l.st.sessions[hash] = &session{user: u, csrfTokenHash: csrf}
		}
	}
}

func (l *loader) loadCIJobs(entries []ciJobEntry) {
	ids := make(map[int64]path)
	tokens := make(map[[sha256.Size]byte]path)
	for i, e := range entries {
		p := path{"ci_jobs", i}
		ok := l.checkID(p, e.ID, ids, "CI job")
		if e.PipelineID <= 0 {
			l.ps.add(p.with("pipeline_id"), "required: the job's pipeline id, a positive number")
			ok = false
		}
		hash, okHash := l.hash(p.with("token_sha256"), e.TokenSHA256, "CI job token")
		if okHash && !firstUse(l, tokens, hash, p.with("token_sha256"), "CI job token") {
			okHash = false
		}
		pr := l.project(p.with("project"), e.Project)
		u := l.user(p.with("user"), e.User)
		if env := e.Environment; env != nil {
			ep := p.with("environment")
			if env.Name == "" {
				l.ps.add(ep, "name is required: ci_access environments match the environment's name")
				ok = false
			}
			if env.Slug == "" {
				l.ps.add(ep, "slug is required")
				ok = false
			}
			if !slices.Contains(environmentTiers, env.Tier) {
				l.ps.add(ep.with("tier"), "tier %q is not one of GitLab's tiers: %s", env.Tier, strings.Join(environmentTiers, ", "))
				ok = false
			}
		}
		if !ok || !okHash || pr == nil || u == nil {
			continue
		}
		l.st.jobs[hash] = &ciJob{
			id: e.ID, pipelineID: e.PipelineID, project: pr, user: u,
			protectedRef: e.ProtectedRef, environment: e.Environment,
		}
	}
}

// checkID checks a required, unique, positive id.
func (l *loader) checkID(at path, id int64, seen map[int64]path, what string) bool {
	if id <= 0 {
		l.ps.add(at.with("id"), "required: the %s's GitLab id, a positive number", what)
		return false
	}
	return firstUse(l, seen, id, at.with("id"), what+" id "+strconv.FormatInt(id, 10))
}

// checkPath checks a full path of at least minSegments segments.
func (l *loader) checkPath(at path, p string, minSegments int) bool {
	segments := strings.Split(p, "/")
	valid := p != "" && len(segments) >= minSegments
	for _, s := range segments {
		valid = valid && pathSegment.MatchString(s)
	}
	if !valid {
		what := "a full path like acme or acme/platform"
		if minSegments > 1 {
			what = "a full path with its group, like acme/app"
		}
		l.ps.add(at, "%q is not %s; segments hold letters, digits, '_', '-' and '.'", p, what)
	}
	return valid
}

// firstUse records k as used at at, or reports that it was used before.
func firstUse[K comparable](l *loader, seen map[K]path, k K, at path, what string) bool {
	if first, dup := seen[k]; dup {
		l.ps.add(at, "%s is already used at line %d (%s)", what, lineOf(l.ps.root, first), first)
		return false
	}
	seen[k] = at
	return true
}

var emptyHash = sha256.Sum256(nil)

// hash decodes a stored SHA-256. Its messages never repeat the value: when
// it is malformed it may well be the plain secret pasted by mistake.
func (l *loader) hash(at path, value, what string) ([sha256.Size]byte, bool) {
	var h [sha256.Size]byte
	if value == "" {
		l.ps.add(at, "required: the SHA-256 of the %s, in hex (printf %%s VALUE | sha256sum)", what)
		return h, false
	}
	b, err := hex.DecodeString(value)
	if err != nil || len(b) != sha256.Size {
		l.ps.add(at, "must be the SHA-256 of the %s: 64 hex digits from printf %%s VALUE | sha256sum, without its trailing \"  -\"; found %d characters that are not (not shown, in case they are the secret itself)", what, len(value))
		return h, false
	}
	copy(h[:], b)
	if h == emptyHash {
		l.ps.add(at, "is the SHA-256 of an empty string; hash the %s itself", what)
		return h, false
	}
	return h, true
}

// project resolves a reference to a listed project.
func (l *loader) project(at path, p string) *project {
	if p == "" {
		l.ps.add(at, "required: a project's full path, e.g. acme/app")
		return nil
	}
	pr := l.st.projects[strings.ToLower(p)]
	if pr == nil {
		l.ps.add(at, "no project %s under projects", p)
	}
	return pr
}

// user resolves a reference to a listed user.
func (l *loader) user(at path, username string) *user {
	if username == "" {
		l.ps.add(at, "required: a username from users")
		return nil
	}
	u := l.users[strings.ToLower(username)]
	if u == nil {
		l.ps.add(at, "no user %s under users", username)
	}
	return u
}

func (l *loader) role(at path, name string) (accessLevel, bool) {
	level, ok := roleLevel(name)
	if !ok {
		names := make([]string, len(roles))
		for i, r := range roles {
			names[i] = r.name
		}
		l.ps.add(at, "role %q is not one of GitLab's roles: %s", name, strings.Join(names, ", "))
	}
	return level, ok
}

// cutLast splits "a/b/c" into "a/b" and "c"; nested is false for "a".
func cutLast(p string) (parent, last string, nested bool) {
	i := strings.LastIndexByte(p, '/')
	if i < 0 {
		return "", p, false
	}
	return p[:i], p[i+1:], true
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// path addresses a node of the file: string elements are schema keys, key
// elements are keys taken from the data (paths in memberships), ints are list
// indexes.
type path []any

// key is a mapping key taken from the data, printed quoted.
type key string

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
		case key:
			fmt.Fprintf(&b, "[%q]", string(el))
		case string:
			if b.Len() > 0 {
				b.WriteByte('.')
			}
			b.WriteString(el)
		}
	}
	return b.String()
}

// lineOf returns the line of the node at p, or of its deepest existing ancestor.
func lineOf(root *yaml.Node, p path) int {
	if root == nil {
		return 0
	}
	n := root
	if n.Kind == yaml.DocumentNode && len(n.Content) > 0 {
		n = n.Content[0]
	}
	line := n.Line
	for _, el := range p {
		var next *yaml.Node
		name, isKey := el.(string)
		if k, ok := el.(key); ok {
			name, isKey = string(k), true
		}
		switch {
		case isKey && n.Kind == yaml.MappingNode:
			for i := 0; i+1 < len(n.Content); i += 2 {
				if n.Content[i].Value == name {
					next, line = n.Content[i+1], n.Content[i].Line
					break
				}
			}
		case !isKey && n.Kind == yaml.SequenceNode:
			if i := el.(int); i < len(n.Content) {
				next = n.Content[i]
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

// problems collects what is wrong with a file, each with its line.
type problems struct {
	file string
	root *yaml.Node
	list []problem
}

type problem struct {
	line int
	text string
}

func (ps *problems) add(at path, format string, args ...any) {
	line := lineOf(ps.root, at)
	ps.list = append(ps.list, problem{line, fmt.Sprintf("%s:%d: %s: %s", ps.file, line, at, fmt.Sprintf(format, args...))})
}

var yamlLinePrefix = regexp.MustCompile(`^(?:yaml: )?line (\d+): `)

// addYAML records one of yaml.v3's messages ("line N: …" or "yaml: line N: …").
func (ps *problems) addYAML(msg string) {
	m := yamlLinePrefix.FindStringSubmatch(msg)
	if m == nil {
		ps.list = append(ps.list, problem{0, fmt.Sprintf("%s: %s", ps.file, strings.TrimPrefix(msg, "yaml: "))})
		return
	}
	line, _ := strconv.Atoi(m[1])
	ps.list = append(ps.list, problem{line, fmt.Sprintf("%s:%d: %s", ps.file, line, msg[len(m[0]):])})
}

func (ps *problems) err() error {
	if len(ps.list) == 0 {
		return nil
	}
	slices.SortStableFunc(ps.list, func(a, b problem) int { return cmp.Compare(a.line, b.line) })
	texts := make([]string, len(ps.list))
	for i, p := range ps.list {
		texts[i] = p.text
	}
	return fmt.Errorf("standalone file %s has %d problem(s):\n\t%s", ps.file, len(texts), strings.Join(texts, "\n\t"))
}
