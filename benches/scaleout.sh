#!/usr/bin/env bash
# Scale-out on one machine: INSTANCES engine instances in one consumer group
# against one Apache Kafka broker (fresh broker and state for each run). After
# the group settles (every input partition owned, each instance holding its
# share) and a warm-up, it measures:
#   1. throughput: EVENTS synthetic events produced as fast as the broker takes
#      them, until every user's output reflects their last event (aggregate
#      over the instances), with the CPU of every instance and of the broker;
#   2. freshness: SECONDS_AT_RATE seconds at RATE events/s, event -> published
#      list as an app's consumer sees it;
#   3. the global item tables' traffic: the changelog bytes the throughput
#      phase wrote (every instance's follower reads all of them) and the
#      other instances' batches each instance folded in.
# The broker, the instances and the load generator share this host's cores,
# so the figures say what more instances cost here, not what more hosts give.
# Prints the load generator's JSON lines and one summary JSON line (with
# each instance's share of the events).
# Usage: INSTANCES=3 benches/scaleout.sh   (env: INSTANCES=1, EVENTS=100000,
#   USERS=10000, WARMUP_EVENTS=20000, RATE=1000, SECONDS_AT_RATE=5, CATALOG,
#   GUARANTEE, ENGINE_TOML as in pipeline.sh)
source "$(dirname "$0")/broker.sh"

INSTANCES=${INSTANCES:-1}
EVENTS=${EVENTS:-100000}
USERS=${USERS:-10000}
WARMUP_EVENTS=${WARMUP_EVENTS:-20000}
RATE=${RATE:-1000}
SECONDS_AT_RATE=${SECONDS_AT_RATE:-5}
require_catalog
# The engine consumes the interactions and the refresh topics (the gauge
# counts both); users are spread over the interactions topic's partitions.
partitions=$(awk -F' *= *' '$1 == "partitions" { p += $2 } END { print p }' topics/interactions.toml topics/refresh.toml)
user_partitions=$(awk -F' *= *' '$1 == "partitions" { print $2 }' topics/interactions.toml)

engine_config
ports=()
for i in $(seq "$INSTANCES"); do
  port=$(free_port)
  start_engine "$work/state-$i" "$port" /metrics
  ports+=("$port")
done

metric() { # metric PORT NAME: the sum of the samples of NAME on instance PORT
    { curl -sf --max-time 5 "http://127.0.0.1:$1/metrics" || true; } | awk -v n="$2" '$1 == n || index($1, n "{") == 1 { s += $2 } END { print s + 0 }'
}
# The group has settled when the instances own every partition between them
# and none is idle (with more instances than user partitions some are).
settled=""
for _ in $(seq 600); do
  total=0; idle=0
  for port in "${ports[@]}"; do
    owned=$(metric "$port" recstream_assigned_partitions)
    total=$((total + owned))
    [ "$owned" -gt 0 ] || idle=$((idle + 1))
  done
  if [ "$total" -eq "$partitions" ] && { [ "$idle" -eq 0 ] || [ "$INSTANCES" -gt "$user_partitions" ]; }; then
    settled=yes
    break
  fi
  sleep 0.1
done
if [ -z "$settled" ]; then
  echo "the group did not settle in 60 s: $total of $partitions partitions owned, $idle idle instance(s); engine log:" >&2
  tail -20 "$work/engine.log" >&2
  exit 1
fi

load() { "$BIN" loadgen --brokers "$brokers" --config "$ENGINE_CONFIG" --catalog "$CATALOG" --users "$USERS" "$@"; }
changelog_bytes() { # segment bytes on the broker's disk, every partition (indexes are preallocated: left out)
  find "$work"/kafka/data -path '*reco.state-changelog.v1-*' -name '*.log' -printf '%s\n' 2>/dev/null | awk '{ s += $1 } END { print s + 0 }'
}
engines_cpu() {
  local e sum=0
  for e in $ENGINES; do sum=$(awk -v a="$sum" -v b="$(cpu_seconds "$e")" 'BEGIN {printf "%.2f", a + b}'); done
  echo "$sum"
}

echo "# machine: $(nproc) cores; $INSTANCES instance(s) over $partitions input partitions; catalog: $CATALOG; guarantee: $GUARANTEE; $USERS users"
load --events "$WARMUP_EVENTS" --rate 0 --seed 7 >/dev/null
engines0=$(engines_cpu)
broker0=$(cpu_seconds "$BROKER")
changelog0=$(changelog_bytes)
followed0=0
for port in "${ports[@]}"; do followed0=$((followed0 + $(metric "$port" recstream_global_items_batches_total))); done
throughput=$(load --events "$EVENTS" --rate 0 --seed 1)
echo "$throughput"
engines1=$(engines_cpu)
broker1=$(cpu_seconds "$BROKER")
changelog1=$(changelog_bytes)
followed1=0
for port in "${ports[@]}"; do followed1=$((followed1 + $(metric "$port" recstream_global_items_batches_total))); done
freshness=$(load --events $((RATE * SECONDS_AT_RATE)) --rate "$RATE" --seed 2)
echo "$freshness"

follow_s=0
for port in "${ports[@]}"; do
  f=$({ curl -sf --max-time 5 "http://127.0.0.1:$port/metrics" || true; } | awk '$1 == "recstream_stage_seconds_sum{stage=\"follow\"}" { print $2 }')
  follow_s=$(awk -v a="$follow_s" -v b="${f:-0}" 'BEGIN { printf "%.2f", a + b }')
done
shares=""
rss_mb=0
for port in "${ports[@]}"; do
  shares="$shares $(metric "$port" recstream_events_total)"
done
for e in $ENGINES; do
  rss_mb=$((rss_mb + $(awk '/VmHWM/{print int($2 / 1024)}' "/proc/$e/status")))
done
python3 - "$INSTANCES" "$EVENTS" "$engines0" "$engines1" "$broker0" "$broker1" "$rss_mb" "$throughput" "$freshness" "$shares" "$changelog0" "$changelog1" "$followed0" "$followed1" "$follow_s" <<'PY'
import json, sys
k, events = int(sys.argv[1]), int(sys.argv[2])
e0, e1, b0, b1 = map(float, sys.argv[3:7])
rss_mb = int(sys.argv[7])
t, f = json.loads(sys.argv[8]), json.loads(sys.argv[9])
shares = [float(x) for x in sys.argv[10].split()]
c0, c1, f0, f1 = map(int, sys.argv[11:15])
print(json.dumps({
    "phase": "scaleout", "instances": k, "events": events,
    "throughput": round(t["pipeline_rate"]),
    "engine_cpu_s": round(e1 - e0, 2), "per_engine_cpu_second": round(events / (e1 - e0)),
    "broker_cpu_s": round(b1 - b0, 2),
    "rate": f["target_rate"], "p50_ms": f["latency_ms_p50"], "p99_ms": f["latency_ms_p99"],
    "peak_rss_mb_total": rss_mb,
    "event_share": [round(s / sum(shares), 3) for s in shares] if sum(shares) else [],
    # Every instance's follower reads the whole changelog (global item tables).
    "changelog_bytes_per_event": round((c1 - c0) / events),
    "followed_batches": f1 - f0,
    # Engine-thread time folding followed batches in, whole run, all instances.
    "follow_stage_s": float(sys.argv[15]),
}))
PY
