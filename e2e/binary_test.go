package e2e

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// buildKAS builds the kas command into a temporary directory.
func buildKAS(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "kas")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/kasproject/kas/cmd/kas").CombinedOutput()
	if err != nil {
		t.Fatalf("go build ./cmd/kas: %v\n%s", err, out)
	}
	return bin
}

// kasProcess is the kas binary (or agentk) running as a child process.
type kasProcess struct {
	cmd    *exec.Cmd
	what   string        // names it in messages
	exited chan struct{} // closed when the process has exited; then err is set
	err    error

	mu    sync.Mutex
	lines []map[string]any // its JSON log lines
	raw   bytes.Buffer
}

// startKASProcess runs bin with the configuration file and waits until it
// logs that it is ready; env holds extra environment variables (NAME=value).
// The process is killed if it still runs when the test ends.
func startKASProcess(t *testing.T, bin, configFile string, env ...string) *kasProcess {
	t.Helper()
	cmd := exec.Command(bin, "--configuration-file", configFile)
	if len(env) > 0 {
		cmd.Env = append(os.Environ(), env...)
	}
	return startLogged(t, cmd, "kas with "+configFile, "kas is ready")
}

// startLogged runs cmd, which logs JSON lines on stderr, and waits until
// it logs ready. It is killed if it still runs when the test ends, and its
// logs must hold no credential.
func startLogged(t *testing.T, cmd *exec.Cmd, what, ready string) *kasProcess {
	t.Helper()
	p := &kasProcess{cmd: cmd, what: what, exited: make(chan struct{})}
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", what, err)
	}
	go func() {
		p.read(stderr)
		p.err = p.cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		<-p.exited
		for _, s := range secrets {
			if strings.Contains(p.logs(), s) {
				t.Errorf("a credential (%.12s…) appears in the logs of %s", s, what)
			}
		}
		if t.Failed() {
			t.Logf("logs of %s:\n%s", what, p.logs())
		}
	})
	p.waitLog(t, ready)
	return p
}

func (p *kasProcess) read(r io.Reader) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		var line map[string]any
		_ = json.Unmarshal(sc.Bytes(), &line) // a line that is not JSON is kept in raw only
		p.mu.Lock()
		p.raw.Write(sc.Bytes())
		p.raw.WriteByte('\n')
		if line != nil {
			p.lines = append(p.lines, line)
		}
		p.mu.Unlock()
	}
}

func (p *kasProcess) logs() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.raw.String()
}

// waitLog waits for a log line with msg whose other fields are as given
// (key, value pairs) and returns it.
func (p *kasProcess) waitLog(t *testing.T, msg string, fields ...string) map[string]any {
	t.Helper()
	var found map[string]any
	eventually(t, func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		for _, l := range p.lines {
			if logMatches(l, msg, fields) {
				found = l
				return true
			}
		}
		select {
		case <-p.exited:
			t.Fatalf("%s exited (%v) without logging %q", p.what, p.err, msg)
		default:
		}
		return false
	}, func() string { return fmt.Sprintf("%s did not log %q %v", p.what, msg, fields) })
	return found
}

// findLog returns the first log line with msg whose field key starts with
// prefix, or nil.
func (p *kasProcess) findLog(msg, key, prefix string) map[string]any {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, l := range p.lines {
		if v, ok := l[key].(string); ok && l["msg"] == msg && strings.HasPrefix(v, prefix) {
			return l
		}
	}
	return nil
}

// count counts the log lines with msg whose other fields are as given.
func (p *kasProcess) count(msg string, fields ...string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, l := range p.lines {
		if logMatches(l, msg, fields) {
			n++
		}
	}
	return n
}

// logMatches says whether a log line has msg and the fields (key, value
// pairs).
func logMatches(l map[string]any, msg string, fields []string) bool {
	if l["msg"] != msg {
		return false
	}
	for i := 0; i+1 < len(fields); i += 2 {
		if l[fields[i]] != fields[i+1] {
			return false
		}
	}
	return true
}

func (p *kasProcess) address(t *testing.T, listener string) string {
	t.Helper()
	addr, _ := p.waitLog(t, "Listening", "listener", listener)["address"].(string)
	if addr == "" {
		t.Fatalf("%s logged no address for %s", p.what, listener)
	}
	return addr
}

