//! `recstream replay-eval`: the variants and peers side by side on MovieLens
//! streams, the sweep of defaults, and the evaluation document.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};
use clap::Args;

use super::report::{self, DatasetReport, PeerResult, SplitResult};
use super::VariantResult;
use super::{
    run_split, run_variant, standard_variants, Models, Settings, Split, Stream, VariantSpec,
};
use crate::config::EngineConfig;
use crate::ncf::foldin::FoldInConfig;

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// MovieLens directories (or ratings files beside their catalog), replayed one after the other.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "../shared/data/movielens/ml-100k,../shared/data/movielens/ml-latest-small"
    )]
    pub data: Vec<PathBuf>,
    /// Only these variants (default: all of them).
    #[arg(long, value_delimiter = ',')]
    pub variants: Vec<String>,
    /// The evaluation document.
    #[arg(long, default_value = "eval/REPLAY.md")]
    pub out: PathBuf,
    /// Model files and raw results.
    #[arg(long, default_value = "target/replay")]
    pub work_dir: PathBuf,
    /// Replay only the first N events of each stream (quick checks).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Training epochs of the replay's models (default: the trainer's).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Retraining interval in days of event time (default: 30 on ml-100k, 1095 on longer streams).
    #[arg(long)]
    pub retrain_days: Option<f64>,
    /// The history model's training settings as JSON, over the defaults,
    /// e.g. '{"sampled_items": 2048, "max_len": 50}'.
    #[arg(long)]
    pub history_config: Option<String>,
    /// The history model's blend weight in `full-blend-history`.
    #[arg(long, default_value_t = super::HISTORY_BLEND_NCF)]
    pub history_ncf: f64,
    /// Skip the Python peers (river, implicit).
    #[arg(long)]
    pub no_peers: bool,
    /// Run variants on both cores (one thread per dataset).
    #[arg(long)]
    pub parallel: bool,
    /// Replay through this Kafka cluster instead of in-process (models reach
    /// the pipeline through its experiment file; a broker round trip per
    /// event, so use --limit).
    #[arg(long)]
    pub brokers: Option<String>,
    /// Run the sweep that picks the engine's defaults instead (writes SWEEP.md
    /// and sweep.png beside --out).
    #[arg(long)]
    pub sweep: bool,
    /// Take the engine settings (`[engine]`) from this recstream config file
    /// instead of the defaults: every variant, and the sweep's start, builds on them.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Also replay each variant split over these numbers of simulated
    /// instances (users hashed to one partition each), once with global item
    /// tables and once with each instance's item knowledge isolated.
    #[arg(long, value_delimiter = ',')]
    pub instances: Vec<usize>,
}

/// The engine settings the variants build on.
fn base_config(args: &ReplayArgs) -> Result<EngineConfig> {
    Ok(config_file(args)?.map(|c| c.engine).unwrap_or_default())
}

/// How the replay's models fold users in: `[model.fold_in]` of --config.
fn fold_in_config(args: &ReplayArgs) -> Result<FoldInConfig> {
    Ok(config_file(args)?
        .map(|c| c.model.fold_in)
        .unwrap_or_default())
}

fn config_file(args: &ReplayArgs) -> Result<Option<crate::config::Config>> {
    crate::cli::config_file(args.config.as_deref())
}

/// Published-protocol anchors of all-time popularity (issue text, ±0.003).
fn anchor(name: &str) -> Option<f64> {
    match name {
        "ml-100k" => Some(0.077),
        "ml-latest-small" => Some(0.048),
        _ => None,
    }
}

fn defaults_for(stream: &Stream, args: &ReplayArgs) -> (f64, f64) {
    let span_days = stream
        .events
        .last()
        .zip(stream.events.first())
        .map_or(1.0, |(l, f)| (l.ts_ms - f.ts_ms) as f64 / 86_400_000.0);
    // Short streams (ML-100K: 7 months) are retrained monthly and plotted
    // weekly; long ones (ml-latest-small: 22 years) every three years, plotted
    // half-yearly (a retraining costs up to a minute on 2 cores).
    let (retrain, window) = if span_days < 400.0 {
        (30.0, 7.0)
    } else {
        (1095.0, 180.0)
    };
    (args.retrain_days.unwrap_or(retrain), window)
}

