//! The NeuMF trainer, on candle (autodiff, AdamW) on the CPU.
//!
//! Why candle: a small dependency tree that builds in minutes on two cores, a
//! tensor API that maps one to one onto the ONNX graph we export, and CPU
//! matmuls through `gemm` that train ML-100K in about a minute. Randomness
//! (initialisation, shuffling, negatives, dropout masks) comes from our own
//! seeded generator, not candle's, so a run is reproducible bit for bit.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use serde::{Deserialize, Serialize};

use super::data::{self, RankingCase, Row};
use super::model::{Dense, NcfWeights, Objective};
use crate::rng::Rng;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("invalid training setting `{field}`: {detail}")]
    Config { field: &'static str, detail: String },
    #[error("no training data")]
    Empty,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub objective: Objective,
    /// GMF embedding size (0 turns the GMF branch off).
    pub gmf_dim: usize,
    /// MLP embedding size per side; the tower's input is twice this.
    pub mlp_dim: usize,
    /// Hidden layer widths of the MLP tower.
    pub hidden: Vec<usize>,
    /// Adds each same-width layer's input to its output.
    pub residual: bool,
    /// BatchNorm after each hidden layer (folded into the weights on export).
    pub batch_norm: bool,
    pub dropout: f32,
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    /// L2 penalty on the embeddings a batch touches.
    pub l2: f64,
    /// Sampled negatives per positive (implicit).
    pub negatives: usize,
    /// Epochs without validation improvement before stopping.
    pub patience: usize,
    /// Share of training rows held out for validation (explicit; implicit holds
    /// out each user's latest training interaction).
    pub validation_fraction: f64,
    pub seed: u64,
    /// Standard deviation of the Gaussian embedding initialisation.
    pub init_std: f32,
    /// SVD++-style history: a user's GMF and MLP vectors add
    /// `|N(u)|^-1/2 · Σ_{j ∈ N(u)} y_j` over the items of their training
    /// history, with `y` learned per item. Baked into the exported user vectors.
    #[serde(default)]
    pub history: bool,
    /// The same for items: an item's vectors add a learned sum over the users
    /// who interacted with it in training. Baked into the exported item tables.
    #[serde(default)]
    pub item_history: bool,
    /// Members trained with seeds `seed, seed + 1, …` and merged into one
    /// NeuMF that scores their mean logit ([`NcfWeights::ensemble`]).
    #[serde(default = "one")]
    pub ensemble: usize,
    /// Each member is the merge of its run's this many best epochs (by the
    /// validation metric), a free ensemble along one training run.
    #[serde(default = "one")]
    pub snapshots: usize,
}

fn one() -> usize {
    1
}

impl TrainConfig {
    pub fn defaults(objective: Objective) -> TrainConfig {
        let explicit = TrainConfig {
            objective,
            gmf_dim: 32,
            mlp_dim: 32,
            // One hidden layer: the merged members' tower is block-diagonal,
            // so deeper towers cost the square of the member count per pair,
            // while one layer is served from the precomputed item half (u1
            // RMSE 0.8929 against 0.8909 with 64-32-16).
            hidden: vec![32],
            residual: false,
            batch_norm: false,
            dropout: 0.0,
            epochs: 40,
            batch_size: 512,
            learning_rate: 0.002,
            // Light: the histories, snapshots and members carry the rest
            // (ML-100K u1: 0.9315 single plain model → 0.8929; models/README.md).
            l2: 0.005,
            negatives: 0,
            patience: 4,
            validation_fraction: 0.05,
            seed: 42,
            init_std: 0.01,
            history: true,
            item_history: true,
            ensemble: 5,
            snapshots: 3,
        };
        match objective {
            Objective::Explicit => explicit,
            // The NCF paper's setting: log loss on 4 negatives per positive,
            // batch 256, lr 0.001; validation is a held-out interaction per user.
            Objective::Implicit => TrainConfig {
                gmf_dim: 16,
                hidden: vec![64, 32, 16],
                epochs: 30,
                batch_size: 256,
                learning_rate: 0.001,
                l2: 0.0,
                negatives: 4,
                validation_fraction: 0.0,
                history: false,
                item_history: false,
                ensemble: 1,
                snapshots: 1,
                ..explicit
            },
        }
    }

    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |field, detail: &str| {
            Err(TrainError::Config {
                field,
                detail: detail.into(),
            })
        };
        // NeuMF fuses both branches; each needs at least one dimension.
        if self.gmf_dim == 0 {
            return bad("gmf_dim", "must be positive");
        }
        if self.mlp_dim == 0 {
            return bad("mlp_dim", "must be positive");
        }
        if self.hidden.contains(&0) {
            return bad("hidden", "layer widths must be positive");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("dropout", "must be in [0, 1)");
        }
        if self.snapshots == 0 {
            return bad("snapshots", "needs at least one epoch");
        }
        if self.ensemble == 0 {
            return bad("ensemble", "needs at least one member");
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be positive");
        }
        if self.epochs == 0 {
            return bad("epochs", "must be positive");
        }
        if !self.learning_rate.is_finite() || self.learning_rate <= 0.0 {
            return bad("learning_rate", "must be positive");
        }
        if self.objective == Objective::Implicit && self.negatives == 0 {
            return bad("negatives", "implicit training needs sampled negatives");
        }
        if !(0.0..0.5).contains(&self.validation_fraction) {
            return bad("validation_fraction", "must be in [0, 0.5)");
        }
        Ok(())
    }
}

