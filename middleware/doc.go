// Package middleware holds kas's request hygiene for every listener:
// correlation IDs, access logs, panic recovery, request metrics, CORS and
// the client's address behind trusted proxies.
// Authentication of each kind lives with the handler that needs it
// (server/proxyauth, server/tunnel, the internal and private APIs) so a
// route's guard is visible where the route is mounted.
package middleware
