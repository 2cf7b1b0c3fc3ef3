package config

import (
	"cmp"
	"fmt"
	"math"
	"slices"
	"strings"
)

// Problem is one thing wrong with the configuration.
type Problem struct {
	// Key names what is wrong: a dotted YAML key such as
	// "private_api.listen.authentication_secret_file", an environment variable
	// such as "OWN_PRIVATE_API_SCHEME", or the file's path for a problem with
	// the whole file (a YAML syntax error).
	Key string
	// Line is the line of the configuration file the key is on, or 0 when the
	// value did not come from the file (a default, an environment variable).
	Line int
	// Message says what is wrong and, where known, how to fix it.
	Message string
}

// String formats the problem as "key: message", or "key (line N): message"
// when it points into the configuration file.
func (p Problem) String() string {
	if p.Line > 0 {
		return fmt.Sprintf("%s (line %d): %s", p.Key, p.Line, p.Message)
	}
	return p.Key + ": " + p.Message
}

// ValidationError reports every problem found in a configuration, so an
// administrator can fix them all in one go.
type ValidationError struct {
	Problems []Problem
}

// Error prints one problem per line.
func (e *ValidationError) Error() string {
	lines := make([]string, len(e.Problems))
	for i, p := range e.Problems {
		lines[i] = p.String()
	}
	return strings.Join(lines, "\n")
}

// problems collects Problems, attaching the file line of each key it knows.
type problems struct {
	list []Problem
	// lines maps a dotted key to the line its value is on in the file.
	lines map[string]int
	// undecodable holds the keys whose values could not be decoded: they keep
	// their defaults, so checking them again would only repeat the problem.
	undecodable map[string]bool
}

func newProblems() *problems {
	return &problems{lines: make(map[string]int), undecodable: make(map[string]bool)}
}

// add records a problem with key, taking the line from the file when the key
// was set there. A key already reported as undecodable is not reported again.
func (ps *problems) add(key, format string, args ...any) {
	if ps.undecodable[key] {
		return
	}
	ps.list = append(ps.list, Problem{Key: key, Line: ps.lines[key], Message: fmt.Sprintf(format, args...)})
}

// addAt records a problem at an explicit line.
func (ps *problems) addAt(key string, line int, format string, args ...any) {
	ps.list = append(ps.list, Problem{Key: key, Line: line, Message: fmt.Sprintf(format, args...)})
}

// addUndecodable records that the value of key could not be decoded.
func (ps *problems) addUndecodable(key string, line int, format string, args ...any) {
	ps.undecodable[key] = true
	ps.addAt(key, line, format, args...)
}

// err returns the collected problems as a *ValidationError, or nil if there are none.
func (ps *problems) err() error {
	if len(ps.list) == 0 {
		return nil
	}
	// Problems from the file in the order of its lines, so they read top to
	// bottom beside it; those without a line (defaults, environment) last.
	slices.SortStableFunc(ps.list, func(a, b Problem) int {
		return cmp.Compare(sortLine(a.Line), sortLine(b.Line))
	})
	return &ValidationError{Problems: ps.list}
}

func sortLine(line int) int {
	if line == 0 {
		return math.MaxInt
	}
	return line
}
