#!/usr/bin/env python3
"""Independent producer for the end-to-end tests (confluent-kafka, not our Rust client).

Reads JSON lines from a file: {"key": str|null, "value": <any JSON or a raw string>,
"raw": bool}. With raw=true the value string is sent verbatim (for malformed payloads).
"""
import argparse
import json
import sys
import time

from confluent_kafka import Producer


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--file", required=True)
    ap.add_argument("--rate", type=float, default=0.0, help="records per second; 0 = as fast as possible")
    args = ap.parse_args()
    started = time.monotonic()
    producer = Producer({"bootstrap.servers": args.brokers, "acks": "all", "linger.ms": 5})
    failures = []

    def on_delivery(err, _msg):
        if err is not None:
            failures.append(str(err))

    count = 0
    with open(args.file, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            value = rec["value"] if rec.get("raw") else json.dumps(rec["value"])
            key = rec.get("key")
            producer.produce(args.topic, key=key.encode() if key is not None else None,
                             value=value.encode(), on_delivery=on_delivery)
            producer.poll(0)
            count += 1
            if args.rate > 0:
                ahead = count / args.rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
    remaining = producer.flush(30)
    if remaining or failures:
        print(f"produce failed: {remaining} undelivered, errors: {failures[:3]}", file=sys.stderr)
        return 1
    print(f"produced {count} records to {args.topic}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
