package standalone

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sync"

	"github.com/kasproject/kas/server/agentcfg"
)

// configCache keeps parsed agent configuration files until they change on disk.
type configCache struct {
	mu      sync.Mutex
	entries map[string]cachedConfig // by file path
}

// cachedConfig is one parse of a file: its configuration or its problems.
type cachedConfig struct {
	info os.FileInfo
	cfg  *agentcfg.Config
	err  error
}

// get returns the configuration in file. A missing file is an empty
// configuration, as in GitLab.
func (c *configCache) get(file string) (*agentcfg.Config, error) {
	info, err := os.Stat(file)
	if errors.Is(err, fs.ErrNotExist) {
		return &agentcfg.Config{}, nil
	}
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	cached, ok := c.entries[file]
	c.mu.Unlock()
	if ok && sameVersion(cached.info, info) {
		return cached.cfg, cached.err
	}
	data, err := os.ReadFile(file)
	if errors.Is(err, fs.ErrNotExist) { // removed since the Stat
		return &agentcfg.Config{}, nil
	}
	if err != nil {
		return nil, err // not cached: reading may work next time
	}
	cfg, err := agentcfg.Parse(data)
	c.mu.Lock()
	c.entries[file] = cachedConfig{info: info, cfg: cfg, err: err}
	c.mu.Unlock()
	return cfg, err
}

// agentConfig returns a's configuration, or a failure naming the file and the
// problem's line. The configuration is shared: callers must not modify it.
func (b *Backend) agentConfig(op string, a *agent) (*agentcfg.Config, error) {
	file := a.configFile()
	cfg, err := b.configs.get(file)
	if err != nil {
		return nil, b.fail(op, fileURL(file), fmt.Errorf("agent %s (id %d): configuration %s: %w", a.name, a.id, file, err))
	}
	return cfg, nil
}
