#!/usr/bin/env bash
# Whole-pipeline benchmark against a real tansu broker process:
#   1. throughput: produce EVENTS as fast as the broker takes them, measure until
#      every user's output reflects their last event;
#   2. freshness: produce at a fixed RATE and measure event -> published-list latency.
# Prints one JSON line per phase plus the engine's peak RSS and recompute counters.
# Usage: benches/pipeline.sh   (env: EVENTS, USERS, RATE, LATENCY_EVENTS, CATALOG)
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install.sh >/dev/null
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/recstream/target}"
cargo build --release --quiet --bin recstream
BIN="$CARGO_TARGET_DIR/release/recstream"

EVENTS=${EVENTS:-200000}
USERS=${USERS:-10000}
RATE=${RATE:-1000}
LATENCY_EVENTS=${LATENCY_EVENTS:-20000}
CATALOG=${CATALOG:-../shared/data/movielens/ml-latest-small/movies.csv}
if [ ! -f "$CATALOG" ]; then
  echo "catalog $CATALOG not found (set CATALOG=...)" >&2
  exit 1
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work=$(mktemp -d)
kport=$(free_port)
hport=$(free_port)
tansu broker --listener-url "tcp://127.0.0.1:$kport" --advertised-listener-url "tcp://127.0.0.1:$kport" \
  --storage-engine memory://tansu/ >"$work/tansu.log" 2>&1 &
TANSU=$!
ENGINE=""
cleanup() { [ -n "$ENGINE" ] && kill "$ENGINE" 2>/dev/null; kill "$TANSU" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$kport") 2>/dev/null && break; sleep 0.1; done

brokers="127.0.0.1:$kport"
"$BIN" topics apply --brokers "$brokers" >/dev/null
"$BIN" run --brokers "$brokers" --catalog "$CATALOG" --state-dir "$work/state" \
  --http-listen "127.0.0.1:$hport" >"$work/engine.log" 2>&1 &
ENGINE=$!
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$hport/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done

echo "# machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; catalog: $CATALOG"
echo "# throughput phase: $EVENTS events, $USERS users, as fast as possible"
"$BIN" loadgen --brokers "$brokers" --catalog "$CATALOG" --events "$EVENTS" --users "$USERS" --rate 0 --seed 1
echo "# freshness phase: $LATENCY_EVENTS events at $RATE events/s"
"$BIN" loadgen --brokers "$brokers" --catalog "$CATALOG" --events "$LATENCY_EVENTS" --users "$USERS" --rate "$RATE" --seed 2
echo "# engine peak RSS: $(awk '/VmHWM/{print $2, $3}' "/proc/$ENGINE/status")"
curl -sf "http://127.0.0.1:$hport/metrics" | grep -E '^recstream_(users_recomputed_total|events_total|batch_records_(sum|count)|rocksdb_bytes)' | sed 's/^/# /'
