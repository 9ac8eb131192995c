//! NCF serving: the ONNX model loaded once into tract (symbolic batch size) and
//! the per-user latent vectors that make it reflect a user from their first
//! event on (see [`super::foldin`]).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tract_onnx::prelude::*;

use super::card::{ModelCard, ModelFiles, CARD_FORMAT, PARITY_TOLERANCE};
use super::foldin::{self, Example, FoldInConfig};
use super::history::{kind_of_weight, HistoryEncoder};
use super::model::{add_vec_mat, NcfWeights, Objective};
use super::onnx;
use crate::catalog::IdMap;
use crate::fnv::Fnv;
use crate::metrics;
use crate::output::ModelInfo;
use crate::recommend::{ScoreError, Scorer};
use crate::state::{UserState, FLAG_COMPLETED, FLAG_DISLIKED, FLAG_LIKED};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("model card {path}: {detail}")]
    Card { path: String, detail: String },
    #[error(transparent)]
    Onnx(#[from] onnx::OnnxError),
    #[error("tract cannot load or run the model: {0}")]
    Tract(String),
}

pub type Plan = TypedSimplePlan<TypedModel>;

/// A loaded model: the tract plan for scoring and the plain weights for fold-in.
pub struct NcfModel {
    pub card: ModelCard,
    pub weights: NcfWeights,
    /// The model as given (the contract's graph).
    plan: Plan,
    /// Its serving form, built from the weights at load ([`Serving`]): one
    /// user against many items; checked against the card like `plan`.
    serving: Option<Serving>,
    /// Identifies the model whose space a stored user vector lives in.
    pub model_id: u64,
    items: IdMap<u32>,
    users: HashMap<String, u32>,
    user_vectors: Vec<f32>,
    /// The prior of users the model never saw: the card's `new_user_prior`,
    /// else the mean trained user.
    new_user_prior_vector: Vec<f32>,
    pub fold_in: FoldInConfig,
    /// A history-based model's encoder: the user vector is computed from the
    /// user's recent interactions (added to the per-user part), and there is
    /// no fold-in.
    pub history: Option<HistoryEncoder>,
}