/// The stream's retraining interval and the replay settings from the flags.
fn settings_for(
    stream: &Stream,
    args: &ReplayArgs,
    tail_from: Option<i64>,
) -> Result<(f64, Settings)> {
    let (retrain_days, window_days) = defaults_for(stream, args);
    let settings = Settings {
        window_days,
        epochs: args.epochs,
        work_dir: args.work_dir.clone(),
        fold_in: fold_in_config(args)?,
        tail_from,
        history: match &args.history_config {
            Some(json) => serde_json::from_str(json)
                .context("--history-config: not a history model setting (models/README.md)")?,
            None => Default::default(),
        },
    };
    Ok((retrain_days, settings))
}

pub async fn run(args: &ReplayArgs) -> Result<()> {
    if let Some(brokers) = &args.brokers {
        return through_broker(args, brokers).await;
    }
    if args.sweep {
        return sweep(args);
    }
    let jobs: Vec<&PathBuf> = args.data.iter().collect();
    let reports: Vec<Result<DatasetReport>> = if args.parallel {
        std::thread::scope(|s| {
            let handles: Vec<_> = jobs
                .iter()
                .map(|path| s.spawn(move || dataset(path, args)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("replay thread panicked"))
                .collect()
        })
    } else {
        jobs.iter().map(|p| dataset(p, args)).collect()
    };
    let reports = reports.into_iter().collect::<Result<Vec<_>>>()?;
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut doc = String::from(
        "## Prequential replay\n\nReproduce: `cargo run --release -- replay-eval` \
         (data from `../shared/data/movielens`, peers from `eval/replay_peers.py`, \
         installed by `eval/setup_peers.sh`). \
         Every rating is replayed in event-time order (ties by user, then item) \
         through `Engine::process`; before it is applied, the list the engine would \
         publish for that user at that moment (`Engine::peek`) is scored. Models \
         are trained inside the replay on the events before the half-way cut only.\n\n",
    );
    for r in &reports {
        doc.push_str(&report::markdown(r, anchor(&r.name)));
        let png = args.out.with_file_name(format!("replay-{}.png", r.name));
        report::plot(
            &png,
            r,
            &[
                "popularity",
                "co-watched",
                "ncf-fold-in",
                "blend-no-model",
                "full-blend",
                "full-blend-retrained",
                "ncf-history",
                "full-blend-history",
                "learned-blend",
            ],
        )
        .map_err(|e| anyhow::anyhow!("plotting {}: {e}", png.display()))?;
        doc.push_str(&format!(
            "![HR@10 over event time]({})\n\n",
            png.file_name().unwrap_or_default().to_string_lossy()
        ));
        let json = args.work_dir.join(format!("{}.json", r.name));
        std::fs::write(&json, serde_json::to_vec_pretty(r)?)
            .with_context(|| format!("writing {}", json.display()))?;
    }
    std::fs::write(&args.out, doc).with_context(|| format!("writing {}", args.out.display()))?;
    println!("wrote {}", args.out.display());
    Ok(())
}

fn sweep(args: &ReplayArgs) -> Result<()> {
    let mut streams = Vec::new();
    for path in &args.data {
        let stream = Stream::load(path, args.limit)
            .with_context(|| format!("loading {}", path.display()))?;
        let tail_from = stream.events[stream.events.len() * 9 / 10].ts_ms;
        let (_, settings) = settings_for(&stream, args, Some(tail_from))?;
        streams.push((stream, settings));
    }
    std::fs::create_dir_all(&args.work_dir)
        .with_context(|| format!("creating {}", args.work_dir.display()))?;
    let start = base_config(args)?;
    let outcome = super::sweep::run(&streams, &start, &[0.0, 0.1, 0.3, 0.6], |line| {
        eprintln!("{line}")
    })?;
    let names: Vec<String> = streams.iter().map(|(s, _)| s.name.clone()).collect();
    let png = args.out.with_file_name("sweep.png");
    super::sweep::plot(&png, &outcome)
        .map_err(|e| anyhow::anyhow!("plotting {}: {e}", png.display()))?;
    let mut doc = super::sweep::markdown(&outcome, &names, &start);
    doc.push_str("![sweep](sweep.png)\n");
    let md = args.out.with_file_name("SWEEP.md");
    std::fs::write(&md, doc).with_context(|| format!("writing {}", md.display()))?;
    println!("wrote {}", md.display());
    Ok(())
}

/// The broker replay: prints each variant's figures (for comparison with the
/// in-process run on the same `--limit`).
async fn through_broker(args: &ReplayArgs, brokers: &str) -> Result<()> {
    for path in &args.data {
        let stream = Stream::load(path, args.limit)
            .with_context(|| format!("loading {}", path.display()))?;
        let (retrain_days, settings) = settings_for(&stream, args, None)?;
        std::fs::create_dir_all(&args.work_dir)
            .with_context(|| format!("creating {}", args.work_dir.display()))?;
        let mut models = Models::default();
        for spec in standard_variants(&base_config(args)?, retrain_days, args.history_ncf)
            .into_iter()
            .filter(|v| args.variants.is_empty() || args.variants.contains(&v.name))
        {
            let r = super::broker::run_variant(&stream, &spec, &settings, &mut models, brokers)
                .await
                .with_context(|| {
                    format!("{}: variant {} through {brokers}", stream.name, spec.name)
                })?;
            println!(
                "{}",
                serde_json::json!({
                    "data": stream.name, "variant": r.name, "events": r.all.cases,
                    "hr": r.all.hr, "ndcg": r.all.ndcg, "seconds": r.seconds,
                })
            );
        }
    }
    Ok(())
}

fn dataset(path: &Path, args: &ReplayArgs) -> Result<DatasetReport> {
    let stream =
        Stream::load(path, args.limit).with_context(|| format!("loading {}", path.display()))?;
    if stream.events.is_empty() {
        bail!("{}: no ratings", path.display());
    }
    let (retrain_days, settings) = settings_for(&stream, args, None)?;
    std::fs::create_dir_all(&args.work_dir)
        .with_context(|| format!("creating {}", args.work_dir.display()))?;
    let specs: Vec<VariantSpec> =
        standard_variants(&base_config(args)?, retrain_days, args.history_ncf)
            .into_iter()
            .filter(|v| args.variants.is_empty() || args.variants.contains(&v.name))
            .collect();
    let engine_variants = || -> Result<(Vec<VariantResult>, Vec<SplitResult>)> {
        let mut models = Models::default();
        let mut variants = Vec::new();
        for spec in &specs {
            let result = run_variant(&stream, spec, &settings, &mut models)
                .with_context(|| format!("{}: variant {}", stream.name, spec.name))?;
            eprintln!(
                "{}: {:<22} HR@10 {:.4} (second half), {:.4} (all) in {:.0} s",
                stream.name, spec.name, result.second_half.hr, result.all.hr, result.seconds
            );
            variants.push(result);
        }
        let mut instances = Vec::new();
        for &n in args.instances.iter().filter(|n| **n > 1) {
            for spec in &specs {
                for global_items in [true, false] {
                    let split = Split {
                        instances: n,
                        global_items,
                    };
                    let result = run_split(&stream, spec, &settings, &mut models, split)
                        .with_context(|| {
                            format!("{}: variant {} over {n} instances", stream.name, spec.name)
                        })?;
                    eprintln!(
                        "{}: {:<22} {n} instances, {}: HR@10 {:.4} (second half) in {:.0} s",
                        stream.name,
                        spec.name,
                        if global_items { "global" } else { "isolated" },
                        result.second_half.hr,
                        result.seconds
                    );
                    instances.push(SplitResult {
                        instances: n,
                        global_items,
                        result,
                    });
                }
            }
        }
        Ok((variants, instances))
    };
    // The peers' results are kept in the work directory, so a stopped run
    // leaves them for the next one. With --parallel they run beside the
    // variants (SASRec alone trains for over an hour, mostly on one core).
    let run_peers = || -> Result<Vec<PeerResult>> {
        if args.no_peers {
            Ok(Vec::new())
        } else {
            peers(path, &stream, retrain_days, args)
        }
    };
    let (peers, (variants, instances)) = if args.parallel {
        std::thread::scope(|scope| {
            let peers = scope.spawn(run_peers);
            let engine = engine_variants();
            let peers = peers
                .join()
                .map_err(|_| anyhow::anyhow!("{}: the peers' thread panicked", stream.name))?;
            Ok::<_, anyhow::Error>((peers?, engine?))
        })?
    } else {
        (run_peers()?, engine_variants()?)
    };
    let users: std::collections::HashSet<u32> = stream.events.iter().map(|e| e.user_id).collect();
    Ok(DatasetReport {
        name: stream.name.clone(),
        events: stream.events.len(),
        users: users.len(),
        items: stream.catalog.len(),
        cut: stream.cut,
        window_days: settings.window_days,
        retrain_days,
        variants,
        peers,
        instances,
    })
}

/// Runs `eval/replay_peers.py` on the same stream and cut: river, ALS and
/// item-kNN in one virtualenv, SASRec in another (TensorFlow 2.15 and river
/// want different numpy majors; `eval/setup_peers.sh` makes both).
fn peers(
    path: &Path,
    stream: &Stream,
    retrain_days: f64,
    args: &ReplayArgs,
) -> Result<Vec<PeerResult>> {
    let ratings = if path.is_dir() {
        ["ratings.csv", "u.data", "ratings.dat"]
            .iter()
            .map(|f| path.join(f))
            .find(|p| p.exists())
            .context("no ratings file")?
    } else {
        path.to_path_buf()
    };
    // ALS and item-kNN are refitted daily on the short stream; the long one
    // spans 22 years, so every 30 days there. SASRec is retrained on the
    // engine's models' schedule.
    let als_days = if retrain_days < 365.0 { 1.0 } else { 30.0 };
    // What every peer's result depends on: the ratings and the peer scripts.
    let mut inputs = crate::fnv::Fnv::default();
    inputs
        .write(&std::fs::read(&ratings).with_context(|| format!("reading {}", ratings.display()))?);
    for script in ["eval/replay_peers.py", "eval/setup_peers.sh"] {
        inputs.write(&std::fs::read(script).with_context(|| format!("reading {script}"))?);
    }
    let mut results = Vec::new();
    // One process per peer, each result kept in the work directory under a
    // fingerprint of everything it depends on (the ratings, the cut, the
    // schedules, the peer scripts and their pinned packages), as the models
    // are: SASRec alone trains for over an hour, and a run that is stopped
    // keeps the peers it finished.
    for (venv, peer) in [
        ("venv-peers", "river"),
        ("venv-peers", "als"),
        ("venv-peers", "itemknn"),
        ("venv-sequential", "sasrec"),
    ] {
        let mut fingerprint = inputs;
        let schedule = format!(
            "{peer} cut={} als_days={als_days} sequential_days={retrain_days} limit={:?}",
            stream.cut, args.limit
        );
        fingerprint.write(schedule.as_bytes());
        let out = args.work_dir.join(format!(
            "{}.peer-{peer}-{}.json",
            stream.name,
            &fingerprint.hex()[..10]
        ));
        if out.exists() {
            eprintln!(
                "peers: {peer} on {}: cached in {}",
                stream.name,
                out.display()
            );
        } else {
            let partial = out.with_extension("partial");
            let mut cmd = Command::new(peer_python(venv));
            cmd.arg("eval/replay_peers.py")
                .arg("--ratings")
                .arg(&ratings)
                .arg("--cut")
                .arg(stream.cut.to_string())
                .arg("--als-days")
                .arg(als_days.to_string())
                .arg("--sequential-days")
                .arg(retrain_days.to_string())
                .arg("--peers")
                .arg(peer)
                .arg("--out")
                .arg(&partial);
            if let Some(n) = args.limit {
                cmd.arg("--limit").arg(n.to_string());
            }
            let status = cmd.status().context("running eval/replay_peers.py")?;
            if !status.success() {
                bail!("eval/replay_peers.py --peers {peer} failed ({status}); install the peers with `eval/setup_peers.sh`, or pass --no-peers");
            }
            std::fs::rename(&partial, &out)
                .with_context(|| format!("renaming {}", partial.display()))?;
        }
        let text = std::fs::read(&out).with_context(|| format!("reading {}", out.display()))?;
        results.extend(serde_json::from_slice::<Vec<PeerResult>>(&text)?);
    }
    Ok(results)
}

/// The Python of a peers virtualenv made by `eval/setup_peers.sh`, or
/// `python3` when there is none.
pub fn peer_python(venv: &str) -> PathBuf {
    let home = std::env::var_os("RECSTREAM_PEERS_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/recstream")));
    home.map(|h| h.join(venv).join("bin/python"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("python3"))
}
