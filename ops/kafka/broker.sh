#!/usr/bin/env bash
# A single-node Apache Kafka broker (KRaft: combined broker and controller) on
# loopback, for the tests, the benchmarks and a person trying recstream
# against the real thing. The broker comes from Maven Central (ops/kafka/pom.xml)
# into ~/.cache/recstream; nothing else is downloaded.
#
#   ops/kafka/broker.sh install                  resolve the broker's jars (idempotent)
#   ops/kafka/broker.sh start [DIR] [PORT]       start in the background; prints bootstrap servers
#   ops/kafka/broker.sh stop  [DIR]              stop it cleanly (SIGTERM, then SIGKILL after 30 s)
#   ops/kafka/broker.sh logs  [DIR]              follow its log
#   ops/kafka/broker.sh run   DIR PORT           format if new, then exec the broker in the foreground
#
# DIR holds server.properties, data/ and broker.log (default
# ~/.cache/recstream/kafka-local); PORT defaults to 9092. The controller listens
# on a second port (PORT+1 by default, KAFKA_CONTROLLER_PORT to choose).
# Restarting with the same DIR keeps every topic and offset.
# KAFKA_EXTRA_PROPERTIES: more server.properties lines, for an experiment.
# KAFKA_LOG4J: another log4j2 configuration (e.g. one that sets
# kafka.request.logger to DEBUG, to count the requests each client sends).
# KAFKA_JIT: quick (the default: C1 only, the JVM starts and warms up fast, as
# the tests want) or full (C1 then C2, as a long-running broker runs: slower
# to warm up, then less CPU per request; the benchmarks use it).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$here/pom.xml")
KAFKA_LIBS="${KAFKA_LIBS:-$HOME/.cache/recstream/kafka-$KAFKA_VERSION/libs}"
# A 2-core machine shared with the engine and a load generator: a small heap,
# few threads, G1 with short pauses.
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx1g}"
KAFKA_LOG4J="${KAFKA_LOG4J:-$here/log4j2.properties}"
case "${KAFKA_JIT:-quick}" in
  quick) jit="-XX:TieredStopAtLevel=1" ;;
  full) jit="" ;;
  *) echo "KAFKA_JIT must be quick or full, not '$KAFKA_JIT'" >&2; exit 2 ;;
esac
KAFKA_JVM_OPTS="${KAFKA_JVM_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent $jit -Djava.awt.headless=true}"

install() {
  if [ -f "$KAFKA_LIBS/kafka_2.13-$KAFKA_VERSION.jar" ] && [ -f "$KAFKA_LIBS/.complete" ]; then
    return
  fi
  command -v mvn >/dev/null || { echo "broker.sh: mvn not found (Java 17 and Maven are needed)" >&2; exit 1; }
  echo "install: Apache Kafka $KAFKA_VERSION from Maven Central into $KAFKA_LIBS" >&2
  rm -rf "$KAFKA_LIBS"
  (cd "$here" && mvn -q -B -Dstyle.color=never dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$KAFKA_LIBS")
  touch "$KAFKA_LIBS/.complete"
}

# Runs a class of the broker's classpath.
kafka_java() {
  # shellcheck disable=SC2086
  java $KAFKA_HEAP_OPTS $KAFKA_JVM_OPTS "-Dlog4j2.configurationFile=$KAFKA_LOG4J" -cp "$KAFKA_LIBS/*" "$@"
}

write_properties() {
  local dir=$1 port=$2 cport=$3
  cat >"$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$dir/data
num.partitions=1
default.replication.factor=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# A group that forms starts at once (the default waits 3 s for more members).
group.initial.rebalance.delay.ms=0
# Two cores: few threads.
num.network.threads=2
num.io.threads=4
background.threads=2
num.recovery.threads.per.data.dir=1
log.cleaner.threads=1
# Compacted topics (outputs, changelog) are cleaned soon, as tests expect.
log.cleaner.min.compaction.lag.ms=0
log.segment.bytes=67108864
PROPS
  # More settings for an experiment, one `key=value` a line (later lines win).
  if [ -n "${KAFKA_EXTRA_PROPERTIES:-}" ]; then
    printf '%s\n' "$KAFKA_EXTRA_PROPERTIES" >>"$dir/server.properties"
  fi
}

run() {
  local dir=${1:?run DIR PORT} port=${2:?run DIR PORT}
  local cport=${KAFKA_CONTROLLER_PORT:-$((port + 1))}
  install
  mkdir -p "$dir"
  write_properties "$dir" "$port" "$cport"
  if [ ! -f "$dir/data/meta.properties" ]; then
    local id
    # A cluster id is 16 random bytes in URL-safe base64; one starting with '-'
    # would read as an option of the storage tool, so draw again (as Kafka's own
    # Uuid.randomUuid does).
    id=$(python3 -c '
import base64, uuid
while True:
    id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode()[:22]
    if not id.startswith("-"):
        print(id)
        break')
    kafka_java kafka.tools.StorageTool format -t "$id" -c "$dir/server.properties" >"$dir/format.log" 2>&1 \
      || { cat "$dir/format.log" >&2; exit 1; }
  fi
  # exec: whoever started `run` holds the broker's own pid (SIGTERM stops it cleanly).
  # shellcheck disable=SC2086
  exec java $KAFKA_HEAP_OPTS $KAFKA_JVM_OPTS "-Dlog4j2.configurationFile=$KAFKA_LOG4J" \
    -cp "$KAFKA_LIBS/*" kafka.Kafka "$dir/server.properties"
}

start() {
  local dir=${1:-$HOME/.cache/recstream/kafka-local} port=${2:-9092}
  mkdir -p "$dir"
  if [ -f "$dir/broker.pid" ] && kill -0 "$(cat "$dir/broker.pid")" 2>/dev/null; then
    echo "broker already running (pid $(cat "$dir/broker.pid"), $(cat "$dir/bootstrap"))" >&2
    cat "$dir/bootstrap"
    return
  fi
  install
  : >"$dir/broker.log"
  nohup "$0" run "$dir" "$port" >>"$dir/broker.log" 2>&1 &
  echo $! >"$dir/broker.pid"
  echo "127.0.0.1:$port" >"$dir/bootstrap"
  for _ in $(seq 600); do
    if grep -q "Kafka Server started" "$dir/broker.log"; then
      cat "$dir/bootstrap"
      return
    fi
    kill -0 "$(cat "$dir/broker.pid")" 2>/dev/null || { tail -30 "$dir/broker.log" >&2; echo "broker exited" >&2; exit 1; }
    sleep 0.1
  done
  echo "broker not started after 60 s; see $dir/broker.log" >&2
  exit 1
}

stop() {
  local dir=${1:-$HOME/.cache/recstream/kafka-local}
  [ -f "$dir/broker.pid" ] || { echo "no broker.pid in $dir" >&2; return; }
  local pid
  pid=$(cat "$dir/broker.pid")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 300); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$dir/broker.pid"; return; }
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$dir/broker.pid"
}

logs() { tail -F "${1:-$HOME/.cache/recstream/kafka-local}/broker.log"; }

cmd=${1:-}
shift || true
case "$cmd" in
  install) install ;;
  run) run "$@" ;;
  start) start "$@" ;;
  stop) stop "$@" ;;
  logs) logs "$@" ;;
  *) sed -n '2,17p' "$0" >&2; exit 2 ;;
esac
