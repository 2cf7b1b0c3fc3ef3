package gitlab_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/kasproject/kas/server/gitlab"
	"github.com/kasproject/kas/server/gitlab/gitlabtest"
	"github.com/kasproject/kas/server/kasjwt"
)

func TestGetReceptiveAgents(t *testing.T) {
	t.Run("GitLab's JSON", func(t *testing.T) {
		// As Grape presents API::Entities::Clusters::ReceptiveAgent: absent
		// optional fields are null.
		rails := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if err := kasjwt.Verify(secret, r.Header.Get(gitlab.HeaderAPIRequest), kasjwt.AudienceGitLab, kasjwt.IssuerKAS); err != nil || r.URL.Path != gitlab.PathReceptiveAgents {
				http.Error(w, `{"message":"401 Unauthorized"}`, http.StatusUnauthorized)
				return
			}
			w.Header().Set("Content-Type", "application/json")
			_, _ = w.Write([]byte(`{"agents":[
				{"id":1,"url":"grpcs://agent.example.com:4242","ca_cert":null,"tls_host":null,"jwt":{"private_key":"c2VlZA=="},"mtls":null},
				{"id":2,"url":"grpcs://10.0.0.5:4242","ca_cert":"-----BEGIN CERTIFICATE-----\n","tls_host":"agentk.internal","jwt":null,"mtls":{"client_key":"k","client_cert":"c"}}]}`))
		}))
		defer rails.Close()
		got, err := newClient(t, rails.URL, nil).GetReceptiveAgents(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 2 || got[0].ID != 1 || got[0].JWT == nil || got[0].JWT.PrivateKey != "c2VlZA==" || got[0].MTLS != nil || got[0].CACert != "" ||
			got[1].TLSHost != "agentk.internal" || got[1].MTLS == nil || got[1].MTLS.ClientCert != "c" || got[1].JWT != nil {
			t.Fatalf("decoded %+v", got)
		}
	})

	t.Run("the fake GitLab", func(t *testing.T) {
		rails := gitlabtest.New(t, secret, nil)
		c := newClient(t, rails.URL, nil)
		// A GitLab without the feature: 404.
		if _, err := c.GetReceptiveAgents(context.Background()); !errors.Is(err, gitlab.ErrNotFound) {
			t.Fatalf("got %v, want a 404", err)
		}
		rails.SetReceptiveAgents([]gitlab.ReceptiveAgent{{ID: 3, URL: "grpc://agentk:8182", JWT: &gitlab.ReceptiveAgentJWT{PrivateKey: "a2V5"}}})
		got, err := c.GetReceptiveAgents(context.Background())
		if err != nil || len(got) != 1 || got[0].ID != 3 {
			t.Fatalf("got %+v, %v", got, err)
		}
		// Not cached: the list is polled.
		rails.SetReceptiveAgents(nil)
		if got, err := c.GetReceptiveAgents(context.Background()); err != nil || len(got) != 0 {
			t.Fatalf("after emptying the list: %+v, %v", got, err)
		}
		if n := rails.Calls(gitlab.PathReceptiveAgents); n != 3 {
			t.Errorf("GitLab was asked %d times, want 3", n)
		}
	})
}
