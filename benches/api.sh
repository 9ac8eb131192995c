#!/usr/bin/env bash
# HTTP API benchmark against a real Apache Kafka broker process and the release engine:
# interactive queries, the intake, and like-to-event-stream freshness (what the
# live page sees). USERS users get state from EVENTS loadgen events first.
# Usage: benches/api.sh   (env: EVENTS, USERS)
source "$(dirname "$0")/broker.sh"

EVENTS=${EVENTS:-50000}
USERS=${USERS:-5000}
CATALOG=src/demo/catalog.csv
MOVIES=$(($(wc -l <"$CATALOG") - 1))
TOKEN="bench-token-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')"

hport=$(free_port)
export RECSTREAM_API_TOKEN="$TOKEN"
start_engine "$work/state" "$hport" /readyz
"$BIN" loadgen --brokers "$brokers" --catalog "$CATALOG" --events "$EVENTS" --users "$USERS" \
  --rate 0 --seed 11 --produce-only >/dev/null
for _ in $(seq 1200); do
  applied=$(curl -sf "http://127.0.0.1:$hport/metrics" |
    awk '$1 ~ /^recstream_events_total/ && $1 ~ /outcome="(applied|duplicate|dead_lettered)"/ {s += $2} END {printf "%.0f", s}')
  [ "$applied" -ge "$EVENTS" ] && break
  sleep 0.5
done

echo "# machine: $(nproc) cores; $USERS users with state from $EVENTS events; catalog $CATALOG ($MOVIES movies)"
python3 benches/api_load.py "$hport" "$TOKEN" load- "$USERS" "$MOVIES"
