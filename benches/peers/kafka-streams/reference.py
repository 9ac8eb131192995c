#!/usr/bin/env python3
"""The seed's rules written a second time, independently of the peer, in plain
Python: generates the shared parity fixture (src/test/resources/parity.json)
that the peer's unit test (ParityTest) and the engine's test
(tests/peer_fixture.rs: the rules' constants are the engine's defaults) read.

    python3 benches/peers/kafka-streams/reference.py   # rewrites the fixture

Order of effects, as in the peer's topology: an event updates its user's
profile, the user's outputs are computed from the popularity of the events
*before* it, then the event is counted for popularity.
"""
import json
import math
import os
import random

RULES = {
    "event_weights": {
        "view": 0.2, "click": 0.5, "play": 1.0, "progress": 1.0, "complete": 2.0,
        "rate": 2.0, "like": 3.0, "dislike": -3.0, "watchlist_add": 1.5,
        "watchlist_remove": -0.5, "skip": -1.0,
    },
    "user_half_life_hours": 720.0,
    "popularity_half_life_hours": 720.0,
    "genre_rows": 3,
    "row_size": 10,
    "top_n": 20,
    "popular_per_genre": 100,
    "dedup_window": 64,
}
ENGAGES = {"play", "progress", "complete", "rate", "like", "watchlist_add"}
NOT_SEEN = {"view", "click", "watchlist_remove"}
MS_PER_HOUR = 3_600_000.0
USER_HL = RULES["user_half_life_hours"] * MS_PER_HOUR
POP_HL = RULES["popularity_half_life_hours"] * MS_PER_HOUR
ALL = "*"


def weight(kind, value):
    base = RULES["event_weights"][kind]
    if kind == "progress":
        return base * (value if value is not None else 0.0)
    if kind == "rate":
        return base * ((value if value is not None else 3.0) - 3.0) / 2.0
    return base


def decay(dt, hl):
    return 1.0 if dt <= 0 else math.exp(-dt * math.log(2.0) / hl)


def pop_key(value, as_of):
    return math.log(value) + as_of * math.log(2.0) / POP_HL


class User:
    def __init__(self):
        self.genres, self.as_of, self.seen, self.ids = {}, 0, set(), []
        self.last_ts, self.version = 0, 0

    def apply(self, e, genres):
        if e["event_id"] in self.ids:
            return False
        self.ids = (self.ids + [e["event_id"]])[-RULES["dedup_window"]:]
        self.version += 1
        self.last_ts = max(self.last_ts, e["ts"])
        w = weight(e["type"], e.get("value"))
        if genres and w != 0.0:
            share = w / len(genres)
            if e["ts"] >= self.as_of:
                f = decay(e["ts"] - self.as_of, USER_HL)
                self.genres = {g: v * f for g, v in self.genres.items()}
                self.as_of = e["ts"]
                amount = share
            else:
                amount = share * decay(self.as_of - e["ts"], USER_HL)
            for g in genres:
                self.genres[g] = self.genres.get(g, 0.0) + amount
        if e["type"] not in NOT_SEEN:
            self.seen.add(e["movie_id"])
        return True

    def top_genres(self):
        pos = [(g, w) for g, w in self.genres.items() if w > 0.0]
        pos.sort(key=lambda gw: (-gw[1], gw[0]))
        return pos[: RULES["genre_rows"]]


def popular_list(popularity, catalog, genre):
    """(movie, key, as_of) of the genre's most popular items, best first."""
    items = [(m, pop_key(v, t), t) for m, (v, t) in popularity.items() if genre == ALL or genre in catalog[m]]
    items.sort(key=lambda x: (-x[1], x[0]))
    return items[: RULES["popular_per_genre"]]


def outputs(user_id, u, popularity, catalog):
    top = u.top_genres()
    total = sum(w for _, w in top)
    lists = {g: popular_list(popularity, catalog, g) for g, _ in top} or {ALL: popular_list(popularity, catalog, ALL)}
    now = max([u.last_ts] + [t for l in lists.values() for _, _, t in l])
    scores = {}
    for l in lists.values():
        for m, key, _ in l:
            if m in u.seen or m in scores:
                continue
            share = sum(w for g, w in top if g in catalog[m]) / total if top else 1.0
            scores[m] = share * math.exp(key - now * math.log(2.0) / POP_HL)
    ranked = sorted(scores.items(), key=lambda ms: (-ms[1], ms[0]))[: RULES["top_n"]]
    rows = []
    for g in [g for g, _ in top] or [ALL]:
        ids = [m for m, _, _ in lists[g] if m not in u.seen][: RULES["row_size"]]
        rows.append({"id": "popular" if g == ALL else "genre:" + g, "items": ids})
    head = {"user_id": user_id, "version": u.version, "as_of": u.last_ts}
    return (dict(head, items=[{"movie_id": m, "score": s} for m, s in ranked]), dict(head, rows=rows))


