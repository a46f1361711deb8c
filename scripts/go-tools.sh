#!/usr/bin/env bash
# Builds the real Prometheus programs the tests run, from their Go modules, and prints the path of
# the binary. Built once per version and cached outside the checkout (a clean clone reuses them):
#   scripts/go-tools.sh alertmanager   Alertmanager (tests/alertmanager.rs, scripts/alertmanager.sh)
#   scripts/go-tools.sh promtool       promtool (tests/promtool.rs: `promtool check metrics`)
# Cache: BEARWATCH_TOOLS (default ~/.cache/bearwatch/tools). Needs Go ≥ 1.24 on PATH or in
# /usr/local/go; the modules come from the Go module proxy like any dependency.
set -euo pipefail
ALERTMANAGER_VERSION=v0.35.0
PROMETHEUS_VERSION=v0.316.0 # the Go module version of Prometheus 3.x, which ships promtool
TOOLS="${BEARWATCH_TOOLS:-$HOME/.cache/bearwatch/tools}"
mkdir -p "$TOOLS"
command -v go >/dev/null || PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || { echo "go-tools.sh: needs the Go toolchain (go) on PATH" >&2; exit 1; }

build_alertmanager() {
  local out="$1" src
  # The module's web UI is built by npm at release time and is not in the module zip, so its
  # embed pattern matches nothing; a placeholder page stands in (the tests use only the API).
  src="$(go mod download -json "github.com/prometheus/alertmanager@$ALERTMANAGER_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
  [[ -d "$src" ]] || { echo "go-tools.sh: go mod download gave no source for alertmanager" >&2; exit 1; }
  local work; work="$(mktemp -d)"
  cp -r "$src/." "$work/" && chmod -R u+w "$work"
  mkdir -p "$work/ui/app/dist/elm" "$work/ui/app/dist/mantine"
  echo '<!doctype html><title>Alertmanager</title><p>UI not built; use the API.' | tee "$work/ui/app/dist/elm/index.html" >"$work/ui/app/dist/mantine/index.html"
  (cd "$work" && go build -trimpath -o "$out" ./cmd/alertmanager)
  rm -rf "$work"
}

build_promtool() {
  local gobin; gobin="$(mktemp -d)"
  GOBIN="$gobin" go install -trimpath "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION"
  mv "$gobin/promtool" "$1" && rmdir "$gobin"
}

tool="${1:-}"
case "$tool" in
  alertmanager) bin="$TOOLS/alertmanager-$ALERTMANAGER_VERSION/alertmanager" ;;
  promtool) bin="$TOOLS/promtool-$PROMETHEUS_VERSION/promtool" ;;
  *) echo "usage: $0 alertmanager|promtool" >&2; exit 2 ;;
esac
# Parallel test binaries may all ask at once: one builds, the others wait.
exec 9>"$TOOLS/$tool.lock"
flock 9
if [[ ! -x "$bin" ]]; then
  mkdir -p "$(dirname "$bin")"
  echo "go-tools.sh: building $tool (once; cached in $TOOLS)" >&2
  "build_$tool" "$bin.tmp" >&2 || { rm -f "$bin.tmp"; exit 1; }
  mv "$bin.tmp" "$bin"
fi
echo "$bin"
