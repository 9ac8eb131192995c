"""A stream processor that does nothing, with librdkafka (the engine's client
library, through confluent-kafka): the floor of event -> output latency.

Consumes the interactions topic and, for every event, publishes a small
record keyed by its user to each output topic (as_of = the event's time, so
`recstream loadgen` reads latency off it exactly as it does the engine's),
with the engine's client settings: producer linger 2 ms, lz4, acks=all; the
consumer fetches on the engine's cadence (5 ms or 1 MiB). What it measures is
the broker, the client library and the host, without any processing.
The Java counterpart is benches/peers/kafka-streams/run.sh relay.
"""
import argparse, json, signal, sys
from confluent_kafka import Consumer, Producer

p = argparse.ArgumentParser()
p.add_argument("--brokers", required=True)
p.add_argument("--input", default="reco.interactions.v1")
p.add_argument("--outputs", default="reco.recommendations.v1,reco.carousels.v2,reco.insights.v1")
p.add_argument("--fetch-wait-ms", default="5")
p.add_argument("--fetch-min-bytes", default="1048576")
p.add_argument("--linger-ms", default="2")
a = p.parse_args()

consumer = Consumer({
    "bootstrap.servers": a.brokers, "group.id": "recstream-relay",
    "auto.offset.reset": "earliest", "enable.auto.commit": True,
    "fetch.wait.max.ms": a.fetch_wait_ms, "fetch.min.bytes": a.fetch_min_bytes,
})
producer = Producer({
    "bootstrap.servers": a.brokers, "linger.ms": a.linger_ms, "acks": "all",
    "compression.type": "lz4",
})
outputs = a.outputs.split(",")
consumer.subscribe([a.input])
running = True
def stop(*_):
    global running
    running = False
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)


def batch(c):
    # poll waits for the first record; consume(n, 0) takes what else is there
    # (consume(n, timeout) would wait for n records or the whole timeout).
    m = c.poll(0.05)
    return [] if m is None else [m] + c.consume(1000, 0)

def produce(topic, record, key):
    # A full local queue (the broker acknowledges slower than the input
    # arrives) is backpressure: wait for deliveries, as the engine does,
    # rather than fail; the latency then shows the broker's limit.
    while True:
        try:
            producer.produce(topic, record, key=key)
            return
        except BufferError:
            producer.poll(0.05)


print("relay: running", file=sys.stderr, flush=True)
version = 0
while running:
    for m in batch(consumer):
        if m.error():
            continue
        try:
            event = json.loads(m.value())
            user, ts = event["user_id"], int(event["ts"])
        except (ValueError, KeyError, TypeError):
            continue
        version += 1
        record = json.dumps({"user_id": user, "as_of": ts, "version": version}).encode()
        for topic in outputs:
            produce(topic, record, user)
    producer.poll(0)
producer.flush(10)
consumer.close()
