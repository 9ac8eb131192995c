//! Training the history-based NeuMF for the stream: causal next-item
//! prediction in event-time order. Every position of a user's sequence is an
//! example: the user vector is encoded from the interactions before it
//! ([`HistoryEncoder`]) and the model is asked for the item that came next,
//! with a softmax over the whole catalogue (or, for large catalogues, over
//! the batch's targets plus uniformly sampled items). Published work finds
//! this far stronger for next-item prediction than log loss on a few sampled
//! negatives (Klenitskiy & Vasilev 2023).
//!
//! The user side is never trained per user, so the model serves users it
//! never saw from their first event, and each event changes the next list
//! with no gradient step.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use serde::{Deserialize, Serialize};

use super::card::{HistorySpec, ModelCard, ModelFiles, ParityCheck, UserVectorLayout, CARD_FORMAT};
use super::data::{self, Dataset, RawInteraction, Row};
use super::eval::{self, EvalError};
use super::foldin::FoldInConfig;
use super::history::{kind_of_rating, HistoryEncoder, HISTORY_KINDS};
use super::model::{Dense, NcfWeights, Objective};
use super::serve::NcfModel;
use super::train::{gaussian, EpochReport, TrainError};
use super::{onnx, plot};
use crate::fnv::Fnv;
use crate::rng::Rng;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SequenceConfig {
    pub gmf_dim: usize,
    pub mlp_dim: usize,
    /// Hidden layer widths of the MLP tower (at least one).
    pub hidden: Vec<usize>,
    /// `L`: the most recent interactions the user vector is computed from.
    pub max_len: usize,
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    /// Decoupled weight decay (AdamW).
    pub weight_decay: f64,
    pub patience: usize,
    pub seed: u64,
    pub init_std: f32,
    /// Catalogues up to this many items train with a full softmax.
    pub full_softmax_items: usize,
    /// Otherwise: this many uniformly drawn items per batch, besides the
    /// batch's own targets, form the softmax.
    pub sampled_items: usize,
    /// `implicit`: which item comes next (softmax); `explicit`: the rating
    /// the next item gets (squared error, the rating head), from the same
    /// history. Left out of the JSON when implicit, so that the replay's
    /// cached next-item models (named by this JSON) stay valid.
    #[serde(skip_serializing_if = "is_implicit")]
    pub objective: Objective,
}

fn is_implicit(o: &Objective) -> bool {
    *o == Objective::Implicit
}

impl Default for SequenceConfig {
    fn default() -> Self {
        SequenceConfig {
            gmf_dim: 32,
            mlp_dim: 32,
            // One narrow layer: the tower runs for every (example, softmax
            // item) pair, the bulk of training time.
            hidden: vec![16],
            max_len: 30,
            epochs: 30,
            batch_size: 256,
            learning_rate: 0.003,
            weight_decay: 0.0,
            patience: 3,
            seed: 42,
            init_std: 0.05,
            // A full softmax over ML-100K's 1,682 items costs 2.7× the
            // sampled one per epoch on 2 cores for the same validation HR
            // after an epoch (0.112 vs 0.116); see models/README.md.
            full_softmax_items: 0,
            sampled_items: 512,
            objective: Objective::Implicit,
        }
    }
}

impl SequenceConfig {
    /// The rating head's defaults: a squared error on ~100k ratings
    /// overfits the next-item model's widths within two epochs (ML-100K:
    /// train 0.46, validation RMSE 1.18 by epoch 5), so it is narrower,
    /// slower and decayed (best validation RMSE 1.077 at epoch 7). `L`
    /// stays the engine's `lists.recent_items`.
    pub fn rating_head() -> SequenceConfig {
        SequenceConfig {
            gmf_dim: 8,
            mlp_dim: 8,
            hidden: vec![8],
            learning_rate: 0.001,
            weight_decay: 0.1,
            objective: Objective::Explicit,
            ..SequenceConfig::default()
        }
    }

    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |field: &'static str, detail: &str| {
            Err(TrainError::Config {
                field,
                detail: detail.into(),
            })
        };
        if self.gmf_dim + self.mlp_dim == 0 {
            return bad("gmf_dim", "gmf_dim and mlp_dim cannot both be 0");
        }
        if self.hidden.is_empty() || self.hidden.contains(&0) {
            return bad("hidden", "needs at least one layer, none of width 0");
        }
        if !(1..=1000).contains(&self.max_len) {
            return bad("max_len", "must be in 1..=1000");
        }
        if self.epochs == 0 || self.batch_size == 0 {
            return bad("epochs", "epochs and batch_size must be positive");
        }
        if self.learning_rate.is_nan() || self.learning_rate <= 0.0 {
            return bad("learning_rate", "must be positive");
        }
        Ok(())
    }
}

