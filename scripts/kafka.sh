#!/usr/bin/env bash
# A real single-node Apache Kafka 4.x broker (KRaft) on 127.0.0.1 for tests and local runs.
#   scripts/kafka.sh start   fetch jars (cached in ~/.m2), format storage, start, wait until ready
#   scripts/kafka.sh stop    stop the broker started here
#   scripts/kafka.sh status  exit 0 when it answers
# Port: BEARWATCH_KAFKA_PORT (default 19092); the controller listens on the next port, and a
# SASL_PLAINTEXT listener (mechanism PLAIN, user `bearwatch`, password `bearwatch-secret`) on the
# one after, for tests of secured clusters. Files: .kafka/ in the repo (gitignored); a second
# broker (e.g. the reliability suite's, which it restarts) keeps its log, pid and data in
# BEARWATCH_KAFKA_DIR. BEARWATCH_KAFKA_KEEP_DATA=1 restarts on the existing log dir (a broker restart)
# instead of a fresh one. `start` is idempotent and serialized with flock, so parallel test binaries
# can all call it.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
LIBS="$ROOT/.kafka/libs"
HERE="${BEARWATCH_KAFKA_DIR:-$ROOT/.kafka}"
PORT="${BEARWATCH_KAFKA_PORT:-19092}"
CONTROLLER_PORT=$((PORT + 1))
SASL_PORT=$((PORT + 2))
mkdir -p "$HERE" "$ROOT/.kafka"

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && grep -q "Kafka Server started" "$HERE/broker.log" 2>/dev/null; }
running() { [[ -f "$HERE/broker.pid" ]] && kill -0 "$(cat "$HERE/broker.pid")" 2>/dev/null; }

start() {
  if running && answers; then echo "127.0.0.1:$PORT"; return 0; fi
  if running; then kill "$(cat "$HERE/broker.pid")" || true; sleep 1; fi
  exec 8>"$ROOT/.kafka/libs.lock"; flock 8
  if [[ ! -f "$LIBS/.complete" ]]; then
    rm -rf "$LIBS"
    mvn -q -B -f "$ROOT/scripts/kafka/pom.xml" dependency:copy-dependencies \
      -DoutputDirectory="$LIBS" -DincludeScope=runtime >&2
    touch "$LIBS/.complete"
  fi
  exec 8>&-
  # A fresh log dir per start (tests create their own topics and expect no leftovers), unless this
  # is a restart that keeps the data.
  local keep=""
  if [[ "${BEARWATCH_KAFKA_KEEP_DATA:-}" == 1 && -f "$HERE/data/meta.properties" ]]; then keep=1; else rm -rf "$HERE/data"; fi
  cat >"$HERE/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT,SASL://127.0.0.1:$SASL_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT,SASL://127.0.0.1:$SASL_PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL:SASL_PLAINTEXT
listener.name.sasl.sasl.enabled.mechanisms=PLAIN
listener.name.sasl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_bearwatch="bearwatch-secret";
inter.broker.listener.name=PLAINTEXT
log.dirs=$HERE/data
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
# Room for the 1 MB malformed-message test: the pipeline, not the broker, rejects it.
message.max.bytes=4194304
PROPS
  local java=(java -Xms256m -Xmx768m -XX:+UseSerialGC -Dlog4j2.configurationFile="$ROOT/scripts/kafka/log4j2.properties" -cp "$LIBS/*")
  if [[ -z "$keep" ]]; then
    "${java[@]}" kafka.tools.StorageTool format -t bearwatch-test-cluster0 -c "$HERE/server.properties" >"$HERE/format.log" 2>&1 \
      || { cat "$HERE/format.log" >&2; exit 1; }
  fi
  # 9>&- : the broker must not inherit (and hold forever) the lock of this script.
  nohup "${java[@]}" kafka.Kafka "$HERE/server.properties" >"$HERE/broker.log" 2>&1 9>&- &
  echo $! >"$HERE/broker.pid"
  for _ in $(seq 1 120); do
    if answers; then echo "127.0.0.1:$PORT"; return 0; fi
    running || { tail -30 "$HERE/broker.log" >&2; echo "kafka.sh: broker exited" >&2; exit 1; }
    sleep 0.5
  done
  tail -30 "$HERE/broker.log" >&2; echo "kafka.sh: broker not ready after 60 s" >&2; exit 1
}

stop() {
  if running; then
    local pid; pid="$(cat "$HERE/broker.pid")"
    kill "$pid"
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$HERE/broker.pid"
}

case "${1:-}" in
  start) exec 9>"$HERE/lock"; flock 9; start ;;
  stop) exec 9>"$HERE/lock"; flock 9; stop ;;
  status) running && answers ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
