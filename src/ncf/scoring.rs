//! `recstream bench-scoring`: tract's scoring time on random NeuMF models of
//! MovieLens sizes, on the model's own graph (one user vector per pair) and on
//! the serving form the engine runs (one user against its candidates, planned
//! for the next batch-size bucket). The
//! models are written to `--out`, so `benches/ort_scoring.py` times ONNX
//! Runtime on the very same files (`benches/scoring.sh` runs both).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use clap::Args;

use super::model::{Dense, NcfWeights, Objective};
use super::onnx;
use super::serve::{compile, Serving};
use crate::rng::Rng;

#[derive(Debug, Args)]
pub struct ScoringArgs {
    /// Item counts of the random models (ML-1M has 3,706 rated items, ML-20M 26,744).
    #[arg(long, value_delimiter = ',', default_values_t = [3706usize, 26744])]
    pub items: Vec<usize>,
    /// Batch sizes (pairs per run).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 100, 500])]
    pub batch: Vec<usize>,
    /// Where the models are written (`neumf-<items>.onnx`).
    #[arg(long)]
    pub out: PathBuf,
    /// Measuring time per (model, batch, graph).
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
}

/// The default implicit architecture (GMF 16, MLP 32, tower 64-32-16) with
/// random weights.
pub fn random_model(n_items: usize, seed: u64) -> NcfWeights {
    let mut rng = Rng::new(seed);
    let mut r =
        |n: usize| -> Vec<f32> { (0..n).map(|_| (rng.unit() as f32 - 0.5) * 0.2).collect() };
    let (g, m) = (16, 32);
    let widths = [2 * m, 64, 32, 16];
    let layers = widths
        .windows(2)
        .map(|w| Dense {
            inp: w[0],
            out: w[1],
            w: r(w[0] * w[1]),
            b: r(w[1]),
            residual: false,
        })
        .collect();
    NcfWeights {
        objective: Objective::Implicit,
        gmf_dim: g,
        mlp_dim: m,
        n_items,
        item_gmf: r(n_items * g),
        item_mlp: r(n_items * m),
        item_bias: r(n_items),
        layers,
        out_w: r(g + 16),
        out_b: 0.0,
        global_mean: 0.0,
    }
}

/// Mean time of one call over about `seconds`, after a warm-up.
fn time_per_call(seconds: f64, mut call: impl FnMut()) -> Duration {
    for _ in 0..20 {
        call();
    }
    let budget = Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut calls = 0u32;
    while started.elapsed() < budget {
        call();
        calls += 1;
    }
    started.elapsed() / calls
}

pub fn run(args: &ScoringArgs) -> Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    for &n_items in &args.items {
        let weights = random_model(n_items, 7);
        let path = args.out.join(format!("neumf-{n_items}.onnx"));
        let bytes = onnx::export(&weights, "bench");
        std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
        let contract = compile(&bytes)?;
        let serving = Serving::build(&weights)?.expect("not residual");
        let d = weights.user_dim();
        let mut rng = Rng::new(11);
        for &batch in &args.batch {
            let users: Vec<f32> = (0..batch * d).map(|_| rng.unit() as f32 - 0.5).collect();
            let items: Vec<i64> = (0..batch)
                .map(|_| (rng.next_u64() % n_items as u64) as i64)
                .collect();
            let pairs = time_per_call(args.seconds, || {
                super::serve::run_plan(&contract, &users, batch, &items).expect("scores");
            });
            // What the engine runs: the plan for the next batch-size bucket.
            let one_user = time_per_call(args.seconds, || {
                serving.score(&users[..d], &items).expect("scores");
            });
            for (graph, t) in [("tract", pairs), ("tract-serving", one_user)] {
                println!(
                    "{}",
                    serde_json::json!({
                        "model": path.file_name().unwrap().to_string_lossy(),
                        "items": n_items, "batch": batch, "engine": graph,
                        "us_per_run": t.as_secs_f64() * 1e6,
                    })
                );
            }
        }
    }
    Ok(())
}
