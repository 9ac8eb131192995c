//! `recstream eval`: the published protocols on MovieLens, our NCF side by side
//! with baselines and PyPI peers on the same splits, written as a markdown table.
//!
//! - Explicit: ML-100K canonical u1–u5 splits, RMSE and MAE.
//! - Implicit: leave-one-out, 99 sampled negatives (NCF paper), HR@10, NDCG@10,
//!   on ML-100K and ml-latest-small.
//! - Cold start: 10 % of ML-100K users never trained on; each is folded in from
//!   their first 5 interactions through the engine's own state and fold-in code,
//!   then ranked on the rest of their interactions.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use clap::Args;
use serde_json::Value;

use super::data::{self, Dataset, RankingCase, RawInteraction, Row};
use super::eval::{self, Run, RunInput};
use super::model::Objective;
use super::train::{self, TrainConfig};
use crate::catalog::{self, Catalog};
use crate::config::EngineConfig;
use crate::event::{EventType, Interaction};
use crate::recommend::affinity;
use crate::rng::Rng;
use crate::state::UserState;

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The MovieLens directory (with ml-100k/ and ml-latest-small/).
    #[arg(long, default_value = "../shared/data/movielens")]
    pub data_dir: PathBuf,
    /// Where split files and models go.
    #[arg(long, default_value = "target/eval")]
    pub work_dir: PathBuf,
    /// The markdown table.
    #[arg(long, default_value = "eval/RESULTS.md")]
    pub out: PathBuf,
    /// ML-100K folds for the explicit protocol.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5")]
    pub folds: Vec<u8>,
    /// Skip the Python peers (Surprise, implicit).
    #[arg(long)]
    pub no_peers: bool,
    /// Also run Surprise's SVD++ (slow).
    #[arg(long)]
    pub svdpp: bool,
    /// Override the epochs of every training run (quick checks).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Which protocols to run (quick checks run one).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "explicit,implicit,cold-start"
    )]
    pub protocols: Vec<Protocol>,
    /// An engine config file: its `[model.fold_in]` settings fold in the
    /// cold-start users (default: the engine's defaults).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    Explicit,
    Implicit,
    ColdStart,
}

fn load(path: &Path) -> Result<Vec<RawInteraction>> {
    data::load_interactions(path).with_context(|| format!("reading {}", path.display()))
}

fn config(objective: Objective, args: &EvalArgs) -> TrainConfig {
    let mut c = TrainConfig::defaults(objective);
    if let Some(e) = args.epochs {
        c.epochs = e;
    }
    c
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Item-mean ratings (the explicit popularity baseline), shrunk to the global
/// mean for rarely rated items.
fn item_mean_errors(train: &[Row], test: &[Row], n_items: usize) -> (f64, f64) {
    let global = train.iter().map(|r| r.rating as f64).sum::<f64>() / train.len() as f64;
    let mut sum = vec![0.0f64; n_items];
    let mut count = vec![0.0f64; n_items];
    for r in train {
        sum[r.item as usize] += r.rating as f64;
        count[r.item as usize] += 1.0;
    }
    const SHRINK: f64 = 5.0;
    let predict = |_: &[u32], items: &[u32]| -> Vec<f32> {
        items
            .iter()
            .map(|&i| ((sum[i as usize] + SHRINK * global) / (count[i as usize] + SHRINK)) as f32)
            .collect()
    };
    train::rating_errors(predict, test, (1.0, 5.0))
}

/// Popularity's HR@10 and NDCG@10 on the sampled cases, and its HR@10
/// against the whole catalogue.
fn popularity_ranking(
    train: &[Row],
    n_users: usize,
    n_items: usize,
    cases: &[RankingCase],
) -> (f64, f64, f64) {
    let mut count = vec![0.0f32; n_items];
    for r in train {
        count[r.item as usize] += 1.0;
    }
    let (hr, ndcg) = train::ranking_metrics(
        |_, items| items.iter().map(|&i| count[i as usize]).collect(),
        cases,
    );
    let interacted = data::interacted(train, n_users);
    let full = eval::full_catalogue_hit_rate(cases, &interacted, |_| count.clone());
    (hr, ndcg, full)
}

fn write_peer_inputs(dir: &Path, run: &Run) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut train = String::new();
    for r in &run.train_rows {
        writeln!(train, "{}\t{}", r.user, r.item)?;
    }
    std::fs::write(dir.join("train.tsv"), train)?;
    let mut cases = String::new();
    for c in &run.cases {
        write!(cases, "{}\t{}", c.user, c.positive)?;
        for n in &c.negatives {
            write!(cases, "\t{n}")?;
        }
        cases.push('\n');
    }
    std::fs::write(dir.join("cases.tsv"), cases)?;
    std::fs::write(
        dir.join("shape.json"),
        serde_json::json!({"users": run.dataset.n_users(), "items": run.dataset.n_items()})
            .to_string(),
    )?;
    Ok(())
}