/// One epoch's line in the run report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochReport {
    pub epoch: usize,
    pub train_loss: f64,
    /// RMSE (explicit) or HR@10 (implicit) on the validation split.
    pub validation: f64,
    pub seconds: f64,
    pub samples_per_second: f64,
}

pub struct Trained {
    /// The model as training left it (the parity reference); `weights` may
    /// come from an earlier, better epoch.
    pub model: Model,
    pub weights: NcfWeights,
    /// Row-major `[n_users][user_dim]`.
    pub user_vectors: Vec<f32>,
    pub epochs: Vec<EpochReport>,
    pub best_epoch: usize,
    /// The validation metric's name: `rmse` or `hr@10`.
    pub validation_metric: &'static str,
}

struct Layer {
    w: Var,
    b: Var,
    /// gamma, beta, running mean, running variance.
    bn: Option<(Var, Var, Vec<f32>, Vec<f32>)>,
    residual: bool,
}

/// The trainable parameters.
pub struct Model {
    config: TrainConfig,
    global_mean: f32,
    user_gmf: Var,
    user_mlp: Var,
    user_bias: Var,
    item_gmf: Var,
    item_mlp: Var,
    item_bias: Var,
    layers: Vec<Layer>,
    out_w: Var,
    out_b: Var,
    history: Option<History>,
    item_history: Option<History>,
    device: Device,
}

/// An SVD++-style history term: each owner (a user, or with
/// [`TrainConfig::item_history`] an item) adds `|N|^-1/2 · Σ_{j ∈ N} y_j` to
/// its GMF and MLP vectors, over the members `N` it interacted with in
/// training (a user's items, an item's users), `y` learned per member.
/// The exporter bakes the sums into the user vectors and item tables.
struct History {
    /// Per owner, its members, sorted.
    members: Vec<Vec<u32>>,
    /// `[members, gmf_dim + mlp_dim]`
    table: Var,
    n_members: usize,
    gmf_dim: usize,
}

impl History {
    fn new(
        config: &TrainConfig,
        pairs: impl Iterator<Item = (u32, u32)>,
        n_owners: usize,
        n_members: usize,
        rng: &mut Rng,
        device: &Device,
    ) -> candle_core::Result<History> {
        let mut members: Vec<Vec<u32>> = vec![Vec::new(); n_owners];
        for (owner, member) in pairs {
            members[owner as usize].push(member);
        }
        for m in &mut members {
            m.sort_unstable();
            m.dedup();
        }
        let d = config.gmf_dim + config.mlp_dim;
        Ok(History {
            members,
            table: var(
                gaussian(rng, n_members * d, config.init_std),
                (n_members, d),
                device,
            )?,
            n_members,
            gmf_dim: config.gmf_dim,
        })
    }