func TestKASBinary(t *testing.T) {
	t.Parallel()
	bin := buildKAS(t)

	t.Run("version is one GitLab Rails parses", func(t *testing.T) {
		out, err := exec.Command(bin, "version").Output()
		if err != nil {
			t.Fatal(err)
		}
		// kas X.Y.Z[-suffix] [(commit <sha>)]; Gem::Version's pattern.
		if !regexp.MustCompile(`^kas [0-9]+(\.[0-9a-zA-Z]+)*(-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?( \(commit [0-9a-f]+\))?\n$`).Match(out) {
			t.Fatalf("kas version printed %q", out)
		}
	})

	t.Run("SIGTERM lets in-flight requests finish", func(t *testing.T) {
		const grace = 30 * time.Second
		e := newWorld(t)
		configFile := filepath.Join(t.TempDir(), "kas.yaml")
		writeYAML(t, configFile, map[string]any{
			"agent": map[string]any{"listen": map[string]any{
				"address":             "127.0.0.1:0",
				"listen_grace_period": grace.String(),
			}},
			"observability": map[string]any{"listen": map[string]any{"address": "127.0.0.1:0"}},
			"api":           map[string]any{"listen": map[string]any{"address": "127.0.0.1:0"}},
			"private_api":   map[string]any{"listen": map[string]any{"address": "127.0.0.1:0"}},
			"standalone":    map[string]any{"file": e.scenarioFile},
		})
		p := startKASProcess(t, bin, configFile)
		e.kas = &kasNode{public: p.address(t, "agent.listen"), observability: p.address(t, "observability.listen")}
		e.startAgent(t, asAgent)

		type result struct {
			code int
			body string
			err  error
		}
		done := make(chan result, 1)
		go func() {
			req, _ := http.NewRequest(http.MethodGet, e.proxyURL()+"/slow", nil)
			pat(asAgent.id, alicePAT).apply(req.Header)
			resp, err := e.client.Do(req)
			if err != nil {
				done <- result{err: err}
				return
			}
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			done <- result{code: resp.StatusCode, body: string(body), err: err}
		}()
		eventually(t, func() bool { return e.kube.Slow() == 1 },
			func() string { return "the request never reached the cluster" })

		signalled := time.Now()
		if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		p.waitLog(t, "Shutting down")
		// kas is draining: now the cluster answers.
		e.kube.Release()
		select {
		case r := <-done:
			if r.err != nil || r.code != http.StatusOK || strings.TrimSpace(r.body) != `{"released":true}` {
				t.Fatalf("the in-flight request got %d %q, %v; want it to finish", r.code, r.body, r.err)
			}
		case <-time.After(grace):
			t.Fatalf("the in-flight request did not finish within the grace period (%s)", grace)
		}
		select {
		case <-p.exited:
		case <-time.After(waitFor):
			t.Fatal("kas did not exit after its last request finished")
		}
		if p.err != nil {
			t.Fatalf("kas exited with %v, want status 0", p.err)
		}
		if took := time.Since(signalled); took > grace {
			t.Errorf("kas took %s to shut down, more than its grace period", took)
		}
	})

	t.Run("config check lists every problem", func(t *testing.T) {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, "short-secret"), []byte(base64.StdEncoding.EncodeToString(make([]byte, 16))), 0o600); err != nil {
			t.Fatal(err)
		}
		bad := filepath.Join(dir, "kas.yaml")
		if err := os.WriteFile(bad, []byte(`gitlab:
  address: gitlab.internal:8080
  authentication_secret_file: short-secret
agent:
  listen:
    adress: 127.0.0.1:8150
    ping_interval: soon
observability:
  logging:
    level: loud
`), 0o600); err != nil {
			t.Fatal(err)
		}
		var stdout, stderr bytes.Buffer
		cmd := exec.Command(bin, "config", "check", "--configuration-file", bad)
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() == 0 {
			t.Fatalf("kas config check on a bad file: %v, want a non-zero exit\n%s", err, stderr.String())
		}
		for _, problem := range []string{
			"gitlab.address (line 2)",
			"gitlab.authentication_secret_file (line 3): ",
			"decodes to 16 bytes",
			"agent.listen.adress (line 6): ",
			"did you mean agent.listen.address?",
			"agent.listen.ping_interval (line 7): ",
			"observability.logging.level (line 10): ",
		} {
			if !strings.Contains(stderr.String(), problem) {
				t.Errorf("the report does not contain %q:\n%s", problem, stderr.String())
			}
		}
		if stdout.Len() != 0 {
			t.Errorf("an invalid configuration was printed:\n%s", stdout.String())
		}
	})

	t.Run("secret generate", func(t *testing.T) {
		seen := map[string]bool{}
		for range 2 {
			out, err := exec.Command(bin, "secret", "generate").Output()
			if err != nil {
				t.Fatalf("kas secret generate: %v", err)
			}
			secret, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(out)))
			if err != nil || len(secret) != 32 {
				t.Fatalf("kas secret generate printed %q: %d bytes, %v; want base64 of 32 bytes", out, len(secret), err)
			}
			seen[string(secret)] = true
		}
		if len(seen) != 2 {
			t.Fatal("kas secret generate printed the same secret twice")
		}
	})
}