/// Each user's interactions in event-time order (ties by item, as the replay
/// orders them), as `(item, kind)`.
pub fn sequences(rows: &[Row], n_users: usize) -> Vec<Vec<(u32, u8)>> {
    rated_sequences(rows, n_users)
        .into_iter()
        .map(|s| s.into_iter().map(|(i, k, _)| (i, k)).collect())
        .collect()
}

/// [`sequences`] with each interaction's rating (0 without one).
fn rated_sequences(rows: &[Row], n_users: usize) -> Vec<Vec<(u32, u8, f32)>> {
    let mut by_user: Vec<Vec<(i64, u32, f32)>> = vec![Vec::new(); n_users];
    for r in rows {
        by_user[r.user as usize].push((r.ts, r.item, r.rating));
    }
    by_user
        .into_iter()
        .map(|mut s| {
            s.sort_unstable_by_key(|&(ts, item, _)| (ts, item));
            s.into_iter()
                .map(|(_, i, r)| (i, kind_of_row(r), r))
                .collect()
        })
        .collect()
}

/// The kind of a training row: its rating's, or for a row without a rating
/// (an interaction dump keeps the positive events, rating 0) a mild interest.
fn kind_of_row(rating: f32) -> u8 {
    if rating > 0.0 {
        kind_of_rating(rating)
    } else {
        INTEREST_KIND
    }
}

/// Kind 4 (see [`super::history::kind_of_weight`]): a click, a play.
const INTEREST_KIND: u8 = 4;

/// The history the engine holds before `sequence[pos]`: most recent first,
/// one entry per item (its latest kind), at most `max_len`.
pub fn history_before(sequence: &[(u32, u8)], pos: usize, max_len: usize) -> Vec<(u32, u8)> {
    let mut out: Vec<(u32, u8)> = Vec::with_capacity(max_len);
    for &(item, kind) in sequence[..pos].iter().rev() {
        if out.len() == max_len {
            break;
        }
        if !out.iter().any(|&(i, _)| i == item) {
            out.push((item, kind));
        }
    }
    out
}

/// What a history model's training run measured; `NAME.report.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SequenceReport {
    pub model_version: String,
    pub architecture: &'static str,
    pub config: SequenceConfig,
    pub training_data: String,
    pub training_data_hash: String,
    pub users: usize,
    pub items: usize,
    pub train_interactions: usize,
    pub best_epoch: usize,
    pub epochs: Vec<EpochReport>,
    pub train_seconds: f64,
    /// On each user's last interaction, the best epoch's: HR@10 over the
    /// whole catalogue (next item), or RMSE (the rating head).
    pub validation: f64,
    pub validation_metric: &'static str,
    pub files: Vec<String>,
}

