package protocol

import "testing"

func TestIsReservedHeader(t *testing.T) {
	for name, want := range map[string]bool{
		"Impersonate-User":             true,
		"impersonate-group":            true,
		"Impersonate_User":             true,
		"IMPERSONATE_EXTRA_SCOPES":     true,
		"Impersonate-Uid":              true,
		"X-Remote-User":                true,
		"x_remote_group":               true,
		"X-Remote-Extra-Scopes":        true,
		"X-Real-Ip":                    true,
		"X_REAL_IP":                    true,
		"X-Forwarded-For":              true,
		"X-Forwarded-Host":             true,
		"x_forwarded_proto":            true,
		"Forwarded":                    true,
		"Kas-Impersonate":              true,
		"kas_upgrade":                  true,
		"Accept":                       false,
		"Content-Type":                 false,
		"X-Remote-Username-Is-Not-Set": false,
		"X-Request-Id":                 false,
		"Impersonator":                 false,
		"User-Agent":                   false,
	} {
		if got := IsReservedHeader(name); got != want {
			t.Errorf("IsReservedHeader(%q) = %v, want %v", name, got, want)
		}
	}
}
