// Package protocol is the wire contract between kas and agentk (protocol v1):
// the WebSocket handshake headers, the byte-stream adapter that lets HTTP/2
// run over a WebSocket, and the headers kas puts on tunnelled requests.
//
// Over the tunnel kas is the HTTP/2 client and agentk the HTTP/2 server.
// Every request kas sends is one stream. Requests marked with HeaderInternal
// under InternalPathPrefix are addressed to agentk itself; every other path is
// a Kubernetes API path.
package protocol

// Handshake: agentk dials AgentPath with these.
const (
	// AgentPath is where agents open their WebSocket on kas's public listener.
	AgentPath = "/-/kubernetes-agent/"
	// Subprotocol names the protocol version in Sec-WebSocket-Protocol.
	Subprotocol = "kas-tunnel.v1"

	HeaderAgentVersion      = "Kas-Agent-Version"
	HeaderAgentCommit       = "Kas-Agent-Commit"
	HeaderPodName           = "Kas-Agent-Pod-Name"
	HeaderPodNamespace      = "Kas-Agent-Pod-Namespace"
	HeaderKubernetesVersion = "Kas-Agent-Kubernetes-Version"
)

// Tunnelled requests (kas → agentk).
const (
	// HeaderIdentity carries the identity agentk must impersonate, encoded by
	// EncodeIdentity. Absent means the agent's own service account. agentk
	// drops every Impersonate-* header it receives and sets them from this.
	HeaderIdentity = "Kas-Impersonate"
	// HeaderUpgrade carries the caller's Upgrade header (websocket, SPDY/3.1):
	// HTTP/2 cannot carry Connection/Upgrade, so kas moves it here and agentk
	// performs the HTTP/1.1 upgrade against the API server. On an upgraded
	// response agentk sets it to the API server's Upgrade value.
	HeaderUpgrade = "Kas-Upgrade"
	// HeaderUpgradeStatus is set by agentk on a 200 response to say the API
	// server switched protocols (its value is "101"); the stream's bodies then
	// carry the raw upgraded bytes each way.
	HeaderUpgradeStatus = "Kas-Upgrade-Status"

	// InternalPathPrefix is reserved for requests to agentk itself; no
	// Kubernetes API path starts with it. agentk serves such a path itself
	// only when HeaderInternal is also set, which kas never forwards from a
	// caller (the proxy removes every Kas-* header and refuses these paths).
	InternalPathPrefix = "/-/agentk/"
	// HeaderInternal ("1") marks a request kas itself sends to agentk.
	HeaderInternal = "Kas-Internal"
	// ConfigurationPath receives configuration pushes (POST, YAML body).
	ConfigurationPath = InternalPathPrefix + "configuration"
)
