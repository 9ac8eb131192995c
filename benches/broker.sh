# Sourced by the benchmark scripts: builds the release engine (unless BIN
# names another build), starts a single-node Apache Kafka broker
# (ops/kafka/broker.sh, KRaft) on a free port with the declared topics, and
# cleans up on exit. Sets BIN, work (a scratch directory), brokers,
# free_port, engine_config, cpu_seconds and start_engine; BROKER is the
# broker's pid, ENGINE the last started engine's and ENGINES every started
# engine's, so that the cleanup stops them too.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash .ci/install.sh >/dev/null
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/recstream/target}"
# BIN: another build of the engine (e.g. the release-lto profile).
[ -n "${BIN:-}" ] || cargo build --release --quiet --bin recstream
BIN="${BIN:-$CARGO_TARGET_DIR/release/recstream}"

# A benchmark measures a warmed-up broker: full JIT (C2), as in production
# (see KAFKA_JIT in ops/kafka/broker.sh; the scripts warm it up before timing).
export KAFKA_JIT="${KAFKA_JIT:-full}"

# A free port below the ephemeral range: outgoing connections take their local
# ports from that range and could take a port picked there before its server binds.
free_port() {
  python3 - <<'PY'
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
for port in random.sample(range(max(1024, low - 12000), low), 200):
    try:
        socket.socket().bind(("127.0.0.1", port))
    except OSError:
        continue
    print(port)
    break
PY
}
work=$(mktemp -d)
kport=$(free_port)
KAFKA_CONTROLLER_PORT=$(free_port) ops/kafka/broker.sh start "$work/kafka" "$kport" >/dev/null
BROKER=$(cat "$work/kafka/broker.pid")
ENGINE=""
ENGINES=""
# The engines stop first, while the broker still answers their last commits
# and group leaves (at most 30 s for all of them, then they are killed); then
# the broker. A script that stops an engine itself also clears ENGINES.
cleanup() {
  local e
  for e in $ENGINES; do kill "$e" 2>/dev/null || true; done
    for _ in $(seq 300); do
    local alive=""
    for e in $ENGINES; do kill -0 "$e" 2>/dev/null && alive=yes; done
    [ -n "$alive" ] || break
    sleep 0.1
  done
  for e in $ENGINES; do kill -9 "$e" 2>/dev/null || true; done
  ops/kafka/broker.sh stop "$work/kafka"
  wait 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
brokers="127.0.0.1:$kport"
# TOPICS_DIR: other topic declarations (e.g. fewer output partitions), for an experiment.
"$BIN" topics apply --brokers "$brokers" ${TOPICS_DIR:+--dir "$TOPICS_DIR"} >/dev/null

# Starts the engine on the catalog $CATALOG with state in $1 and HTTP on port
# $2 (and the config file $ENGINE_CONFIG if set), and waits until GET $3
# answers (/metrics: up; /readyz: partitions assigned). Engines started
# one after another join one consumer group.
start_engine() {
  "$BIN" run --brokers "$brokers" --catalog "$CATALOG" --state-dir "$1" \
    --http-listen "127.0.0.1:$2" ${ENGINE_CONFIG:+--config "$ENGINE_CONFIG"} >>"$work/engine.log" 2>&1 &
  ENGINE=$!
  ENGINES="$ENGINES $ENGINE"
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$2$3" >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "engine not answering $3 after 60 s (log: $work/engine.log)" >&2; exit 1
}

# create_topics_like_input NAME...: creates these topics with as many
# partitions as the declared interactions topic (a system's copy of the input
# must be partitioned like it).
create_topics_like_input() {
  local partitions
  partitions=$(awk -F' *= *' '$1 == "partitions" {print $2}' topics/interactions.toml)
  python3 - "$brokers" "$partitions" "$@" <<'PY'
import sys
from confluent_kafka.admin import AdminClient, NewTopic
admin = AdminClient({"bootstrap.servers": sys.argv[1]})
topics = [NewTopic(name, int(sys.argv[2]), 1) for name in sys.argv[3:]]
for f in admin.create_topics(topics).values():
    f.result()
PY
}

# warm_broker [EVENTS] [RATE]: warms the broker's JIT with no system under
# test attached, so that whichever system is measured first does not pay for
# it. On this kind of host the broker's CPU per event at a fixed rate keeps
# falling for 100,000+ events after start (C2 compiles its produce and fetch
# paths while sharing 2 cores): a system measured on a fresh broker saw p50s
# of 0.7-1.2 s at 1,000 events/s where the same engine saw 30-70 ms later.
# The do-nothing librdkafka relay (benches/peers/relay.py) carries EVENTS
# (default $BROKER_WARMUP_EVENTS, 120000) synthetic events at RATE (default
# 2000/s) from topics of its own (warmup.*, as many partitions as the
# interactions topic) to three outputs, as the systems' traffic does;
# nothing measured later reads them.
warm_broker() {
  local events=${1:-${BROKER_WARMUP_EVENTS:-120000}} rate=${2:-2000} relay_pid
  [[ $events =~ ^[0-9]+$ ]] || { echo "BROKER_WARMUP_EVENTS must be a whole number, not '$events'" >&2; exit 2; }
  [ "$events" -gt 0 ] || return 0
  create_topics_like_input warmup.interactions warmup.recommendations warmup.carousels warmup.insights
  printf '[topics]\ninteractions = "warmup.interactions"\nrecommendations = "warmup.recommendations"\n' >"$work/warmup.toml"
  python3 benches/peers/relay.py --brokers "$brokers" --input warmup.interactions \
    --outputs warmup.recommendations,warmup.carousels,warmup.insights >>"$work/warmup.log" 2>&1 &
  relay_pid=$!
  # Listed with the engines, so that the cleanup stops it if the load fails.
  ENGINES="$ENGINES $relay_pid"
  "$BIN" loadgen --brokers "$brokers" --config "$work/warmup.toml" \
    --catalog "${CATALOG:-../shared/data/movielens/ml-latest-small/movies.csv}" \
    --events "$events" --users 10000 --rate "$rate" --seed 9 >/dev/null
  kill "$relay_pid"
  wait "$relay_pid" 2>/dev/null || true
  ENGINES=${ENGINES% "$relay_pid"}
}

# metric PORT NAME [LABEL_REGEX]: the sum of an engine's samples of a
# Prometheus metric (optionally only those whose labels match), 0 if absent.
metric() {
  curl -sf "http://127.0.0.1:$1/metrics" | awk -v m="$2" -v f="${3:-}" \
    '$1 ~ "^"m && $1 ~ f {s += $2} END {printf "%.0f\n", s}'
}

# Sets CATALOG (the movies the engine and the load generator read; by default
# ml-latest-small's from ../shared/data) and stops if the file is missing.
require_catalog() {
  CATALOG=${CATALOG:-../shared/data/movielens/ml-latest-small/movies.csv}
  if [ ! -f "$CATALOG" ]; then
    echo "catalog $CATALOG not found (set CATALOG=...)" >&2
    exit 1
  fi
}

# Writes the engine's bench config to $ENGINE_CONFIG: the processing
# guarantee ($GUARANTEE: at_least_once, the default, or exactly_once), the
# consumers' fetch.wait.max.ms ($FETCH_WAIT_MS, unset by default: Kafka
# answers a waiting fetch as soon as data arrives; brokers that answer only
# when the wait ends, like tansu 0.6, need 1 ms for freshness) and the
# settings in the file $ENGINE_TOML, if set.
GUARANTEE=${GUARANTEE:-at_least_once}
FETCH_WAIT_MS=${FETCH_WAIT_MS:-}
ENGINE_CONFIG="$work/bench.toml"
engine_config() {
  printf '[processing]\nguarantee = "%s"\n' "$GUARANTEE" >"$ENGINE_CONFIG"
  if [ -n "$FETCH_WAIT_MS" ]; then
    printf '[kafka.client]\n"fetch.wait.max.ms" = "%s"\n' "$FETCH_WAIT_MS" >>"$ENGINE_CONFIG"
  fi
  if [ -n "${ENGINE_TOML:-}" ]; then
    cat "$ENGINE_TOML" >>"$ENGINE_CONFIG"
  fi
}

# CPU seconds (user + system) that process $1 has used so far.
cpu_seconds() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat"; }
# cpu_since BEFORE PID: the CPU seconds PID has used since cpu_seconds gave BEFORE.
cpu_since() { awk -v a="$1" -v b="$(cpu_seconds "$2")" 'BEGIN {printf "%.2f", b - a}'; }
# Minor page faults so far (each a fresh page the kernel zeroes for the process).
minor_faults() { awk '{print $10}' "/proc/$1/stat"; }
