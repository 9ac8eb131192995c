#!/usr/bin/env python3
"""Load for the HTTP API (run by benches/api.sh against a running engine).

Measures, with keep-alive connections from CONCURRENCY threads:
  1. interactive queries: GET /api/users/{id}/carousels for users with state;
  2. intake: POST /api/track (each answered after the broker acknowledged it);
  3. freshness as the live page sees it: POST a like, then time until the
     user's next carousels record arrives on GET /api/users/{id}/stream.
Prints one markdown table row per measurement.

Usage: api_load.py PORT TOKEN USERS_PREFIX USERS MOVIES
"""

import http.client
import json
import random
import statistics
import sys
import threading
import time
import uuid

PORT, TOKEN, PREFIX = int(sys.argv[1]), sys.argv[2], sys.argv[3]
USERS, MOVIES = int(sys.argv[4]), int(sys.argv[5])
CONCURRENCY = 4
REQUESTS = 4000
FRESHNESS_ROUNDS = 100


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def row(name, latencies, seconds):
    ms = [1000 * x for x in latencies]
    print(
        f"| {name} | {len(ms)} | {len(ms) / seconds:,.0f} | {statistics.median(ms):.2f} "
        f"| {percentile(ms, 99):.2f} | {max(ms):.2f} |"
    )


def run_concurrently(make_request):
    latencies, errors = [], []
    lock = threading.Lock()

    def worker(n, seed):
        rng = random.Random(seed)
        conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=30)
        mine = []
        for _ in range(n):
            method, path, body, expect = make_request(rng)
            headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
            start = time.perf_counter()
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            response_body = response.read()
            mine.append(time.perf_counter() - start)
            if response.status != expect:
                with lock:
                    errors.append((response.status, response_body[:200]))
        with lock:
            latencies.extend(mine)

    threads = [
        threading.Thread(target=worker, args=(REQUESTS // CONCURRENCY, i)) for i in range(CONCURRENCY)
    ]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        sys.exit(f"unexpected answers: {errors[:5]}")
    return latencies, elapsed


def query(rng):
    user = f"{PREFIX}{rng.randrange(USERS)}"
    return "GET", f"/api/users/{user}/carousels", None, 200


def track(rng):
    user = f"{PREFIX}{rng.randrange(USERS)}"
    event = {
        "event_id": str(uuid.uuid4()),
        "user_id": user,
        "movie_id": rng.randrange(1, MOVIES + 1),
        "type": "view",
        "ts": int(time.time() * 1000),
    }
    return "POST", "/api/track", json.dumps(event), 202


def freshness():
    """Like → the user's next carousels record on the event stream."""
    user = f"live-{uuid.uuid4().hex[:8]}"
    stream = http.client.HTTPConnection("127.0.0.1", PORT, timeout=30)
    stream.request("GET", f"/api/users/{user}/stream", headers={"Accept": "text/event-stream"})
    events = stream.getresponse()
    lines = iter(events.readline, b"")

    def next_event():
        name = None
        for raw in lines:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: ") and name:
                return name, line[6:]
        raise RuntimeError("stream ended")

    assert next_event()[0] == "ready"
    post = http.client.HTTPConnection("127.0.0.1", PORT, timeout=30)
    latencies = []
    rng = random.Random(5)
    started = time.perf_counter()
    for i in range(FRESHNESS_ROUNDS):
        event = {
            "event_id": f"{user}-{i}",
            "user_id": user,
            "movie_id": rng.randrange(1, MOVIES + 1),
            "type": "like",
            "ts": int(time.time() * 1000),
        }
        start = time.perf_counter()
        post.request("POST", "/api/track", body=json.dumps(event),
                     headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        response = post.getresponse()
        response.read()
        assert response.status == 202, response.status
        while True:
            name, data = next_event()
            if name == "carousels" and json.loads(data)["version"] >= i + 1:
                break
        latencies.append(time.perf_counter() - start)
    return latencies, time.perf_counter() - started


print("| measurement | requests | per second | p50 ms | p99 ms | max ms |")
print("|---|---:|---:|---:|---:|---:|")
row(f"GET /api/users/{{id}}/carousels ({CONCURRENCY} clients)", *run_concurrently(query))
row(f"POST /api/track ({CONCURRENCY} clients)", *run_concurrently(track))
row("like → carousels on the event stream (1 client)", *freshness())
