#!/usr/bin/env bash
# Whole-pipeline benchmark against a real tansu broker process:
#   1. throughput: produce EVENTS as fast as the broker takes them, measure until
#      every user's output reflects their last event;
#   2. freshness: produce at a fixed RATE and measure event -> published-list latency.
# Prints one JSON line per phase plus the engine's peak RSS and recompute counters.
# Usage: benches/pipeline.sh   (env: EVENTS, USERS, RATE, LATENCY_EVENTS, CATALOG)
source "$(dirname "$0")/broker.sh"

EVENTS=${EVENTS:-200000}
USERS=${USERS:-10000}
RATE=${RATE:-1000}
LATENCY_EVENTS=${LATENCY_EVENTS:-20000}
CATALOG=${CATALOG:-../shared/data/movielens/ml-latest-small/movies.csv}
if [ ! -f "$CATALOG" ]; then
  echo "catalog $CATALOG not found (set CATALOG=...)" >&2
  exit 1
fi

hport=$(free_port)

start_engine "$work/state" "$hport" /readyz

echo "# machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; catalog: $CATALOG"
echo "# throughput phase: $EVENTS events, $USERS users, as fast as possible"
"$BIN" loadgen --brokers "$brokers" --catalog "$CATALOG" --events "$EVENTS" --users "$USERS" --rate 0 --seed 1
echo "# freshness phase: $LATENCY_EVENTS events at $RATE events/s"
"$BIN" loadgen --brokers "$brokers" --catalog "$CATALOG" --events "$LATENCY_EVENTS" --users "$USERS" --rate "$RATE" --seed 2
echo "# engine peak RSS: $(awk '/VmHWM/{print $2, $3}' "/proc/$ENGINE/status")"
curl -sf "http://127.0.0.1:$hport/metrics" | grep -E '^recstream_(users_recomputed_total|events_total|batch_records_(sum|count)|rocksdb_bytes)' | sed 's/^/# /'
