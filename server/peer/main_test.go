package peer

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package if a test leaves a goroutine behind: every
// stream, connection and tunnel a test opens must be closed by its cleanup.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