/// Names of the history kinds, for the card.
pub fn kind_names() -> Vec<String> {
    [
        "padding",
        "strong dislike (weight <= -2: 1 star, dislike)",
        "dislike (-2 < weight <= -0.75: 2 stars, skip)",
        "neutral (-0.75 < weight < 0.25: 3 stars, view)",
        "interest (0.25 <= weight < 1.25: 4 stars, click, play)",
        "strong interest (1.25 <= weight < 2.5: 5 stars, complete, watchlist)",
        "like (weight >= 2.5)",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Trains a history model on `train`, writes `out.{onnx,card.json,users.f32,
/// report.json,curve.png}` and loads it back through tract (which checks the
/// card's reference scores against both the graph and the serving form).
pub fn train_and_export(
    config: &SequenceConfig,
    train: &[RawInteraction],
    data_name: &str,
    out: &Path,
    progress: bool,
) -> Result<(NcfModel, SequenceReport), EvalError> {
    let (dataset, mut parts) = Dataset::index(&[train]);
    let rows = parts.remove(0);
    let started = Instant::now();
    let trained = train_sequence(
        config,
        dataset.n_users(),
        dataset.n_items(),
        &rows,
        progress,
    )?;
    let train_seconds = started.elapsed().as_secs_f64();
    let (w, encoder) = (&trained.weights, &trained.encoder);
    let hash = eval::data_hash(&rows, &dataset);
    let mut version_hash = Fnv::default();
    version_hash.write(serde_json::to_string(config).unwrap_or_default().as_bytes());
    version_hash.write(hash.as_bytes());
    let model_version = format!("ncf-history-{}", &version_hash.hex()[..10]);
    let files = ModelFiles::new(out);
    eval::write(
        &files.onnx,
        &onnx::export_with_history(w, encoder, &model_version),
    )?;
    // No per-user part: every user is their history.
    eval::write(&files.users, &[])?;
    let (inputs, outputs) = ModelCard::history_io_specs(w.user_dim(), encoder.max_len);
    let sequences = sequences(&rows, dataset.n_users());
    let validation = trained.epochs[trained.best_epoch - 1].validation;
    let explicit = config.objective == Objective::Explicit;
    let validation_metric = match explicit {
        true => "validation_rmse",
        false => "validation_hr@10_full_catalogue",
    };
    let mut metrics = serde_json::Map::new();
    metrics.insert(validation_metric.into(), validation.into());
    let rated = || rows.iter().map(|r| r.rating).filter(|r| *r > 0.0);
    let rating_scale = explicit.then(|| {
        [
            rated().fold(f32::INFINITY, f32::min),
            rated().fold(f32::NEG_INFINITY, f32::max),
        ]
    });
    let card = ModelCard {
        format: CARD_FORMAT.into(),
        model_version: model_version.clone(),
        objective: config.objective,
        inputs,
        outputs,
        user_vector: UserVectorLayout::of(w),
        item_ids: dataset.item_ids.clone(),
        user_ids: Vec::new(),
        rating_scale,
        training: serde_json::json!({ "architecture": "history-neumf", "config": config }),
        training_data_hash: hash.clone(),
        training_data: data_name.to_string(),
        metrics,
        checks: parity_checks(w, encoder, &sequences),
        new_user_prior: None,
        history: Some(HistorySpec {
            max_len: encoder.max_len,
            kinds: kind_names(),
        }),
    };
    eval::write(
        &files.card,
        &serde_json::to_vec_pretty(&card).unwrap_or_default(),
    )?;
    let model = NcfModel::load(&files.onnx, FoldInConfig::default())?;
    let curve = out.with_extension("curve.png");
    let report_path = out.with_extension("report.json");
    if let Err(e) = plot::training_curve(
        &curve,
        &format!("History NeuMF on {data_name}"),
        match explicit {
            true => "validation RMSE",
            false => "validation HR@10 (full catalogue)",
        },
        &trained.epochs,
        trained.best_epoch,
    ) {
        tracing::warn!("training curve not drawn: {e}");
    }
    let report = SequenceReport {
        model_version,
        architecture: "history-neumf",
        config: config.clone(),
        training_data: data_name.to_string(),
        training_data_hash: hash,
        users: dataset.n_users(),
        items: dataset.n_items(),
        train_interactions: rows.len(),
        best_epoch: trained.best_epoch,
        epochs: trained.epochs,
        train_seconds,
        validation,
        validation_metric,
        files: [&files.onnx, &files.card, &files.users, &curve, &report_path]
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
    };
    eval::write(
        &report_path,
        &serde_json::to_vec_pretty(&report).unwrap_or_default(),
    )?;
    Ok((model, report))
}

/// 16 reference scores: histories taken from training sequences (the
/// empty one included) against items spread over the catalogue.
fn parity_checks(
    w: &NcfWeights,
    encoder: &HistoryEncoder,
    sequences: &[Vec<(u32, u8)>],
) -> Vec<ParityCheck> {
    let with_events: Vec<&Vec<(u32, u8)>> = sequences.iter().filter(|s| !s.is_empty()).collect();
    (0..16usize)
        .map(|k| {
            let history = match with_events.get(k * with_events.len() / 16) {
                Some(seq) if k > 0 => {
                    history_before(seq, seq.len() * (k % 4 + 1) / 4, encoder.max_len)
                }
                _ => Vec::new(),
            };
            let item = ((k * 7919 + 13) % w.n_items) as u32;
            ParityCheck {
                user_row: 0,
                item,
                score: w.score(&encoder.user_vector(&history), item as usize),
                history: Some(history),
            }
        })
        .collect()
}

pub struct SequenceTrained {
    pub weights: NcfWeights,
    pub encoder: HistoryEncoder,
    pub epochs: Vec<EpochReport>,
    pub best_epoch: usize,
}

/// One training or validation example: a history and the item that followed.
struct Example {
    history: Vec<(u32, u8)>,
    target: u32,
    /// The target's rating (0 without one; the rating head trains on rated ones).
    rating: f32,
    /// Every item the user had interacted with before (excluded when ranking).
    seen: Vec<u32>,
}

struct Params {
    table: Var,
    base: Var,
    position: Var,
    kind: Var,
    item_gmf: Var,
    item_mlp: Var,
    item_bias: Var,
    layers: Vec<(Var, Var)>,
    out_w: Var,
    out_b: Var,
}

fn var(data: Vec<f32>, shape: &[usize], device: &Device) -> candle_core::Result<Var> {
    Var::from_tensor(&Tensor::from_vec(data, shape, device)?)
}

fn values(v: &Var) -> candle_core::Result<Vec<f32>> {
    v.as_tensor().flatten_all()?.to_vec1()
}

impl Params {
    fn new(
        c: &SequenceConfig,
        n_items: usize,
        rng: &mut Rng,
        dev: &Device,
    ) -> candle_core::Result<Params> {
        let (g, m, s) = (c.gmf_dim, c.mlp_dim, c.init_std);
        let dim = g + m + 1;
        let mut layers = Vec::new();
        let mut width = 2 * m;
        for &out in &c.hidden {
            let std = (2.0 / width.max(1) as f32).sqrt();
            layers.push((
                var(gaussian(rng, width * out, std), &[width, out], dev)?,
                var(vec![0.0; out], &[1, out], dev)?,
            ));
            width = out;
        }
        let out_in = g + width;
        Ok(Params {
            table: var(gaussian(rng, n_items * dim, s), &[n_items, dim], dev)?,
            base: var(vec![0.0; dim], &[1, dim], dev)?,
            position: var(vec![1.0; c.max_len], &[1, c.max_len], dev)?,
            kind: var(vec![1.0; HISTORY_KINDS], &[HISTORY_KINDS], dev)?,
            item_gmf: var(gaussian(rng, n_items * g, s), &[n_items, g], dev)?,
            item_mlp: var(gaussian(rng, n_items * m, s), &[n_items, m], dev)?,
            item_bias: var(vec![0.0; n_items], &[n_items, 1], dev)?,
            layers,
            out_w: var(
                gaussian(rng, out_in, (1.0 / out_in as f32).sqrt()),
                &[out_in, 1],
                dev,
            )?,
            out_b: var(vec![0.0], &[1, 1], dev)?,
        })
    }

    fn vars(&self) -> Vec<Var> {
        let mut v = vec![
            self.table.clone(),
            self.base.clone(),
            self.position.clone(),
            self.kind.clone(),
            self.item_gmf.clone(),
            self.item_mlp.clone(),
            self.item_bias.clone(),
            self.out_w.clone(),
            self.out_b.clone(),
        ];
        for (w, b) in &self.layers {
            v.push(w.clone());
            v.push(b.clone());
        }
        v
    }

    /// The user vectors `[B, G + M + 1]` of a batch of histories.
    fn users(
        &self,
        c: &SequenceConfig,
        batch: &[&Example],
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let (b, l) = (batch.len(), c.max_len);
        let mut items = vec![0u32; b * l];
        let mut kinds = vec![0u32; b * l];
        let mut norm = vec![0.0f32; b * l];
        for (row, ex) in batch.iter().enumerate() {
            let n = ex.history.len().min(l);
            let w = 1.0 / (n.max(1) as f32).sqrt();
            for (k, &(item, kind)) in ex.history.iter().take(l).enumerate() {
                items[row * l + k] = item;
                kinds[row * l + k] = kind as u32;
                norm[row * l + k] = if kind == 0 { 0.0 } else { w };
            }
        }
        let dim = self.base.as_tensor().dims2()?.1;
        let rows = self
            .table
            .index_select(&Tensor::from_vec(items, b * l, dev)?, 0)?
            .reshape((b, l, dim))?;
        let kind_w = self
            .kind
            .index_select(&Tensor::from_vec(kinds, b * l, dev)?, 0)?
            .reshape((b, l))?;
        let w = kind_w
            .broadcast_mul(self.position.as_tensor())?
            .mul(&Tensor::from_vec(norm, (b, l), dev)?)?;
        rows.broadcast_mul(&w.unsqueeze(2)?)?
            .sum(1)?
            .broadcast_add(self.base.as_tensor())
    }

    /// Logits `[B, C]` of a batch against candidate items (all items when
    /// `candidates` is `None`).
    fn logits(
        &self,
        c: &SequenceConfig,
        batch: &[&Example],
        candidates: Option<&Tensor>,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let (g, m) = (c.gmf_dim, c.mlp_dim);
        let user = self.users(c, batch, dev)?;
        let pick = |v: &Var| match candidates {
            Some(idx) => v.index_select(idx, 0),
            None => Ok(v.as_tensor().clone()),
        };
        let (eg, em, eb) = (
            pick(&self.item_gmf)?,
            pick(&self.item_mlp)?,
            pick(&self.item_bias)?,
        );
        let n_cand = eb.dims2()?.0;
        let b = batch.len();
        let out_w = self.out_w.as_tensor();
        let mut logits = user
            .narrow(1, g + m, 1)?
            .broadcast_add(&eb.t()?)?
            .broadcast_add(self.out_b.as_tensor())?;
        if g > 0 {
            let ug = user
                .narrow(1, 0, g)?
                .broadcast_mul(&out_w.narrow(0, 0, g)?.t()?)?;
            logits = (logits + ug.matmul(&eg.t()?.contiguous()?)?)?;
        }
        let (w1, b1) = &self.layers[0];
        let w1 = w1.as_tensor();
        let user_half = user.narrow(1, g, m)?.matmul(&w1.narrow(0, 0, m)?)?;
        let item_half = em
            .matmul(&w1.narrow(0, m, m)?)?
            .broadcast_add(b1.as_tensor())?;
        let h1 = item_half.dims2()?.1;
        let mut x = user_half
            .unsqueeze(1)?
            .broadcast_add(&item_half.unsqueeze(0)?)?
            .relu()?
            .reshape((b * n_cand, h1))?;
        for (w, bias) in &self.layers[1..] {
            x = x
                .matmul(w.as_tensor())?
                .broadcast_add(bias.as_tensor())?
                .relu()?;
        }
        let last = x.dims2()?.1;
        let mlp = x.matmul(&out_w.narrow(0, g, last)?)?.reshape((b, n_cand))?;
        logits + mlp
    }

    fn export(
        &self,
        c: &SequenceConfig,
        global_mean: f32,
    ) -> candle_core::Result<(NcfWeights, HistoryEncoder)> {
        let mut layers = Vec::new();
        let mut width = 2 * c.mlp_dim;
        for (w, b) in &self.layers {
            let out = b.as_tensor().dims2()?.1;
            layers.push(Dense {
                inp: width,
                out,
                w: values(w)?,
                b: values(b)?,
                residual: false,
            });
            width = out;
        }
        let item_bias = values(&self.item_bias)?;
        let weights = NcfWeights {
            objective: c.objective,
            gmf_dim: c.gmf_dim,
            mlp_dim: c.mlp_dim,
            n_items: item_bias.len(),
            item_gmf: values(&self.item_gmf)?,
            item_mlp: values(&self.item_mlp)?,
            item_bias,
            layers,
            out_w: values(&self.out_w)?,
            out_b: values(&self.out_b)?[0],
            global_mean,
        };
        let mut kind_weight = values(&self.kind)?;
        kind_weight[0] = 0.0;
        let encoder = HistoryEncoder {
            max_len: c.max_len,
            position_weight: values(&self.position)?,
            kind_weight,
            table: values(&self.table)?,
            base: values(&self.base)?,
        };
        Ok((weights, encoder))
    }
}

/// Training examples (every position but each user's last) and validation
/// examples (each user's last interaction, for users with at least two).
fn examples(rated: &[Vec<(u32, u8, f32)>], max_len: usize) -> (Vec<Example>, Vec<Example>) {
    let (mut train, mut validation) = (Vec::new(), Vec::new());
    for rated_seq in rated {
        let seq: Vec<(u32, u8)> = rated_seq.iter().map(|&(i, k, _)| (i, k)).collect();
        for pos in 0..seq.len() {
            let ex = Example {
                history: history_before(&seq, pos, max_len),
                target: seq[pos].0,
                rating: rated_seq[pos].2,
                seen: Vec::new(),
            };
            if pos + 1 == seq.len() && seq.len() >= 2 {
                let mut seen: Vec<u32> = seq[..pos].iter().map(|e| e.0).collect();
                seen.sort_unstable();
                seen.dedup();
                validation.push(Example { seen, ..ex });
            } else {
                train.push(ex);
            }
        }
    }
    (train, validation)
}

/// HR@10 over the whole catalogue, items seen before excluded, and the
/// mean log-sum-exp of the cases' logits (the calibration shift).
fn hit_rate(
    p: &Params,
    c: &SequenceConfig,
    cases: &[Example],
    dev: &Device,
) -> candle_core::Result<(f64, f64)> {
    if cases.is_empty() {
        return Ok((f64::NAN, 0.0));
    }
    let mut hits = 0usize;
    let mut lse_sum = 0.0f64;
    for chunk in cases.chunks(64) {
        let batch: Vec<&Example> = chunk.iter().collect();
        let logits = p.logits(c, &batch, None, dev)?.to_vec2::<f32>()?;
        for (ex, row) in chunk.iter().zip(logits) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            lse_sum += max
                + row
                    .iter()
                    .map(|&l| (l as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            let target = row[ex.target as usize];
            let better = row
                .iter()
                .enumerate()
                .filter(|&(i, &s)| s > target && ex.seen.binary_search(&(i as u32)).is_err())
                .count();
            hits += usize::from(better < 10);
        }
    }
    Ok((
        hits as f64 / cases.len() as f64,
        lse_sum / cases.len() as f64,
    ))
}

/// The rating head's RMSE on `cases` (each predicted from its history).
fn rmse(
    p: &Params,
    c: &SequenceConfig,
    cases: &[Example],
    global_mean: f32,
    dev: &Device,
) -> candle_core::Result<f64> {
    if cases.is_empty() {
        return Ok(f64::NAN);
    }
    let mut se = 0.0f64;
    for chunk in cases.chunks(256) {
        let batch: Vec<&Example> = chunk.iter().collect();
        let items: Vec<u32> = chunk.iter().map(|e| e.target).collect();
        let n = items.len();
        let logits = p.logits(c, &batch, Some(&Tensor::from_vec(items, n, dev)?), dev)?;
        let own: Vec<f32> = logits
            .gather(&Tensor::from_vec((0..n as u32).collect(), (n, 1), dev)?, 1)?
            .flatten_all()?
            .to_vec1()?;
        for (e, l) in chunk.iter().zip(own) {
            se += ((global_mean + l) as f64 - e.rating as f64).powi(2);
        }
    }
    Ok((se / cases.len() as f64).sqrt())
}

/// Trains on `rows` (dense indices, any order): causal next-item prediction
/// with early stopping on each user's last interaction (HR@10, full catalogue).
pub fn train_sequence(
    config: &SequenceConfig,
    n_users: usize,
    n_items: usize,
    rows: &[Row],
    progress: bool,
) -> Result<SequenceTrained, TrainError> {
    config.validate()?;
    if rows.is_empty() || n_items == 0 {
        return Err(TrainError::Empty);
    }
    let dev = Device::Cpu;
    let mut rng = Rng::new(config.seed);
    let params = Params::new(config, n_items, &mut rng, &dev)?;
    let mut optimizer = AdamW::new(
        params.vars(),
        ParamsAdamW {
            lr: config.learning_rate,
            weight_decay: config.weight_decay,
            ..Default::default()
        },
    )?;
    let explicit = config.objective == Objective::Explicit;
    let (mut train, mut validation) = examples(&rated_sequences(rows, n_users), config.max_len);
    if explicit {
        // The rating head learns from rated interactions only (each still
        // predicted from the whole history before it).
        train.retain(|e| e.rating > 0.0);
        validation.retain(|e| e.rating > 0.0);
    }
    if train.is_empty() {
        return Err(TrainError::Empty);
    }
    let global_mean = if explicit {
        (train.iter().map(|e| e.rating as f64).sum::<f64>() / train.len() as f64) as f32
    } else {
        0.0
    };
    // What the data can teach: kinds and positions it never shows keep
    // their initial weights, so the export borrows the nearest trained ones.
    let longest = train.iter().map(|e| e.history.len()).max().unwrap_or(0);
    let mut kinds_seen = [false; HISTORY_KINDS];
    for e in &train {
        for &(_, k) in &e.history {
            kinds_seen[k as usize] = true;
        }
    }
    let full = n_items <= config.full_softmax_items;
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut best: Option<(f64, usize, NcfWeights, HistoryEncoder)> = None;
    let mut epochs = Vec::new();
    for epoch in 1..=config.epochs {
        let started = Instant::now();
        order = data::shuffled(order, &mut rng);
        let mut loss_sum = 0.0f64;
        for chunk in order.chunks(config.batch_size) {
            let batch: Vec<&Example> = chunk.iter().map(|&i| &train[i]).collect();
            let (candidates, targets) = if explicit {
                // Only each example's own item is scored.
                sampled_softmax(&batch, n_items, 0, &mut rng)
            } else if full {
                (None, batch.iter().map(|e| e.target).collect::<Vec<u32>>())
            } else {
                sampled_softmax(&batch, n_items, config.sampled_items, &mut rng)
            };
            let candidates = candidates
                .map(|c| {
                    let n = c.len();
                    Tensor::from_vec(c, n, &dev)
                })
                .transpose()?;
            let logits = params.logits(config, &batch, candidates.as_ref(), &dev)?;
            let target = Tensor::from_vec(targets, batch.len(), &dev)?;
            let loss = if explicit {
                let ratings: Vec<f32> = batch.iter().map(|e| e.rating - global_mean).collect();
                let ratings = Tensor::from_vec(ratings, (batch.len(), 1), &dev)?;
                let own = logits.gather(&target.unsqueeze(1)?, 1)?;
                (own - ratings)?.sqr()?.mean_all()?
            } else {
                candle_nn::loss::cross_entropy(&logits, &target)?
            };
            optimizer.backward_step(&loss)?;
            loss_sum += loss.to_scalar::<f32>()? as f64 * batch.len() as f64;
        }
        let (metric, log_sum_exp) = if explicit {
            (rmse(&params, config, &validation, global_mean, &dev)?, 0.0)
        } else {
            hit_rate(&params, config, &validation, &dev)?
        };
        let seconds = started.elapsed().as_secs_f64();
        let report = EpochReport {
            epoch,
            train_loss: loss_sum / train.len() as f64,
            validation: metric,
            seconds,
            samples_per_second: train.len() as f64 / seconds,
        };
        if progress {
            let (loss, measure) = match explicit {
                true => ("squared error", "RMSE"),
                false => ("softmax loss", "HR@10"),
            };
            eprintln!(
                "epoch {epoch:>3}: {loss} {:.4}  validation {measure} {:.4}  {:.1}s",
                report.train_loss, metric, seconds
            );
        }
        epochs.push(report);
        // Higher HR, lower RMSE.
        let better = |a: f64, b: f64| if explicit { a < b } else { a > b };
        let improved = match &best {
            None => true,
            Some((b, ..)) => better(metric, *b) || (b.is_nan() && !metric.is_nan()),
        };
        if improved {
            let (mut weights, mut encoder) = params.export(config, global_mean)?;
            fill_untrained(&mut encoder, longest, &kinds_seen);
            // Softmax logits are shift-invariant; shifting them by the mean
            // log-sum-exp makes sigmoid(logit) ≈ the softmax probability of
            // being the next item (small, far from sigmoid's flat top).
            // (0 for the rating head, whose logit is the rating's offset.)
            weights.out_b -= log_sum_exp as f32;
            best = Some((metric, epoch, weights, encoder));
        } else if epoch - best.as_ref().map_or(0, |b| b.1) >= config.patience {
            break;
        }
    }
    let (_, best_epoch, weights, encoder) = best.expect("at least one epoch ran");
    Ok(SequenceTrained {
        weights,
        encoder,
        epochs,
        best_epoch,
    })
}

/// Positions past the longest training history take the last trained
/// position's weight; a kind absent from training (a like, in rating data)
/// takes the nearest trained kind's weight on the same side (a like: a
/// 5-star's), so neither keeps its arbitrary initial value.
fn fill_untrained(
    encoder: &mut HistoryEncoder,
    longest: usize,
    kinds_seen: &[bool; HISTORY_KINDS],
) {
    if longest > 0 {
        let last = encoder.position_weight[longest - 1];
        for w in &mut encoder.position_weight[longest..] {
            *w = last;
        }
    }
    // Kinds 1..=3 are dislike to neutral, 4..=6 interest to like.
    for side in [1..=3usize, 4..=6] {
        let trained: Vec<usize> = side.clone().filter(|&k| kinds_seen[k]).collect();
        for k in side.filter(|&k| !kinds_seen[k]) {
            if let Some(&near) = trained.iter().min_by_key(|&&t| t.abs_diff(k)) {
                encoder.kind_weight[k] = encoder.kind_weight[near];
            }
        }
    }
}

/// The softmax's items for a batch too large a catalogue for a full one: the
/// batch's targets and `extra` uniformly drawn items; returns them and each
/// example's target position among them.
fn sampled_softmax(
    batch: &[&Example],
    n_items: usize,
    extra: usize,
    rng: &mut Rng,
) -> (Option<Vec<u32>>, Vec<u32>) {
    let mut position: HashMap<u32, u32> = HashMap::new();
    let mut items = Vec::new();
    let mut add = |item: u32, items: &mut Vec<u32>| -> u32 {
        *position.entry(item).or_insert_with(|| {
            items.push(item);
            items.len() as u32 - 1
        })
    };
    let targets = batch.iter().map(|e| add(e.target, &mut items)).collect();
    for _ in 0..extra {
        let item = (rng.next_u64() % n_items as u64) as u32;
        add(item, &mut items);
    }
    (Some(items), targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(user: u32, item: u32, ts: i64) -> Row {
        Row {
            user,
            item,
            rating: 5.0,
            ts,
        }
    }

    #[test]
    fn untrained_kinds_and_positions_borrow_the_nearest_trained_weights() {
        let mut e = crate::ncf::history::tests::random_encoder(3, 2, 5, 4);
        let mut seen = [false; HISTORY_KINDS];
        for k in [1, 3, 4, 5] {
            seen[k] = true;
        }
        let before = e.clone();
        fill_untrained(&mut e, 3, &seen);
        assert_eq!(e.position_weight[..3], before.position_weight[..3]);
        assert_eq!(e.position_weight[3], before.position_weight[2]);
        assert_eq!(e.position_weight[4], before.position_weight[2]);
        assert_eq!(
            e.kind_weight[6], before.kind_weight[5],
            "a like as a 5-star"
        );
        // Equally near 1 and 3: the first.
        assert_eq!(e.kind_weight[2], before.kind_weight[1]);
        assert_eq!(e.kind_weight[0], before.kind_weight[0]);
        assert_eq!(e.kind_weight[4], before.kind_weight[4]);
    }

    #[test]
    fn histories_are_most_recent_first_one_entry_per_item() {
        let seq = vec![(1, 5), (2, 4), (1, 3), (3, 5)];
        assert_eq!(history_before(&seq, 0, 10), vec![]);
        assert_eq!(history_before(&seq, 3, 10), vec![(1, 3), (2, 4)]);
        assert_eq!(history_before(&seq, 4, 2), vec![(3, 5), (1, 3)]);
    }

    #[test]
    fn sequences_follow_event_time_then_item() {
        let rows = vec![row(0, 7, 20), row(0, 3, 10), row(0, 2, 20), row(1, 1, 5)];
        let s = sequences(&rows, 2);
        assert_eq!(s[0].iter().map(|e| e.0).collect::<Vec<_>>(), vec![3, 2, 7]);
        assert_eq!(s[1].len(), 1);
    }

    /// Users walk a ring of items: after item `i` comes `i + 1`. A model
    /// that reads the history learns the successor; the exported encoder and
    /// weights score exactly what the trainer's forward pass scores.
    #[test]
    fn learns_a_successor_and_exports_what_it_trained() {
        let n_items = 12u32;
        let mut rows = Vec::new();
        for user in 0..60u32 {
            let start = user % n_items;
            for step in 0..8u32 {
                rows.push(row(user, (start + step) % n_items, step as i64));
            }
        }
        let config = SequenceConfig {
            gmf_dim: 8,
            mlp_dim: 8,
            hidden: vec![8],
            max_len: 4,
            epochs: 60,
            patience: 60,
            batch_size: 64,
            learning_rate: 0.02,
            ..SequenceConfig::default()
        };
        let trained = train_sequence(&config, 60, n_items as usize, &rows, false).unwrap();
        let best = trained.epochs[trained.best_epoch - 1].validation;
        assert!(best > 0.9, "validation HR@10 {best}");
        // Top-1 after item 5 is item 6.
        let user = trained.encoder.user_vector(&[(5, 5), (4, 5)]);
        let scores: Vec<f32> = (0..n_items as usize)
            .map(|i| trained.weights.score(&user, i))
            .collect();
        let top = (0..n_items as usize)
            .filter(|&i| i != 5 && i != 4)
            .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
            .unwrap();
        assert_eq!(top, 6);
    }

    #[test]
    fn exported_model_scores_as_the_trainer_does() {
        let config = SequenceConfig {
            gmf_dim: 4,
            mlp_dim: 3,
            hidden: vec![5, 2],
            max_len: 3,
            ..SequenceConfig::default()
        };
        let dev = Device::Cpu;
        let params = Params::new(&config, 9, &mut Rng::new(3), &dev).unwrap();
        let ex = Example {
            history: vec![(4, 2), (7, 6), (1, 4)],
            target: 0,
            rating: 0.0,
            seen: vec![],
        };
        let short = Example {
            history: vec![(8, 3)],
            target: 0,
            rating: 0.0,
            seen: vec![],
        };
        let logits = params
            .logits(&config, &[&ex, &short], None, &dev)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let (weights, encoder) = params.export(&config, 0.0).unwrap();
        for (e, row) in [&ex, &short].iter().zip(&logits) {
            let user = encoder.user_vector(&e.history);
            for (item, &logit) in row.iter().enumerate() {
                let want = 1.0 / (1.0 + (-logit).exp());
                let got = weights.score(&user, item);
                assert!((got - want).abs() < 1e-5, "item {item}: {got} vs {want}");
            }
        }
    }
}