    /// The history terms of `owners`, as `(gmf, mlp)` rows: one dense product
    /// of the owners' weight rows with the table (for MovieLens-sized
    /// catalogues cheaper than gathering row by row).
    ///
    /// In training, `held_out` names each row's counterpart (the target item
    /// of a user's row, the user of an item's row): it is left out of that
    /// row's history, as a test pair is absent from the training histories,
    /// so the model never learns to read the answer from its input.
    fn sums(
        &self,
        owners: &[u32],
        held_out: Option<&[u32]>,
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let width = self.n_members;
        let mut weights = vec![0.0f32; owners.len() * width];
        for (row, &owner) in owners.iter().enumerate() {
            let members = &self.members[owner as usize];
            let skip = held_out
                .map(|h| h[row])
                .filter(|m| members.binary_search(m).is_ok());
            let kept = members.len() - usize::from(skip.is_some());
            if kept == 0 {
                continue;
            }
            let w = 1.0 / (kept as f32).sqrt();
            let dst = &mut weights[row * width..(row + 1) * width];
            for &m in members {
                dst[m as usize] = w;
            }
            if let Some(m) = skip {
                dst[m as usize] = 0.0;
            }
        }
        let weights = Tensor::from_vec(weights, (owners.len(), width), device)?;
        let sums = weights.matmul(self.table.as_tensor())?;
        let d = sums.dims2()?.1;
        Ok((
            sums.narrow(1, 0, self.gmf_dim)?,
            sums.narrow(1, self.gmf_dim, d - self.gmf_dim)?,
        ))
    }

    /// `owners`' GMF and MLP rows with their history terms added, and the
    /// L2 term grown by the terms' squares (as for the embeddings).
    fn add_to(
        &self,
        owners: &[u32],
        held_out: Option<&[u32]>,
        gmf: Tensor,
        mlp: Tensor,
        reg: Tensor,
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (hg, hm) = self.sums(owners, held_out, device)?;
        let reg = (reg + hg.sqr()?.sum_all()? + hm.sqr()?.sum_all()?)?;
        Ok(((gmf + hg)?, (mlp + hm)?, reg))
    }

    /// Every owner's term, for the export.
    /// In chunks of owners, so the dense weights stay small on big data.
    fn all(&self, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        const CHUNK: usize = 1024;
        let owners: Vec<u32> = (0..self.members.len() as u32).collect();
        let (mut gmf, mut mlp) = (Vec::new(), Vec::new());
        for chunk in owners.chunks(CHUNK) {
            let (g, m) = self.sums(chunk, None, device)?;
            gmf.push(g);
            mlp.push(m);
        }
        Ok((Tensor::cat(&gmf, 0)?, Tensor::cat(&mlp, 0)?))
    }
}

const BN_EPS: f32 = 1e-5;
const BN_MOMENTUM: f32 = 0.1;

/// `n` draws of a zero-mean Gaussian (from our seeded generator).
pub(crate) fn gaussian(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            // Box–Muller.
            let u1 = rng.unit().max(1e-12);
            let u2 = rng.unit();
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32 * std
        })
        .collect()
}

fn var(data: Vec<f32>, shape: (usize, usize), device: &Device) -> candle_core::Result<Var> {
    Var::from_tensor(&Tensor::from_vec(data, shape, device)?)
}

