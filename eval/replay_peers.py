#!/usr/bin/env python3
"""Peers of the prequential replay, on the same stream and cut as `recstream replay-eval`.

- river's reco.BiasedMF: progressive RMSE/MAE (predict each rating, then learn it).
- implicit's ALS, refitted on every interaction so far at a fixed interval of
  event time: for each interaction, the user's top 10 (items the user already
  interacted with excluded, the user's vector recomputed from their current
  history, so users newer than the last fit are served too) is checked for the item.

Events are ordered by (time, user, item) like the engine's replay; metrics
cover events at or after --cut (ms). Writes a JSON list of results.
"""
import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402


def load(path, limit):
    rows = []
    name = os.path.basename(path)
    with open(path, encoding="latin-1") as f:
        for i, line in enumerate(f):
            if name.endswith(".csv"):
                if i == 0:
                    continue
                u, m, r, t = line.strip().split(",")[:4]
            elif name.endswith(".dat"):
                u, m, r, t = line.strip().split("::")
            else:
                u, m, r, t = line.split("\t")[:4]
            rows.append((int(t) * 1000, int(u), int(m), float(r)))
    rows.sort()
    if limit:
        rows = rows[:limit]
    return rows


def river_biased_mf(rows, cut):
    from river import optim, reco

    model = reco.BiasedMF(
        n_factors=10,
        bias_optimizer=optim.SGD(0.025),
        latent_optimizer=optim.SGD(0.05),
        weight_initializer=optim.initializers.Zeros(),
        latent_initializer=optim.initializers.Normal(mu=0.0, sigma=0.1, seed=73),
        l2_bias=0.0,
        l2_latent=0.0,
    )
    se = ae = 0.0
    n = 0
    for t, u, m, r in rows:
        p = model.predict_one(str(u), str(m))
        if t >= cut:
            p = min(max(p, 0.5), 5.0)
            se += (p - r) ** 2
            ae += abs(p - r)
            n += 1
        model.learn_one(str(u), str(m), r)
    return {
        "name": "river BiasedMF",
        "hr": None,
        "ndcg": None,
        "mrr": None,
        "rmse": math.sqrt(se / n) if n else None,
        "mae": ae / n if n else None,
        "cases": n,
        "note": "river reco.BiasedMF (10 factors, SGD 0.025/0.05, river's documented setting), predict then learn on every rating.",
    }


def implicit_als(rows, cut, days):
    from implicit.als import AlternatingLeastSquares

    users = {u: i for i, u in enumerate(sorted({r[1] for r in rows}))}
    items = {m: i for i, m in enumerate(sorted({r[2] for r in rows}))}
    n_users, n_items = len(users), len(items)
    history = [[] for _ in range(n_users)]
    counts = np.zeros(n_items)
    interval = int(days * 86_400_000)
    model = None
    next_fit = cut
    fits = 0
    hits = 0
    ndcg = mrr = 0.0
    n = 0
    seen = []  # (user, item) so far, for refits
    for t, u, m, _r in rows:
        ui, mi = users[u], items[m]
        if t >= cut:
            if t >= next_fit:
                data = np.ones(len(seen), dtype=np.float32)
                us = np.fromiter((s[0] for s in seen), dtype=np.int32, count=len(seen))
                ms = np.fromiter((s[1] for s in seen), dtype=np.int32, count=len(seen))
                matrix = sp.csr_matrix((data, (us, ms)), shape=(n_users, n_items))
                model = AlternatingLeastSquares(
                    factors=64, regularization=0.05, iterations=15, random_state=7
                )
                model.fit(matrix, show_progress=False)
                fits += 1
                while next_fit <= t:
                    next_fit += interval
            mine = history[ui]
            if mine:
                row = sp.csr_matrix(
                    (np.ones(len(mine), dtype=np.float32), (np.zeros(len(mine), dtype=np.int32), np.array(mine, dtype=np.int32))),
                    shape=(1, n_items),
                )
                ids, _ = model.recommend(
                    ui, row, N=10, filter_already_liked_items=True, recalculate_user=True
                )
                top = list(ids)
            else:
                # No history yet: ALS has nothing to go on; most popular so far.
                top = list(np.lexsort((np.arange(n_items), -counts))[:10])
            if mi in top:
                rank = top.index(mi) + 1
                hits += 1
                ndcg += 1.0 / math.log2(rank + 1)
                mrr += 1.0 / rank
            n += 1
        history[ui].append(mi)
        counts[mi] += 1
        seen.append((ui, mi))
    return {
        "name": "implicit ALS",
        "hr": hits / n if n else None,
        "ndcg": ndcg / n if n else None,
        "mrr": mrr / n if n else None,
        "rmse": None,
        "mae": None,
        "cases": n,
        "note": f"implicit {__import__('implicit').__version__} ALS (64 factors, reg 0.05, 15 iterations) refitted every {days:g} days of event time on all interactions so far ({fits} fits); user vector recomputed from the current history; users without history get popularity.",
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratings", required=True)
    ap.add_argument("--cut", type=int, required=True, help="ms; metrics from here on")
    ap.add_argument("--als-days", type=float, default=1.0)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rows = load(a.ratings, a.limit)
    out = []
    for f in (lambda: river_biased_mf(rows, a.cut), lambda: implicit_als(rows, a.cut, a.als_days)):
        started = time.time()
        r = f()
        print(f"peers: {r['name']}: {r} in {time.time() - started:.0f} s", file=sys.stderr)
        out.append(r)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
