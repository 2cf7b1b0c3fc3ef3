package protocol

import (
	"errors"
	"net/url"
	"testing"
)

func TestCheckPath(t *testing.T) {
	tests := []struct {
		target string // the request-target as sent
		unsafe bool
	}{
		{"/api/v1/namespaces", false},
		{"/apis/apps/v1/namespaces/default/deployments/web", false},
		{"/api/v1/namespaces/default/pods/web-0/log?follow=true", false},
		{"/api/v1/namespaces/kube-system/services/https:metrics:443/proxy/metrics", false},
		{"/api/v1/nodes/node.example.com", false}, // dots inside a name are fine
		{"/api/v1/namespaces/a%20b", false},
		{"/", false},
		{"/../../escape", true},
		{"/api/../../escape", true},
		{"/api/v1/./namespaces", true},
		{"/..", true},
		{"/..%2f..%2fescape", true},
		{"/..%2F..%2Fescape", true},
		{"/%2e%2e/%2e%2e/escape", true},
		{"/%2E%2E/escape", true},
		{"/.%2e/escape", true},
		{"/%2e./escape", true},
		{"/api/v1/namespaces%2fkube-system", true},
		{"/api/v1/%252e%252e/escape", true}, // %252e decodes to %2e
		{"/api/v1/%252F/escape", true},      // %252F decodes to %2F
		{"/api/v1/namespaces/a%25b", false}, // a literal % is not a slash or dot
	}
	for _, tt := range tests {
		t.Run(tt.target, func(t *testing.T) {
			u, err := url.ParseRequestURI(tt.target)
			if err != nil {
				t.Fatal(err)
			}
			err = CheckPath(u)
			if tt.unsafe != (err != nil) || (err != nil && !errors.Is(err, ErrUnsafePath)) {
				t.Fatalf("CheckPath(%q) = %v, want unsafe: %v", tt.target, err, tt.unsafe)
			}
		})
	}
}
