#!/usr/bin/env bash
# Sets up ONNX Runtime (scripts/setup-ort.sh) and runs the whole test suite in the dev profile.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-ort.sh >/dev/null
cargo test --locked "$@"