def main():
    rng = random.Random(20261204)
    genres = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"]
    catalog = {m: sorted(rng.sample(genres, rng.choice([1, 1, 2, 3]))) for m in range(1, 41)}
    kinds = ["view", "click", "play", "progress", "complete", "rate", "like", "dislike",
             "watchlist_add", "watchlist_remove", "skip"]
    t0 = 1_780_000_000_000
    records = []  # (key, payload text)
    events = []
    ts = t0
    for i in range(400):
        user = f"u{rng.randrange(12)}"
        # Users favour a few items per genre so lists are not flat.
        movie = min(int(rng.paretovariate(0.8)), 40)
        kind = rng.choice(kinds)
        ts += rng.randrange(1, 4 * 3_600_000)
        e = {"event_id": f"e{i}", "user_id": user, "movie_id": movie, "type": kind, "ts": ts}
        if kind == "rate":
            e["value"] = rng.choice([1.0, 2.0, 3.0, 4.0, 4.5, 5.0])
        elif kind == "progress":
            e["value"] = round(rng.random(), 3)
        if i % 50 == 17:
            e["ts"] = ts - 48 * 3_600_000  # late by two days
        events.append(e)
        records.append((user, json.dumps(e)))
        if i % 97 == 5:
            records.append((user, json.dumps(e)))  # a redelivery: applied once
    # A user with no positive genre gets the popular items overall.
    for j, (kind, movie) in enumerate([("dislike", 1), ("skip", 2)]):
        ts += 60_000
        e = {"event_id": f"cold{j}", "user_id": "cold", "movie_id": movie, "type": kind, "ts": ts}
        records.append(("cold", json.dumps(e)))
    records.insert(100, ("u3", "{not json"))
    records.insert(200, ("u4", json.dumps({"event_id": "x", "user_id": "u4", "movie_id": 999, "type": "play", "ts": t0})))
    records.insert(300, ("u5", json.dumps({"event_id": "y", "user_id": "u5", "movie_id": 1, "type": "rate", "ts": t0})))

    users, popularity, last = {}, {}, {}
    counted = 0
    for _, text in records:
        try:
            e = json.loads(text)
        except ValueError:
            continue
        if e["movie_id"] not in catalog or (e["type"] in ("rate", "progress") and "value" not in e):
            continue
        u = users.setdefault(e["user_id"], User())
        if not u.apply(e, catalog[e["movie_id"]]):
            continue
        last[e["user_id"]] = outputs(e["user_id"], u, popularity, catalog)
        if e["type"] in ENGAGES or weight(e["type"], e.get("value")) > 0.0:
            v, t = popularity.get(e["movie_id"], (0.0, 0))
            popularity[e["movie_id"]] = (v * decay(e["ts"] - t, POP_HL) + 1.0, e["ts"]) if e["ts"] >= t \
                else (v + decay(t - e["ts"], POP_HL), t)
            counted += 1
    fixture = {
        "about": "Shared parity fixture of the Kafka Streams peer: written by reference.py; "
                 "ParityTest pipes `records` through the peer's topology and compares each "
                 "user's last outputs with `expected`.",
        "rules": RULES,
        "catalog": {str(m): g for m, g in catalog.items()},
        "records": [{"key": k, "value": v} for k, v in records],
        "expected": {u: {"recommendations": r, "carousels": c} for u, (r, c) in sorted(last.items())},
        "applied_events": sum(u.version for u in users.values()),
    }
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src/test/resources/parity.json")
    with open(out, "w") as f:
        json.dump(fixture, f, indent=1)
        f.write("\n")
    print(f"{out}: {len(records)} records, {fixture['applied_events']} applied, {counted} counted for popularity, "
          f"{len(last)} users")


if __name__ == "__main__":
    main()
