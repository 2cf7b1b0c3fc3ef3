package agent

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"

	"gopkg.in/yaml.v3"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// maxConfigurationSize bounds a configuration push; GitLab limits agent
// configuration files far below this.
const maxConfigurationSize = 1 << 20

// serveConfiguration stores the agent configuration kas pushes (POST, YAML).
func (a *Agent) serveConfiguration(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		writeStatus(w, http.StatusMethodNotAllowed, metav1.StatusReasonMethodNotAllowed,
			fmt.Sprintf("agentk: %s is not allowed on the configuration endpoint, use POST", r.Method))
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxConfigurationSize))
	if err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			writeStatus(w, http.StatusRequestEntityTooLarge, metav1.StatusReasonRequestEntityTooLarge,
				fmt.Sprintf("agentk: configuration is larger than %d bytes", maxConfigurationSize))
			return
		}
		writeStatus(w, http.StatusBadRequest, metav1.StatusReasonBadRequest, "agentk: read configuration: "+err.Error())
		return
	}
	var doc yaml.Node
	if err := yaml.Unmarshal(body, &doc); err != nil {
		writeStatus(w, http.StatusBadRequest, metav1.StatusReasonBadRequest, "agentk: configuration is not valid YAML: "+err.Error())
		return
	}

	a.mu.Lock()
	changed := a.config == nil || !bytes.Equal(a.config, body)
	a.config = body
	a.mu.Unlock()

	// The content is not logged: it is the user's, and a hash is enough to
	// tell versions apart.
	sum := sha256.Sum256(body)
	if changed {
		a.logger.Info("agent configuration changed", "size", len(body), "sha256", hex.EncodeToString(sum[:]))
	} else {
		a.logger.Debug("agent configuration unchanged", "sha256", hex.EncodeToString(sum[:]))
	}
	w.WriteHeader(http.StatusNoContent)
}

// Configuration returns the last agent configuration kas pushed (YAML), or
// nil if none has arrived yet.
func (a *Agent) Configuration() []byte {
	a.mu.Lock()
	defer a.mu.Unlock()
	return bytes.Clone(a.config)
}
