#!/usr/bin/env python3
"""Regenerates benches/RESULTS.md: runs every benchmark on this machine and
writes the machine, the method, the commands and the results, with each
target (issues 5 and 20) next to its figure. Runs against a local Apache
Kafka broker (ops/kafka/broker.sh), both guarantee modes side by side.

Usage: benches/report.py            (about 40 minutes on 2 cores)
       QUICK=1 benches/report.py    (small runs: checks the script, not the figures)
       benches/report.py growth     (only the growth curves: prints the tables, writes benches/growth.png)
       benches/report.py scaleout   (only the 1/2/3-instance runs: prints the table)
       benches/report.py floor [RATE ...]   (only the do-nothing relays' freshness, default 1000 2800)
       RESUME=LOG benches/report.py (goes on after an interrupted run: every
                    command that completed in LOG, the run's log, is read
                    back from it instead of run again)
       RESUME=LOG RERUN=REGEX benches/report.py (the same, but the commands
                    in which REGEX finds a match are run again, e.g.
                    RERUN=peer.sh after a change to benches/peer.sh)
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


def command_key(shown):
    """A command as logged, with the run's own temporary directory (where
    its config files live) left out, so that runs can be matched."""
    return re.sub(r"[^\s=]*recstream-report-[^/\s]+", "REPORT_DIR", shown)


# Separates a logged command's stdout from its stderr.
STDERR_MARK = "\n#~ stderr ~#\n"


def completed_commands(log):
    """The commands an earlier run's log holds as completed, in order:
    {command: [(wall-clock start or None, its stdout), ...]}. A failed
    command is logged as `! command`: skipped, so it runs again. (Logs
    written before the stderr mark give stdout and stderr together.)"""
    done = {}
    if log:
        parts = re.split(r"^([+!]) (.*)$", pathlib.Path(log).read_text(), flags=re.M)
        entries = []
        for mark, shown, body in zip(parts[1::3], parts[2::3], parts[3::3]):
            started = re.match(r"\n# started: ([\d.]+)\n", body)
            if started:
                body = body[started.end():]
            entries.append((mark, shown, float(started.group(1)) if started else None,
                            body.split(STDERR_MARK)[0]))
        # A command ended, at the latest, when the next one started: what
        # criterion wrote after that is not this run's (see criterion_means).
        ends = [e[2] for e in entries[1:]] + [None]
        for (mark, shown, started, stdout), ended in zip(entries, ends):
            if mark == "+":
                done.setdefault(command_key(shown.strip()), []).append((started, ended, stdout))
    return done


RESUME = os.environ.get("RESUME")
EARLIER = completed_commands(RESUME)
RERUN = re.compile(os.environ["RERUN"]) if os.environ.get("RERUN") else None
REUSED = []
# The commands this run ran itself (under RESUME, the ones not read back).
RAN = []
# When the last command run (or read back) started and ended, by the wall
# clock (None: not known, for a read-back command that was the log's last).
last_started = 0.0
last_ended = None


def run(env_settings, command):
    """Runs a command from the repo root with extra environment settings;
    returns its stdout. Everything it prints also goes to the log. Under
    RESUME, a command the earlier log holds as completed is read back."""
    global last_started, last_ended
    shown = (" ".join(f"{k}={v}" for k, v in env_settings.items()) + " " + command).strip()
    print(f"+ {shown}", file=sys.stderr, flush=True)
    key = command_key(shown)
    earlier = EARLIER[key].pop(0) if EARLIER.get(key) else None
    if earlier and not (RERUN and RERUN.search(shown)):
        started_at, last_ended, stdout = earlier
        last_started = started_at or 0.0
        REUSED.append(shown)
        with LOG.open("a") as log:
            log.write(f"\n+ {shown}\n# started: {last_started:.0f}\n{stdout}{STDERR_MARK}\n")
        print(f"  read back from {RESUME}", file=sys.stderr, flush=True)
        return stdout
    RAN.append(shown)
    env = dict(os.environ, CARGO_TARGET_DIR=str(TARGET_DIR))
    env.update({k: str(v) for k, v in env_settings.items()})
    started = time.monotonic()
    last_started = time.time()
    done = subprocess.run(
        command, shell=True, cwd=ROOT, env=env, capture_output=True, text=True
    )
    last_ended = time.time()
    mark = "+" if done.returncode == 0 else "!"
    with LOG.open("a") as log:
        log.write(f"\n{mark} {shown}\n# started: {last_started:.0f}\n{done.stdout}{STDERR_MARK}{done.stderr}\n")
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {shown}\nlog: {LOG}\n"
                 f"go on from here: RESUME={LOG} benches/report.py")
    print(f"  {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return done.stdout


def kafka_version():
    pom = (ROOT / "ops/kafka/pom.xml").read_text()
    return re.search(r"<kafka.version>(.*)</kafka.version>", pom).group(1)


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
        # Items the model scored per tract run (the head, then the shown
        # items: up to two runs per recompute; 0 without a model).
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
        cpu = re.search(
            r"CPU meanwhile: engine ([\d.]+) s, broker ([\d.]+) s, load generator ([\d.]+) s", text
        )
        runs.append({
            "settings": settings,
            "result": result,
            "inside": engine_share(text),
            "engine_cpu": float(cpu.group(1)),
            "broker_cpu": float(cpu.group(2)),
            "loadgen_cpu": float(cpu.group(3)),
        })
    runs.sort(key=lambda r: r["result"]["latency_ms_p99"])
    median = dict(runs[len(runs) // 2])
    median["p99s"] = [r["result"]["latency_ms_p99"] for r in runs]
    return median


def floors(rates):
    """The same freshness runs with a relay that does nothing in place of the
    engine (`FLOOR=librdkafka|java`): what event -> output latency costs on
    this broker and host before any processing."""
    return [freshness({"FLOOR": client, "RATE": int(rate)})
            for rate in rates for client in ("librdkafka", "java")]


def floor_table(runs):
    rows = [
        "| relay's clients | rate | p50 | p95 | p99 (each run) | max | CPU over the run: relay / broker / load generator |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for f in runs:
        r = f["result"]
        p99s = ", ".join(f"{p:.0f}" for p in f["p99s"])
        clients = "librdkafka (`benches/peers/relay.py`)" if f["settings"]["FLOOR"] == "librdkafka" \
            else "Java (`benches/peers/kafka-streams/run.sh relay`)"
        rows.append(
            f"| {clients} | {f['settings']['RATE']:,}/s | {r['latency_ms_p50']:.1f} ms | "
            f"{r['latency_ms_p95']:.1f} ms | **{r['latency_ms_p99']:.1f} ms** ({p99s}) | "
            f"{r['latency_ms_max']:.0f} ms | {f['engine_cpu']:.2f} s / {f['broker_cpu']:.2f} s / "
            f"{f['loadgen_cpu']:.2f} s in 5 s |")
    return rows


def floor_note(runs, rate):
    """The floor's p99 at `rate`, for a target's row."""
    at = [f for f in runs if f["settings"]["RATE"] == rate]
    if not at:
        return ""
    return "; floor at the same rate (a relay that does nothing): " + ", ".join(
        f"{f['settings']['FLOOR']} {f['result']['latency_ms_p99']:.0f} ms" for f in at)


def user_store(live):
    """Keys and bytes of the per-user store in `recstream state-size` output:
    the engine's `users` column family, the peer's `user-profiles` store."""
    keys = size = 0
    for db in live["databases"]:
        for cf in db["column_families"]:
            if cf["name"] == "users" or "user-profiles" in db["path"]:
                keys += cf["keys"]
                size += cf["key_bytes"] + cf["value_bytes"]
    return keys, size


def side_by_side(settings):
    """One benches/peer.sh run: the engine and the Kafka Streams peer on the
    same broker and input, one after the other."""
    text = run(settings, "benches/peer.sh")
    systems = {}
    for block in re.split(r"^## ", text, flags=re.M)[1:]:
        name, body = block.split("\n", 1)
        lines = json_lines(body)
        throughput, fresh = lines[0], lines[1:]
        cpu = re.search(r"throughput CPU: \S+ ([\d.]+) s, broker ([\d.]+) s", body)
        live = json.loads(re.search(r"# live state: (\{.*\})", body).group(1))
        users, user_bytes = user_store(live)
        systems[name.strip()] = {
            "throughput": throughput,
            "freshness": fresh,
            "cpu": float(cpu.group(1)),
            "broker_cpu": float(cpu.group(2)),
            "per_cpu_second": throughput["events"] / float(cpu.group(1)),
            "rss_mb": int(re.search(r"# peak RSS: (\d+) kB", body).group(1)) / 1024,
            "users_with_state": users,
            "user_state_per_user": user_bytes / max(1, users),
            "all_state_per_user": live["bytes"] / max(1, users),
        }
    return {"settings": settings, **systems}


def engine_share(text):
    """From the engine's own histograms: the mean time from receiving a record
    to its outputs being acknowledged (or committed), its p99 bucket bound,
    and the mean transaction commit; the rest of the end-to-end latency is
    outside the engine (producer linger, broker hops, the consumers' fetches)."""
    buckets = [(float(le), float(n)) for le, n in re.findall(
        r'^# recstream_processing_seconds_bucket\{le="([^"+]+)"\} (\S+)$', text, re.M)]
    total = re.search(r"^# recstream_processing_seconds_count (\S+)$", text, re.M)
    sum_ = re.search(r"^# recstream_processing_seconds_sum (\S+)$", text, re.M)
    commit_n = re.search(r"^# recstream_transaction_commit_seconds_count (\S+)$", text, re.M)
    commit_s = re.search(r"^# recstream_transaction_commit_seconds_sum (\S+)$", text, re.M)
    if not (total and sum_) or float(total.group(1)) == 0:
        return None
    n = float(total.group(1))
    p99 = next((le for le, c in buckets if c >= 0.99 * n), float("inf"))
    commits = float(commit_n.group(1)) if commit_n else 0
    return {
        "mean_ms": float(sum_.group(1)) / n * 1000,
        "p99_bound_ms": p99 * 1000,
        "commit_mean_ms": float(commit_s.group(1)) / commits * 1000 if commits else None,
    }


def markdown_rows(text):
    return [line for line in text.splitlines() if line.startswith("|")]


def markdown_tables(text):
    """Every markdown table in `text`, as lists of rows (header first)."""
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def growth_curves():
    """cargo bench --bench state_growth: the users table and the catalogue
    table (markdown rows each), and benches/growth.png drawn from them."""
    text = run({"USERS": "10000,100000" if QUICK else "10000,30000,100000,300000,1000000",
                "ITEMS": "10000,30000" if QUICK else "10000,30000,100000"},
               "cargo bench --quiet --bench state_growth")
    users, items = markdown_tables(text)
    plot_growth(users, items, ROOT / "benches/growth.png")
    return users, items


def plot_growth(users, items, path):
    """Engine time per event against users and against catalogue size, and
    RocksDB bytes per user, on log axes: what a user sizes a deployment by."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    u = [cells(r) for r in users[2:]]
    i = [cells(r) for r in items[2:]]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 4), dpi=100)
    n_users = [int(r[0]) for r in u]
    left.plot(n_users, [1e6 / float(r[2]) for r in u], "o-")
    left.set(xscale="log", xlabel="users with state", ylabel="engine µs per event",
             title="Cost with users (10k items)", ylim=(0, None))
    middle.plot([int(r[0]) for r in i], [float(r[4]) for r in i], "o-", color="C1")
    middle.set(xscale="log", xlabel="catalogue items", ylabel="engine µs per event",
               title="Cost with catalogue size (10k users)", ylim=(0, None))
    right.plot(n_users, [float(r[3]) for r in u], "o-", color="C2", label="RocksDB SST (compressed)")
    right.plot(n_users, [float(r[4]) for r in u], "s--", color="C3", label="encoded state")
    right.set(xscale="log", xlabel="users with state", ylabel="bytes per user",
              title="State per user", ylim=(0, None))
    right.legend()
    for ax in (left, middle, right):
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("recstream engine stage (apply, recompute, commit; one thread), "
                 "`cargo bench --bench state_growth`", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def scaleout_runs():
    """benches/scaleout.sh with 1, 2 and 3 instances: one summary each."""
    results = []
    for k in [1, 2, 3]:
        settings = {"INSTANCES": k, "EVENTS": 20000 if QUICK else 100000}
        (summary,) = [j for j in json_lines(run(settings, "benches/scaleout.sh"))
                      if j.get("phase") == "scaleout"]
        results.append((settings, summary))
    return results


def scaleout_table(results):
    rows = ["| instances | throughput, events/s | engine CPU (all instances) | events per engine CPU-second | "
            "broker CPU | freshness p50 / p99 at 1,000/s | peak RSS, all instances | share of events per instance |",
            "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for _, r in results:
        rows.append(
            f"| {r['instances']} | {r['throughput']:,} | {r['engine_cpu_s']:.1f} s | {r['per_engine_cpu_second']:,} | "
            f"{r['broker_cpu_s']:.1f} s | {r['p50_ms']:.0f} / {r['p99_ms']:.0f} ms | {r['peak_rss_mb_total']:,} MB | "
            f"{' / '.join(f'{x:.0%}' for x in r['event_share'])} |")
    return rows


def cells(row):
    return [c.strip().strip("*") for c in row.strip("|").split("|")]


def criterion_means(since, until=None):
    """Mean time of every criterion benchmark written after `since` (and,
    for a command read back under RESUME, before the next one started:
    a later `cargo bench` may have rewritten some since)."""
    means = {}
    for estimates in sorted((TARGET_DIR / "criterion").glob("**/new/estimates.json")):
        written = estimates.stat().st_mtime
        if written < since or (until is not None and written > until + 1):
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


def mode_of(settings):
    return settings.get("GUARANTEE", "at_least_once")


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
    run({}, "cargo bench --quiet --bench stages" + (" -- --quick" if QUICK else ""))
    stages = criterion_means(last_started, last_ended)
    scoring = markdown_rows(
        run({"SECONDS_PER_POINT": "0.5" if QUICK else "2"}, "benches/scoring.sh")
    )
    growth, item_growth = growth_curves()

    eos = {"GUARANTEE": "exactly_once"}
    synthetic = pipeline({"EVENTS": n, "LATENCY_EVENTS": 5000, "RATE": 1000})
    eos_synthetic = pipeline({**eos, "EVENTS": n, "LATENCY_EVENTS": 5000, "RATE": 1000})
    # The coalescing window is the default (README, "The coalescing window as
    # the default"): batches may grow to 20,000 records for up to 1 s while
    # the pipeline is busy, so a user's events in one batch cost one
    # recompute. This run keeps the earlier small batches (1,000 records,
    # 10 ms) to show what the window saves.
    small = LOG.parent / "small-batches.toml"
    small.write_text("batch_max_wait_ms = 10\nbatch_max_records = 1000\n")
    small_batches = pipeline({"ENGINE_TOML": small, "EVENTS": n, "LATENCY_EVENTS": 5000, "RATE": 1000})
    ncf_synthetic = pipeline(
        {"NCF": 1, "EVENTS": n // 2, "LATENCY_EVENTS": 2500, "RATE": 500}
    )
    sessions = ncf_sessions = eos_sessions = None
    if real:
        sessions = pipeline({**ml100k, "EVENTS": n, "LATENCY_EVENTS": 2000, "RATE": 1000})
        eos_sessions = pipeline(
            {**eos, **ml100k, "EVENTS": n, "LATENCY_EVENTS": 2000, "RATE": 1000}
        )
        candidates = LOG.parent / "candidates.toml"
        # The target is a scoring capacity: the model scores every candidate
        # (rescore_depth = 0), not only the head of the ranked lists.
        candidates.write_text("[engine.lists]\ncandidates_per_source = 200\nrescore_depth = 0\n")
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

    # Per guarantee mode: 1,000/s, then half of that mode's own throughput.
    fresh = []
    for mode, synth, sess in [({}, synthetic, sessions), (eos, eos_synthetic, eos_sessions)]:
        fresh.append(freshness({**mode, "RATE": 1000}))
        fresh.append(freshness({**mode, "RATE": half(synth["throughput"]["pipeline_rate"])}))
        if sess:
            rate = half(sess["throughput"]["pipeline_rate"])
            seconds = max(1, min(5, sess["throughput"]["events"] // rate))
            fresh.append(freshness({**mode, **ml100k, "RATE": rate, "SECONDS_AT_RATE": seconds}))

    # The floor: a relay that does nothing, at the synthetic rates above.
    synthetic_half = half(synthetic["throughput"]["pipeline_rate"])
    floor_runs = floors([1000, synthetic_half])

    # The Kafka Streams peer beside the engine: synthetic users in both
    # guarantee modes, real sessions in the default one.
    peer_rates = "500 1000" if QUICK else "1000 2000"
    peer_runs = [
        ("synthetic", side_by_side({"EVENTS": n, "RATES": peer_rates})),
        ("synthetic", side_by_side({**eos, "EVENTS": n, "RATES": peer_rates})),
    ]
    if real:
        peer_runs.append(("ML-100K ratings", side_by_side({**ml100k, "EVENTS": n, "RATES": peer_rates})))
    scaleout = scaleout_runs()

    # Targets.
    scoring_500 = [cells(r) for r in scoring[2:] if cells(r)[1] == "500"]
    scoring_ratio = min(float(c[-1]) for c in scoring_500) if scoring_500 else float("nan")

    growth_rows = [cells(r) for r in growth[2:]]
    first, last = growth_rows[0], growth_rows[-1]
    at_1000 = [f for f in fresh if f["settings"]["RATE"] == 1000 and "RATINGS" not in f["settings"]]
    half_load = [f for f in fresh if f not in at_1000]

    def fresh_label(f):
        return (f"{mode_of(f['settings'])}, {f['settings']['RATE']:,}/s "
                f"{'real sessions' if 'RATINGS' in f['settings'] else 'synthetic'}")

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
            "freshness p99 ≤ 25 ms at half the sustainable load (event → published recommendation)",
            "; ".join(
                f"{fresh_label(f)}: {f['result']['latency_ms_p99']:.0f} ms (median of {len(f['p99s'])})"
                for f in half_load
            ),
            "; ".join(
                f"{verdict(all(f['result']['latency_ms_p99'] <= 25 for f in half_load if mode_of(f['settings']) == m))} ({m})"
                for m in ["at_least_once", "exactly_once"]
            ) + floor_note(floor_runs, synthetic_half),
        ),
        (
            "freshness p99 ≤ 10 ms at 1,000 events/s",
            "; ".join(
                f"{fresh_label(f)}: {f['result']['latency_ms_p99']:.0f} ms" for f in at_1000
            ),
            "; ".join(
                f"{verdict(f['result']['latency_ms_p99'] <= 10)} ({mode_of(f['settings'])})"
                for f in at_1000
            ) + floor_note(floor_runs, 1000),
        ),
        (
            "state ≤ 256 B per user plus the recent items; growth 10 k → 1 M users",
            f"{last[5]} B without the recent items ({last[4]} B with them); "
            f"workload {first[2]} events/s at {first[0]} users, {last[2]} at {last[0]}",
            verdict(float(last[5]) <= 256),
        ),
        (
            "≥ 15 k events per engine CPU-second without a model, ≥ 8 k with it (synthetic uniform "
            "users: every event its own recompute); real sessions not below the previous report",
            f"synthetic: {synthetic['per_cpu_second']:,.0f} without a model "
            f"({small_batches['per_cpu_second']:,.0f} with the earlier 10 ms / 1,000-record batches), "
            f"{ncf_synthetic['per_cpu_second']:,.0f} with NCF"
            + (f"; real sessions: {sessions['per_cpu_second']:,.0f} without a model" if sessions else "")
            + (f", {ncf_sessions['per_cpu_second']:,.0f} with NCF" if ncf_sessions else ""),
            f"{verdict(synthetic['per_cpu_second'] >= 15000)} (without); "
            f"{verdict(ncf_synthetic['per_cpu_second'] >= 8000)} (with NCF); real sessions: compare "
            "with the previous RESULTS.md (git log -p benches/RESULTS.md)",
        ),
    ]

    for load, pr in peer_runs:
        e, k = pr["engine"], pr["peer"]
        ratio = e["per_cpu_second"] / k["per_cpu_second"]
        lower = all(a["latency_ms_p99"] < b["latency_ms_p99"] for a, b in zip(e["freshness"], k["freshness"]))
        targets.append((
            f"vs the Kafka Streams peer ({load}, {mode_of(pr['settings'])}): ≥ 3× its events per CPU-second, "
            "lower p99 at every common rate",
            f"{ratio:.2f}× ({e['per_cpu_second']:,.0f} against {k['per_cpu_second']:,.0f}); p99 "
            + ", ".join(f"{a['latency_ms_p99']:.0f} against {b['latency_ms_p99']:.0f} ms at {a['target_rate']:,}/s"
                        for a, b in zip(e["freshness"], k["freshness"])),
            f"{verdict(ratio >= 3)} (CPU); {verdict(lower)} (p99)",
        ))

    def pipeline_row(name, p):
        t, f = p["throughput"], p["freshness"]
        per_rescore = p["candidates_per_rescore"]
        folds = p["counters"].get("recstream_ncf_fold_in_seconds_count", 0)
        fold_in = p["counters"].get("recstream_ncf_fold_in_seconds_sum", 0) / folds if folds else 0
        return (
            f"| {name} | {t['pipeline_rate']:,.0f} | {p['cpu_seconds']:.1f} s | {p['per_cpu_second']:,.0f} | "
            f"{p['ceiling']['rate']:,.0f} | {p['share']:.2%} | "
            f"{p['counters'].get('recstream_users_recomputed_total', 0):,.0f} | "
            f"{f'{per_rescore:.0f}' if per_rescore else '—'} | "
            f"{f'{fold_in * 1e6:.0f} µs' if fold_in else '—'} | "
            f"{f['latency_ms_p50']:.0f} / {f['latency_ms_p95']:.0f} / "
            f"{f['latency_ms_p99']:.0f} ms at {f['target_rate']:,}/s | {p['rss_mb']:.0f} MB |"
        )

    runs = [
        ("synthetic, no model", synthetic),
        ("synthetic, no model, 10 ms / 1,000-record batches (before the window)", small_batches),
        ("synthetic, no model, exactly_once", eos_synthetic),
    ]
    if sessions:
        runs.append(("ML-100K ratings, no model", sessions))
        runs.append(("ML-100K ratings, no model, exactly_once", eos_sessions))
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
    if REUSED and RERUN:
        ran = ", ".join(f"`{c}`" for c in RAN) or "none"
        w(f"Resumed (`RESUME=LOG RERUN={RERUN.pattern}`): the outputs of {len(REUSED)} commands "
          f"were read back from an earlier run's log; the commands this run ran itself: {ran}. "
          "The minutes above count this run only.\n")
    elif REUSED:
        w(f"Resumed (`RESUME=LOG`) after an interrupted run: the outputs of its first {len(REUSED)} "
          f"commands, up to `{REUSED[-1]}`, were read back from that run's log; the minutes "
          "above count the resumed run only.\n")
    w(f"Machine: {os.cpu_count()} cores ({cpu_model}), {mem_gib:.0f} GiB; broker "
      f"Apache Kafka {kafka_version()} (single-node KRaft, `ops/kafka/broker.sh`, 1 GiB heap) on "
      "loopback. The broker, the engine and the load generator share the cores; the "
      "freshness table shows how the CPU splits between them. Runs without a guarantee "
      "named are `at_least_once`.\n")
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
    w("## The cost of exactly_once\n")
    w("The same loads in both guarantee modes, same broker version, same run (Kafka Streams "
      "documents its EOS cost the same way: throughput and latency beside at-least-once).\n")
    w("| measure | at_least_once | exactly_once | change |")
    w("|---|---:|---:|---:|")

    def cost_row(name, a, b, unit, fmt="{:,.0f}"):
        change = (b - a) / a if a else float("nan")
        w(f"| {name} | {fmt.format(a)}{unit} | {fmt.format(b)}{unit} | {change:+.0%} |")

    pairs = [("synthetic", synthetic, eos_synthetic)]
    if sessions:
        pairs.append(("ML-100K ratings", sessions, eos_sessions))
    for name, a, b in pairs:
        cost_row(f"{name}: throughput, events/s", a["throughput"]["pipeline_rate"],
                 b["throughput"]["pipeline_rate"], "")
        cost_row(f"{name}: events per engine CPU-second", a["per_cpu_second"], b["per_cpu_second"], "")
    by_load = {}
    for f in fresh:
        kind = "real sessions" if "RATINGS" in f["settings"] else "synthetic"
        load = "1,000/s" if f["settings"]["RATE"] == 1000 else "half of the mode's throughput"
        by_load.setdefault(f"{kind}, {load}", {})[mode_of(f["settings"])] = f
    for label, modes in by_load.items():
        if len(modes) == 2:
            a, b = (modes[m] for m in ["at_least_once", "exactly_once"])
            change = b["result"]["latency_ms_p99"] / a["result"]["latency_ms_p99"] - 1
            w(f"| freshness p99, {label} | {a['result']['latency_ms_p99']:.1f} ms at "
              f"{a['settings']['RATE']:,}/s | {b['result']['latency_ms_p99']:.1f} ms at "
              f"{b['settings']['RATE']:,}/s | {change:+.0%} |")
    w("")
    w("## Whole pipeline against Apache Kafka\n")
    w("Throughput: events produced as fast as the broker takes them, until every user's "
      "recommendations reflect their last event. Ceiling: a plain consumer with the "
      "engine's settings reading the same records (same run). Freshness: event → "
      "recommendation record seen by a consumer, at a fixed rate after the throughput phase.\n")
    w("| run | events/s | engine CPU | events per CPU-second | ceiling records/s | share | "
      "users recomputed | candidates per re-score | NCF fold-in per user | freshness p50 / p95 / p99 | peak RSS |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, p in runs:
        w(pipeline_row(name, p))
    w("")
    w("```sh")
    for _, p in runs:
        w(command_of(p["settings"], "benches/pipeline.sh"))
    w("```\n")
    w("## Beside the Kafka Streams peer\n")
    w("`benches/peer.sh`: the engine (`[engine.lists] top_n = 20`) and the Kafka Streams "
      "application of `benches/peers/kafka-streams` (the seed's job: decayed genre tastes, "
      "decayed popularity overall and per genre, a top-20 list and genre carousels per user; "
      "Kafka Streams defaults but the producer's linger, 2 ms as the engine's) on the same broker, "
      "the same events and the same machine, one after the other, on a broker warmed up first "
      "with neither attached (120,000 events through a do-nothing relay: on a fresh broker the "
      "system measured first paid for the broker's JIT). The engine does strictly "
      "more per event (co-watch, content similarity, trending, three outputs with insights). "
      "CPU is the process's own (user + system); the broker's is beside it. State: the live key "
      "and value bytes of each system's RocksDB stores once it has stopped (`recstream state-size`), "
      "per user with state: its per-user store alone (the engine's `users` column family, the peer's "
      "`user-profiles` store), and all its stores (item side and bookkeeping included).\n")
    w("| load | guarantee | system | events/s | CPU | events per CPU-second | broker CPU | "
      "freshness p50 / p99 | peak RSS | users with state | user state per user | all state per user |")
    w("|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for load, pr in peer_runs:
        for name in ["engine", "peer"]:
            x = pr[name]
            fresh_cells = "; ".join(
                f"{f['latency_ms_p50']:.0f} / {f['latency_ms_p99']:.0f} ms at {f['target_rate']:,}/s"
                for f in x["freshness"])
            w(f"| {load} | {mode_of(pr['settings'])} | {'recstream' if name == 'engine' else 'Kafka Streams peer'} | "
              f"{x['throughput']['pipeline_rate']:,.0f} | {x['cpu']:.1f} s | {x['per_cpu_second']:,.0f} | "
              f"{x['broker_cpu']:.1f} s | {fresh_cells} | {x['rss_mb']:.0f} MB | "
              f"{x['users_with_state']:,} | {x['user_state_per_user']:,.0f} B | {x['all_state_per_user']:,.0f} B |")
    w("")
    w("```sh")
    for _, pr in peer_runs:
        w(command_of(pr["settings"], "benches/peer.sh"))
    w("```\n")
    w("## Freshness on a fresh broker\n")
    w("| guarantee | load | rate | p50 | p95 | p99 (each run) | max | CPU over the run: engine / broker / load generator |")
    w("|---|---|---:|---:|---:|---:|---:|---:|")
    for f in fresh:
        r = f["result"]
        kind = "ML-100K ratings" if "RATINGS" in f["settings"] else "synthetic users"
        seconds = f["settings"].get("SECONDS_AT_RATE", 5)
        p99s = ", ".join(f"{p:.0f}" for p in f["p99s"])
        w(f"| {mode_of(f['settings'])} | {kind} | {f['settings']['RATE']:,}/s | {r['latency_ms_p50']:.1f} ms | "
          f"{r['latency_ms_p95']:.1f} ms | **{r['latency_ms_p99']:.1f} ms** ({p99s}) | "
          f"{r['latency_ms_max']:.0f} ms | {f['engine_cpu']:.2f} s / {f['broker_cpu']:.2f} s / "
          f"{f['loadgen_cpu']:.2f} s in {seconds} s |")
    w("")
    w(f"Each row is the median of {FRESHNESS_RUNS} runs by p99 (every run's p99 in brackets; "
      "freshness on this shared host varies from run to run). Rows other than 1,000/s "
      "run at half of the throughput measured above for the same load and guarantee.\n")
    w("Where the time goes (same runs): inside the engine, from receiving a record to "
      "its batch's outputs acknowledged (`at_least_once`) or committed (`exactly_once`), "
      "from `recstream_processing_seconds`; the rest of the end-to-end latency is the "
      "producer's linger, the broker hops and the consumers' fetches.\n")
    w("| guarantee | load | rate | end to end p50 | inside the engine: mean / p99 bucket | transaction commit, mean |")
    w("|---|---|---:|---:|---:|---:|")
    for f in fresh:
        inside = f.get("inside")
        if not inside:
            continue
        kind = "ML-100K ratings" if "RATINGS" in f["settings"] else "synthetic users"
        commit = f"{inside['commit_mean_ms']:.1f} ms" if inside["commit_mean_ms"] else "—"
        w(f"| {mode_of(f['settings'])} | {kind} | {f['settings']['RATE']:,}/s | "
          f"{f['result']['latency_ms_p50']:.1f} ms | {inside['mean_ms']:.1f} ms / ≤ {inside['p99_bound_ms']:.0f} ms | {commit} |")
    w("")
    w("```sh")
    for f in fresh:
        w(command_of(f["settings"], "benches/freshness.sh"))
    w("```\n")
    w("## The floor: a relay that does nothing\n")
    w("The same freshness runs (same load generator, broker and warm-up) with a relay in "
      "place of the engine: for every event it publishes a small record keyed by the user to "
      "each of the three output topics, with the engine's client settings, and does nothing "
      "else. No processor can be fresher on this broker and host; what the engine adds is "
      "the difference.\n")
    out.extend(floor_table(floor_runs))
    w("")
    w("```sh")
    for f in floor_runs:
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
    w("## Scale-out on one machine\n")
    w("`benches/scaleout.sh`: 1, 2 and 3 engine instances in one consumer group on the same "
      "broker and the same 2 cores (synthetic users; fresh broker and state per row). The "
      "broker, every instance and the load generator share the cores, so the rows say what "
      "more instances cost on one host, not what more hosts give.\n")
    out.extend(scaleout_table(scaleout))
    w("")
    w("```sh")
    for settings, _ in scaleout:
        w(command_of(settings, "benches/scaleout.sh"))
    w("```\n")
    w("## Growth with users and with the catalogue\n")
    w("`cargo bench --bench state_growth` (the engine stage alone, one thread; the output "
      "encoding and the broker add a cost per recompute that depends on neither axis):\n")
    w("![growth curves](growth.png)\n")
    out.extend(growth)
    w("")
    out.extend(item_growth)
    w("")
    OUT.write_text("\n".join(out))
    print(f"wrote {OUT} (log: {LOG})", file=sys.stderr)


if __name__ == "__main__":
    if sys.argv[1:] == ["growth"]:
        for table in growth_curves():
            print("\n".join(table) + "\n")
        print(f"wrote {ROOT / 'benches/growth.png'}", file=sys.stderr)
    elif sys.argv[1:] == ["scaleout"]:
        print("\n".join(scaleout_table(scaleout_runs())))
    elif sys.argv[1:2] == ["floor"]:
        print("\n".join(floor_table(floors(sys.argv[2:] or [1000, 2800]))))
    elif sys.argv[1:]:
        sys.exit("usage: benches/report.py [growth | scaleout | floor [RATE ...]]")
    else:
        main()
