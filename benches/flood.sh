#!/usr/bin/env bash
# Flood and restore benchmark against a real Apache Kafka broker process.
#   1. flood: EVENTS events (default 1M) for USERS users wait in the input topic;
#      the engine starts and consumes them as fast as the broker delivers. Reports
#      the consume time and rate, and the engine's peak RSS (VmHWM) sampled from
#      /proc while it runs: memory must stay bounded (bounded queues), not grow
#      with the backlog.
#   2. restore: a second instance with an empty state directory joins the same
#      group after the first stops; it restores every partition's state from the
#      changelog topic. Reports restore seconds and seconds per 100k users.
# Usage: benches/flood.sh   (env: EVENTS, USERS, CATALOG)
source "$(dirname "$0")/broker.sh"

EVENTS=${EVENTS:-1000000}
USERS=${USERS:-100000}
require_catalog

echo "# machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; catalog: $CATALOG"
echo "# backlog: $EVENTS events for $USERS users"
"$BIN" loadgen --brokers "$brokers" --catalog "$CATALOG" --events "$EVENTS" --users "$USERS" \
  --rate 0 --seed 11 --produce-only

hport=$(free_port)
t0=$(date +%s.%N)
start_engine "$work/state-a" "$hport" /metrics
peak=0
while :; do
  done_events=$(metric "$hport" recstream_events_total 'outcome="(applied|duplicate|dead_lettered)"')
  rss=$(awk '/VmHWM/{print $2}' "/proc/$ENGINE/status")
  [ "$rss" -gt "$peak" ] && peak=$rss
  [ "$done_events" -ge "$EVENTS" ] && break
  sleep 0.5
done
t1=$(date +%s.%N)
rss_now=$(awk '/VmRSS/{print $2}' "/proc/$ENGINE/status")
users_state=$(metric "$hport" recstream_users_recomputed_total)
live=$(metric "$hport" recstream_rocksdb_bytes 'measure="live"')
python3 - "$EVENTS" "$t0" "$t1" "$peak" "$rss_now" <<'EOF'
import json, sys
events, t0, t1, peak, now = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
s = t1 - t0
print(json.dumps({"phase": "flood", "events": events, "seconds": round(s, 1), "events_per_s": round(events / s),
                  "peak_rss_mb": round(peak / 1024), "rss_after_mb": round(now / 1024)}))
EOF
echo "# rocksdb live bytes: $live; users recomputed: $users_state"
kill -TERM "$ENGINE"; wait "$ENGINE" || true
ENGINE=""
ENGINES=""

# Restore: a fresh instance in the same group takes every partition over.
hport=$(free_port)
start_engine "$work/state-b" "$hport" /metrics
for _ in $(seq 1200); do
  restored=$(metric "$hport" recstream_partition_handovers_total 'outcome="restored"')
  [ "$restored" -ge 6 ] && break
  sleep 0.5
done
seconds=$(curl -sf "http://127.0.0.1:$hport/metrics" | awk '$1=="recstream_restore_seconds_sum"{print $2}')
records=$(metric "$hport" recstream_restore_records_total)
python3 - "$seconds" "$records" "$USERS" <<'EOF'
import json, sys
s, records, users = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
print(json.dumps({"phase": "restore", "partitions": 6, "changelog_records": records, "seconds": round(s, 2),
                  "seconds_per_100k_users": round(s * 100000 / users, 2)}))
EOF