impl Model {
    pub fn new(
        config: &TrainConfig,
        n_users: usize,
        n_items: usize,
        global_mean: f32,
        train_rows: &[Row],
        rng: &mut Rng,
    ) -> Result<Model, TrainError> {
        config.validate()?;
        let device = Device::Cpu;
        let (g, m, s) = (config.gmf_dim, config.mlp_dim, config.init_std);
        let zeros = |n| vec![0.0f32; n];
        let mut layers = Vec::new();
        let mut width = 2 * m;
        for &out in &config.hidden {
            // He initialisation suits ReLU layers.
            let std = (2.0 / width as f32).sqrt();
            let w = var(gaussian(rng, width * out, std), (width, out), &device)?;
            let b = var(zeros(out), (1, out), &device)?;
            let bn = if config.batch_norm {
                Some((
                    var(vec![1.0; out], (1, out), &device)?,
                    var(zeros(out), (1, out), &device)?,
                    zeros(out),
                    vec![1.0; out],
                ))
            } else {
                None
            };
            layers.push(Layer {
                w,
                b,
                bn,
                residual: config.residual && width == out,
            });
            width = out;
        }
        let out_in = g + width;
        let history = if config.history {
            let pairs = train_rows.iter().map(|r| (r.user, r.item));
            Some(History::new(config, pairs, n_users, n_items, rng, &device)?)
        } else {
            None
        };
        let item_history = if config.item_history {
            let pairs = train_rows.iter().map(|r| (r.item, r.user));
            Some(History::new(config, pairs, n_items, n_users, rng, &device)?)
        } else {
            None
        };
        Ok(Model {
            config: config.clone(),
            global_mean,
            user_gmf: var(gaussian(rng, n_users * g, s), (n_users, g), &device)?,
            user_mlp: var(gaussian(rng, n_users * m, s), (n_users, m), &device)?,
            user_bias: var(zeros(n_users), (n_users, 1), &device)?,
            item_gmf: var(gaussian(rng, n_items * g, s), (n_items, g), &device)?,
            item_mlp: var(gaussian(rng, n_items * m, s), (n_items, m), &device)?,
            item_bias: var(zeros(n_items), (n_items, 1), &device)?,
            layers,
            out_w: var(
                gaussian(rng, out_in, (1.0 / out_in as f32).sqrt()),
                (out_in, 1),
                &device,
            )?,
            out_b: var(zeros(1), (1, 1), &device)?,
            history,
            item_history,
            device,
        })
    }

    fn vars(&self) -> Vec<Var> {
        let mut v = vec![
            self.user_gmf.clone(),
            self.user_mlp.clone(),
            self.user_bias.clone(),
            self.item_gmf.clone(),
            self.item_mlp.clone(),
            self.item_bias.clone(),
            self.out_w.clone(),
            self.out_b.clone(),
        ];
        for h in [&self.history, &self.item_history].into_iter().flatten() {
            v.push(h.table.clone());
        }
        for l in &self.layers {
            v.push(l.w.clone());
            v.push(l.b.clone());
            if let Some((gamma, beta, _, _)) = &l.bn {
                v.push(gamma.clone());
                v.push(beta.clone());
            }
        }
        v
    }

