package standalone

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sync"
	"time"

	"github.com/kasproject/kas/server/agentyaml"
)

// configCache keeps parsed agent configuration files until they change on
// disk, looking at a file at most once per recheck interval.
type configCache struct {
	recheck time.Duration
	mu      sync.Mutex
	entries map[string]cachedConfig // by file path
}

// cachedConfig is one parse of a file: its configuration or its problems.
// info is nil for a missing file.
type cachedConfig struct {
	info    os.FileInfo
	checked time.Time
	cfg     *agentyaml.Config
	err     error
}

// get returns the configuration in file. A missing file is an empty
// configuration, as in GitLab.
func (c *configCache) get(file string) (*agentyaml.Config, error) {
	now := time.Now()
	c.mu.Lock()
	cached, ok := c.entries[file]
	c.mu.Unlock()
	if ok && now.Sub(cached.checked) < c.recheck {
		return cached.cfg, cached.err
	}
	info, err := os.Stat(file)
	if errors.Is(err, fs.ErrNotExist) {
		c.store(file, cachedConfig{checked: now, cfg: &agentyaml.Config{}})
		return &agentyaml.Config{}, nil
	}
	if err != nil {
		return nil, err
	}
	if ok && cached.info != nil && sameVersion(cached.info, info) {
		cached.checked = now
		c.store(file, cached)
		return cached.cfg, cached.err
	}
	data, err := os.ReadFile(file)
	if errors.Is(err, fs.ErrNotExist) { // removed since the Stat
		return &agentyaml.Config{}, nil
	}
	if err != nil {
		return nil, err // not cached: reading may work next time
	}
	cfg, err := agentyaml.Parse(data)
	c.store(file, cachedConfig{info: info, checked: now, cfg: cfg, err: err})
	return cfg, err
}

func (c *configCache) store(file string, entry cachedConfig) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.entries[file] = entry
}

// agentConfig returns a's configuration, or a failure naming the file and the
// problem's line. The configuration is shared: callers must not modify it.
func (b *Backend) agentConfig(op string, a *agent) (*agentyaml.Config, error) {
	file := a.configFile()
	cfg, err := b.configs.get(file)
	if err != nil {
		return nil, b.fail(op, fileURL(file), fmt.Errorf("agent %s (id %d): configuration %s: %w", a.name, a.id, file, err))
	}
	return cfg, nil
}