fn read(path: &Path) -> Result<Vec<u8>, ModelError> {
    std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// An ONNX graph, optimised and made runnable by tract.
pub fn compile(bytes: &[u8]) -> Result<Plan, ModelError> {
    runnable(typed(bytes)?)
}

fn tract_error(e: TractError) -> ModelError {
    ModelError::Tract(format!("{e:#}"))
}

fn typed(bytes: &[u8]) -> Result<TypedModel, ModelError> {
    tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .and_then(|m| m.into_typed())
        .map_err(tract_error)
}

fn runnable(model: TypedModel) -> Result<Plan, ModelError> {
    model
        .into_optimized()
        .and_then(|m| m.into_runnable())
        .map_err(tract_error)
}

/// Batch sizes the serving tower is planned for; a user's candidates are
/// padded up to the next one (larger sets use the flexible plan). Steps of
/// 64 above 64 rows: padded rows cost as much as real ones, and with
/// powers of two a typical pool of ≈ 350 candidates ran 512 rows.
fn serving_batches() -> impl Iterator<Item = usize> {
    [16, 32].into_iter().chain((64..=1024).step_by(64))
}

/// Items whose activations are written feature-major together: 16 floats,
/// one cache line per feature.
const SERVING_BLOCK: usize = 16;

/// The serving form: one user against many items. The engine does the
/// per-item lookups itself (one pass over the candidates: the item's
/// precomputed half of the first MLP layer plus the user's half, ReLU, and
/// the GMF and bias terms as one dot product), and tract runs the dense
/// layers after the first on those activations ([`onnx::export_tower`]).
/// Row gathers inside tract cost more than its matrix products.
pub struct Serving {
    fixed: Vec<(usize, Plan)>,
    flexible: Plan,
    /// [`NcfWeights::item_first_layer`]: `[n_items][h1]`, bias included.
    item_h1: Vec<f32>,
    /// `[n_items][gmf_dim + 1]`: the item's GMF vector and its bias.
    item_gb: Vec<f32>,
    /// The user rows of the first layer's weights, `[mlp_dim][h1]`.
    user_first: Vec<f32>,
    /// The output weights of the GMF product.
    gmf_out: Vec<f32>,
    out_bias: f32,
    gmf_dim: usize,
    mlp_dim: usize,
    h1: usize,
}

impl Serving {
    /// `None` for a model whose first layer is residual (it has no item half).
    /// Plans the tower once per batch size, with the symbolic `N` fixed
    /// (tract then plans every operator for that shape once, not per call),
    /// and once for any size.
    pub fn build(weights: &NcfWeights) -> Result<Option<Serving>, ModelError> {
        let Some(item_h1) = weights.item_first_layer() else {
            return Ok(None);
        };
        let model = typed(&onnx::export_tower(weights))?;
        let batch = model.sym("N");
        let fixed = serving_batches()
            .map(|n| {
                let sized = model
                    .concretize_dims(&SymbolValues::default().with(&batch, n as i64))
                    .map_err(tract_error)?;
                Ok((n, runnable(sized)?))
            })
            .collect::<Result<_, ModelError>>()?;
        let (g, m) = (weights.gmf_dim, weights.mlp_dim);
        let h1 = weights.layers[0].out;
        let item_gb = (0..weights.n_items)
            .flat_map(|i| {
                weights.item_gmf[i * g..(i + 1) * g]
                    .iter()
                    .chain(std::iter::once(&weights.item_bias[i]))
                    .copied()
            })
            .collect();
        Ok(Some(Serving {
            fixed,
            flexible: runnable(model)?,
            item_h1,
            item_gb,
            user_first: weights.layers[0].w[..m * h1].to_vec(),
            gmf_out: weights.out_w[..g].to_vec(),
            out_bias: weights.out_b,
            gmf_dim: g,
            mlp_dim: m,
            h1,
        }))
    }

    /// The item half of the first layer, `[n_items][h1]` (fold-in uses it).
    pub fn item_first_layer(&self) -> &[f32] {
        &self.item_h1
    }

    /// Scores one user (`[user_dim]`) against `items` (model indices).
    pub fn score(&self, user: &[f32], items: &[i64]) -> Result<Vec<f32>, ModelError> {
        let (g, m, h1) = (self.gmf_dim, self.mlp_dim, self.h1);
        let n = items.len();
        let (rows, plan) = match self.fixed.iter().find(|(size, _)| *size >= n) {
            Some((size, plan)) => (*size, plan),
            None => (n, &self.flexible),
        };
        // The user's half of the first layer and of the GMF/bias product, once.
        let mut user_h1 = vec![0.0f32; h1];
        add_vec_mat(&user[g..g + m], &self.user_first, &mut user_h1);
        let user_gmf: Vec<f32> = user[..g]
            .iter()
            .zip(&self.gmf_out)
            .map(|(u, w)| u * w)
            .collect();
        let constant = user[g + m] + self.out_bias;
        // Padding rows stay zero; their scores are dropped.
        // Feature-major (`[h1][rows]`, see [`onnx::export_tower`]).
        let mut activations = Tensor::zero::<f32>(&[h1, rows]).map_err(tract_error)?;
        let mut base = Tensor::zero::<f32>(&[1, rows]).map_err(tract_error)?;
        {
            let acts = activations.as_slice_mut::<f32>().map_err(tract_error)?;
            let base = base.as_slice_mut::<f32>().map_err(tract_error)?;
            // A block of items at a time, written feature by feature: each
            // write is a contiguous run of the block's items (item by item,
            // the writes' stride of `rows` floats thrashes the cache when
            // `rows` is a multiple of 512).
            let mut tables: [&[f32]; SERVING_BLOCK] = [&[]; SERVING_BLOCK];
            for (block, chunk) in items.chunks(SERVING_BLOCK).enumerate() {
                let first = block * SERVING_BLOCK;
                for (k, &item) in chunk.iter().enumerate() {
                    let i = usize::try_from(item)
                        .ok()
                        .filter(|i| i * h1 < self.item_h1.len())
                        .ok_or_else(|| {
                            ModelError::Tract(format!("item index {item} is outside the model"))
                        })?;
                    tables[k] = &self.item_h1[i * h1..(i + 1) * h1];
                    let gb = &self.item_gb[i * (g + 1)..(i + 1) * (g + 1)];
                    base[first + k] = constant
                        + gb[g]
                        + gb[..g]
                            .iter()
                            .zip(&user_gmf)
                            .map(|(a, b)| a * b)
                            .sum::<f32>();
                }
                let tables = &tables[..chunk.len()];
                for (j, (feature, u)) in acts.chunks_exact_mut(rows).zip(&user_h1).enumerate() {
                    for (a, table) in feature[first..first + chunk.len()].iter_mut().zip(tables) {
                        *a = (u + table[j]).max(0.0);
                    }
                }
            }
        }
        let out = plan
            .run(tvec!(activations.into(), base.into()))
            .map_err(tract_error)?;
        let scores = out[0].as_slice::<f32>().map_err(tract_error)?;
        Ok(scores[..n].to_vec())
    }
}

/// Runs a scoring graph: `users` is row-major `[user_rows][user_dim]` (one row
/// per item, or one row for the serving form), `items` the item indices.
pub fn run_plan(
    plan: &Plan,
    users: &[f32],
    user_rows: usize,
    items: &[i64],
) -> Result<Vec<f32>, ModelError> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let tract = |e: TractError| ModelError::Tract(format!("{e:#}"));
    let dim = users.len() / user_rows.max(1);
    let user = Tensor::from_shape(&[user_rows, dim], users).map_err(tract)?;
    let item = Tensor::from_shape(&[items.len()], items).map_err(tract)?;
    let out = plan.run(tvec!(user.into(), item.into())).map_err(tract)?;
    Ok(out[0].as_slice::<f32>().map_err(tract)?.to_vec())
}

