#!/usr/bin/env bash
# Cost per event on the synthetic uniform load (every event its own
# recompute), against a real Apache Kafka broker: after a warm-up of
# WARMUP_EVENTS, EVENTS events of USERS users are produced as fast as the
# broker takes them; prints the engine's and the broker's CPU over that
# phase, events per engine CPU-second, the engine's minor page faults per
# event (fresh pages the kernel zeroes), the users recomputed and the
# items a model scored per recompute, and the mean size of the records
# each output topic holds (SIZE_SAMPLE per topic, read back with the Python
# client) with how many records and bytes it holds per input event, and the
# engine's peak RSS. This is the figure issue 22's cost-per-event targets are about.
# Usage: benches/cost.sh   (env: EVENTS=100000 USERS=10000 WARMUP_EVENTS=20000
#   SIZE_SAMPLE=2000, CATALOG, NCF=1 a NeuMF model, GUARANTEE, ENGINE_TOML,
#   PERF=FILE: also `perf record` the engine over the measured phase into FILE)
source "$(dirname "$0")/broker.sh"

EVENTS=${EVENTS:-100000}
USERS=${USERS:-10000}
WARMUP_EVENTS=${WARMUP_EVENTS:-20000}
SIZE_SAMPLE=${SIZE_SAMPLE:-2000}
require_catalog

engine_config
if [ "${NCF:-0}" = 1 ]; then
  "$BIN" train --synthetic-users 2000 --catalog "$CATALOG" --epochs 3 --quiet \
    --out "$work/ncf" >"$work/train.log" 2>&1
  printf '[model]\npath = "%s"\n' "$work/ncf.onnx" >>"$ENGINE_CONFIG"
fi
hport=$(free_port)
start_engine "$work/state" "$hport" /readyz
load() { "$BIN" loadgen --brokers "$brokers" --config "$ENGINE_CONFIG" --catalog "$CATALOG" --users "$USERS" --rate 0 "$@"; }

echo "# machine: $(nproc) cores; catalog: $CATALOG; NCF: ${NCF:-0}; guarantee: $GUARANTEE; $USERS users"
load --events "$WARMUP_EVENTS" --seed 7 >/dev/null
engine0=$(cpu_seconds "$ENGINE")
faults0=$(minor_faults "$ENGINE")
broker0=$(cpu_seconds "$BROKER")
scored0=$(metric "$hport" recstream_ncf_inference_batch_size_sum)
users0=$(metric "$hport" recstream_users_recomputed_total)
if [ -n "${PERF:-}" ]; then
  perf record -F 499 --call-graph dwarf,16384 -p "$ENGINE" -o "$PERF" >"$PERF.log" 2>&1 &
  perf_pid=$!
fi
load --events "$EVENTS" --seed 1
engine1=$(cpu_seconds "$ENGINE")
faults1=$(minor_faults "$ENGINE")
broker1=$(cpu_seconds "$BROKER")
scored1=$(metric "$hport" recstream_ncf_inference_batch_size_sum)
users1=$(metric "$hport" recstream_users_recomputed_total)
if [ -n "${PERF:-}" ]; then
  kill -INT "$perf_pid"
  wait "$perf_pid" || true
fi
awk -v a="$engine0" -v b="$engine1" -v c="$broker0" -v d="$broker1" -v n="$EVENTS" \
    -v f0="$faults0" -v f1="$faults1" 'BEGIN {
  printf "# engine %.2f CPU-s, %.0f events per engine CPU-second (%.1f us per event); broker %.2f CPU-s (%.1f us per event)\n",
    b - a, n / (b - a), 1e6 * (b - a) / n, d - c, 1e6 * (d - c) / n
  printf "# engine minor page faults: %.2f per event\n", (f1 - f0) / n }'
awk -v s0="$scored0" -v s1="$scored1" -v u0="$users0" -v u1="$users1" -v n="$EVENTS" 'BEGIN {
  s = s1 - s0; u = u1 - u0
  printf "# users recomputed: %d (%.2f events each); items the model scored per recompute: %.0f\n",
    u, u ? n / u : 0, u ? s / u : 0 }'
echo "# engine peak RSS: $(awk '/VmHWM/{print $2, $3}' "/proc/$ENGINE/status")"
python3 - "$brokers" "$SIZE_SAMPLE" "$((WARMUP_EVENTS + EVENTS))" <<'PY'
import pathlib, sys, tomllib
from confluent_kafka import Consumer, TopicPartition
brokers, sample, produced = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# The output topics as declared in topics/ (the bench config keeps their names).
topics = {}
for f in sorted(pathlib.Path("topics").glob("*.toml")):
    t = tomllib.loads(f.read_text())
    if t["role"] in ("recommendations", "carousels", "insights", "changelog"):
        topics[t["role"]] = t["name"]
for role, name in topics.items():
    c = Consumer({"bootstrap.servers": brokers, "group.id": "bench-cost-sizes",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([name])
    sizes = []
    while len(sizes) < sample:
        m = c.poll(5)
        if m is None:
            break
        if not m.error():
            sizes.append(len(m.value() or b""))
    # Every record the topic holds (warm-up included), per input event produced.
    parts = c.list_topics(name, timeout=10).topics[name].partitions
    held = 0
    for p in parts:
        low, high = c.get_watermark_offsets(TopicPartition(name, p), timeout=10)
        held += high - low
    c.close()
    mean = sum(sizes) / len(sizes) if sizes else 0
    print(f"# {role} ({name}): mean record {mean:,.0f} B over {len(sizes)} records; "
          f"{held / produced:.2f} records, ~{held * mean / produced:,.0f} B per input event")
PY
