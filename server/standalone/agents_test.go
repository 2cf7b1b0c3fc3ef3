package standalone

import (
	"reflect"
	"testing"
)

func TestAgents(t *testing.T) {
	b, err := Open("../../testdata/standalone/example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	got, err := b.Agents()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) == 0 || !reflect.DeepEqual(got[0], Agent{ID: 1, Name: "prod", ProjectID: got[0].ProjectID, ProjectPath: "acme/infra"}) || got[0].ProjectID == 0 {
		t.Fatalf("Agents() = %+v, want agent 1 prod of acme/infra first", got)
	}
}
