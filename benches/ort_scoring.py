#!/usr/bin/env python3
"""ONNX Runtime (one thread) on the models `recstream bench-scoring` wrote:
the same files, batch sizes and input shapes as tract's figures (one user
vector per pair). Prints one JSON line per (model, batch).

Usage: ort_scoring.py DIR SECONDS BATCH[,BATCH...]
"""

import glob
import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort

directory, seconds = sys.argv[1], float(sys.argv[2])
batches = [int(b) for b in sys.argv[3].split(",")]
options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.inter_op_num_threads = 1
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
rng = np.random.default_rng(11)
for path in sorted(glob.glob(os.path.join(directory, "neumf-*.onnx"))):
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    dim = session.get_inputs()[0].shape[1]
    n_items = int(os.path.basename(path)[len("neumf-"):-len(".onnx")])
    for batch in batches:
        feeds = {
            "user": (rng.random((batch, dim), dtype=np.float32) - 0.5),
            "item": rng.integers(0, n_items, size=batch, dtype=np.int64),
        }
        for _ in range(20):
            session.run(None, feeds)
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            session.run(None, feeds)
            calls += 1
        elapsed = time.perf_counter() - started
        print(json.dumps({"model": os.path.basename(path), "items": n_items, "batch": batch,
                          "engine": f"onnxruntime {ort.__version__}", "us_per_run": 1e6 * elapsed / calls}))
