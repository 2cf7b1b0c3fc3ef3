package config

import (
	"bytes"
	"encoding/base64"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestReadSecretFile(t *testing.T) {
	secret := bytes.Repeat([]byte{0xA5}, 32)
	encoded := base64.StdEncoding.EncodeToString(secret)
	tests := []struct {
		name    string
		content string // "" with missing set: no file at all
		missing bool
		dir     bool
		want    []byte
		wantErr string
	}{
		{name: "32 bytes", content: encoded, want: secret},
		{name: "32 bytes with newline and spaces", content: "\n  " + encoded + " \r\n", want: secret},
		{name: "31 bytes", content: base64.StdEncoding.EncodeToString(secret[:31]), wantErr: "decodes to 31 bytes, want exactly 32; generate one with `kas secret generate`"},
		{name: "33 bytes", content: base64.StdEncoding.EncodeToString(append(secret, 1)), wantErr: "decodes to 33 bytes, want exactly 32"},
		{name: "URL-safe alphabet", content: base64.URLEncoding.EncodeToString(bytes.Repeat([]byte{0xFB}, 32)), wantErr: "is not base64 (standard encoding"},
		{name: "no padding", content: base64.RawStdEncoding.EncodeToString(bytes.Repeat([]byte{1}, 32)), wantErr: "is not base64"},
		{name: "plain text", content: "hunter2-hunter2-hunter2", wantErr: "is not base64"},
		{name: "empty", content: " \n", wantErr: "is empty"},
		{name: "too large", content: strings.Repeat(encoded, 40), wantErr: "is larger than 1024 bytes"},
		{name: "missing", missing: true, wantErr: "no such file or directory"},
		{name: "a directory", dir: true, wantErr: "read secret file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "secret")
			switch {
			case tt.dir:
				if err := os.Mkdir(path, 0o700); err != nil {
					t.Fatal(err)
				}
			case !tt.missing:
				if err := os.WriteFile(path, []byte(tt.content), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			got, err := ReadSecretFile(path)
			if tt.wantErr != "" {
				if err == nil {
					t.Fatalf("want an error containing %q, got none", tt.wantErr)
				}
				if !strings.Contains(err.Error(), tt.wantErr) {
					t.Errorf("error %q does not contain %q", err, tt.wantErr)
				}
				if !strings.Contains(err.Error(), path) {
					t.Errorf("error %q does not name the file", err)
				}
				if c := strings.TrimSpace(tt.content); c != "" && strings.Contains(err.Error(), c) {
					t.Errorf("error %q contains the file's content", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("ReadSecretFile: %v", err)
			}
			if !bytes.Equal(got, tt.want) {
				t.Errorf("got %x, want %x", got, tt.want)
			}
		})
	}
}

func TestParseCIDRs(t *testing.T) {
	tests := []struct {
		in      string
		want    []string
		wantErr string
	}{
		{in: "10.0.0.0/8", want: []string{"10.0.0.0/8"}},
		{in: " 10.0.0.0/8 , fd00::/8,192.168.1.0/24 ", want: []string{"10.0.0.0/8", "fd00::/8", "192.168.1.0/24"}},
		{in: "10.1.2.3/8", want: []string{"10.0.0.0/8"}},
		{in: "10.0.0.0/8,", want: []string{"10.0.0.0/8"}},
		{in: "2001:db8::1/128", want: []string{"2001:db8::1/128"}},
		{in: "10.0.0.1", wantErr: `"10.0.0.1": not a CIDR`},
		{in: "10.0.0.0/33", wantErr: `"10.0.0.0/33": not a CIDR`},
		{in: "10.0.0.0/8, nonsense, ::/200", wantErr: `"nonsense", "::/200": not a CIDR`},
		{in: "", wantErr: "no CIDR given"},
		{in: " , ", wantErr: "no CIDR given"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParseCIDRs(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("want an error containing %q, got %v", tt.wantErr, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseCIDRs: %v", err)
			}
			var want []netip.Prefix
			for _, w := range tt.want {
				want = append(want, netip.MustParsePrefix(w))
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("got %v, want %v", got, want)
			}
		})
	}
}