/// Runs a history-based model's graph: one user (per-user part `user` and a
/// history, most recent first) against `items`.
pub fn run_history_plan(
    plan: &Plan,
    encoder: &HistoryEncoder,
    user: &[f32],
    history: &[(u32, u8)],
    items: &[i64],
) -> Result<Vec<f32>, ModelError> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let tract = |e: TractError| ModelError::Tract(format!("{e:#}"));
    let (n, l, d) = (items.len(), encoder.max_len, user.len());
    let (hist, kinds) = encoder.inputs(history);
    let repeat = |v: &[i64]| -> Vec<i64> { (0..n).flat_map(|_| v.iter().copied()).collect() };
    let users: Vec<f32> = (0..n).flat_map(|_| user.iter().copied()).collect();
    let inputs = tvec!(
        Tensor::from_shape(&[n, d], &users).map_err(tract)?.into(),
        Tensor::from_shape(&[n, l], &repeat(&hist))
            .map_err(tract)?
            .into(),
        Tensor::from_shape(&[n, l], &repeat(&kinds))
            .map_err(tract)?
            .into(),
        Tensor::from_shape(&[n], items).map_err(tract)?.into(),
    );
    let out = plan.run(inputs).map_err(tract)?;
    Ok(out[0].as_slice::<f32>().map_err(tract)?.to_vec())
}