struct ColdStart {
    users: usize,
    cases: usize,
    folded: (f64, f64),
    prior_only: (f64, f64),
    popularity: (f64, f64),
    genre_affinity: (f64, f64),
    /// The history-based NeuMF: the user vector is the 5 events encoded.
    history: (f64, f64),
    /// HR@10 against the whole catalogue (every item the user never
    /// interacted with): folded-in NeuMF, history NeuMF, popularity.
    full: [f64; 3],
}

/// The streaming path for cold users: their first `k` interactions become
/// `rate` events applied to a fresh [`UserState`] and folded into the model by
/// [`super::serve::NcfModel::fold_in_user`], exactly as the engine does.
fn cold_start(
    args: &EvalArgs,
    all: &[RawInteraction],
    catalog: &Catalog,
    k: usize,
) -> Result<ColdStart> {
    let mut rng = Rng::new(7);
    let mut users: Vec<&str> = all.iter().map(|r| r.user.as_str()).collect();
    users.sort_unstable();
    users.dedup();
    let cold: std::collections::BTreeSet<&str> = users
        .iter()
        .copied()
        .filter(|_| rng.unit() < 0.10)
        .collect();
    let warm: Vec<RawInteraction> = all
        .iter()
        .filter(|r| !cold.contains(r.user.as_str()))
        .cloned()
        .collect();
    let run = eval::run(RunInput {
        config: config(Objective::Implicit, args),
        train: &warm,
        test: None,
        data_name: "ml-100k warm users (cold-start protocol)".into(),
        out: args.work_dir.join("models/coldstart-implicit"),
        progress: !args.quiet,
    })?;
    let (history_model, _) = super::sequence::train_and_export(
        &super::sequence::SequenceConfig::default(),
        &warm,
        "ml-100k warm users (cold-start protocol)",
        &args.work_dir.join("models/coldstart-history"),
        !args.quiet,
    )?;
    // Both models index the warm users' items the same way (sorted movie ids).
    anyhow::ensure!(
        history_model.card.item_ids == run.model.card.item_ids,
        "the two cold-start models index different items"
    );
    let mut model = run.model;
    if let Some(config) = crate::cli::config_file(args.config.as_deref())? {
        model.fold_in = config.model.fold_in;
    }
    let model = &model;
    let engine = EngineConfig::default();
    let mut popularity = vec![0.0f32; run.dataset.n_items()];
    for r in &run.train_rows {
        popularity[r.item as usize] += 1.0;
    }
    let mut by_user: BTreeMap<&str, Vec<&RawInteraction>> = BTreeMap::new();
    for r in all.iter().filter(|r| cold.contains(r.user.as_str())) {
        by_user.entry(r.user.as_str()).or_default().push(r);
    }
    let n_items = model.card.item_ids.len();
    let (mut folded, mut prior_only, mut pop, mut genre) = (vec![], vec![], vec![], vec![]);
    let mut history = vec![];
    let mut full: [Vec<f64>; 3] = Default::default();
    let every_item: Vec<i64> = (0..n_items as i64).collect();
    let mut case_count = 0;
    let mut cold_users = 0;
    for (user, mut events) in by_user {
        events.sort_by_key(|r| (r.ts, r.movie_id));
        if events.len() <= k {
            continue;
        }
        cold_users += 1;
        let mut state = UserState::default();
        for (j, r) in events[..k].iter().enumerate() {
            let Some(movie) = catalog.get(r.movie_id) else {
                continue;
            };
            let event = Interaction {
                event_id: format!("{user}-{j}"),
                user_id: user.to_string(),
                movie_id: r.movie_id,
                kind: EventType::Rate,
                value: Some(r.rating as f64),
                ts: r.ts,
                context: None,
            };
            state.apply(&event, movie, &engine);
        }
        let prior = model.prior(user).to_vec();
        model.fold_in_user(user, &mut state);
        let interacted: Vec<u32> = {
            let mut v: Vec<u32> = events
                .iter()
                .filter_map(|r| model.item_index(r.movie_id))
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let history_vector = history_model.user_vector(user, &state).into_owned();
        let folded_all = model.score_user(&state.latent, &every_item)?;
        let history_all = history_model.score_user(&history_vector, &every_item)?;
        let full_scores: [&[f32]; 3] = [&folded_all, &history_all, &popularity];
        let weights = state.genre_weights_at(state.last_ts, &engine);
        let max_abs = weights
            .iter()
            .map(|g| g.weight.abs())
            .fold(0.0f32, f32::max) as f64;
        for r in &events[k..] {
            let Some(positive) = model.item_index(r.movie_id) else {
                continue;
            };
            let mut negatives = std::collections::BTreeSet::new();
            while negatives.len() < 99 {
                negatives.insert(data::sample_negative(&mut rng, n_items, &interacted));
            }
            let mut items: Vec<u32> = vec![positive];
            items.extend(data::shuffled(negatives.into_iter().collect(), &mut rng));
            let score_with = |vector: &[f32]| -> (f64, f64) {
                let users: Vec<f32> = items.iter().flat_map(|_| vector.iter().copied()).collect();
                let idx: Vec<i64> = items.iter().map(|&i| i as i64).collect();
                let s = model
                    .score_pairs(&users, &idx)
                    .expect("model scores its items");
                data::hit_and_ndcg(s[0], &s[1..], 10)
            };
            folded.push(score_with(&state.latent));
            prior_only.push(score_with(&prior));
            let idx: Vec<i64> = items.iter().map(|&i| i as i64).collect();
            let h = history_model.score_user(&history_vector, &idx)?;
            history.push(data::hit_and_ndcg(h[0], &h[1..], 10));
            for (hits, scores) in full.iter_mut().zip(full_scores) {
                hits.push(eval::full_catalogue_hit(scores, positive, &interacted));
            }
            let p: Vec<f32> = items.iter().map(|&i| popularity[i as usize]).collect();
            pop.push(data::hit_and_ndcg(p[0], &p[1..], 10));
            // Genre affinity, popularity breaking ties (as the engine's blend would).
            let g: Vec<f32> = items
                .iter()
                .map(|&i| {
                    let movie = catalog.get(model.card.item_ids[i as usize]);
                    let a = movie.map_or(0.0, |m| affinity(m.genres, &weights, max_abs));
                    a as f32 + 1e-6 * popularity[i as usize]
                })
                .collect();
            genre.push(data::hit_and_ndcg(g[0], &g[1..], 10));
            case_count += 1;
        }
    }
    let avg = |v: &[(f64, f64)]| {
        (
            mean(&v.iter().map(|x| x.0).collect::<Vec<_>>()),
            mean(&v.iter().map(|x| x.1).collect::<Vec<_>>()),
        )
    };
    Ok(ColdStart {
        users: cold_users,
        cases: case_count,
        folded: avg(&folded),
        prior_only: avg(&prior_only),
        popularity: avg(&pop),
        genre_affinity: avg(&genre),
        history: avg(&history),
        full: [mean(&full[0]), mean(&full[1]), mean(&full[2])],
    })
}

fn peer(peers: &Value, section: &str, algo: &str, split: &str, metric: &str) -> Option<f64> {
    peers
        .get(section)?
        .get(algo)?
        .get(split)?
        .get(metric)?
        .as_f64()
}

fn cell(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.4}"))
}

