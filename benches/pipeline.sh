#!/usr/bin/env bash
# Whole-pipeline benchmark against a real Apache Kafka broker process, in one run:
#   1. throughput: produce EVENTS as fast as the broker takes them, measure until
#      every user's output reflects their last event;
#   2. ceiling: a plain consumer (the engine's client settings, records
#      discarded) reads the same EVENTS from the same topic;
#   3. freshness: produce at a fixed RATE and measure event -> published-list
#      latency as an app's consumer sees it.
# Prints one JSON line per phase plus the engine's peak RSS and counters.
# Usage: benches/pipeline.sh   (env: EVENTS, USERS, RATE, LATENCY_EVENTS, CATALOG,
#   NCF=1: re-score with a NeuMF model trained on synthetic users of CATALOG,
#   NCF=history: the history-based NeuMF instead (also the model's own
#   candidate source: the whole catalogue scored per recomputed user),
#   GUARANTEE=exactly_once: Kafka transactions (default at_least_once),
#   FETCH_WAIT_MS: the consumers' fetch.wait.max.ms, see benches/broker.sh,
#   RATINGS=FILE: the throughput phase replays these MovieLens ratings in
#   event-time order, as fast as possible, instead of synthetic users; CATALOG
#   must hold their movies, e.g. RATINGS=../shared/data/movielens/ml-100k/u.data
#   CATALOG=../shared/data/movielens/ml-100k/u.item,
#   ENGINE_TOML=FILE: more engine settings, appended to the bench's config,
#   e.g. [engine.lists] candidates_per_source = 120)
source "$(dirname "$0")/broker.sh"

EVENTS=${EVENTS:-200000}
USERS=${USERS:-10000}
RATE=${RATE:-1000}
LATENCY_EVENTS=${LATENCY_EVENTS:-20000}
NCF=${NCF:-0}
require_catalog

engine_config
if [ "$NCF" = 1 ] || [ "$NCF" = history ]; then
  architecture=neumf
  [ "$NCF" = history ] && architecture=history
  "$BIN" train --architecture "$architecture" --synthetic-users 2000 --catalog "$CATALOG" --epochs 3 --quiet \
    --out "$work/ncf" >"$work/train.log" 2>&1
  printf '[model]\npath = "%s"\n' "$work/ncf.onnx" >>"$ENGINE_CONFIG"
fi
hport=$(free_port)

start_engine "$work/state" "$hport" /readyz

echo "# machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; catalog: $CATALOG; NCF: $NCF; guarantee: $GUARANTEE; fetch.wait.max.ms: ${FETCH_WAIT_MS:-default}"
# Bytes the broker holds for a topic (its log segments, compressed as sent).
topic_bytes() { find "$work/kafka/data" -path "*/$1-[0-9]*/*.log" -printf '%s\n' 2>/dev/null | awk '{s += $1} END {print s + 0}'; }
output_topics=$(grep -h '^name' topics/changelog.toml topics/recommendations.toml topics/carousels.toml topics/insights.toml | cut -d'"' -f2)
declare -A bytes_before
for t in $output_topics; do bytes_before[$t]=$(topic_bytes "$t"); done
cpu_before=$(cpu_seconds "$ENGINE")
if [ -n "${RATINGS:-}" ]; then
  echo "# throughput phase: the first $EVENTS ratings of $RATINGS in event-time order, as fast as possible"
  throughput=$("$BIN" loadgen --brokers "$brokers" --config "$ENGINE_CONFIG" --catalog "$CATALOG" --events "$EVENTS" --ratings "$RATINGS" --rate 0)
else
  echo "# throughput phase: $EVENTS events, $USERS users, as fast as possible"
  throughput=$("$BIN" loadgen --brokers "$brokers" --config "$ENGINE_CONFIG" --catalog "$CATALOG" --events "$EVENTS" --users "$USERS" --rate 0 --seed 1)
fi
echo "$throughput"
# A ratings file may hold fewer than EVENTS (and only the catalog's movies count).
EVENTS=$(echo "$throughput" | grep -o '"events":[0-9]*' | cut -d: -f2)
cpu_after=$(cpu_seconds "$ENGINE")
echo "# engine CPU in the throughput phase: $(awk -v a="$cpu_before" -v b="$cpu_after" -v n="$EVENTS" 'BEGIN {printf "%.2f s, %.0f events per CPU-second", b - a, n / (b - a)}')"
sleep 2  # the last batch's records and markers
for t in $output_topics; do
  echo "# bytes written to $t in the throughput phase: $(awk -v a="${bytes_before[$t]}" -v b="$(topic_bytes "$t")" -v n="$EVENTS" 'BEGIN {printf "%.0f per event (compressed, as the broker holds them)", (b - a) / n}')"
done
echo "# ceiling: bare consume of the same $EVENTS records"
"$BIN" loadgen --brokers "$brokers" --config "$ENGINE_CONFIG" --catalog "$CATALOG" --events "$EVENTS" --bare-consume
echo "# freshness phase: $LATENCY_EVENTS events at $RATE events/s"
"$BIN" loadgen --brokers "$brokers" --config "$ENGINE_CONFIG" --catalog "$CATALOG" --events "$LATENCY_EVENTS" --users "$USERS" --rate "$RATE" --seed 2
echo "# engine peak RSS: $(awk '/VmHWM/{print $2, $3}' "/proc/$ENGINE/status")"
curl -sf "http://127.0.0.1:$hport/metrics" \
  | grep -E '^recstream_(users_recomputed_total|events_total|batch_records_(sum|count)|rocksdb_bytes|ncf_inference_batch_size_(sum|count)|scorer_seconds_(sum|count)|ncf_fold_in_seconds_(sum|count))' \
  | sed 's/^/# /'
