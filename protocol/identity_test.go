package protocol

import (
	"encoding/base64"
	"net/http"
	"reflect"
	"strings"
	"testing"
)

func TestIdentityRoundTrip(t *testing.T) {
	id := Identity{
		Username: "gitlab:user:alice",
		UID:      "7",
		Groups:   []string{"gitlab:user", "gitlab:project_role:100:developer"},
		Extra:    map[string][]string{"agent.gitlab.com/id": {"1"}, "agent.gitlab.com/username": {"alice"}},
	}
	v, err := EncodeIdentity(id)
	if err != nil {
		t.Fatal(err)
	}
	got, err := DecodeIdentity(v)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, id) {
		t.Fatalf("round trip: got %+v, want %+v", got, id)
	}
}

func TestDecodeIdentityRejects(t *testing.T) {
	tests := []struct {
		name, value, wantErr string
	}{
		{"not base64", "!!!", "not base64url"},
		{"not JSON", "bm90IGpzb24", "not valid JSON"},
		{"no username", "eyJncm91cHMiOlsiYSJdfQ", "no username"},
		{"bad extra key", encodeRaw(`{"username":"u","extra":{"a b":["x"]}}`), "not a valid header name"},
		{"too large", strings.Repeat("A", MaxIdentitySize+1), "more than"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := DecodeIdentity(tc.value)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("DecodeIdentity(%q) error = %v, want containing %q", tc.value, err, tc.wantErr)
			}
		})
	}
	if _, err := EncodeIdentity(Identity{}); err == nil {
		t.Fatal("EncodeIdentity accepted an identity without a username")
	}
}

func TestSetImpersonationHeaders(t *testing.T) {
	h := http.Header{}
	h.Set("Impersonate-User", "caller-chose-this")
	h.Add("impersonate-group", "system:masters")
	h["impersonate-extra-scopes"] = []string{"x"} // non-canonical key
	h.Set("Accept", "application/json")
	SetImpersonationHeaders(h, Identity{
		Username: "gitlab:ci_job:9",
		Groups:   []string{"gitlab:ci_job", "gitlab:project:101"},
		Extra:    map[string][]string{"agent.gitlab.com/ci_job_id": {"9"}},
	})
	want := http.Header{
		"Accept":            {"application/json"},
		"Impersonate-User":  {"gitlab:ci_job:9"},
		"Impersonate-Group": {"gitlab:ci_job", "gitlab:project:101"},
		"Impersonate-Extra-agent.gitlab.com%2Fci_job_id": {"9"},
	}
	if !reflect.DeepEqual(h, want) {
		t.Fatalf("headers:\n got %v\nwant %v", h, want)
	}
}

func encodeRaw(s string) string {
	return strings.TrimRight(strings.NewReplacer("+", "-", "/", "_").Replace(b64(s)), "=")
}

func FuzzDecodeIdentity(f *testing.F) {
	good, _ := EncodeIdentity(Identity{Username: "u", Groups: []string{"g"}, Extra: map[string][]string{"k": {"v"}}})
	for _, s := range []string{good, "", "e30", "!!", encodeRaw(`{"username":"x","extra":{"":[""]}}`)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		id, err := DecodeIdentity(v)
		if err != nil {
			return
		}
		if id.Username == "" {
			t.Fatal("accepted an identity without a username")
		}
		h := http.Header{}
		SetImpersonationHeaders(h, id)
		for k := range h {
			if strings.ContainsAny(k, " \t\r\n:") {
				t.Fatalf("produced invalid header name %q", k)
			}
		}
	})
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }
