#!/usr/bin/env bash
# NCF scoring side by side: tract on the model's own graph, tract on the
# serving form the engine runs (one user, item half of the first layer
# precomputed), and ONNX Runtime (PyPI, one thread) on the same ONNX files and
# batch sizes, in one run. Prints a markdown table with ORT time / our time.
# Usage: benches/scoring.sh   (env: SECONDS_PER_POINT, BATCHES, ITEMS)
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install.sh --build-only >/dev/null
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/recstream/target}"
python3 -c "import onnxruntime, numpy" 2>/dev/null ||
  python3 -m pip install --quiet --user onnxruntime numpy 2>/dev/null ||
  python3 -m pip install --quiet --user --break-system-packages onnxruntime numpy
# BIN: another build of the engine (e.g. the release-lto profile).
[ -n "${BIN:-}" ] || cargo build --release --quiet --bin recstream
BIN="${BIN:-$CARGO_TARGET_DIR/release/recstream}"
SECONDS_PER_POINT=${SECONDS_PER_POINT:-2}
BATCHES=${BATCHES:-1,100,500}
ITEMS=${ITEMS:-3706,26744}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "# machine: $(nproc) cores; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
{
  "$BIN" bench-scoring --items "$ITEMS" --batch "$BATCHES" --out "$work" --seconds "$SECONDS_PER_POINT"
  python3 benches/ort_scoring.py "$work" "$SECONDS_PER_POINT" "$BATCHES"
} >"$work/results.jsonl"
python3 - "$work/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in rows:
    kind = "ort" if r["engine"].startswith("onnxruntime") else r["engine"]
    by.setdefault((r["items"], r["batch"]), {})[kind] = r
ort_name = next(r["engine"] for r in rows if r["engine"].startswith("onnxruntime"))
print(f"| items | batch | {ort_name} µs | tract µs | ratio | tract serving µs | ratio |")
print("|---:|---:|---:|---:|---:|---:|---:|")
for (items, batch), r in sorted(by.items()):
    o, t, s = r["ort"]["us_per_run"], r["tract"]["us_per_run"], r["tract-serving"]["us_per_run"]
    print(f"| {items} | {batch} | {o:.1f} | {t:.1f} | {o / t:.2f} | {s:.1f} | **{o / s:.2f}** |")
print("\nratio = ONNX Runtime time / ours (above 1: ours is faster)")
PY
