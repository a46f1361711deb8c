#!/usr/bin/env bash
# Installs the Debian packages the tests use (scripts/test-deps.sh), sets up ONNX Runtime (scripts/setup-ort.sh), the test SMTP server's and DuckDB's packages and
# playwright-core (drives Debian's chromium in tests/dashboard.rs), builds Alertmanager and promtool
# (scripts/go-tools.sh), starts the test Kafka broker
# (scripts/kafka.sh) unless one is already running, and runs the whole test suite in the dev profile.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/test-deps.sh
scripts/setup-ort.sh >/dev/null
# The tests' real SMTP server (tests/smtp_server.py) runs on aiosmtpd from the same virtualenv.
.venv/bin/python -m pip install -q --disable-pip-version-check -r scripts/requirements-test.txt
(cd tests/browser && npm ci --silent --no-audit --no-fund)
# Alertmanager and promtool, built from their Go modules once and cached (scripts/go-tools.sh);
# in the background while cargo builds, and the tests that run them wait for it.
mkdir -p target
(scripts/go-tools.sh alertmanager && scripts/go-tools.sh promtool) >target/go-tools.log 2>&1 &
if ! scripts/kafka.sh status; then
  trap 'scripts/kafka.sh stop' EXIT
fi
BEARWATCH_TEST_BROKERS="$(scripts/kafka.sh start)"
export BEARWATCH_TEST_BROKERS
cargo test --locked --no-fail-fast "$@"
