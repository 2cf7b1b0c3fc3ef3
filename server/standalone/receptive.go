package standalone

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"os"

	"github.com/kasproject/kas/protocol"
	"github.com/kasproject/kas/server/gitlab"
)

const (
	opReceptiveAgents = "get receptive agents"
	opAgentInfoByID   = "get agent info by id"
)

// GetReceptiveAgents lists the agents with a receptive section, in GitLab's
// shape, reading their key and certificate files now: a rotated file takes
// effect at kas's next poll.
func (b *Backend) GetReceptiveAgents(ctx context.Context) ([]gitlab.ReceptiveAgent, error) {
	st, err := b.begin(ctx, opReceptiveAgents)
	if err != nil {
		return nil, err
	}
	var out []gitlab.ReceptiveAgent
	for _, a := range st.agents {
		if a.receptive == nil {
			continue
		}
		ra, err := readReceptive(*a.receptive)
		if err != nil {
			return nil, b.fail(opReceptiveAgents, b.url, fmt.Errorf("agent %d (%s): %w", a.id, a.name, err))
		}
		ra.ID = a.id
		out = append(out, ra)
	}
	return out, nil
}

// AgentInfoByID describes agent id as agent_info would: a receptive agent
// has no token to look it up by. An unknown agent is a 404.
func (b *Backend) AgentInfoByID(ctx context.Context, id int64) (*gitlab.AgentInfo, error) {
	st, err := b.begin(ctx, opAgentInfoByID)
	if err != nil {
		return nil, err
	}
	a := st.agentsByID[id]
	if a == nil {
		return nil, b.refuse(opAgentInfoByID, http.StatusNotFound, fmt.Sprintf("404 Not Found: no agent %d under agents in %s", id, b.file))
	}
	return &gitlab.AgentInfo{ProjectID: a.project.id, AgentID: a.id, AgentName: a.name, DefaultBranch: a.project.defaultBranch}, nil
}

// readReceptive reads and checks a receptive entry's files into GitLab's
// shape (the ID aside). Errors name the file, never its content.
func readReceptive(e receptiveEntry) (gitlab.ReceptiveAgent, error) {
	ra := gitlab.ReceptiveAgent{URL: e.URL, TLSHost: e.TLSHost}
	var errs []error
	if e.CACertificateFile != "" {
		pem, err := os.ReadFile(e.CACertificateFile)
		if err != nil {
			errs = append(errs, fmt.Errorf("ca_certificate_file: %w", err))
		} else if !x509.NewCertPool().AppendCertsFromPEM(pem) {
			errs = append(errs, fmt.Errorf("ca_certificate_file %s holds no PEM certificate", e.CACertificateFile))
		} else {
			ra.CACert = string(pem)
		}
	}
	if e.JWTPrivateKeyFile != "" {
		data, err := os.ReadFile(e.JWTPrivateKeyFile)
		if err != nil {
			errs = append(errs, fmt.Errorf("jwt_private_key_file: %w", err))
		} else if key, err := protocol.ParseEd25519PrivateKey(data); err != nil {
			errs = append(errs, fmt.Errorf("jwt_private_key_file %s: %w", e.JWTPrivateKeyFile, err))
		} else {
			ra.JWT = &gitlab.ReceptiveAgentJWT{PrivateKey: base64.StdEncoding.EncodeToString(key.Seed())}
		}
	}
	if e.ClientCertificateFile != "" {
		cert, errCert := os.ReadFile(e.ClientCertificateFile)
		key, errKey := os.ReadFile(e.ClientKeyFile)
		switch {
		case errCert != nil:
			errs = append(errs, fmt.Errorf("client_certificate_file: %w", errCert))
		case errKey != nil:
			errs = append(errs, fmt.Errorf("client_key_file: %w", errKey))
		default:
			if _, err := tls.X509KeyPair(cert, key); err != nil {
				errs = append(errs, fmt.Errorf("client_certificate_file %s and client_key_file %s: %w", e.ClientCertificateFile, e.ClientKeyFile, err))
			} else {
				ra.MTLS = &gitlab.ReceptiveAgentMTLS{ClientCert: string(cert), ClientKey: string(key)}
			}
		}
	}
	return ra, errors.Join(errs...)
}
