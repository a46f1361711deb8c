#!/usr/bin/env bash
# A real Prometheus Alertmanager on 127.0.0.1 (built from its Go module by scripts/go-tools.sh).
#   scripts/alertmanager.sh start [CONFIG]   in the background on BEARWATCH_ALERTMANAGER_PORT
#                                            (default 9093), files in .alertmanager/; CONFIG
#                                            defaults to alerts/alertmanager.yml
#   scripts/alertmanager.sh stop
#   scripts/alertmanager.sh run CONFIG PORT DIR [ARG...]   in the foreground (tests start and kill
#                                            it themselves); DIR keeps silences and the
#                                            notification log across restarts
# Clustering is off (one Alertmanager per port); an HA pair is two of them that bearwatch both posts to.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
HERE="$ROOT/.alertmanager"
PORT="${BEARWATCH_ALERTMANAGER_PORT:-9093}"

run() {
  local config="$1" port="$2" dir="$3"; shift 3
  local bin; bin="$("$ROOT/scripts/go-tools.sh" alertmanager)"
  mkdir -p "$dir"
  exec "$bin" --config.file="$config" --storage.path="$dir" --web.listen-address="127.0.0.1:$port" \
    --cluster.listen-address= --log.level=warn "$@"
}

ready() { curl -fsS "http://127.0.0.1:$PORT/-/ready" >/dev/null 2>&1; }

case "${1:-}" in
  run) shift; [[ $# -ge 3 ]] || { echo "usage: $0 run CONFIG PORT DIR [ARG...]" >&2; exit 2; }; run "$@" ;;
  start)
    mkdir -p "$HERE"
    if [[ -f "$HERE/pid" ]] && kill -0 "$(cat "$HERE/pid")" 2>/dev/null; then echo "http://127.0.0.1:$PORT"; exit 0; fi
    "$ROOT/scripts/go-tools.sh" alertmanager >/dev/null
    nohup "$0" run "$(realpath "${2:-$ROOT/alerts/alertmanager.yml}")" "$PORT" "$HERE/data" >"$HERE/log" 2>&1 &
    echo $! >"$HERE/pid"
    for _ in $(seq 1 60); do
      if ready; then echo "http://127.0.0.1:$PORT"; exit 0; fi
      kill -0 "$(cat "$HERE/pid")" 2>/dev/null || { tail -20 "$HERE/log" >&2; exit 1; }
      sleep 0.5
    done
    tail -20 "$HERE/log" >&2; echo "alertmanager.sh: not ready after 30 s" >&2; exit 1 ;;
  stop)
    if [[ -f "$HERE/pid" ]]; then kill "$(cat "$HERE/pid")" 2>/dev/null || true; rm -f "$HERE/pid"; fi ;;
  *) echo "usage: $0 start [CONFIG] | stop | run CONFIG PORT DIR [ARG...]" >&2; exit 2 ;;
esac