/// Table cells of `a / b` pairs (a metric pair per scorer), the first in
/// bold when it is ours: `**a / b** | c / d | …`.
fn pair_cells(values: &[Option<f64>], bold_first: bool) -> String {
    values
        .chunks(2)
        .enumerate()
        .map(|(i, pair)| {
            let text = pair
                .iter()
                .map(|v| cell(*v))
                .collect::<Vec<_>>()
                .join(" / ");
            if i == 0 && bold_first {
                format!("**{text}**")
            } else {
                text
            }
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

pub fn run(args: &EvalArgs) -> Result<()> {
    let ml100k = args.data_dir.join("ml-100k");
    let small = args.data_dir.join("ml-latest-small");
    std::fs::create_dir_all(&args.work_dir)?;
    let started = std::time::Instant::now();

    // Explicit: u1–u5.
    let mut explicit_runs = Vec::new();
    let mut folds_spec = Vec::new();
    let folds: &[u8] = if args.protocols.contains(&Protocol::Explicit) {
        &args.folds
    } else {
        &[]
    };
    for k in folds {
        let base = ml100k.join(format!("u{k}.base"));
        let test = ml100k.join(format!("u{k}.test"));
        let (train_raw, test_raw) = (load(&base)?, load(&test)?);
        let run = eval::run(RunInput {
            config: config(Objective::Explicit, args),
            train: &train_raw,
            test: Some(&test_raw),
            data_name: format!("ml-100k u{k}.base"),
            out: args.work_dir.join(format!("models/ml100k-u{k}-explicit")),
            progress: !args.quiet,
        })?;
        // The baseline sees all of uN.base, as the model's training + validation did.
        let (dataset, parts) = Dataset::index(&[&train_raw, &test_raw]);
        let baseline = item_mean_errors(&parts[0], &parts[1], dataset.n_items());
        eprintln!("u{k}: NCF {:?}, item mean {baseline:?}", run.report.test);
        folds_spec.push(serde_json::json!({
            "name": format!("u{k}"),
            "train": std::fs::canonicalize(&base)?,
            "test": std::fs::canonicalize(&test)?,
        }));
        explicit_runs.push((format!("u{k}"), run.report, baseline));
    }
    if !folds_spec.is_empty() {
        std::fs::write(
            args.work_dir.join("explicit.json"),
            serde_json::json!({ "folds": folds_spec }).to_string(),
        )?;
    }

    // Implicit: leave-one-out with 99 negatives.
    let mut implicit_runs = Vec::new();
    // ML-100K's interactions also feed the cold-start protocol below.
    let ml100k_all = load(&ml100k.join("u.data"))?;
    // ml-latest-small is read only when the implicit protocol runs.
    let small_all = if args.protocols.contains(&Protocol::Implicit) {
        Some(load(&small.join("ratings.csv"))?)
    } else {
        None
    };
    let implicit_data: Vec<(&str, &[RawInteraction])> = match &small_all {
        Some(small_all) => vec![("ml-100k", &ml100k_all), ("ml-latest-small", small_all)],
        None => Vec::new(),
    };
    for (name, raw) in implicit_data {
        let run = eval::run(RunInput {
            config: config(Objective::Implicit, args),
            train: raw,
            test: None,
            data_name: name.into(),
            out: args.work_dir.join(format!("models/{name}-implicit")),
            progress: !args.quiet,
        })?;
        let baseline = popularity_ranking(
            &run.train_rows,
            run.dataset.n_users(),
            run.dataset.n_items(),
            &run.cases,
        );
        eprintln!("{name}: NCF {:?}, popularity {baseline:?}", run.report.test);
        write_peer_inputs(&args.work_dir.join("implicit").join(name), &run)?;
        implicit_runs.push((name, run.report.clone(), baseline, run.cases.len()));
    }

    // Cold start.
    let cold = if args.protocols.contains(&Protocol::ColdStart) {
        let catalog = catalog::load(&ml100k.join("u.item"))?;
        Some(cold_start(args, &ml100k_all, &catalog, 5)?)
    } else {
        None
    };

    // Peers, on the files written above.
    let peers: Value = if args.no_peers {
        Value::Null
    } else {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("eval/peers.py");
        let mut cmd = std::process::Command::new(crate::replay::command::peer_python("venv-peers"));
        cmd.arg(&script).arg("--work").arg(&args.work_dir);
        if args.svdpp {
            cmd.arg("--svdpp");
        }
        let status = cmd.status().context("running eval/peers.py")?;
        anyhow::ensure!(
            status.success(),
            "eval/peers.py failed ({status}); install the peers with `eval/setup_peers.sh`"
        );
        serde_json::from_slice(&std::fs::read(args.work_dir.join("peers.json"))?)?
    };

    let table = render(
        args,
        &explicit_runs,
        &implicit_runs,
        cold.as_ref(),
        &peers,
        started.elapsed().as_secs_f64(),
    );
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, &table)?;
    println!("{table}");
    Ok(())
}

/// One leave-one-out run: data name, report, popularity's (HR@10,
/// NDCG@10, whole-catalogue HR@10), users.
type ImplicitRun<'a> = (&'a str, eval::RunReport, (f64, f64, f64), usize);

fn render(
    args: &EvalArgs,
    explicit: &[(String, eval::RunReport, (f64, f64))],
    implicit: &[ImplicitRun],
    cold: Option<&ColdStart>,
    peers: &Value,
    seconds: f64,
) -> String {
    let mut s = String::new();
    let metric = |r: &eval::RunReport, m: &str| r.test.get(m).and_then(Value::as_f64);
    let _ = writeln!(s, "# NCF evaluation\n");
    let _ = writeln!(
        s,
        "Reproduce: `cargo run --release -- eval --data-dir {}` ({}; this run took {:.0} s on a 2-core machine). \
         Our numbers are computed by tract on the exported ONNX model, not by the trainer.\n",
        args.data_dir.display(),
        if args.no_peers { "without peers" } else { "peers from eval/peers.py on the same split files" },
        seconds
    );
    if !explicit.is_empty() {
        let _ = writeln!(
            s,
            "## Explicit: ML-100K canonical splits (RMSE / MAE, lower is better)\n"
        );
        let _ = writeln!(
            s,
            "| split | NeuMF (ours) | item mean (baseline) | Surprise SVD | Surprise SVD++ |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|");
        let mut cols: [Vec<f64>; 8] = Default::default();
        for (name, r, base) in explicit {
            let values = [
                metric(r, "rmse"),
                metric(r, "mae"),
                Some(base.0),
                Some(base.1),
                peer(peers, "explicit", "surprise_svd", name, "rmse"),
                peer(peers, "explicit", "surprise_svd", name, "mae"),
                peer(peers, "explicit", "surprise_svdpp", name, "rmse"),
                peer(peers, "explicit", "surprise_svdpp", name, "mae"),
            ];
            for (c, v) in cols.iter_mut().zip(values) {
                if let Some(v) = v {
                    c.push(v);
                }
            }
            let _ = writeln!(s, "| {name} | {} |", pair_cells(&values, false));
        }
        let means: Vec<Option<f64>> = cols
            .iter()
            .map(|c| (c.len() == explicit.len()).then(|| mean(c)))
            .collect();
        let _ = writeln!(s, "| **mean** | {} |\n", pair_cells(&means, true));
        let _ = writeln!(
            s,
            "Published (ANCHORS.md): Surprise SVD 0.934 / 0.737 and SVD++ 0.919 / 0.721 (random 5-fold); \
             GLocal-K RMSE 0.8889 on u1. Target: mean RMSE ≤ 0.89.\n"
        );
    }
    if !implicit.is_empty() {
        let _ = writeln!(
            s,
            "## Implicit: leave-one-out, 99 sampled negatives (HR@10 / NDCG@10, higher is better)\n"
        );
        let _ = writeln!(
            s,
            "| data | users | NeuMF (ours) | popularity | implicit ALS | implicit BPR |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|");
        for (name, r, base, users) in implicit {
            let p = |algo: &str, m: &str| peer(peers, "implicit", algo, name, m);
            let values = [
                metric(r, "hr@10"),
                metric(r, "ndcg@10"),
                Some(base.0),
                Some(base.1),
                p("implicit_als", "hr@10"),
                p("implicit_als", "ndcg@10"),
                p("implicit_bpr", "hr@10"),
                p("implicit_bpr", "ndcg@10"),
            ];
            let _ = writeln!(s, "| {name} | {users} | {} |", pair_cells(&values, true));
        }
        let _ = writeln!(
            s,
            "\nTies count against the held-out item. Negatives are distinct items the user never interacted with.\n"
        );
        // Sampled metrics can reverse orderings (Krichene & Rendle 2020).
        let _ = writeln!(
            s,
            "The same held-out items ranked against the **whole catalogue** (every item the user never interacted with), HR@10:\n"
        );
        let _ = writeln!(
            s,
            "| data | NeuMF (ours) | popularity | implicit ALS | implicit BPR |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|");
        for (name, r, base, _) in implicit {
            let p = |algo: &str| peer(peers, "implicit", algo, name, "hr@10_full_catalogue");
            let cells = [
                metric(r, "hr@10_full_catalogue"),
                Some(base.2),
                p("implicit_als"),
                p("implicit_bpr"),
            ];
            let best = cells.iter().flatten().copied().fold(f64::MIN, f64::max);
            let row: Vec<String> = cells
                .iter()
                .map(|c| match c {
                    Some(v) if *v == best => format!("**{v:.4}**"),
                    Some(v) => format!("{v:.4}"),
                    None => "–".into(),
                })
                .collect();
            let _ = writeln!(s, "| {name} | {} |", row.join(" | "));
        }
        let _ = writeln!(s);
    }
    if let Some(cold) = cold {
        let _ = writeln!(s, "## Cold start: ML-100K, 10 % of users never trained on, folded in from their first 5 interactions\n");
        let _ = writeln!(
            s,
            "{} cold users, {} ranking cases (each later interaction against 99 unseen items).\n",
            cold.users, cold.cases
        );
        let _ = writeln!(
            s,
            "| scorer | HR@10 (99 sampled) | NDCG@10 (99 sampled) | HR@10 (whole catalogue) |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|");
        for (name, (hr, ndcg), full) in [
            (
                "history NeuMF, user vector encoded from the 5 events (ours)",
                cold.history,
                Some(cold.full[1]),
            ),
            (
                "NeuMF, user vector folded in (ours)",
                cold.folded,
                Some(cold.full[0]),
            ),
            (
                "NeuMF, new-user prior only (no fold-in)",
                cold.prior_only,
                None,
            ),
            ("popularity", cold.popularity, Some(cold.full[2])),
            (
                "genre affinity (engine state from the 5 events)",
                cold.genre_affinity,
                None,
            ),
        ] {
            let full = full.map_or("–".to_string(), |f| format!("{f:.4}"));
            let _ = writeln!(s, "| {name} | {hr:.4} | {ndcg:.4} | {full} |");
        }
        let _ = writeln!(
            s,
            "\nWhole catalogue: the held-out item's rank among every item the user never interacted with (ties count against it); sampled metrics can order scorers differently (Krichene & Rendle 2020).\n"
        );
    }
    let _ = writeln!(s, "\n## Training runs\n");
    let _ = writeln!(
        s,
        "| run | best epoch / epochs | train seconds | samples/s |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|");
    for r in explicit
        .iter()
        .map(|e| &e.1)
        .chain(implicit.iter().map(|i| &i.1))
    {
        let _ = writeln!(
            s,
            "| {} ({}) | {} / {} | {:.1} | {:.0} |",
            r.training_data,
            r.config.objective.as_str(),
            r.best_epoch,
            r.epochs.len(),
            r.train_seconds,
            r.samples_per_second
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_cells_write_the_tables_row_format() {
        let values = [Some(0.5), None, Some(1.0), Some(0.25)];
        assert_eq!(
            pair_cells(&values, true),
            "**0.5000 / –** | 1.0000 / 0.2500"
        );
        assert_eq!(pair_cells(&values, false), "0.5000 / – | 1.0000 / 0.2500");
    }
}