    /// Logits of a batch, and the L2 term of the embeddings it touched. In
    /// training mode BatchNorm uses batch statistics (and updates its running
    /// ones) and dropout is applied with masks drawn from `rng`.
    fn forward(
        &mut self,
        users: &[u32],
        items: &[u32],
        train: Option<&mut Rng>,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let n = users.len();
        let u = Tensor::from_slice(users, n, &self.device)?;
        let i = Tensor::from_slice(items, n, &self.device)?;
        let mut ug = self.user_gmf.index_select(&u, 0)?;
        let mut ig = self.item_gmf.index_select(&i, 0)?;
        let mut um = self.user_mlp.index_select(&u, 0)?;
        let mut im = self.item_mlp.index_select(&i, 0)?;
        let ub = self.user_bias.index_select(&u, 0)?;
        let ib = self.item_bias.index_select(&i, 0)?;
        let mut reg = (ug.sqr()?.sum_all()?
            + ig.sqr()?.sum_all()?
            + um.sqr()?.sum_all()?
            + im.sqr()?.sum_all()?
            + ub.sqr()?.sum_all()?
            + ib.sqr()?.sum_all()?)?;
        // In training each row's counterpart is held out of its history.
        let training = train.is_some();
        if let Some(history) = &self.history {
            let held_out = training.then_some(items);
            (ug, um, reg) = history.add_to(users, held_out, ug, um, reg, &self.device)?;
        }
        if let Some(history) = &self.item_history {
            let held_out = training.then_some(users);
            (ig, im, reg) = history.add_to(items, held_out, ig, im, reg, &self.device)?;
        }
        let reg = reg.affine(1.0 / n as f64, 0.0)?;
        let gmf = (ug * ig)?;
        let mut x = Tensor::cat(&[&um, &im], 1)?;
        let dropout = self.config.dropout;
        let mut rng = train;
        for layer in &mut self.layers {
            let mut z = x
                .matmul(layer.w.as_tensor())?
                .broadcast_add(layer.b.as_tensor())?;
            if let Some((gamma, beta, running_mean, running_var)) = &mut layer.bn {
                let (mean, variance) = if rng.is_some() {
                    let mean = z.mean_keepdim(0)?;
                    let variance = z.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)?;
                    let (mv, vv) = (
                        mean.flatten_all()?.to_vec1::<f32>()?,
                        variance.flatten_all()?.to_vec1::<f32>()?,
                    );
                    for (r, b) in running_mean.iter_mut().zip(&mv) {
                        *r = (1.0 - BN_MOMENTUM) * *r + BN_MOMENTUM * b;
                    }
                    for (r, b) in running_var.iter_mut().zip(&vv) {
                        *r = (1.0 - BN_MOMENTUM) * *r + BN_MOMENTUM * b;
                    }
                    (mean, variance)
                } else {
                    let w = running_mean.len();
                    (
                        Tensor::from_slice(running_mean, (1, w), &self.device)?,
                        Tensor::from_slice(running_var, (1, w), &self.device)?,
                    )
                };
                z = z
                    .broadcast_sub(&mean)?
                    .broadcast_div(&(variance + BN_EPS as f64)?.sqrt()?)?
                    .broadcast_mul(gamma.as_tensor())?
                    .broadcast_add(beta.as_tensor())?;
            }
            let mut a = z.relu()?;
            if layer.residual {
                a = (a + &x)?;
            }
            if let Some(r) = rng.as_deref_mut() {
                if dropout > 0.0 {
                    let keep = 1.0 - dropout;
                    let dims = a.dims2()?;
                    let mask: Vec<f32> = (0..dims.0 * dims.1)
                        .map(|_| {
                            if r.unit() < keep as f64 {
                                1.0 / keep
                            } else {
                                0.0
                            }
                        })
                        .collect();
                    a = (a * Tensor::from_vec(mask, dims, &self.device)?)?;
                }
            }
            x = a;
        }
        let h = Tensor::cat(&[&gmf, &x], 1)?;
        let logit = h
            .matmul(self.out_w.as_tensor())?
            .broadcast_add(self.out_b.as_tensor())?
            .add(&ub)?
            .add(&ib)?
            .squeeze(1)?;
        Ok((logit, reg))
    }

    fn loss(&self, logit: &Tensor, target: &Tensor) -> candle_core::Result<Tensor> {
        match self.config.objective {
            Objective::Explicit => (logit + self.global_mean as f64)?
                .sub(target)?
                .sqr()?
                .mean_all(),
            Objective::Implicit => {
                // Log loss on logits, stable: relu(x) − x·y + ln(1 + e^−|x|).
                let soft = logit.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
                (logit.relu()? - logit.mul(target)?)?.add(&soft)?.mean_all()
            }
        }
    }

    /// The trainer's own forward pass in inference mode (the parity reference).
    pub fn predict(&mut self, users: &[u32], items: &[u32]) -> Result<Vec<f32>, TrainError> {
        let (logit, _) = self.forward(users, items, None)?;
        let out = match self.config.objective {
            Objective::Explicit => (logit + self.global_mean as f64)?,
            Objective::Implicit => candle_nn::ops::sigmoid(&logit)?,
        };
        Ok(out.to_vec1()?)
    }

    fn matrix(v: &Var) -> candle_core::Result<Vec<f32>> {
        v.as_tensor().flatten_all()?.to_vec1()
    }

    /// GMF and MLP tables with their history terms added (as served).
    fn baked(
        &self,
        gmf: &Var,
        mlp: &Var,
        history: Option<&History>,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (gmf, mlp) = (gmf.as_tensor().clone(), mlp.as_tensor().clone());
        match history {
            None => Ok((gmf, mlp)),
            Some(h) => {
                let (hg, hm) = h.all(&self.device)?;
                Ok(((gmf + hg)?, (mlp + hm)?))
            }
        }
    }

    /// The inference form: BatchNorm folded into each layer's weights.
    pub fn export(&self) -> Result<(NcfWeights, Vec<f32>), TrainError> {
        let c = &self.config;
        let mut layers = Vec::new();
        let mut width = 2 * c.mlp_dim;
        for l in &self.layers {
            let out = l.b.as_tensor().dims2()?.1;
            let mut w = Self::matrix(&l.w)?;
            let mut b = Self::matrix(&l.b)?;
            if let Some((gamma, beta, mean, variance)) = &l.bn {
                let (gamma, beta) = (Self::matrix(gamma)?, Self::matrix(beta)?);
                for j in 0..out {
                    let s = gamma[j] / (variance[j] + BN_EPS).sqrt();
                    for i in 0..width {
                        w[i * out + j] *= s;
                    }
                    b[j] = (b[j] - mean[j]) * s + beta[j];
                }
            }
            layers.push(Dense {
                inp: width,
                out,
                w,
                b,
                residual: l.residual,
            });
            width = out;
        }
        let n_items = self.item_bias.as_tensor().dims2()?.0;
        let (item_gmf, item_mlp) =
            self.baked(&self.item_gmf, &self.item_mlp, self.item_history.as_ref())?;
        let weights = NcfWeights {
            objective: c.objective,
            gmf_dim: c.gmf_dim,
            mlp_dim: c.mlp_dim,
            n_items,
            item_gmf: item_gmf.flatten_all()?.to_vec1()?,
            item_mlp: item_mlp.flatten_all()?.to_vec1()?,
            item_bias: Self::matrix(&self.item_bias)?,
            layers,
            out_w: Self::matrix(&self.out_w)?,
            out_b: Self::matrix(&self.out_b)?[0],
            global_mean: if c.objective == Objective::Explicit {
                self.global_mean
            } else {
                0.0
            },
        };
        let (user_gmf, user_mlp) =
            self.baked(&self.user_gmf, &self.user_mlp, self.history.as_ref())?;
        let users = Tensor::cat(&[&user_gmf, &user_mlp, self.user_bias.as_tensor()], 1)?
            .flatten_all()?
            .to_vec1()?;
        Ok((weights, users))
    }
}

