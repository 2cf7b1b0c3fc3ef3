package agentyaml

import (
	"errors"
	"reflect"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want *Config
	}{
		{name: "empty file", in: "", want: &Config{}},
		{name: "only comments", in: "# nothing configured yet\n", want: &Config{}},
		{name: "other sections pass through", in: "gitops:\n  manifest_projects:\n  - id: acme/manifests\nobservability:\n  logging:\n    level: debug\n", want: &Config{}},
		{
			name: "every enforced field",
			in: `
ci_access:
  projects:
    - id: acme/app
      default_namespace: app
      access_as:
        impersonate:
          username: deployer
          groups: [deployers, viewers]
          uid: "1000"
          extra:
            - key: team
              val: [payments]
      environments: [production, review/*]
      protected_branches_only: true
  groups:
    - id: acme/platform
      access_as:
        ci_job: {}
    - id: acme
user_access:
  access_as:
    user: {}
  projects:
    - id: acme/app
  groups:
    - id: acme/platform
flux:
  resource_name: ignored-by-kas
`,
			want: &Config{
				CIAccess: &CIAccess{
					Projects: []CIAccessEntry{{
						ID:               "acme/app",
						DefaultNamespace: "app",
						AccessAs: &CIAccessAs{Impersonate: &Impersonate{
							Username: "deployer",
							Groups:   []string{"deployers", "viewers"},
							UID:      "1000",
							Extra:    []ImpersonateExtra{{Key: "team", Values: []string{"payments"}}},
						}},
						Environments:          []string{"production", "review/*"},
						ProtectedBranchesOnly: true,
					}},
					Groups: []CIAccessEntry{
						{ID: "acme/platform", AccessAs: &CIAccessAs{CIJob: &struct{}{}}},
						{ID: "acme"},
					},
				},
				UserAccess: &UserAccess{
					AccessAs: &UserAccessAs{User: &struct{}{}},
					Projects: []Ref{{ID: "acme/app"}},
					Groups:   []Ref{{ID: "acme/platform"}},
				},
			},
		},
		{
			name: "access_as agent",
			in:   "user_access:\n  access_as:\n    agent: {}\n  projects: [{id: acme/app}]\n",
			want: &Config{UserAccess: &UserAccess{AccessAs: &UserAccessAs{Agent: &struct{}{}}, Projects: []Ref{{ID: "acme/app"}}}},
		},
		{
			name: "user_access without access_as parses; GitLab refuses users at request time",
			in:   "user_access:\n  projects: [{id: acme/app}]\n",
			want: &Config{UserAccess: &UserAccess{Projects: []Ref{{ID: "acme/app"}}}},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Parse([]byte(tc.in))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("Parse =\n%#v\nwant\n%#v", got, tc.want)
			}
		})
	}
}

