package standalone

import "fmt"

// Agent is an agent the standalone file lists.
type Agent struct {
	ID          int64
	Name        string
	ProjectID   int64
	ProjectPath string
}

// Agents lists the agents of the standalone file, ordered by ID, so the
// status page can show those that are not connected.
func (b *Backend) Agents() ([]Agent, error) {
	st, err := b.snapshot()
	if err != nil {
		return nil, fmt.Errorf("list the agents of %s: %w", b.file, err)
	}
	out := make([]Agent, len(st.agents))
	for i, a := range st.agents {
		out[i] = Agent{ID: a.id, Name: a.name, ProjectID: a.project.id, ProjectPath: a.project.path}
	}
	return out, nil
}