/// Validation data for early stopping.
pub enum Validation {
    Ratings(Vec<Row>),
    Ranking(Vec<RankingCase>),
}

/// Explicit metrics: (RMSE, MAE), predictions clipped to the rating scale.
pub fn rating_errors(
    predict: impl Fn(&[u32], &[u32]) -> Vec<f32>,
    rows: &[Row],
    scale: (f32, f32),
) -> (f64, f64) {
    if rows.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let users: Vec<u32> = rows.iter().map(|r| r.user).collect();
    let items: Vec<u32> = rows.iter().map(|r| r.item).collect();
    let predictions = predict(&users, &items);
    let (mut se, mut ae) = (0.0f64, 0.0f64);
    for (p, r) in predictions.iter().zip(rows) {
        let e = (p.clamp(scale.0, scale.1) - r.rating) as f64;
        se += e * e;
        ae += e.abs();
    }
    let n = rows.len() as f64;
    ((se / n).sqrt(), ae / n)
}

/// Implicit metrics: (HR@10, NDCG@10) over leave-one-out cases.
pub fn ranking_metrics(
    predict: impl Fn(&[u32], &[u32]) -> Vec<f32>,
    cases: &[RankingCase],
) -> (f64, f64) {
    if cases.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let (mut hits, mut ndcg) = (0.0, 0.0);
    // Score many cases per call: the scorer is fastest on big batches.
    for chunk in cases.chunks(64) {
        let mut users = Vec::new();
        let mut items = Vec::new();
        for c in chunk {
            users.extend(std::iter::repeat_n(c.user, 1 + c.negatives.len()));
            items.push(c.positive);
            items.extend(&c.negatives);
        }
        let scores = predict(&users, &items);
        let mut at = 0;
        for c in chunk {
            let n = 1 + c.negatives.len();
            let (h, g) = data::hit_and_ndcg(scores[at], &scores[at + 1..at + n], 10);
            hits += h;
            ndcg += g;
            at += n;
        }
    }
    let n = cases.len() as f64;
    (hits / n, ndcg / n)
}

/// The validation metric of exported weights: RMSE (unclipped) or HR@10.
pub fn validation_metric(weights: &NcfWeights, users: &[f32], validation: &Validation) -> f64 {
    let user_dim = weights.user_dim();
    let predict = |u: &[u32], i: &[u32]| -> Vec<f32> {
        u.iter()
            .zip(i)
            .map(|(&u, &i)| {
                let row = &users[u as usize * user_dim..(u as usize + 1) * user_dim];
                weights.score(row, i as usize)
            })
            .collect()
    };
    match validation {
        Validation::Ratings(rows) => rating_errors(predict, rows, (f32::MIN, f32::MAX)).0,
        Validation::Ranking(cases) => ranking_metrics(predict, cases).0,
    }
}

