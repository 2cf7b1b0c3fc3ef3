// Package e2e holds the end-to-end tests of kas: kas, agentk and a fake
// Kubernetes API server (internal/fakekube) run for real on 127.0.0.1 with
// kernel-chosen ports, and a real Kubernetes client (client-go) talks to the
// cluster through kas's Kubernetes API proxy and the agent's tunnel.
// Most tests run one kas in-process in standalone mode from a scenario the
// test writes; one runs it against a fake GitLab Rails, and TestKASBinary
// builds and runs the kas binary. TestMultiNode runs several kas processes
// sharing a real redis-server (internal/redistest), with agents connected to
// different nodes. The package has no code besides its tests.
package e2e