/// The first of `computed` (a form's name and its score) farther than
/// [`PARITY_TOLERANCE`] from the card's `expected` score; NaN fails too.
fn parity_mismatch(
    expected: f32,
    computed: [(&'static str, f32); 2],
) -> Option<(&'static str, f32)> {
    computed.into_iter().find(|(_, s)| {
        let gap = (s - expected).abs();
        gap.is_nan() || gap > PARITY_TOLERANCE
    })
}

/// `a + b`, element by element.
fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// The card beside `NAME.onnx`, checked for its format.
pub fn read_card(path: &Path) -> Result<ModelCard, ModelError> {
    let card_path = ModelFiles::new(path).card;
    let card_err = |detail: String| ModelError::Card {
        path: card_path.display().to_string(),
        detail,
    };
    let card: ModelCard =
        serde_json::from_slice(&read(&card_path)?).map_err(|e| card_err(e.to_string()))?;
    if card.format != CARD_FORMAT {
        return Err(card_err(format!(
            "format is {:?}, expected {CARD_FORMAT:?}",
            card.format
        )));
    }
    Ok(card)
}

impl NcfModel {
    /// Loads `NAME.onnx` with its card and user vectors.
    pub fn load(path: &Path, fold_in: FoldInConfig) -> Result<NcfModel, ModelError> {
        let files = ModelFiles::new(path);
        let card_err = |detail: String| ModelError::Card {
            path: files.card.display().to_string(),
            detail,
        };
        let card = read_card(path)?;
        let bytes = read(&files.onnx)?;
        let (weights, _) = onnx::read_weights(&bytes)?;
        let history = onnx::read_history(&bytes)?;
        let d = weights.user_dim();
        if let Some(encoder) = &history {
            encoder
                .validate(weights.n_items, d)
                .map_err(|e| ModelError::Onnx(onnx::OnnxError::Contract(e)))?;
        }
        match (&history, &card.history) {
            (Some(e), Some(h)) if e.max_len != h.max_len => {
                return Err(card_err(format!(
                    "card says a history of {}, the model reads {}",
                    h.max_len, e.max_len
                )))
            }
            (Some(_), None) => {
                return Err(card_err(
                    "the model reads a history; the card has no `history` section".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(card_err(
                    "the card has a `history` section; the model reads none".into(),
                ))
            }
            _ => {}
        }
        if card.user_vector.dim != d || card.item_ids.len() != weights.n_items {
            return Err(card_err(format!(
                "card says {} dims and {} items, the model has {d} and {}",
                card.user_vector.dim,
                card.item_ids.len(),
                weights.n_items
            )));
        }
        let raw = read(&files.users)?;
        if raw.len() != card.user_ids.len() * d * 4 {
            return Err(card_err(format!(
                "{} holds {} bytes, expected {} users × {d} floats",
                files.users.display(),
                raw.len(),
                card.user_ids.len()
            )));
        }
        let user_vectors: Vec<f32> = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let plan = compile(&bytes)?;
        let serving = Serving::build(&weights)?;
        let new_user_prior_vector = match &card.new_user_prior {
            Some(prior) if prior.len() != d => {
                return Err(card_err(format!(
                    "new_user_prior has {} values, the user vector {d}",
                    prior.len()
                )))
            }
            Some(prior) => prior.clone(),
            None => super::model::mean_row(&user_vectors, d),
        };
        let mut hash = Fnv::default();
        hash.write(card.model_version.as_bytes());
        hash.write(&bytes);
        let model = NcfModel {
            items: card
                .item_ids
                .iter()
                .enumerate()
                .map(|(i, &m)| (m, i as u32))
                .collect(),
            users: card
                .user_ids
                .iter()
                .enumerate()
                .map(|(i, u)| (u.clone(), i as u32))
                .collect(),
            card,
            weights,
            plan,
            serving,
            model_id: hash.0,
            user_vectors,
            new_user_prior_vector,
            fold_in,
            history,
        };
        model.check_parity().map_err(card_err)?;
        Ok(model)
    }

    /// Runs the card's reference pairs through tract: a model whose scores
    /// differ from what its trainer computed is never served.
    fn check_parity(&self) -> Result<(), String> {
        let checks = &self.card.checks;
        if checks.is_empty() {
            return Err("no parity checks: the card must carry reference scores \
                        (`checks`, see models/README.md)"
                .into());
        }
        if let Some(encoder) = &self.history {
            return self.check_history_parity(encoder);
        }
        let d = self.user_dim();
        let rows = self.card.user_ids.len();
        let mut users = Vec::with_capacity(checks.len() * d);
        for c in checks {
            if c.user_row >= rows || c.item as usize >= self.weights.n_items {
                return Err(format!(
                    "parity check (user row {}, item {}) is outside the model",
                    c.user_row, c.item
                ));
            }
            users.extend_from_slice(&self.user_vectors[c.user_row * d..(c.user_row + 1) * d]);
        }
        let items: Vec<i64> = checks.iter().map(|c| c.item as i64).collect();
        let scores = self
            .score_pairs(&users, &items)
            .map_err(|e| e.to_string())?;
        for (k, (c, s)) in checks.iter().zip(scores).enumerate() {
            let served = self
                .score_user(&users[k * d..(k + 1) * d], &[c.item as i64])
                .map_err(|e| e.to_string())?[0];
            if let Some((graph, s)) =
                parity_mismatch(c.score, [("the model", s), ("its serving form", served)])
            {
                return Err(format!(
                    "parity check failed: user row {} item {}: the card says {}, tract computes {s} with {graph}",
                    c.user_row, c.item, c.score
                ));
            }
        }
        Ok(())
    }

    /// The parity checks of a history-based model: each check's history
    /// through the model's graph, and encoded in Rust through the serving form.
    fn check_history_parity(&self, encoder: &HistoryEncoder) -> Result<(), String> {
        let d = self.user_dim();
        let rows = self.card.user_ids.len();
        for c in &self.card.checks {
            let history = c.history.as_deref().unwrap_or(&[]);
            let out_of_model = c.item as usize >= self.weights.n_items
                || (rows > 0 && c.user_row >= rows)
                || history.iter().any(|&(i, k)| {
                    i as usize >= self.weights.n_items
                        || k as usize >= super::history::HISTORY_KINDS
                });
            if out_of_model {
                return Err(format!(
                    "parity check (user row {}, item {}) is outside the model",
                    c.user_row, c.item
                ));
            }
            let user_part = if rows > 0 {
                self.user_vectors[c.user_row * d..(c.user_row + 1) * d].to_vec()
            } else {
                self.new_user_prior_vector.clone()
            };
            let item = [c.item as i64];
            let graph = run_history_plan(&self.plan, encoder, &user_part, history, &item)
                .map_err(|e| e.to_string())?[0];
            let user = add(&user_part, &encoder.user_vector(history));
            let served = self.score_user(&user, &item).map_err(|e| e.to_string())?[0];
            if let Some((form, s)) = parity_mismatch(
                c.score,
                [("the model", graph), ("its serving form", served)],
            ) {
                return Err(format!(
                    "parity check failed: history {history:?} item {}: the card says {}, tract computes {s} with {form}",
                    c.item, c.score
                ));
            }
        }
        Ok(())
    }

    /// Scores one user's vector against `items` in one tract run, with the
    /// serving form when the model has one.
    pub fn score_user(&self, user: &[f32], items: &[i64]) -> Result<Vec<f32>, ModelError> {
        let Some(serving) = &self.serving else {
            let users: Vec<f32> = items.iter().flat_map(|_| user.iter().copied()).collect();
            return self.score_pairs(&users, items);
        };
        if items.is_empty() {
            return Ok(Vec::new());
        }
        serving.score(user, items)
    }

    pub fn user_dim(&self) -> usize {
        self.weights.user_dim()
    }

    pub fn item_index(&self, movie_id: u32) -> Option<u32> {
        self.items.get(&movie_id).copied()
    }

    /// The trained vector of a known user, else the new-user prior.
    pub fn prior(&self, user_id: &str) -> &[f32] {
        let d = self.user_dim();
        match self.users.get(user_id) {
            Some(&i) => &self.user_vectors[i as usize * d..(i as usize + 1) * d],
            None => &self.new_user_prior_vector,
        }
    }

    /// Scores `(user vector, item index)` pairs in one tract run; `users` is
    /// row-major `[items.len()][user_dim]`.
    pub fn score_pairs(&self, users: &[f32], items: &[i64]) -> Result<Vec<f32>, ModelError> {
        if self.history.is_some() {
            return Err(ModelError::Tract(
                "a history model's graph takes histories: use score_user with its user_vector"
                    .into(),
            ));
        }
        run_plan(&self.plan, users, items.len(), items)
    }

    /// The user's vector in this model's space. A history-based model
    /// encodes the state's recent interactions (plus the per-user part);
    /// otherwise the folded-in vector from the state when it belongs to this
    /// model, else the prior.
    pub fn user_vector<'a>(&'a self, user_id: &str, state: &'a UserState) -> Cow<'a, [f32]> {
        if let Some(encoder) = &self.history {
            let encoded = encoder.user_vector(&self.history_of(state));
            return Cow::Owned(add(self.prior(user_id), &encoded));
        }
        if self.has_vector(state) {
            Cow::Borrowed(&state.latent)
        } else {
            Cow::Borrowed(self.prior(user_id))
        }
    }

    /// The state's recent interactions as a history-based model reads them:
    /// most recent first, items the model knows, kinds from the signed weights.
    pub fn history_of(&self, state: &UserState) -> Vec<(u32, u8)> {
        let cap = self.history.as_ref().map_or(0, |e| e.max_len);
        state
            .recent
            .iter()
            .filter_map(|r| Some((self.item_index(r.movie_id)?, kind_of_weight(r.weight))))
            .take(cap)
            .collect()
    }

    /// Whether the state holds a vector folded in for this model.
    fn has_vector(&self, state: &UserState) -> bool {
        state.latent_model == self.model_id && state.latent.len() == self.user_dim()
    }

    /// The fold-in examples of a user: their recent interactions, plus sampled
    /// negatives for implicit models (deterministic: hashed from the user and
    /// the item, so replays give the same vector).
    pub fn examples(&self, user_id: &str, state: &UserState) -> Vec<Example> {
        let mut out = Vec::new();
        let cap = self.fold_in.max_history;
        match self.weights.objective {
            Objective::Implicit => {
                // Implicit models learn what users watch: a low rating is
                // still a watch (as in training); dislikes and skips are not.
                let engaged: Vec<u32> = state.engaged_recent().take(cap).collect();
                for r in state.recent.iter().take(cap) {
                    let Some(item) = self.item_index(r.movie_id) else {
                        continue;
                    };
                    let positive = r.weight > 0.0 || engaged.contains(&r.movie_id);
                    out.push(Example {
                        item: item as usize,
                        target: if positive { 1.0 } else { 0.0 },
                        weight: 1.0,
                    });
                    if positive {
                        for j in 0..self.fold_in.negatives {
                            if let Some(neg) = self.sampled_negative(user_id, r.movie_id, j, state)
                            {
                                out.push(Example {
                                    item: neg,
                                    target: 0.0,
                                    weight: 1.0,
                                });
                            }
                        }
                    }
                }
            }
            Objective::Explicit => {
                let recent: Vec<u32> = state.recent.iter().take(cap).map(|r| r.movie_id).collect();
                for s in state.seen.iter().filter(|s| recent.contains(&s.movie_id)) {
                    let Some(item) = self.item_index(s.movie_id) else {
                        continue;
                    };
                    // Ratings speak for themselves; judgements without a
                    // rating stand for a high or low one.
                    let (lo, hi) = self.card.rating_scale.map_or((1.0, 5.0), |s| (s[0], s[1]));
                    let target = if s.rating_x2 > 0 {
                        s.rating_x2 as f32 / 2.0
                    } else if s.flags & FLAG_DISLIKED != 0 {
                        lo + 0.1 * (hi - lo)
                    } else if s.flags & FLAG_LIKED != 0 {
                        hi - 0.1 * (hi - lo)
                    } else if s.flags & FLAG_COMPLETED != 0 {
                        hi - 0.25 * (hi - lo)
                    } else {
                        continue;
                    };
                    out.push(Example {
                        item: item as usize,
                        target,
                        weight: 1.0,
                    });
                }
            }
        }
        out
    }

    fn sampled_negative(
        &self,
        user_id: &str,
        movie_id: u32,
        j: usize,
        state: &UserState,
    ) -> Option<usize> {
        let n = self.weights.n_items as u64;
        let mut h = Fnv::default();
        h.write(user_id.as_bytes());
        h.write(&movie_id.to_le_bytes());
        h.write(&(j as u64).to_le_bytes());
        let mut x = h.0;
        // A few probes skip items the user has seen.
        for _ in 0..8 {
            let item = (x % n) as usize;
            if !state.is_seen(self.card.item_ids[item]) {
                return Some(item);
            }
            x = x.rotate_left(17).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
        None
    }

    /// Moves the user's vector to fit their interactions (after new events).
    /// A history-based model needs none: its input already changed.
    pub fn fold_in_user(&self, user_id: &str, state: &mut UserState) {
        if self.history.is_some() {
            return;
        }
        let examples = self.examples(user_id, state);
        let prior = self.prior(user_id);
        let warm = self.has_vector(state);
        let start = self.user_vector(user_id, state).to_vec();
        let config = FoldInConfig {
            steps: if warm {
                self.fold_in.warm_steps
            } else {
                self.fold_in.steps
            },
            ..self.fold_in
        };
        let folded = foldin::fold_in(
            &self.weights,
            self.serving.as_ref().map(Serving::item_first_layer),
            prior,
            &start,
            &examples,
            &config,
        );
        state.latent = folded;
        state.latent_model = self.model_id;
    }

    /// The model's score mapped to 0..1 for the blend. History models
    /// score the probability of being the next item; the scorer divides it
    /// by the user's best item's ([`NcfScorer`]).
    pub fn normalized(&self, score: f32) -> f32 {
        match (self.weights.objective, self.card.rating_scale) {
            (Objective::Implicit, _) => score,
            (Objective::Explicit, Some([lo, hi])) => ((score - lo) / (hi - lo)).clamp(0.0, 1.0),
            (Objective::Explicit, None) => ((score - 1.0) / 4.0).clamp(0.0, 1.0),
        }
    }
}

/// The NCF model behind the engine's scorer seam.
pub struct NcfScorer {
    pub model: Arc<NcfModel>,
}

impl Scorer for NcfScorer {
    fn info(&self) -> ModelInfo {
        ModelInfo {
            name: "ncf".into(),
            version: self.model.card.model_version.clone(),
        }
    }

    /// Scores all of one user's candidates in one tract run (the serving
    /// form: the item half of the first layer is precomputed); items the model
    /// does not know get NaN (no NCF signal).
    fn score(
        &self,
        user_id: &str,
        state: &UserState,
        items: &[u32],
    ) -> Result<Vec<f32>, ScoreError> {
        let m = &self.model;
        if m.history.is_some() {
            // Relative to the user's best item in the whole catalogue.
            let all = self.score_catalogue(user_id, state)?.unwrap_or_default();
            return Ok(items
                .iter()
                .map(|id| crate::recommend::score_of(&all, *id))
                .collect());
        }
        let user = m.user_vector(user_id, state);
        let known: Vec<(usize, i64)> = items
            .iter()
            .enumerate()
            .filter_map(|(k, id)| m.item_index(*id).map(|i| (k, i as i64)))
            .collect();
        let indices: Vec<i64> = known.iter().map(|k| k.1).collect();
        let started = Instant::now();
        let scores = m
            .score_user(&user, &indices)
            .map_err(|e| ScoreError(e.to_string()))?;
        metrics::inference(started.elapsed().as_secs_f64(), indices.len());
        let mut out = vec![f32::NAN; items.len()];
        for ((k, _), s) in known.iter().zip(scores) {
            out[*k] = m.normalized(s);
        }
        Ok(out)
    }

    fn history_len(&self) -> Option<usize> {
        self.model.history.as_ref().map(|e| e.max_len)
    }

    fn scores_catalogue_per_call(&self) -> bool {
        self.model.history.is_some()
    }

    /// The whole catalogue in one run of the serving form, for history
    /// models. Per-user models keep re-scoring the other sources'
    /// candidates only: their deeper default tower made the catalogue pass
    /// halve the engine's events per CPU-second on ml-latest-small (12.3k
    /// against 21.5k for a history model; benches/README.md), and their
    /// own candidates were never measured to pay for it.
    fn score_catalogue(
        &self,
        user_id: &str,
        state: &UserState,
    ) -> Result<Option<Vec<(u32, f32)>>, ScoreError> {
        let m = &self.model;
        if m.history.is_none() {
            return Ok(None);
        }
        let user = m.user_vector(user_id, state);
        let indices: Vec<i64> = (0..m.weights.n_items as i64).collect();
        let started = Instant::now();
        let scores = m
            .score_user(&user, &indices)
            .map_err(|e| ScoreError(e.to_string()))?;
        metrics::inference(started.elapsed().as_secs_f64(), indices.len());
        // A history model's probabilities are relative to the user's best
        // item in the catalogue (seen ones included: the replay's blend
        // weight was chosen with this scale); a rating head's ratings are
        // mapped onto the rating scale as per-user models' are.
        let scale = match m.weights.objective {
            Objective::Implicit => 1.0 / scores.iter().copied().fold(f32::MIN_POSITIVE, f32::max),
            Objective::Explicit => 1.0,
        };
        let mut out: Vec<(u32, f32)> = m
            .card
            .item_ids
            .iter()
            .zip(scores)
            .map(|(&id, s)| (id, m.normalized(s) * scale))
            .collect();
        out.sort_unstable_by_key(|s| s.0);
        Ok(Some(out))
    }

    fn observe(&self, user_id: &str, state: &mut UserState) {
        if self.model.history.is_some() {
            return;
        }
        let started = Instant::now();
        self.model.fold_in_user(user_id, state);
        metrics::fold_in(started.elapsed().as_secs_f64());
    }
}
