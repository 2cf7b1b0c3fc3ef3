// Package tlsutil is TLS for kas: the server side of every listener
// (certificate files reloaded on change or SIGHUP, or certificates from an
// ACME CA through certmagic, shared between nodes in Redis) and the client
// side of every outbound connection (trusted CA pools for GitLab, peers and
// Redis, and logging an untrusted server certificate once with the fix).
package tlsutil
