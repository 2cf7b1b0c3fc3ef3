#!/usr/bin/env bash
# Installs the system programs the tests start: redis-server (multi-node
# registry, ACME storage), iproute2 (network-namespace tests), pebble (a
# local ACME server) and chromium (the status page's browser tests). Needs
# root (apt-get); skips what is already installed.
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v pebble >/dev/null 2>&1 || need+=(pebble)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
