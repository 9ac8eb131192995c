#!/usr/bin/env python3
"""Regenerates benches/RESULTS.md: runs every benchmark on this machine and
writes the machine, the method, the commands and the results, with each of
issue 5's targets next to its figure.

Usage: benches/report.py            (about 7 minutes on 2 cores)
       QUICK=1 benches/report.py    (small runs: checks the script, not the figures)
Env: DATA (default ../shared/data/movielens; the real-session runs are skipped
without it), OUT (default benches/RESULTS.md).
"""

import datetime
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
QUICK = os.environ.get("QUICK") == "1"
# Relative to the repo root, where every command runs, so the commands in the
# document work from any clone next to shared/.
DATA = pathlib.Path(os.path.relpath(os.environ.get("DATA", ROOT.parent / "shared/data/movielens"), ROOT))
OUT = pathlib.Path(os.environ.get("OUT", ROOT / "benches/RESULTS.md"))
FRESHNESS_RUNS = 1 if QUICK else 3
TARGET_DIR = pathlib.Path(
    os.environ.get("CARGO_TARGET_DIR", pathlib.Path.home() / ".cache/recstream/target")
)
LOG = pathlib.Path(tempfile.mkdtemp(prefix="recstream-report-")) / "report.log"


def run(env_settings, command):
    """Runs a command from the repo root with extra environment settings;
    returns its stdout. Everything it prints also goes to the log."""
    shown = " ".join(f"{k}={v}" for k, v in env_settings.items()) + " " + command
    print(f"+ {shown.strip()}", file=sys.stderr, flush=True)
    env = dict(os.environ, CARGO_TARGET_DIR=str(TARGET_DIR))
    env.update({k: str(v) for k, v in env_settings.items()})
    started = time.monotonic()
    done = subprocess.run(
        command, shell=True, cwd=ROOT, env=env, capture_output=True, text=True
    )
    with LOG.open("a") as log:
        log.write(f"\n+ {shown}\n{done.stdout}\n{done.stderr}\n")
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {shown}\nlog: {LOG}")
    print(f"  {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return done.stdout


def tansu_version():
    tansu = pathlib.Path.home() / ".cargo/bin/tansu"
    done = subprocess.run([str(tansu), "--version"], capture_output=True, text=True)
    return done.stdout.strip() or "tansu"


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def pipeline(settings):
    """One benches/pipeline.sh run: throughput, ceiling, freshness, counters."""
    text = run(settings, "benches/pipeline.sh")
    throughput, ceiling, freshness = json_lines(text)
    cpu = re.search(r"engine CPU in the throughput phase: ([\d.]+) s", text)
    counters = {k: float(v) for k, v in re.findall(r"^# (recstream_\S+) (\S+)$", text, re.M)}
    rss = re.search(r"engine peak RSS: (\d+) kB", text)
    cpu_seconds = float(cpu.group(1))
    rescores = counters.get("recstream_ncf_inference_batch_size_count", 0)
    return {
        "settings": settings,
        "throughput": throughput,
        "ceiling": ceiling,
        "freshness": freshness,
        "cpu_seconds": cpu_seconds,
        "per_cpu_second": throughput["events"] / cpu_seconds,
        "share": throughput["pipeline_rate"] / ceiling["rate"],
        # NCF batch sizes: one tract run per re-score (0 without a model).
        "candidates_per_rescore": (
            counters.get("recstream_ncf_inference_batch_size_sum", 0) / rescores if rescores else 0
        ),
        "counters": counters,
        "rss_mb": int(rss.group(1)) / 1024 if rss else float("nan"),
    }


def freshness(settings):
    """benches/freshness.sh at a fixed rate, FRESHNESS_RUNS times (freshness
    on this shared host varies from run to run): the run with the median
    p99, and every run's p99."""
    runs = []
    for _ in range(FRESHNESS_RUNS):
        text = run(settings, "benches/freshness.sh")
        (result,) = json_lines(text)
        cpu = re.search(r"CPU meanwhile: engine ([\d.]+) s, broker ([\d.]+) s", text)
        runs.append({
            "settings": settings,
            "result": result,
            "engine_cpu": float(cpu.group(1)),
            "broker_cpu": float(cpu.group(2)),
        })
    runs.sort(key=lambda r: r["result"]["latency_ms_p99"])
    median = dict(runs[len(runs) // 2])
    median["p99s"] = [r["result"]["latency_ms_p99"] for r in runs]
    return median


def markdown_rows(text):
    return [line for line in text.splitlines() if line.startswith("|")]


def cells(row):
    return [c.strip().strip("*") for c in row.strip("|").split("|")]


def criterion_means(since):
    """Mean time of every criterion benchmark written after `since`."""
    means = {}
    for estimates in sorted((TARGET_DIR / "criterion").glob("**/new/estimates.json")):
        if estimates.stat().st_mtime < since:
            continue
        name = str(estimates.parent.parent.relative_to(TARGET_DIR / "criterion"))
        means[name] = json.loads(estimates.read_text())["mean"]["point_estimate"]
    return means


def duration(ns):
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.1f} µs"
    return f"{ns:.0f} ns"


def verdict(ok):
    return "**met**" if ok else "not met"


def command_of(settings, script):
    """The command line of a run, with temporary files named by their content."""
    def shown(value):
        if isinstance(value, pathlib.Path):
            return f"<file: {value.read_text().strip()}>".replace("\n", " ")
        return value
    return " ".join(f"{k}={shown(v)}" for k, v in settings.items()) + f" {script}"


def main():
    started = time.time()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    cpu_model = next(
        (l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
        "unknown CPU",
    )
    mem_gib = int(open("/proc/meminfo").readline().split()[1]) / 2**20
    real = (ROOT / DATA).is_dir()
    ml100k = {"RATINGS": f"{DATA}/ml-100k/u.data", "CATALOG": f"{DATA}/ml-100k/u.item"}
    n = 20000 if QUICK else 100000

    # Stages and scoring first: they want the machine to themselves.
    bench_started = time.time()
    run({}, "cargo bench --quiet --bench stages" + (" -- --quick" if QUICK else ""))
    stages = criterion_means(bench_started)
    scoring = markdown_rows(
        run({"SECONDS_PER_POINT": "0.5" if QUICK else "2"}, "benches/scoring.sh")
    )
    growth = markdown_rows(
        run({"USERS": "10000,100000" if QUICK else "10000,100000,1000000"},
            "cargo bench --quiet --bench state_growth")
    )

    synthetic = pipeline({"EVENTS": n, "LATENCY_EVENTS": 5000, "RATE": 1000})
    ncf_synthetic = pipeline(
        {"NCF": 1, "EVENTS": n // 2, "LATENCY_EVENTS": 2500, "RATE": 500}
    )
    sessions = ncf_sessions = None
    if real:
        sessions = pipeline({**ml100k, "EVENTS": n, "LATENCY_EVENTS": 2000, "RATE": 1000})
        candidates = LOG.parent / "candidates.toml"
        candidates.write_text("[engine.lists]\ncandidates_per_source = 200\n")
        ncf_sessions = pipeline({
            "NCF": 1,
            "RATINGS": f"{DATA}/ml-latest-small/ratings.csv",
            "ENGINE_TOML": candidates,
            "EVENTS": n + 10000,
            "RATE": 500,
            "LATENCY_EVENTS": 500,
        })

    def half(rate):
        return max(100, int(rate / 2 / 100) * 100)

    fresh = [freshness({"RATE": 1000})]
    fresh.append(freshness({"RATE": half(synthetic["throughput"]["pipeline_rate"])}))
    if sessions:
        rate = half(sessions["throughput"]["pipeline_rate"])
        seconds = max(1, min(5, sessions["throughput"]["events"] // rate))
        fresh.append(freshness({**ml100k, "RATE": rate, "SECONDS_AT_RATE": seconds}))

    # Targets.
    scoring_500 = [cells(r) for r in scoring[2:] if cells(r)[1] == "500"]
    scoring_ratio = min(float(c[-1]) for c in scoring_500) if scoring_500 else float("nan")

    growth_rows = [cells(r) for r in growth[2:]]
    first, last = growth_rows[0], growth_rows[-1]
    half_load = fresh[1:]
    targets = [
        (
            "NCF scoring ≥ 1.0× ONNX Runtime at batch 500",
            f"{scoring_ratio:.2f}× (slowest model size)",
            verdict(scoring_ratio >= 1.0),
        ),
        (
            "≥ 20 k events/s per core with NCF re-scoring 500 candidates",
            (f"real sessions: {ncf_sessions['per_cpu_second']:,.0f} events per engine CPU-second, "
             f"{ncf_sessions['candidates_per_rescore']:.0f} candidates per re-score; " if ncf_sessions else "")
            + f"synthetic uniform users: {ncf_synthetic['per_cpu_second']:,.0f}, "
            f"{ncf_synthetic['candidates_per_rescore']:.0f} candidates",
            verdict(bool(ncf_sessions) and ncf_sessions["per_cpu_second"] >= 20000
                    and ncf_sessions['candidates_per_rescore'] >= 500)
            + (" on real sessions; " + verdict(ncf_synthetic["per_cpu_second"] >= 20000)
               + " on the synthetic load" if ncf_sessions else ""),
        ),
        (
            "without NCF, ≥ 50 % of the bare-consume rate",
            f"synthetic: {synthetic['share']:.2%} ({synthetic['throughput']['pipeline_rate']:,.0f} of "
            f"{synthetic['ceiling']['rate']:,.0f} records/s)"
            + (f"; real sessions: {sessions['share']:.2%} ({sessions['throughput']['pipeline_rate']:,.0f} of "
               f"{sessions['ceiling']['rate']:,.0f})" if sessions else ""),
            verdict(max(p["share"] for p in [synthetic, sessions] if p) >= 0.5),
        ),
        (
            "freshness p99 ≤ 25 ms at half the sustainable load",
            "; ".join(
                f"{f['settings']['RATE']:,}/s {'real sessions' if 'RATINGS' in f['settings'] else 'synthetic'}: "
                f"{f['result']['latency_ms_p99']:.0f} ms (median of {len(f['p99s'])})"
                for f in half_load
            ),
            verdict(all(f["result"]["latency_ms_p99"] <= 25 for f in half_load)),
        ),
        (
            "state ≤ 256 B per user plus the recent items; growth 10 k → 1 M users",
            f"{last[5]} B without the recent items ({last[4]} B with them); "
            f"workload {first[2]} events/s at {first[0]} users, {last[2]} at {last[0]}",
            verdict(float(last[5]) <= 256),
        ),
    ]

    def pipeline_row(name, p):
        t, f = p["throughput"], p["freshness"]
        per_rescore = p["candidates_per_rescore"]
        return (
            f"| {name} | {t['pipeline_rate']:,.0f} | {p['cpu_seconds']:.1f} s | {p['per_cpu_second']:,.0f} | "
            f"{p['ceiling']['rate']:,.0f} | {p['share']:.2%} | "
            f"{p['counters'].get('recstream_users_recomputed_total', 0):,.0f} | "
            f"{f'{per_rescore:.0f}' if per_rescore else '—'} | "
            f"{f['latency_ms_p50']:.0f} / {f['latency_ms_p95']:.0f} / "
            f"{f['latency_ms_p99']:.0f} ms at {f['target_rate']:,}/s | {p['rss_mb']:.0f} MB |"
        )

    runs = [("synthetic, no model", synthetic)]
    if sessions:
        runs.append(("ML-100K ratings, no model", sessions))
    runs.append(("synthetic, NCF", ncf_synthetic))
    if ncf_sessions:
        runs.append(("ml-latest-small ratings, NCF, 200 per source", ncf_sessions))

    out = []
    w = out.append
    w("# Benchmark results\n")
    w(f"Generated by `benches/report.py` on {datetime.date.today()} at commit `{commit}` "
      f"in {(time.time() - started) / 60:.0f} minutes{' (QUICK=1: small runs, figures not comparable)' if QUICK else ''}. "
      "Do not edit: run the command again. The method, the analysis and the history "
      "of each figure are in [README.md](README.md).\n")
    w(f"Machine: {os.cpu_count()} cores ({cpu_model}), {mem_gib:.0f} GiB; broker "
      f"{tansu_version()} (in-memory storage) on loopback. The broker, the engine and "
      "the load generator share the cores.\n")
    reference = stages.get("engine/recompute_one_user")
    if reference:
        w(f"This host's speed varies with its neighbours: `engine/recompute_one_user` took "
          f"{duration(reference)} in this run against 56 µs in quiet runs of the same code "
          "(2026-11-27), and whole-pipeline figures moved by up to a quarter between runs.\n")
    w("## Targets\n")
    w("| target | measured | verdict |")
    w("|---|---|---|")
    for target, measured, ok in targets:
        w(f"| {target} | {measured} | {ok} |")
    w("")
    w("## Whole pipeline against tansu\n")
    w("Throughput: events produced as fast as the broker takes them, until every user's "
      "recommendations reflect their last event. Ceiling: a plain consumer with the "
      "engine's settings reading the same records (same run). Freshness: event → "
      "recommendation record seen by a consumer, at a fixed rate after the throughput phase.\n")
    w("| run | events/s | engine CPU | events per CPU-second | ceiling records/s | share | "
      "users recomputed | candidates per re-score | freshness p50 / p95 / p99 | peak RSS |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, p in runs:
        w(pipeline_row(name, p))
    w("")
    w("```sh")
    for _, p in runs:
        w(command_of(p["settings"], "benches/pipeline.sh"))
    w("```\n")
    w("## Freshness on a fresh broker\n")
    w("| load | rate | p50 | p95 | p99 (each run) | max | CPU over the run: engine / broker |")
    w("|---|---:|---:|---:|---:|---:|---:|")
    for f in fresh:
        r = f["result"]
        kind = "ML-100K ratings" if "RATINGS" in f["settings"] else "synthetic users"
        seconds = f["settings"].get("SECONDS_AT_RATE", 5)
        p99s = ", ".join(f"{p:.0f}" for p in f["p99s"])
        w(f"| {kind} | {f['settings']['RATE']:,}/s | {r['latency_ms_p50']:.0f} ms | "
          f"{r['latency_ms_p95']:.0f} ms | **{r['latency_ms_p99']:.0f} ms** ({p99s}) | "
          f"{r['latency_ms_max']:.0f} ms | {f['engine_cpu']:.2f} s / {f['broker_cpu']:.2f} s in {seconds} s |")
    w("")
    w(f"Each row is the median of {FRESHNESS_RUNS} runs by p99 (every run's p99 in brackets; "
      "freshness on this shared host varies from run to run). The second and third rows "
      "run at half of the throughput measured above for the same load.\n")
    w("```sh")
    for f in fresh:
        w(command_of(f["settings"], "benches/freshness.sh"))
    w("```\n")
    w("## NCF scoring side by side with ONNX Runtime\n")
    w("`benches/scoring.sh` (random NeuMF graphs of the two catalogue sizes, one thread):\n")
    out.extend(scoring)
    w("")
    w("## Stages (criterion, mean)\n")
    w("`cargo bench --bench stages`:\n")
    w("| stage | mean |")
    w("|---|---:|")
    for name, ns in stages.items():
        w(f"| `{name}` | {duration(ns)} |")
    w("")
    w("## State size and growth with the number of users\n")
    w("`cargo bench --bench state_growth`:\n")
    out.extend(growth)
    w("")
    OUT.write_text("\n".join(out))
    print(f"wrote {OUT} (log: {LOG})", file=sys.stderr)


if __name__ == "__main__":
    main()
