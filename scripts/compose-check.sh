#!/usr/bin/env bash
# Loads docker-compose.yml the way `docker compose config` does: with the compose plugin when the
# Docker CLI has it, else with compose-go (scripts/compose-config, the plugin's own loader) when Go is
# installed. Exit 3 when neither is available (tests/compose.rs then notes it and moves on).
set -euo pipefail
cd "$(dirname "$0")/.."
if docker compose version >/dev/null 2>&1; then
  exec docker compose -f docker-compose.yml config --quiet
fi
if command -v go >/dev/null 2>&1; then
  cd scripts/compose-config
  exec go run . ../../docker-compose.yml >/dev/null
fi
echo "neither 'docker compose' nor Go is installed; docker-compose.yml was not loaded by compose" >&2
exit 3
