// Package tlsutil is TLS configuration for kas: certificate loading, CA
// pools, client TLS for GitLab, peers and Redis.
package tlsutil