/// Trains a model on `train` rows, early-stopping on `validation`.
pub fn train(
    config: &TrainConfig,
    n_users: usize,
    n_items: usize,
    train_rows: &[Row],
    validation: &Validation,
    progress: bool,
) -> Result<Trained, TrainError> {
    config.validate()?;
    if train_rows.is_empty() {
        return Err(TrainError::Empty);
    }
    let mut rng = Rng::new(config.seed);
    let global_mean = match config.objective {
        Objective::Explicit => {
            (train_rows.iter().map(|r| r.rating as f64).sum::<f64>() / train_rows.len() as f64)
                as f32
        }
        Objective::Implicit => 0.0,
    };
    let mut model = Model::new(config, n_users, n_items, global_mean, train_rows, &mut rng)?;
    let mut optimizer = AdamW::new(
        model.vars(),
        ParamsAdamW {
            lr: config.learning_rate,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let seen = data::interacted(train_rows, n_users);
    let higher_is_better = matches!(validation, Validation::Ranking(_));
    let mut best: Option<(f64, usize, NcfWeights, Vec<f32>)> = None;
    let mut epochs = Vec::new();
    let mut snapshots: Vec<(f64, NcfWeights, Vec<f32>)> = Vec::new();
    for epoch in 1..=config.epochs {
        let started = Instant::now();
        // (user, item, target) samples: every positive, plus fresh negatives.
        let mut samples: Vec<(u32, u32, f32)> = match config.objective {
            Objective::Explicit => train_rows
                .iter()
                .map(|r| (r.user, r.item, r.rating))
                .collect(),
            Objective::Implicit => {
                let mut s = Vec::with_capacity(train_rows.len() * (1 + config.negatives));
                for r in train_rows {
                    s.push((r.user, r.item, 1.0));
                    for _ in 0..config.negatives {
                        let neg = data::sample_negative(&mut rng, n_items, &seen[r.user as usize]);
                        s.push((r.user, neg, 0.0));
                    }
                }
                s
            }
        };
        samples = data::shuffled(samples, &mut rng);
        let steps = samples.len().div_ceil(config.batch_size);
        let bar = progress_bar(progress, steps as u64, epoch, config.epochs);
        let mut loss_sum = 0.0f64;
        for batch in samples.chunks(config.batch_size) {
            let users: Vec<u32> = batch.iter().map(|s| s.0).collect();
            let items: Vec<u32> = batch.iter().map(|s| s.1).collect();
            let targets: Vec<f32> = batch.iter().map(|s| s.2).collect();
            let target = Tensor::from_vec(targets, batch.len(), &model.device)?;
            let (logit, reg) = model.forward(&users, &items, Some(&mut rng))?;
            let data_loss = model.loss(&logit, &target)?;
            let loss = (&data_loss + reg.affine(config.l2, 0.0)?)?;
            optimizer.backward_step(&loss)?;
            loss_sum += data_loss.to_scalar::<f32>()? as f64 * batch.len() as f64;
            bar.inc(1);
        }
        let (weights, users) = model.export()?;
        let metric = validation_metric(&weights, &users, validation);
        let seconds = started.elapsed().as_secs_f64();
        let report = EpochReport {
            epoch,
            train_loss: loss_sum / samples.len() as f64,
            validation: metric,
            seconds,
            samples_per_second: samples.len() as f64 / seconds,
        };
        bar.finish_and_clear();
        if progress {
            eprintln!(
                "epoch {epoch:>3}: loss {:.4}  validation {} {:.4}  {:.1}s  {:.0} samples/s",
                report.train_loss,
                if higher_is_better { "HR@10" } else { "RMSE" },
                metric,
                seconds,
                report.samples_per_second
            );
        }
        epochs.push(report);
        let improved = improves(metric, best.as_ref().map(|b| b.0), higher_is_better);
        if config.snapshots > 1 && !metric.is_nan() {
            // Only the best `snapshots` epochs so far are kept.
            snapshots.push((metric, weights.clone(), users.clone()));
            snapshots.sort_by(|a, b| {
                let order = a.0.total_cmp(&b.0);
                if higher_is_better {
                    order.reverse()
                } else {
                    order
                }
            });
            snapshots.truncate(config.snapshots);
        }
        if improved {
            best = Some((metric, epoch, weights, users));
        } else if epoch - best.as_ref().map_or(0, |b| b.1) >= config.patience {
            break;
        }
    }
    let (_, best_epoch, mut weights, mut user_vectors) = best.expect("at least one epoch ran");
    if snapshots.len() > 1 {
        // The epochs with the best validation scores, merged: averaging
        // snapshots along one run smooths the noise of stopping at one epoch.
        let members: Vec<(NcfWeights, Vec<f32>)> =
            snapshots.into_iter().map(|(_, w, u)| (w, u)).collect();
        (weights, user_vectors) =
            NcfWeights::ensemble(&members).map_err(|detail| TrainError::Config {
                field: "snapshots",
                detail,
            })?;
    }
    Ok(Trained {
        model,
        weights,
        user_vectors,
        epochs,
        best_epoch,
        validation_metric: if higher_is_better { "hr@10" } else { "rmse" },
    })
}

/// Whether an epoch's validation score replaces the best so far. A NaN
/// (no validation pairs, or a diverged model) never replaces a number, a
/// number always replaces a NaN, and among NaNs the latest epoch is kept.
fn improves(metric: f64, best: Option<f64>, higher_is_better: bool) -> bool {
    match best {
        None => true,
        Some(b) if b.is_nan() => true,
        Some(_) if metric.is_nan() => false,
        Some(b) if higher_is_better => metric > b,
        Some(b) => metric < b,
    }
}

fn progress_bar(visible: bool, steps: u64, epoch: usize, epochs: usize) -> indicatif::ProgressBar {
    if !visible {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(steps);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "epoch {msg} [{bar:40}] {pos}/{len} batches, {per_sec}, eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("{epoch}/{epochs}"));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_number_replaces_a_nan_best_and_never_the_reverse() {
        assert!(improves(f64::NAN, None, true));
        assert!(improves(0.2, Some(f64::NAN), true), "a NaN first epoch");
        assert!(improves(0.9, Some(f64::NAN), false));
        assert!(!improves(f64::NAN, Some(0.2), true));
        assert!(improves(f64::NAN, Some(f64::NAN), true), "the latest NaN");
        assert!(improves(0.3, Some(0.2), true) && !improves(0.2, Some(0.2), true));
        assert!(improves(0.8, Some(0.9), false) && !improves(0.9, Some(0.8), false));
    }

    fn history(members: Vec<Vec<u32>>) -> History {
        let device = Device::Cpu;
        // Member j's row is all j + 1, so a sum shows which members it took.
        let table: Vec<f32> = (0..3).flat_map(|j| [j as f32 + 1.0; 2]).collect();
        History {
            members,
            table: var(table, (3, 2), &device).unwrap(),
            n_members: 3,
            gmf_dim: 1,
        }
    }

    #[test]
    fn a_history_term_is_the_normalised_sum_of_its_members_rows() {
        let h = history(vec![vec![0, 2], vec![]]);
        let (gmf, mlp) = h.sums(&[0, 1], None, &Device::Cpu).unwrap();
        let gmf: Vec<Vec<f32>> = gmf.to_vec2().unwrap();
        let expected = (1.0 + 3.0) / 2f32.sqrt();
        assert!((gmf[0][0] - expected).abs() < 1e-6);
        assert_eq!(mlp.to_vec2::<f32>().unwrap()[0], gmf[0]);
        // No history, no term.
        assert_eq!(gmf[1], vec![0.0]);
    }

    #[test]
    fn training_leaves_the_rows_own_pair_out_of_its_history() {
        let h = history(vec![vec![0, 1, 2]]);
        let device = Device::Cpu;
        let (held_out, _) = h.sums(&[0, 0], Some(&[1, 7]), &device).unwrap();
        let held_out: Vec<Vec<f32>> = held_out.to_vec2().unwrap();
        // Member 1 left out, the rest renormalised over two members.
        assert!((held_out[0][0] - (1.0 + 3.0) / 2f32.sqrt()).abs() < 1e-6);
        // A counterpart outside the history changes nothing.
        assert!((held_out[1][0] - 6.0 / 3f32.sqrt()).abs() < 1e-6);
    }
}
