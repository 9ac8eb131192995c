#!/usr/bin/env python3
"""Widely used peers on the exact splits `recstream eval` wrote.

Explicit: Surprise's SVD (and SVD++ with --svdpp) on each uN.base / uN.test.
Implicit: the `implicit` library's ALS and BPR on each leave-one-out split,
ranking the held-out item among the same 99 sampled negatives as our NCF.

Input (written by `recstream eval` into --work):
  explicit.json                     {"folds": [{"name", "train", "test"}, ...]}
  implicit/<data>/train.tsv         user_index \\t item_index   (dense indices)
  implicit/<data>/cases.tsv         user_index \\t positive \\t negative...
  implicit/<data>/shape.json        {"users": n, "items": m}
Output: <work>/peers.json
"""
import argparse
import json
import os
import sys
import time

import numpy as np


def explicit(work, svdpp, seed):
    from surprise import SVD, SVDpp, Dataset, Reader, accuracy
    from surprise.model_selection import PredefinedKFold

    spec = json.load(open(os.path.join(work, "explicit.json")))
    reader = Reader(line_format="user item rating timestamp", sep="\t")
    out = {}
    algos = [("surprise_svd", lambda: SVD(random_state=seed))]
    if svdpp:
        algos.append(("surprise_svdpp", lambda: SVDpp(random_state=seed)))
    for fold in spec["folds"]:
        data = Dataset.load_from_folds([(fold["train"], fold["test"])], reader=reader)
        trainset, testset = next(PredefinedKFold().split(data))
        for name, make in algos:
            started = time.time()
            algo = make()
            algo.fit(trainset)
            predictions = algo.test(testset)
            out.setdefault(name, {})[fold["name"]] = {
                "rmse": accuracy.rmse(predictions, verbose=False),
                "mae": accuracy.mae(predictions, verbose=False),
                "seconds": time.time() - started,
            }
            print(f"{name} {fold['name']}: {out[name][fold['name']]}", file=sys.stderr)
    return out


def ranking(scores_of, cases):
    hits = ndcg = 0.0
    for user, positive, negatives in cases:
        items = np.array([positive] + negatives)
        s = scores_of(user, items)
        rank = int(np.sum(s[1:] >= s[0]))
        if rank < 10:
            hits += 1
            ndcg += 1.0 / np.log2(rank + 2)
    return {"hr@10": hits / len(cases), "ndcg@10": ndcg / len(cases)}


def implicit_peers(work, seed):
    import scipy.sparse as sp
    import implicit as imp

    out = {}
    root = os.path.join(work, "implicit")
    for name in sorted(os.listdir(root)):
        d = os.path.join(root, name)
        shape = json.load(open(os.path.join(d, "shape.json")))
        pairs = np.loadtxt(os.path.join(d, "train.tsv"), dtype=np.int64, ndmin=2)
        matrix = sp.csr_matrix(
            (np.ones(len(pairs), dtype=np.float32), (pairs[:, 0], pairs[:, 1])),
            shape=(shape["users"], shape["items"]),
        )
        matrix.data[:] = 1.0
        cases = []
        for line in open(os.path.join(d, "cases.tsv")):
            f = [int(x) for x in line.split()]
            cases.append((f[0], f[1], f[2:]))
        models = {
            "implicit_als": lambda: imp.als.AlternatingLeastSquares(
                factors=64, regularization=0.05, alpha=2.0, iterations=30, random_state=seed
            ),
            "implicit_bpr": lambda: imp.bpr.BayesianPersonalizedRanking(
                factors=64, learning_rate=0.01, regularization=0.01, iterations=200, random_state=seed
            ),
        }
        for algo, make in models.items():
            started = time.time()
            model = make()
            model.fit(matrix, show_progress=False)
            uf = np.asarray(model.user_factors)
            itf = np.asarray(model.item_factors)
            result = ranking(lambda u, items: itf[items] @ uf[u], cases)
            # The held-out item against every item the user never interacted with.
            users = np.array([c[0] for c in cases])
            ids, _ = model.recommend(users, matrix[users], N=10, filter_already_liked_items=True)
            result["hr@10_full_catalogue"] = float(np.mean([c[1] in set(row) for c, row in zip(cases, ids)]))
            result["seconds"] = time.time() - started
            out.setdefault(algo, {})[name] = result
            print(f"{algo} {name}: {result}", file=sys.stderr)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--svdpp", action="store_true")
    p.add_argument("--seed", type=int, default=42)
    a = p.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    result = {}
    if os.path.exists(os.path.join(a.work, "explicit.json")):
        result["explicit"] = explicit(a.work, a.svdpp, a.seed)
    if os.path.isdir(os.path.join(a.work, "implicit")):
        result["implicit"] = implicit_peers(a.work, a.seed)
    json.dump(result, open(os.path.join(a.work, "peers.json"), "w"), indent=2)


if __name__ == "__main__":
    main()
