// Package prototoolpb holds GitLab's gitlab.agent.prototool messages (HTTP
// heads as GitLab's agentk carries them), as kas declares them; see
// package agentkpb, which generates it.
package prototoolpb
