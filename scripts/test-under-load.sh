#!/usr/bin/env bash
# Runs the README's test command RUNS times in a row (default 2) while HOGS CPU-bound processes (default
# one per core) compete with it, to show that no test depends on an idle machine. Prints each run's
# result. HOGS=0 when something else loads the machine (a training run, say).
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-2}"
hogs=()
trap 'kill "${hogs[@]}" 2>/dev/null || true' EXIT
for _ in $(seq "${HOGS:-$(nproc)}"); do
  (while :; do :; done) &
  hogs+=("$!")
done
for run in $(seq "$runs"); do
  started=$(date +%s)
  if scripts/test.sh > "target/test-under-load-$run.log" 2>&1; then
    echo "run $run of $runs: passed in $(( $(date +%s) - started )) s (log: target/test-under-load-$run.log)"
  else
    echo "run $run of $runs: FAILED after $(( $(date +%s) - started )) s; see target/test-under-load-$run.log" >&2
    grep -E "^test .* FAILED|panicked" "target/test-under-load-$run.log" >&2 || true
    exit 1
  fi
done