func TestParseProblems(t *testing.T) {
	tests := []struct {
		name string
		in   string
		// want holds one "line N: substring" per expected problem, in order.
		want []string
	}{
		{
			name: "syntax error",
			in:   "ci_access:\n  projects:\n    - id: acme/app\n\t- id: acme/b\n",
			// yaml.v3 reports the line where the broken block began.
			want: []string{"line 3: found a tab character that violates indentation"},
		},
		{
			name: "entry without id",
			in:   "ci_access:\n  projects:\n    - default_namespace: app\n",
			want: []string{"line 3: ci_access.projects[0].id: the full path is required"},
		},
		{
			name: "two identities",
			in:   "ci_access:\n  groups:\n    - id: acme\n      access_as:\n        agent: {}\n        ci_job: {}\n",
			want: []string{"line 4: ci_access.groups[0].access_as: set exactly one of agent, impersonate, ci_job; found agent and ci_job"},
		},
		{
			name: "misspelled key inside an entry",
			in:   "ci_access:\n  projects:\n    - id: acme/app\n      enviroments: [production]\n",
			want: []string{"line 4: field enviroments not found"},
		},
		{
			name: "ci_user is not supported",
			in:   "ci_access:\n  projects:\n    - id: acme/app\n      access_as:\n        ci_user: {}\n",
			want: []string{"line 5: field ci_user not found"},
		},
		{
			name: "impersonate without username, extra without key",
			in:   "ci_access:\n  projects:\n    - id: acme/app\n      access_as:\n        impersonate:\n          groups: [g]\n          extra:\n            - val: [v]\n",
			want: []string{
				"line 5: ci_access.projects[0].access_as.impersonate.username: required",
				"line 8: ci_access.projects[0].access_as.impersonate.extra[0].key: required",
			},
		},
		{
			name: "environment pattern that is not a regular expression",
			in:   "ci_access:\n  projects:\n    - id: acme/app\n      environments:\n        - production\n        - review/(*\n        - \"\"\n",
			want: []string{
				`line 6: ci_access.projects[0].environments[1]: "review/(*" is not a usable pattern`,
				"line 7: ci_access.projects[0].environments[2]: an environment name or pattern is required",
			},
		},
		{
			name: "misspelled section",
			in:   "ci_acess:\n  projects: [{id: acme/app}]\n",
			want: []string{`line 1: unknown key "ci_acess": did you mean ci_access?`},
		},
		{
			name: "user_access with two identities and an empty ref",
			in:   "user_access:\n  access_as:\n    agent: {}\n    user: {}\n  groups:\n    - id: \"\"\n",
			want: []string{
				"line 2: user_access.access_as: set exactly one of agent, user; found agent and user",
				"line 6: user_access.groups[0].id: the group's full path is required",
			},
		},
		{
			name: "wrong type",
			in:   "ci_access:\n  projects: acme/app\n",
			want: []string{"line 2: cannot unmarshal !!str `acme/app`"},
		},
		{
			name: "every problem at once",
			in:   "ci_access:\n  projects:\n    - default_namespace: a\n    - id: acme/b\n      bogus: 1\nuser_access:\n  access_as: {agent: {}, user: {}}\n",
			want: []string{
				"line 3: ci_access.projects[0].id",
				"line 5: field bogus not found",
				"line 7: user_access.access_as: set exactly one",
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := Parse([]byte(tc.in))
			if err == nil {
				t.Fatalf("Parse = %+v, want an error", cfg)
			}
			var perr *Error
			if !errors.As(err, &perr) {
				t.Fatalf("Parse error %T %v, want *Error", err, err)
			}
			if len(perr.Problems) != len(tc.want) {
				t.Fatalf("got %d problems %q, want %d: %q", len(perr.Problems), err, len(tc.want), tc.want)
			}
			for i, p := range perr.Problems {
				if !strings.HasPrefix(p.String(), tc.want[i]) {
					t.Errorf("problem %d = %q, want prefix %q", i, p.String(), tc.want[i])
				}
			}
		})
	}
}

func TestMatchesEnvironment(t *testing.T) {
	tests := []struct {
		name     string
		patterns []string
		env      string
		want     bool
	}{
		{name: "no environments: every job", patterns: nil, env: "", want: true},
		{name: "no environments: job with one", patterns: nil, env: "production", want: true},
		{name: "environments: job without one", patterns: []string{"production"}, env: "", want: false},
		{name: "exact", patterns: []string{"staging", "production"}, env: "production", want: true},
		{name: "exact only without a wildcard", patterns: []string{"production"}, env: "production-eu", want: false},
		{name: "wildcard", patterns: []string{"review/*"}, env: "review/feature-1", want: true},
		{name: "wildcard is unanchored, as in GitLab", patterns: []string{"review/*"}, env: "x-review/1", want: true},
		{name: "wildcard does not match other names", patterns: []string{"review/*"}, env: "staging", want: false},
		{name: "wildcard alone", patterns: []string{"*"}, env: "anything", want: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := CIAccessEntry{ID: "acme/app", Environments: tc.patterns}
			if got := e.MatchesEnvironment(tc.env); got != tc.want {
				t.Errorf("MatchesEnvironment(%q) with %q = %v, want %v", tc.env, tc.patterns, got, tc.want)
			}
		})
	}
}
