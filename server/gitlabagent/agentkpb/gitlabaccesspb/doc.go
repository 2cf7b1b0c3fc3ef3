// Package gitlabaccesspb holds GitLab's gitlab.agent.gitlab_access.rpc
// service (agentk modules reaching GitLab through kas), as kas declares
// it; see package agentkpb, which generates it.
package gitlabaccesspb
