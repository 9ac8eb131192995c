#!/usr/bin/env bash
# Freshness at a fixed input rate on a fresh broker and engine: event ->
# published-list latency as an app's consumer sees it (p50/p95/p99), and the
# CPU that the engine and the broker used meanwhile (they share this host's
# cores with the load generator).
# Usage: RATE=3500 benches/freshness.sh   (env: RATE, SECONDS_AT_RATE=5, WARMUP_SECONDS=10,
#   USERS=10000, CATALOG, GUARANTEE, FETCH_WAIT_MS, ENGINE_TOML as in pipeline.sh,
#   RATINGS=FILE: replay these MovieLens ratings in event-time order at RATE
#   instead of synthetic users; CATALOG must hold their movies;
#   LATENCY_LOG=FILE: each output's latency split into engine and delivery, as CSV;
#   LOADGEN_CONFIG=FILE: the load generator's own config (its producer and the
#   consumer that watches the outputs, like an app's) instead of the engine's;
#   FLOOR=librdkafka|java: measure a stream processor that does nothing instead
#   of the engine (benches/peers/relay.py, or the Java clients' relay of
#   benches/peers/kafka-streams): one output per event to each output topic,
#   with the engine's client settings; RELAY_ARGS: more relay options;
#   BROKER_WARMUP_EVENTS=N: first warm the broker with N events through the
#   do-nothing relay, nothing attached (warm_broker in broker.sh; default 0))
source "$(dirname "$0")/broker.sh"

RATE=${RATE:-1000}
SECONDS_AT_RATE=${SECONDS_AT_RATE:-5}
USERS=${USERS:-10000}
CATALOG=${CATALOG:-../shared/data/movielens/ml-latest-small/movies.csv}
warm_broker "${BROKER_WARMUP_EVENTS:-0}"
engine_config
hport=$(free_port)
case "${FLOOR:-}" in
  "") start_engine "$work/state" "$hport" /readyz ;;
  librdkafka) relay=(python3 benches/peers/relay.py) ;;
  java) benches/peers/kafka-streams/run.sh build -DskipTests >/dev/null; relay=(benches/peers/kafka-streams/run.sh relay) ;;
  *) echo "FLOOR must be librdkafka or java, not '$FLOOR'" >&2; exit 2 ;;
esac
if [ -n "${FLOOR:-}" ]; then
  # No readiness to wait for: the relay reads its fresh group from the
  # earliest offset, and the warm-up below waits until it has answered.
  # shellcheck disable=SC2086
  "${relay[@]}" --brokers "$brokers" ${RELAY_ARGS:-} >>"$work/engine.log" 2>&1 &
  ENGINE=$!
  ENGINES="$ENGINES $ENGINE"
  echo "# floor: a relay that does nothing ($FLOOR clients) instead of the engine"
fi

events=$((RATE * SECONDS_AT_RATE))
if [ -n "${RATINGS:-}" ]; then
  source_flags=(--ratings "$RATINGS")
  echo "# $events ratings of $RATINGS at $RATE events/s; guarantee: $GUARANTEE; fetch.wait.max.ms: ${FETCH_WAIT_MS:-default}"
else
  source_flags=(--users "$USERS" --seed 2)
  echo "# $events events of $USERS synthetic users at $RATE events/s; guarantee: $GUARANTEE; fetch.wait.max.ms: ${FETCH_WAIT_MS:-default}"
fi
# A warm-up first, at the same rate (WARMUP_SECONDS, default 10; 0 to skip):
# the broker's JIT compiles its hot paths only after thousands of requests,
# and the first produces to just-created output topics and the first batches
# of a new engine are a cold start, not the steady state measured here.
if [ "${WARMUP_SECONDS:-10}" -gt 0 ]; then
  "$BIN" loadgen --brokers "$brokers" --config "${LOADGEN_CONFIG:-$ENGINE_CONFIG}" --catalog "$CATALOG" \
    --events $((RATE * ${WARMUP_SECONDS:-10})) --users "$USERS" --rate "$RATE" --seed 3 >/dev/null
fi
engine_before=$(cpu_seconds "$ENGINE")
broker_before=$(cpu_seconds "$BROKER")
# The load generator's own CPU (user + system) comes from /usr/bin/time.
/usr/bin/time -f "%U %S" -o "$work/loadgen.time" \
  "$BIN" loadgen --brokers "$brokers" --config "${LOADGEN_CONFIG:-$ENGINE_CONFIG}" --catalog "$CATALOG" \
  --events "$events" --rate "$RATE" "${source_flags[@]}" ${LATENCY_LOG:+--latency-log "$LATENCY_LOG"}
loadgen_cpu=$(awk '{printf "%.2f", $1 + $2}' "$work/loadgen.time")
echo "# CPU meanwhile: engine $(cpu_since "$engine_before" "$ENGINE") s, broker $(cpu_since "$broker_before" "$BROKER") s, load generator $loadgen_cpu s${FLOOR:+ (the engine's figure is the $FLOOR relay's)}"
[ -n "${FLOOR:-}" ] && exit 0
curl -sf "http://127.0.0.1:$hport/metrics" \
  | grep -E '^recstream_(users_recomputed_total|batch_records_(sum|count)|stage_seconds_sum|processing_seconds_(bucket|sum|count)|transaction_commit_seconds_(sum|count)|event_to_publish_seconds_(sum|count))' \
  | sed 's/^/# /'
