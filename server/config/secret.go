package config

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"
)

// SecretLength is the length in bytes of the API and private API secrets,
// as GitLab requires of gitlab_kas['api_secret_key'] and ['private_api_secret_key'].
const SecretLength = 32

// maxSecretFileSize bounds how much of a secret file is read: a secret is 44
// base64 characters, so anything much larger is the wrong file.
const maxSecretFileSize = 1024

// ReadSecretFile reads a secret file: base64 (standard encoding, surrounding
// whitespace ignored) of exactly 32 bytes. It returns the decoded bytes.
// Errors name the file and what is wrong with it, never its content.
func ReadSecretFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read secret file: %w", err)
	}
	defer f.Close()
	raw, err := io.ReadAll(io.LimitReader(f, maxSecretFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("read secret file: %w", err)
	}
	if len(raw) > maxSecretFileSize {
		return nil, fmt.Errorf("secret file %s is larger than %d bytes, so it is not a secret file (a secret is %d base64 characters); generate one with `kas secret generate`",
			path, maxSecretFileSize, base64.StdEncoding.EncodedLen(SecretLength))
	}
	text := bytes.TrimSpace(raw)
	if len(text) == 0 {
		return nil, fmt.Errorf("secret file %s is empty, want base64 of exactly %d bytes; generate one with `kas secret generate`", path, SecretLength)
	}
	secret := make([]byte, base64.StdEncoding.DecodedLen(len(text)))
	n, err := base64.StdEncoding.Decode(secret, text)
	if err != nil {
		// The decoder's error carries only an offset, but say nothing of
		// the content at all.
		return nil, fmt.Errorf("secret file %s is not base64 (standard encoding: A-Z a-z 0-9 + / and = padding), want base64 of exactly %d bytes; generate one with `kas secret generate`", path, SecretLength)
	}
	if n != SecretLength {
		return nil, fmt.Errorf("secret file %s decodes to %d bytes, want exactly %d; generate one with `kas secret generate`", path, n, SecretLength)
	}
	return secret[:n], nil
}

// ParseCIDRs parses OWN_PRIVATE_API_CIDR: comma-separated IPv4 and/or IPv6
// CIDRs such as "10.0.0.0/8, fd00::/8". Spaces around entries and empty
// entries (a trailing comma) are ignored; at least one CIDR is required.
// Host bits are cleared, so 10.1.2.3/8 gives 10.0.0.0/8.
func ParseCIDRs(s string) ([]netip.Prefix, error) {
	var prefixes []netip.Prefix
	var bad []string
	for entry := range strings.SplitSeq(s, ",") {
		entry = strings.TrimSpace(entry)
		if entry == "" {
			continue
		}
		p, err := netip.ParsePrefix(entry)
		if err != nil {
			bad = append(bad, fmt.Sprintf("%q", entry))
			continue
		}
		prefixes = append(prefixes, p.Masked())
	}
	if len(bad) > 0 {
		return nil, fmt.Errorf("%s: not a CIDR, want comma-separated CIDRs such as 10.0.0.0/8 or fd00::/8", strings.Join(bad, ", "))
	}
	if len(prefixes) == 0 {
		return nil, errors.New("no CIDR given, want one or more comma-separated CIDRs such as 10.0.0.0/8")
	}
	return prefixes, nil
}
