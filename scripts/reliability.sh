#!/usr/bin/env bash
# The reliability suite (tests/reliability.rs) in its full form: 10 × kill -9 during a 100 k-story
# Kafka replay, a broker restart, a 2-minute SMTP outage, 10 k malformed messages, a throttled
# classifier. CI runs the short form as part of scripts/test.sh. Takes about an hour on 2 cores.
#   scripts/reliability.sh            full form
#   scripts/reliability.sh --short    the CI sizes
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" != "--short" ]]; then export BEARWATCH_RELIABILITY=full; fi
exec scripts/test.sh --test reliability -- --nocapture --test-threads 1
