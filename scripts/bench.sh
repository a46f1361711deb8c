#!/usr/bin/env bash
# Runs every benchmark and writes docs/BENCHMARKS.md (from benches/BENCHMARKS.md.in): classify vs
# the Python reference, SQL vs DuckDB, windows + rules alone, end to end from Kafka, alert latency,
# the analyst's loop, detection of injected bursts.
# Takes about 30 minutes on 2 cores. Each bench's own output stays in target/bench-report/.
#   scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
# The source the binary is built from, as it is now (the report is written at the end).
BENCH_COMMIT="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock || echo ' (with uncommitted changes)')"
export BENCH_COMMIT
scripts/setup-ort.sh >/dev/null
.venv/bin/python -m pip install -q --disable-pip-version-check -r benches/requirements.txt
cargo build --release --locked
if ! scripts/kafka.sh status; then
  trap 'scripts/kafka.sh stop' EXIT
fi
brokers="$(scripts/kafka.sh start)"
out=target/bench-report
mkdir -p "$out"
bench() {
  local name=$1
  shift
  echo "== bearwatch bench $name $*" >&2
  ./target/release/bearwatch bench "$name" "$@" | tee "$out/$name.md.partial"
  mv "$out/$name.md.partial" "$out/$name.md"
}
bench classify --repeats 5 --profile
bench windows --repeats 3
bench sql --repeats 5
bench e2e --repeats 3 --brokers "$brokers"
bench alerts --brokers "$brokers"
bench loop --splits 3
bench detect --seeds 201,202,203,204,205 --bursts 3

.venv/bin/python benches/report.py "$out" "$(( $(date +%s) - started ))"
echo "wrote docs/BENCHMARKS.md" >&2
