#!/usr/bin/env python3
"""Peers of the prequential replay, on the same stream and cut as `recstream replay-eval`.

- river's reco.BiasedMF: progressive RMSE/MAE (predict each rating, then learn it).
- implicit's ALS, refitted on every interaction so far at a fixed interval of
  event time: for each interaction, the user's top 10 (items the user already
  interacted with excluded, the user's vector recomputed from their current
  history, so users newer than the last fit are served too) is checked for the item.
- implicit's item-item nearest neighbours (the strong non-neural item-to-item
  peer): cosine or BM25-weighted, refitted like ALS; its similarity and
  neighbourhood size are tuned on the quarter of event time before the cut.
- SASRec (Kang & McAuley 2018), the self-attentive sequential recommender, as
  Microsoft Recommenders packages it (TensorFlow, CPU): trained on every
  sequence so far at the cut and again on the engine's retraining schedule,
  with early stopping on each user's last interaction; each interaction is
  predicted from the user's whole sequence before it.

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

PEERS = ("river", "als", "itemknn", "sasrec")


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


class Hits:
    """HR/NDCG/MRR@10 over the cases scored."""

    def __init__(self):
        self.hits = 0
        self.ndcg = self.mrr = 0.0
        self.n = 0

    def add(self, top, item):
        if item in top:
            rank = top.index(item) + 1
            self.hits += 1
            self.ndcg += 1.0 / math.log2(rank + 1)
            self.mrr += 1.0 / rank
        self.n += 1

    def result(self, name, note):
        n = self.n
        return {
            "name": name,
            "hr": self.hits / n if n else None,
            "ndcg": self.ndcg / n if n else None,
            "mrr": self.mrr / n if n else None,
            "rmse": None,
            "mae": None,
            "cases": n,
            "note": note,
        }


def indexed(rows):
    users = {u: i for i, u in enumerate(sorted({r[1] for r in rows}))}
    items = {m: i for i, m in enumerate(sorted({r[2] for r in rows}))}
    return users, items


def popular_top(counts, n=10):
    return list(np.lexsort((np.arange(len(counts)), -counts))[:n])


def refitted_protocol(rows, start, end, days, fit, top):
    """The prequential protocol over the events in [start, end) for a model
    refitted from `start` on, every `days` of event time, on every
    interaction so far: `fit(user-item matrix)` makes the model and
    `top(model, user, history row, history, counts)` its 10 items for a
    user with history; a user without any gets the most popular items so
    far. Returns the Hits and the number of fits."""
    users, items = indexed(rows)
    n_users, n_items = len(users), len(items)
    history = [[] for _ in range(n_users)]
    counts = np.zeros(n_items)
    interval = int(days * 86_400_000)
    model = None
    next_fit = start
    fits = 0
    seen = []  # (user, item) so far, for refits
    hits = Hits()
    for t, u, m, _r in rows:
        if t >= end:
            break
        ui, mi = users[u], items[m]
        if t >= start:
            if t >= next_fit:
                data = np.ones(len(seen), dtype=np.float32)
                us = np.fromiter((s[0] for s in seen), dtype=np.int32, count=len(seen))
                ms = np.fromiter((s[1] for s in seen), dtype=np.int32, count=len(seen))
                model = fit(sp.csr_matrix((data, (us, ms)), shape=(n_users, n_items)))
                fits += 1
                while next_fit <= t:
                    next_fit += interval
            mine = history[ui]
            if mine:
                row = sp.csr_matrix(
                    (np.ones(len(mine), dtype=np.float32), (np.zeros(len(mine), dtype=np.int32), np.array(mine, dtype=np.int32))),
                    shape=(1, n_items),
                )
                hits.add(top(model, ui, row, mine, counts), mi)
            else:
                # No history yet: the model has nothing to go on.
                hits.add(popular_top(counts), mi)
        history[ui].append(mi)
        counts[mi] += 1
        seen.append((ui, mi))
    return hits, fits


def implicit_als(rows, cut, days):
    from implicit.als import AlternatingLeastSquares

    def fit(matrix):
        model = AlternatingLeastSquares(
            factors=64, regularization=0.05, iterations=15, random_state=7
        )
        model.fit(matrix, show_progress=False)
        return model

    def top(model, ui, row, _mine, _counts):
        ids, _ = model.recommend(
            ui, row, N=10, filter_already_liked_items=True, recalculate_user=True
        )
        return list(ids)

    hits, fits = refitted_protocol(rows, cut, float("inf"), days, fit, top)
    return hits.result(
        "implicit ALS",
        f"implicit {__import__('implicit').__version__} ALS (64 factors, reg 0.05, 15 iterations) refitted every {days:g} days of event time on all interactions so far ({fits} fits); user vector recomputed from the current history; users without history get popularity.",
    )


def item_knn_run(rows, start, end, days, similarity, k):
    """The prequential protocol over events in [start, end) for one setting."""
    from implicit.nearest_neighbours import BM25Recommender, CosineRecommender

    def fit(matrix):
        # Repeated (user, item) pairs count once.
        matrix.data[:] = 1.0
        model = BM25Recommender(K=k) if similarity == "bm25" else CosineRecommender(K=k)
        model.fit(matrix, show_progress=False)
        return model

    def top(model, ui, row, mine, counts):
        row.sum_duplicates()
        row.data[:] = 1.0
        ids, scores = model.recommend(ui, row, N=10, filter_already_liked_items=True)
        top = [i for i, s in zip(ids, scores) if s > 0]
        # Too few neighbours: filled with the most popular unseen items.
        if len(top) < 10:
            mine_set = set(mine)
            for i in popular_top(counts, 10 + len(mine)):
                if len(top) == 10:
                    break
                if i not in mine_set and i not in top:
                    top.append(i)
        return top

    return refitted_protocol(rows, start, end, days, fit, top)


def item_knn(rows, cut, days):
    first = rows[0][0]
    tune_from = cut - (cut - first) // 4
    grid = [(s, k) for s in ("cosine", "bm25") for k in (20, 50, 100, 200)]
    tuned = []
    for s, k in grid:
        h, _ = item_knn_run(rows, tune_from, cut, days, s, k)
        tuned.append((h.hits / max(h.n, 1), s, k))
        print(f"peers: item-kNN {s} K={k}: validation HR@10 {tuned[-1][0]:.4f}", file=sys.stderr)
    best, s, k = max(tuned, key=lambda x: (x[0], x[1], -x[2]))
    hits, fits = item_knn_run(rows, cut, float("inf"), days, s, k)
    grid_text = ", ".join(f"{gs} K={gk}: {hr:.4f}" for hr, gs, gk in tuned)
    return hits.result(
        "implicit item-kNN",
        f"implicit {__import__('implicit').__version__} item-item {s} similarity, K={k} "
        f"(of cosine/BM25 × K 20/50/100/200, tuned by HR@10 on the quarter of event time "
        f"before the cut: {grid_text}), refitted every {days:g} days ({fits} fits); the user's "
        f"items so far score their neighbours; unseen-item gaps filled by popularity.",
    )


SASREC_SETTINGS = dict(
    # The SASRec paper's MovieLens-1M setting (dense movie ratings).
    seq_max_len=200,
    num_blocks=2,
    embedding_dim=50,
    attention_dim=50,
    attention_num_heads=1,
    conv_dims=[50, 50],
    dropout_rate=0.2,
    l2_reg=0.0,
    batch_size=128,
    learning_rate=0.001,
    max_epochs=600,
    validate_every=20,
    # Checks without a better validation HR before training stops.
    patience=3,
)


def sasrec_fit(sequences, n_items, seed):
    """Trains on `sequences` (lists of 1-based item indices, oldest first);
    each user's last item is held out for early stopping (HR@10 over every
    item, the user's earlier items excluded)."""
    import tensorflow as tf
    from recommenders.models.sasrec.model import SASREC
    from recommenders.models.sasrec.sampler import WarpSampler

    cfg = SASREC_SETTINGS
    maxlen = cfg["seq_max_len"]
    tf.random.set_seed(seed)
    np.random.seed(seed)
    train = {}
    valid = []
    for seq in sequences:
        if len(seq) >= 3:
            train[len(train) + 1] = seq[:-1]
            valid.append((seq[:-1], seq[-1]))
        elif len(seq) >= 2:
            train[len(train) + 1] = seq
    model = SASREC(
        item_num=n_items,
        seq_max_len=maxlen,
        num_blocks=cfg["num_blocks"],
        embedding_dim=cfg["embedding_dim"],
        attention_dim=cfg["attention_dim"],
        attention_num_heads=cfg["attention_num_heads"],
        conv_dims=cfg["conv_dims"],
        dropout_rate=cfg["dropout_rate"],
        l2_reg=cfg["l2_reg"],
        num_neg_test=n_items - 1,
    )
    sampler = WarpSampler(train, len(train), n_items, batch_size=cfg["batch_size"], maxlen=maxlen, n_workers=1)
    optimizer = tf.keras.optimizers.Adam(learning_rate=cfg["learning_rate"], beta_1=0.9, beta_2=0.999, epsilon=1e-7)

    @tf.function
    def step(inputs):
        with tf.GradientTape() as tape:
            pos, neg, mask = model(inputs, training=True)
            loss = model.loss_function(pos, neg, mask)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    steps = max(1, len(train) // cfg["batch_size"])
    best = (-1.0, 0, None)
    try:
        for epoch in range(1, cfg["max_epochs"] + 1):
            for _ in range(steps):
                u, seq, pos, neg = sampler.next_batch()
                inputs, _target = model.create_combined_dataset(u, seq, pos, neg)
                step({k: tf.constant(inputs[k], dtype=tf.int64) for k in ("input_seq", "positive", "negative")})
            if epoch % cfg["validate_every"] == 0 or epoch == cfg["max_epochs"]:
                hr = np.mean([item in top for top, item in zip(sasrec_top([h for h, _ in valid], model, n_items), (i for _, i in valid))]) if valid else 0.0
                if hr > best[0]:
                    best = (hr, epoch, model.get_weights())
                elif epoch - best[1] >= cfg["patience"] * cfg["validate_every"]:
                    break
    finally:
        sampler.close()
    model.set_weights(best[2])
    return model, best[1], best[0]


def sasrec_top(histories, model, n_items, n=10, batch=256):
    """Top `n` (1-based item indices) for each history, its items excluded."""
    import tensorflow as tf

    maxlen = SASREC_SETTINGS["seq_max_len"]
    emb = model.item_embedding_layer.embeddings[1:]  # items 1..n_items
    out = []
    for b in range(0, len(histories), batch):
        chunk = histories[b : b + batch]
        seqs = np.zeros((len(chunk), maxlen), dtype=np.int64)
        for r, h in enumerate(chunk):
            tail = h[-maxlen:]
            if tail:
                seqs[r, maxlen - len(tail) :] = tail
        x = tf.constant(seqs)
        # SASREC.predict's computation, for a batch of users at once.
        mask = tf.expand_dims(tf.cast(tf.not_equal(x, 0), tf.float32), -1)
        seq_emb, pos_emb = model.embedding(x)
        h = (seq_emb + pos_emb) * mask
        h = model.encoder(h, False, mask)
        h = model.layer_normalization(h)[:, -1, :]
        scores = tf.matmul(h, emb, transpose_b=True).numpy()
        for r, hist in enumerate(chunk):
            s = scores[r]
            if hist:
                s[np.array(hist) - 1] = -np.inf
            top = np.argpartition(-s, n)[:n]
            top = top[np.argsort(-s[top], kind="stable")]
            out.append([int(i) + 1 for i in top])
    return out


def sasrec(rows, cut, days):
    users, items = indexed(rows)
    interval = int(days * 86_400_000)
    history = {}
    counts = {}
    fit_at = []
    t_next = cut
    last = rows[-1][0]
    while t_next <= last:
        fit_at.append(t_next)
        t_next += interval
    hits = Hits()
    fits = []
    i = 0
    # Events before the cut only build histories.
    while i < len(rows) and rows[i][0] < cut:
        t, u, m, _ = rows[i]
        history.setdefault(u, []).append(m)
        counts[m] = counts.get(m, 0) + 1
        i += 1
    seed = 7
    while i < len(rows):
        t0 = rows[i][0]
        start = max(f for f in fit_at if f <= t0)
        end = min([f for f in fit_at if f > t0] + [float("inf")])
        # Train on every sequence so far; items indexed by first appearance.
        vocab = {}
        for u in sorted(history):
            for m in history[u]:
                vocab.setdefault(m, len(vocab) + 1)
        sequences = [[vocab[m] for m in history[u]] for u in sorted(history)]
        started = time.time()
        model, epoch, val_hr = sasrec_fit(sequences, len(vocab), seed)
        fits.append((epoch, val_hr, time.time() - started))
        print(f"peers: SASRec fit at {start} on {sum(map(len, sequences))} interactions: best epoch {epoch}, validation HR@10 {val_hr:.4f}, {time.time() - started:.0f} s", file=sys.stderr)
        seed += 1
        # The model is fixed until the next fit: every case in between is
        # predicted (in one batch) from its user's history at that moment.
        cases = []
        j = i
        while j < len(rows) and rows[j][0] < end:
            t, u, m, _ = rows[j]
            mine = history.setdefault(u, [])
            cases.append(([vocab[x] for x in mine if x in vocab], m, bool(mine), set(mine)))
            mine.append(m)
            j += 1
        known = [c for c in cases if c[2]]
        tops = iter(sasrec_top([c[0] for c in known], model, len(vocab)))
        inverse = {v: k for k, v in vocab.items()}
        for _hist, m, has_history, _mine in cases:
            if has_history:
                top = [inverse[x] for x in next(tops)]
            else:
                # No history: the most popular items so far.
                top = sorted(counts, key=lambda x: (-counts[x], x))[:10]
            hits.add(top, m)
        for _h, m, _k, _s in cases:
            counts[m] = counts.get(m, 0) + 1
        i = j
        del model
        __import__("tensorflow").keras.backend.clear_session()
    cfg = SASREC_SETTINGS
    fit_text = "; ".join(f"epoch {e}, val {v:.3f}, {s:.0f} s" for e, v, s in fits)
    return hits.result(
        "SASRec",
        f"Microsoft Recommenders {__import__('recommenders').__version__} SASREC on TensorFlow {__import__('tensorflow').__version__} "
        f"(CPU): the paper's MovieLens-1M setting (max length {cfg['seq_max_len']}, {cfg['num_blocks']} blocks, "
        f"d={cfg['embedding_dim']}, dropout {cfg['dropout_rate']}, Adam {cfg['learning_rate']}, batch {cfg['batch_size']}, "
        f"binary loss with one sampled negative per position), up to {cfg['max_epochs']} epochs, validated every "
        f"{cfg['validate_every']} by HR@10 on each user's last interaction (stopped after {cfg['patience']} checks without gain, the best kept); trained at the cut and every {days:g} days "
        f"on every sequence so far ({len(fits)} fits: {fit_text}); users without history get popularity.",
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratings", required=True)
    ap.add_argument("--cut", type=int, required=True, help="ms; metrics from here on")
    ap.add_argument("--als-days", type=float, default=1.0, help="refit interval of ALS and item-kNN")
    ap.add_argument("--sequential-days", type=float, default=30.0, help="SASRec's retraining interval")
    ap.add_argument("--peers", default=",".join(PEERS), help="which of " + ",".join(PEERS))
    ap.add_argument("--limit", type=int)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rows = load(a.ratings, a.limit)
    out = []
    runs = {
        "river": lambda: river_biased_mf(rows, a.cut),
        "als": lambda: implicit_als(rows, a.cut, a.als_days),
        "itemknn": lambda: item_knn(rows, a.cut, a.als_days),
        "sasrec": lambda: sasrec(rows, a.cut, a.sequential_days),
    }
    chosen = a.peers.split(",")
    unknown = [p for p in chosen if p not in runs]
    if unknown:
        ap.error(f"--peers: unknown {unknown}; choose from {','.join(PEERS)}")
    for f in (runs[p] for p in chosen):
        started = time.time()
        r = f()
        print(f"peers: {r['name']}: {r} in {time.time() - started:.0f} s", file=sys.stderr)
        out.append(r)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
