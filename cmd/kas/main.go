// Command kas is the GitLab agent server for Kubernetes.
//
//	kas [run] --configuration-file kas.yaml   run the server
//	kas config check --configuration-file F   validate and print the effective configuration
//	kas secret generate                       print a new 32-byte base64 secret
//	kas token --secret-file F --audience A    mint a short-lived JWT for debugging
//	kas version                               print the version
package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/redis/go-redis/v9"

	"github.com/kasproject/kas/internal/buildinfo"
	"github.com/kasproject/kas/registry"
	"github.com/kasproject/kas/server"
	"github.com/kasproject/kas/server/config"
	"github.com/kasproject/kas/server/kasjwt"
	"github.com/kasproject/kas/server/logging"
)

// version may be set at build time with -ldflags "-X main.version=…";
// otherwise the version Go recorded in the binary is used (internal/buildinfo).
var version = "dev"

// exitUsage is returned for bad flags or arguments, as the flag package does.
const exitUsage = 2

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	cmd := "run"
	if len(args) > 0 && args[0] != "" && args[0][0] != '-' {
		cmd, args = args[0], args[1:]
	}
	switch cmd {
	case "run":
		return runServer(args, stderr)
	case "config":
		if len(args) == 0 || args[0] != "check" {
			fmt.Fprintln(stderr, "usage: kas config check --configuration-file FILE")
			return exitUsage
		}
		return configCheck(args[1:], stdout, stderr)
	case "secret":
		if len(args) != 1 || args[0] != "generate" {
			fmt.Fprintln(stderr, "usage: kas secret generate")
			return exitUsage
		}
		return secretGenerate(stdout, stderr)
	case "token":
		return token(args, stdout, stderr)
	case "version":
		build := buildinfo.Read(version, "")
		if build.Commit != "" {
			fmt.Fprintf(stdout, "kas %s (commit %s)\n", build.Version, build.Commit)
		} else {
			fmt.Fprintln(stdout, "kas", build.Version)
		}
		return 0
	case "help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "kas: unknown command %q\n\n%s", cmd, usage)
		return exitUsage
	}
}

const usage = `kas — the GitLab agent server for Kubernetes

Usage:
  kas [run] [--configuration-file FILE]       run the server (no file: embedded defaults, standalone mode)
  kas config check --configuration-file FILE  validate FILE and print the effective configuration
  kas secret generate                         print a new secret (base64 of 32 random bytes)
  kas token --secret-file FILE --audience AUD [--issuer ISS] [--ttl 5m]
                                              print a signed HS256 JWT for calling kas's APIs with curl
  kas version                                 print the version

Run 'kas COMMAND --help' for a command's flags.
`

func newFlagSet(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs
}

func runServer(args []string, stderr io.Writer) int {
	fs := newFlagSet("kas run", stderr)
	file := fs.String("configuration-file", "", "kas configuration `file` (YAML); empty means the embedded defaults")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	cfg, err := config.Load(*file, os.Getenv)
	if err != nil {
		fmt.Fprintf(stderr, "kas: invalid configuration:\n%v\n", err)
		return 1
	}
	level, err := logging.ParseLevel(cfg.Observability.Logging.Level)
	if err != nil {
		fmt.Fprintf(stderr, "kas: observability.logging.level: %v\n", err)
		return 1
	}
	recent := logging.NewRecent(50)
	log := logging.New(stderr, level, recent)
	// go-redis logs through a process-wide logger; route it into ours,
	// rate-limited, instead of a line per failed dial on stderr.
	redis.SetLogger(registry.NewRedisClientLogger(log))

	build := buildinfo.Read(version, "")
	srv, err := server.New(cfg, server.Options{Logger: log, Recent: recent, Version: build.Version, Commit: build.Commit})
	if err != nil {
		log.Error("Cannot start kas", "error", err.Error())
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	// SIGHUP reloads static certificates (they are also polled for changes).
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	go func() {
		for {
			select {
			case <-hup:
				if err := srv.ReloadCertificates(); err != nil {
					log.Error("Reload certificates on SIGHUP", "error", err.Error())
				} else {
					log.Info("Reloaded certificates on SIGHUP")
				}
			case <-ctx.Done():
				return
			}
		}
	}()
	if err := srv.Run(ctx); err != nil {
		log.Error("kas stopped", "error", err.Error())
		return 1
	}
	return 0
}

func configCheck(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("kas config check", stderr)
	file := fs.String("configuration-file", "", "kas configuration `file` to check (YAML)")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	cfg, err := config.Load(*file, os.Getenv)
	if err != nil {
		fmt.Fprintf(stderr, "%s is not valid:\n%v\n", displayName(*file), err)
		return 1
	}
	if err := cfg.WriteEffective(stdout); err != nil {
		fmt.Fprintf(stderr, "kas: print configuration: %v\n", err)
		return 1
	}
	fmt.Fprintf(stderr, "%s is valid.\n", displayName(*file))
	return 0
}

func displayName(file string) string {
	if file == "" {
		return "the embedded default configuration"
	}
	return file
}

func secretGenerate(stdout, stderr io.Writer) int {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		fmt.Fprintf(stderr, "kas: read random bytes: %v\n", err)
		return 1
	}
	fmt.Fprintln(stdout, base64.StdEncoding.EncodeToString(b))
	return 0
}

func token(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("kas token", stderr)
	secretFile := fs.String("secret-file", "", "`file` holding the base64 secret (e.g. the API secret for the internal API)")
	audience := fs.String("audience", "", "JWT audience: "+kasjwt.AudienceKAS+" for the internal API, "+kasjwt.AudiencePrivateAPI+" for the private API")
	issuer := fs.String("issuer", "kas-token", "JWT issuer")
	ttl := fs.Duration("ttl", kasjwt.MaxAPILifetime, "how long the token is valid (kas's APIs accept at most "+kasjwt.MaxAPILifetime.String()+")")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	var problems []error
	if *secretFile == "" {
		problems = append(problems, errors.New("--secret-file is required"))
	}
	if *audience == "" {
		problems = append(problems, errors.New("--audience is required"))
	}
	switch {
	case *ttl <= 0:
		problems = append(problems, errors.New("--ttl must be positive"))
	case *ttl > kasjwt.MaxAPILifetime:
		problems = append(problems, fmt.Errorf("--ttl %s is longer than the %s kas's APIs accept; mint a new token when it expires", *ttl, kasjwt.MaxAPILifetime))
	}
	if len(problems) > 0 {
		fmt.Fprintf(stderr, "kas token: %v\n", errors.Join(problems...))
		return exitUsage
	}
	secret, err := config.ReadSecretFile(*secretFile)
	if err != nil {
		fmt.Fprintf(stderr, "kas token: %v\n", err)
		return 1
	}
	tok, err := kasjwt.Sign(secret, *issuer, *audience, *ttl)
	if err != nil {
		fmt.Fprintf(stderr, "kas token: %v\n", err)
		return 1
	}
	fmt.Fprintln(stdout, tok)
	return 0
}
