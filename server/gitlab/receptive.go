package gitlab

import (
	"context"
	"net/http"
)

// PathReceptiveAgents lists the receptive agents: agents GitLab (EE,
// Ultimate, 17.4 or later, with the admin setting "Enable receptive mode")
// wants kas to dial, from the agents' URL configurations. GitLab without
// the feature answers 404.
const PathReceptiveAgents = "/api/v4/internal/kubernetes/receptive_agents"

// ReceptiveAgents is the answer of GET PathReceptiveAgents.
type ReceptiveAgents struct {
	Agents []ReceptiveAgent `json:"agents"`
}

// ReceptiveAgent is one agent's URL configuration, as GitLab's
// API::Entities::Clusters::ReceptiveAgent presents it. Exactly one of JWT
// and MTLS is set. It holds private keys: never log it.
type ReceptiveAgent struct {
	// ID is the agent's ID.
	ID int64 `json:"id"`
	// URL is where the agent listens, e.g. grpcs://agent.example.com:4242.
	URL string `json:"url"`
	// CACert (PEM) verifies the agent's certificate; empty means the
	// system roots.
	CACert string `json:"ca_cert,omitempty"`
	// TLSHost is the name to verify in the agent's certificate; empty
	// means the URL's host.
	TLSHost string              `json:"tls_host,omitempty"`
	JWT     *ReceptiveAgentJWT  `json:"jwt,omitempty"`
	MTLS    *ReceptiveAgentMTLS `json:"mtls,omitempty"`
}

// ReceptiveAgentJWT is the key kas signs its JWT for the agent with.
type ReceptiveAgentJWT struct {
	// PrivateKey is base64 of the Ed25519 private key's 32-byte seed
	// (Ruby's Ed25519::SigningKey#to_bytes).
	PrivateKey string `json:"private_key"`
}

// ReceptiveAgentMTLS is the client certificate kas presents to the agent.
type ReceptiveAgentMTLS struct {
	ClientCert string `json:"client_cert"` // PEM
	ClientKey  string `json:"client_key"`  // PEM
}

// GetReceptiveAgents asks GitLab which receptive agents kas should dial.
// Not cached: it is polled, and the answer carries private keys.
func (c *Client) GetReceptiveAgents(ctx context.Context) ([]ReceptiveAgent, error) {
	var resp ReceptiveAgents
	// call decodes a successful answer into its last argument.
	if _, err := c.call(ctx, "get receptive agents", http.MethodGet, PathReceptiveAgents, nil, nil, &resp); err != nil {
		return nil, err
	}
	return resp.Agents, nil
}
