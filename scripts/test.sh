#!/usr/bin/env bash
# The project's test command (the README's second quick-start command):
# formatting, vet, and every test with the race detector. Tests start the
# servers they need themselves (redis-server, …) from PATH; when run as root
# it first installs the missing ones with scripts/install-test-deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/go/bin:$PATH"

if [ "$(id -u)" = 0 ]; then
  scripts/install-test-deps.sh
fi

unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$unformatted" ]; then
  echo "gofmt would change:" >&2
  echo "$unformatted" >&2
  exit 1
fi
go vet ./...
go test -race -count=1 -timeout 20m ./...
