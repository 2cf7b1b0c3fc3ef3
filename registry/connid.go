package registry

import (
	"crypto/rand"
	"encoding/binary"
	"math"
)

// NewConnectionID returns a TunnelInfo.ConnectionID for a new agent
// connection: random and positive (1 to 2^63−1), as GitLab defines it
// ("randomly generated when an agent connects"). GitLab Rails tells an
// agent's connections apart by it across every kas node and restart, so a
// counter per node, which starts again at 1, will not do. Every tunnel
// flavour takes its IDs from here.
func NewConnectionID() int64 {
	var b [8]byte
	for {
		_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go 1.24+)
		if id := int64(binary.BigEndian.Uint64(b[:]) & math.MaxInt64); id > 0 {
			return id
		}
	}
}
