#!/usr/bin/env bash
# The engine and the Kafka Streams peer (benches/peers/kafka-streams) side by
# side on one Apache Kafka broker, the same input and the same machine, one
# after the other (each with the host to itself): for each,
#   1. throughput: EVENTS produced as fast as the broker takes them, until
#      every user's output reflects their last event; the system's and the
#      broker's CPU seconds over the phase;
#   2. freshness at each rate of RATES (event -> published list, as an app's
#      consumer of the output topic sees it);
#   3. peak RSS, and, once it has stopped, the live key and value bytes of
#      its RocksDB stores (`recstream state-size`: comparable between the
#      two, where a state directory's bytes depend on flushes and the
#      write-ahead log).
# Before anything runs, the broker is warmed up with neither system attached
# (warm_broker in benches/broker.sh: BROKER_WARMUP_EVENTS, default 120000,
# through a do-nothing relay): on a fresh broker, whichever system ran first
# paid for the broker's JIT. Before each throughput phase, WARMUP_EVENTS
# (default 20000) events of other users warm the system up (the JVM's JIT,
# the engine's caches).
# Both read their own copy of the input topic (same partitions, same events:
# the load generator's seeds). Prints one "## engine" / "## peer" block each,
# with the load generator's JSON lines.
# Usage: benches/peer.sh   (env: EVENTS=100000 USERS=10000 RATES="1000 2000"
#   SECONDS_AT_RATE=5 CATALOG GUARANTEE=at_least_once|exactly_once,
#   RATINGS=FILE: the throughput phase replays MovieLens ratings,
#   ENGINE_TOML=FILE: more engine settings, PEER_ARGS: more peer options,
#   BROKER_WARMUP_EVENTS: the broker's warm-up, 0 to skip)
source "$(dirname "$0")/broker.sh"

EVENTS=${EVENTS:-100000}
USERS=${USERS:-10000}
RATES=${RATES:-1000 2000}
SECONDS_AT_RATE=${SECONDS_AT_RATE:-5}
CATALOG=${CATALOG:-../shared/data/movielens/ml-latest-small/movies.csv}
PEER=benches/peers/kafka-streams/run.sh
# The seed's list is 20 long; the engine publishes the same length here.
top_n=20
peer_guarantee=$([ "$GUARANTEE" = exactly_once ] && echo exactly_once_v2 || echo at_least_once)
$PEER build -DskipTests >/dev/null
warm_broker

engine_config
printf '[engine.lists]\ntop_n = %s\n' "$top_n" >>"$ENGINE_CONFIG"
# The peer's copy of the topics; the load generator reads topic names from a config.
PEER_CONFIG="$work/peer.toml"
printf '[topics]\ninteractions = "peer.interactions"\nrecommendations = "peer.recommendations"\n' >"$PEER_CONFIG"
create_topics_like_input peer.interactions

# measure NAME PID CONFIG: the three phases against the running system PID.
measure() {
  echo "## $1"
  local before broker_before
  "$BIN" loadgen --brokers "$brokers" --config "$3" --catalog "$CATALOG" --events "${WARMUP_EVENTS:-20000}" \
    --users "$USERS" --rate 0 --seed 3 >/dev/null
  before=$(cpu_seconds "$2")
  broker_before=$(cpu_seconds "$BROKER")
  if [ -n "${RATINGS:-}" ]; then
    "$BIN" loadgen --brokers "$brokers" --config "$3" --catalog "$CATALOG" --events "$EVENTS" --ratings "$RATINGS" --rate 0
  else
    "$BIN" loadgen --brokers "$brokers" --config "$3" --catalog "$CATALOG" --events "$EVENTS" --users "$USERS" --rate 0 --seed 1
  fi
  echo "# throughput CPU: $1 $(cpu_since "$before" "$2") s, broker $(cpu_since "$broker_before" "$BROKER") s"
  for rate in $RATES; do
    before=$(cpu_seconds "$2")
    broker_before=$(cpu_seconds "$BROKER")
    "$BIN" loadgen --brokers "$brokers" --config "$3" --catalog "$CATALOG" \
      --events $((rate * SECONDS_AT_RATE)) --users "$USERS" --rate "$rate" --seed 2
    echo "# freshness CPU at $rate/s: $1 $(cpu_since "$before" "$2") s, broker $(cpu_since "$broker_before" "$BROKER") s"
  done
  echo "# peak RSS: $(awk '/VmHWM/{print $2}' "/proc/$2/status") kB"
}

hport=$(free_port)
start_engine "$work/state" "$hport" /readyz
measure engine "$ENGINE" "$ENGINE_CONFIG"
# stop_and_size PID STATE_DIR: stops the system (a clean close flushes its
# stores), then reads its stores' live entries.
stop_and_size() {
  kill "$1"; wait "$1" 2>/dev/null || true
  echo "# live state: $("$BIN" state-size "$2")"
}
stop_and_size "$ENGINE" "$work/state"; ENGINE=""; ENGINES=""

# shellcheck disable=SC2086
$PEER --brokers "$brokers" --catalog "$CATALOG" --input peer.interactions --state-dir "$work/peer-state" \
  --guarantee "$peer_guarantee" --top-n "$top_n" ${PEER_ARGS:-} >>"$work/peer.log" 2>&1 &
ENGINE=$!   # the cleanup stops it
ENGINES="$ENGINES $ENGINE"
for _ in $(seq 600); do
  grep -q -- '-> RUNNING' "$work/peer.log" 2>/dev/null && break
  sleep 0.1
done
grep -q -- '-> RUNNING' "$work/peer.log" || { echo "peer not running after 60 s:" >&2; tail "$work/peer.log" >&2; exit 1; }
# run.sh execs java: $ENGINE is the JVM.
measure peer "$ENGINE" "$PEER_CONFIG"
stop_and_size "$ENGINE" "$work/peer-state"; ENGINE=""; ENGINES=""
