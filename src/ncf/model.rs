//! NeuMF in its inference form (BatchNorm folded, dropout gone): the weights the
//! ONNX exporter writes, and a plain-Rust forward pass and user-vector gradient
//! used for fold-in and as a third check in the parity test.
//!
//! The model scores a `(user vector, item index)` pair. The user vector is
//! `[gmf (G) | mlp (M) | bias (1)]`; item tables are part of the model:
//!
//! ```text
//! gmf    = user_gmf ⊙ item_gmf[i]
//! h_0    = [user_mlp, item_mlp[i]];  h_k = relu(h_{k-1}·W_k + b_k) (+ h_{k-1} if residual)
//! logit  = [gmf, h_L]·w_out + b_out + user_bias + item_bias[i]
//! score  = sigmoid(logit) (implicit)   or   global_mean + logit (explicit)
//! ```

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Rating regression (MSE); the score is a predicted rating.
    Explicit,
    /// Interaction probability (log loss with sampled negatives).
    Implicit,
}

impl Objective {
    pub fn as_str(self) -> &'static str {
        match self {
            Objective::Explicit => "explicit",
            Objective::Implicit => "implicit",
        }
    }
}

/// `out += x · w`, with `w` row-major `[x.len()][out.len()]`: a vector
/// through a layer's weights (or a block of its rows).
pub fn add_vec_mat(x: &[f32], w: &[f32], out: &mut [f32]) {
    let width = out.len();
    for (k, &xk) in x.iter().enumerate() {
        for (o, &wk) in out.iter_mut().zip(&w[k * width..(k + 1) * width]) {
            *o += xk * wk;
        }
    }
}

/// The mean of row-major `rows` of width `dim` (zeros without rows): the
/// mean trained user, where the card names no new-user prior.
pub fn mean_row(rows: &[f32], dim: usize) -> Vec<f32> {
    let n = (rows.len() / dim).max(1) as f32;
    let mut mean = vec![0.0f32; dim];
    for row in rows.chunks_exact(dim) {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += v / n;
        }
    }
    mean
}

/// One hidden layer, `out = relu(in·w + b)`, `w` stored row-major `[inp][out]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Dense {
    pub inp: usize,
    pub out: usize,
    pub w: Vec<f32>,
    pub b: Vec<f32>,
    /// Adds the layer's input to its output (only when `inp == out`).
    pub residual: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NcfWeights {
    pub objective: Objective,
    pub gmf_dim: usize,
    /// The user's (and item's) MLP embedding size; the tower's input is twice this.
    pub mlp_dim: usize,
    pub n_items: usize,
    /// `[n_items][gmf_dim]`
    pub item_gmf: Vec<f32>,
    /// `[n_items][mlp_dim]`
    pub item_mlp: Vec<f32>,
    pub item_bias: Vec<f32>,
    pub layers: Vec<Dense>,
    /// `[gmf_dim + last layer width]`
    pub out_w: Vec<f32>,
    pub out_b: f32,
    /// Added to explicit predictions; 0 for implicit models.
    pub global_mean: f32,
}

/// Intermediate values of one forward pass, kept for the backward pass.
struct Trace {
    /// Input of each layer then the last output: `layers.len() + 1` vectors.
    acts: Vec<Vec<f32>>,
    /// Pre-activation of each layer.
    pre: Vec<Vec<f32>>,
    logit: f32,
}

impl NcfWeights {
    /// Length of a user vector: `gmf | mlp | bias`.
    pub fn user_dim(&self) -> usize {
        self.gmf_dim + self.mlp_dim + 1
    }

    fn tower_out(&self) -> usize {
        self.layers.last().map_or(2 * self.mlp_dim, |l| l.out)
    }

    /// Checks that every table has the size the dimensions promise.
    pub fn validate(&self) -> Result<(), String> {
        let (g, m, n) = (self.gmf_dim, self.mlp_dim, self.n_items);
        let mut expect = vec![
            ("item_gmf", self.item_gmf.len(), n * g),
            ("item_mlp", self.item_mlp.len(), n * m),
            ("item_bias", self.item_bias.len(), n),
            ("out_w", self.out_w.len(), g + self.tower_out()),
        ];
        let mut width = 2 * m;
        for (k, l) in self.layers.iter().enumerate() {
            if l.inp != width {
                return Err(format!(
                    "layer {k} takes {} inputs, expected {width}",
                    l.inp
                ));
            }
            if l.residual && l.inp != l.out {
                return Err(format!("layer {k} is residual but changes width"));
            }
            expect.push(("layer weight", l.w.len(), l.inp * l.out));
            expect.push(("layer bias", l.b.len(), l.out));
            width = l.out;
        }
        for (name, got, want) in expect {
            if got != want {
                return Err(format!("{name} has {got} values, expected {want}"));
            }
        }
        Ok(())
    }

    /// One NeuMF whose logit is the mean of the members' logits: the members'
    /// embeddings side by side, their towers block-diagonal, their output
    /// weights, biases and user biases averaged. The serving contract stays
    /// the same, so an ensemble is exported, checked and served like any
    /// model. `users[k]` are member k's user vectors, row-major, one row per
    /// user in the same order for every member. Members must share their
    /// objective, dimensions, layer widths and item count.
    pub fn ensemble(members: &[(NcfWeights, Vec<f32>)]) -> Result<(NcfWeights, Vec<f32>), String> {
        let (first, first_users) = members.first().ok_or("no members")?;
        let k = members.len();
        let (g, m, n_items) = (first.gmf_dim, first.mlp_dim, first.n_items);
        let widths: Vec<(usize, bool)> = first.layers.iter().map(|l| (l.out, l.residual)).collect();
        let n_users = first_users.len() / first.user_dim();
        for (w, u) in members {
            let same = w.objective == first.objective
                && (w.gmf_dim, w.mlp_dim, w.n_items) == (g, m, n_items)
                && w.global_mean == first.global_mean
                && w.layers
                    .iter()
                    .map(|l| (l.out, l.residual))
                    .eq(widths.iter().copied())
                && u.len() == first_users.len();
            if !same {
                return Err("ensemble members differ in shape".into());
            }
        }
        let share = 1.0 / k as f32;
        // Where member j's tower value o sits in the merged tower, per level.
        // Level 0 is [user mlp (all members) | item mlp (all members)]; a
        // residual layer keeps its input's order so the skip adds like to like.
        let mut place: Vec<Vec<usize>> = (0..k)
            .map(|j| {
                (0..2 * m)
                    .map(|o| {
                        if o < m {
                            j * m + o
                        } else {
                            k * m + j * m + (o - m)
                        }
                    })
                    .collect()
            })
            .collect();
        let mut layers = Vec::with_capacity(widths.len());
        let mut inp = 2 * m * k;
        for (level, &(width, residual)) in widths.iter().enumerate() {
            let out = width * k;
            let next: Vec<Vec<usize>> = (0..k)
                .map(|j| {
                    if residual {
                        place[j].clone()
                    } else {
                        (0..width).map(|o| j * width + o).collect()
                    }
                })
                .collect();
            let mut w = vec![0.0f32; inp * out];
            let mut b = vec![0.0f32; out];
            for (j, (member, _)) in members.iter().enumerate() {
                let l = &member.layers[level];
                for a in 0..l.inp {
                    for o in 0..l.out {
                        w[place[j][a] * out + next[j][o]] = l.w[a * l.out + o];
                    }
                }
                for o in 0..l.out {
                    b[next[j][o]] = l.b[o];
                }
            }
            layers.push(Dense {
                inp,
                out,
                w,
                b,
                residual,
            });
            place = next;
            inp = out;
        }
        let tower = inp;
        let mut out_w = vec![0.0f32; g * k + tower];
        let mut item_gmf = vec![0.0f32; n_items * g * k];
        let mut item_mlp = vec![0.0f32; n_items * m * k];
        let mut item_bias = vec![0.0f32; n_items];
        let mut out_b = 0.0;
        for (j, (member, _)) in members.iter().enumerate() {
            for o in 0..g {
                out_w[j * g + o] = member.out_w[o] * share;
            }
            for (o, &at) in place[j].iter().enumerate() {
                out_w[g * k + at] = member.out_w[g + o] * share;
            }
            for i in 0..n_items {
                item_gmf[i * g * k + j * g..i * g * k + (j + 1) * g]
                    .copy_from_slice(&member.item_gmf[i * g..(i + 1) * g]);
                item_mlp[i * m * k + j * m..i * m * k + (j + 1) * m]
                    .copy_from_slice(&member.item_mlp[i * m..(i + 1) * m]);
                item_bias[i] += member.item_bias[i] * share;
            }
            out_b += member.out_b * share;
        }
        let merged = NcfWeights {
            objective: first.objective,
            gmf_dim: g * k,
            mlp_dim: m * k,
            n_items,
            item_gmf,
            item_mlp,
            item_bias,
            layers,
            out_w,
            out_b,
            global_mean: first.global_mean,
        };
        let (d, dk) = (first.user_dim(), merged.user_dim());
        let mut users = vec![0.0f32; n_users * dk];
        for (j, (_, member_users)) in members.iter().enumerate() {
            for u in 0..n_users {
                let src = &member_users[u * d..(u + 1) * d];
                let dst = &mut users[u * dk..(u + 1) * dk];
                dst[j * g..(j + 1) * g].copy_from_slice(&src[..g]);
                dst[g * k + j * m..g * k + (j + 1) * m].copy_from_slice(&src[g..g + m]);
                dst[dk - 1] += src[g + m] * share;
            }
        }
        Ok((merged, users))
    }

    /// The item half of the first MLP layer for every item,
    /// `item_mlp[i] · W₁[item rows] + b₁`, row-major `[n_items][h₁]`: with it
    /// a pair's first layer is the user's half plus a row. `None` without
    /// layers or when the first layer is residual (it needs the whole input).
    pub fn item_first_layer(&self) -> Option<Vec<f32>> {
        let first = self.layers.first().filter(|l| !l.residual)?;
        let (m, h1) = (self.mlp_dim, first.out);
        let mut table = Vec::with_capacity(self.n_items * h1);
        for row in self.item_mlp.chunks_exact(m) {
            let start = table.len();
            table.extend_from_slice(&first.b);
            add_vec_mat(row, &first.w[m * h1..2 * m * h1], &mut table[start..]);
        }
        Some(table)
    }

    fn trace(&self, user: &[f32], item: usize) -> Trace {
        let (g, m) = (self.gmf_dim, self.mlp_dim);
        let mut h0 = Vec::with_capacity(2 * m);
        h0.extend_from_slice(&user[g..g + m]);
        h0.extend_from_slice(&self.item_mlp[item * m..(item + 1) * m]);
        let mut acts = vec![h0];
        let mut pre = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let x = acts.last().expect("input");
            let mut z = l.b.clone();
            for (i, &xi) in x.iter().enumerate() {
                if xi != 0.0 {
                    let row = &l.w[i * l.out..(i + 1) * l.out];
                    for (zj, &wj) in z.iter_mut().zip(row) {
                        *zj += xi * wj;
                    }
                }
            }
            let mut a: Vec<f32> = z.iter().map(|&v| v.max(0.0)).collect();
            if l.residual {
                for (aj, &xj) in a.iter_mut().zip(x) {
                    *aj += xj;
                }
            }
            pre.push(z);
            acts.push(a);
        }
        let ig = &self.item_gmf[item * g..(item + 1) * g];
        let mut logit = self.out_b + user[g + m] + self.item_bias[item];
        for k in 0..g {
            logit += user[k] * ig[k] * self.out_w[k];
        }
        for (h, w) in acts.last().expect("output").iter().zip(&self.out_w[g..]) {
            logit += h * w;
        }
        Trace { acts, pre, logit }
    }

    /// The score of a logit: sigmoid (implicit) or the global mean plus it.
    pub fn link(&self, logit: f32) -> f32 {
        match self.objective {
            Objective::Implicit => 1.0 / (1.0 + (-logit).exp()),
            Objective::Explicit => self.global_mean + logit,
        }
    }

    /// The model's score for one pair.
    pub fn score(&self, user: &[f32], item: usize) -> f32 {
        self.link(self.trace(user, item).logit)
    }

    /// Adds `weight · ∂loss/∂user` to `grad` and returns the pair's loss, for
    /// log loss (implicit; `target` in 0..1) or squared error (explicit).
    pub fn accumulate_user_grad(
        &self,
        user: &[f32],
        item: usize,
        target: f32,
        weight: f32,
        grad: &mut [f32],
    ) -> f32 {
        let (g, m) = (self.gmf_dim, self.mlp_dim);
        let t = self.trace(user, item);
        let score = self.link(t.logit);
        let (loss, dlogit) = match self.objective {
            Objective::Implicit => {
                let p = score.clamp(1e-7, 1.0 - 1e-7);
                (
                    -(target * p.ln() + (1.0 - target) * (1.0 - p).ln()),
                    score - target,
                )
            }
            Objective::Explicit => ((score - target).powi(2), 2.0 * (score - target)),
        };
        let d = dlogit * weight;
        // GMF branch and the user's bias.
        let ig = &self.item_gmf[item * g..(item + 1) * g];
        for k in 0..g {
            grad[k] += d * self.out_w[k] * ig[k];
        }
        grad[g + m] += d;
        // MLP tower, backwards.
        let mut dh: Vec<f32> = self.out_w[g..].iter().map(|w| d * w).collect();
        for (k, l) in self.layers.iter().enumerate().rev() {
            let z = &t.pre[k];
            let x = &t.acts[k];
            let dz: Vec<f32> = dh
                .iter()
                .zip(z)
                .map(|(&dv, &zv)| if zv > 0.0 { dv } else { 0.0 })
                .collect();
            let mut dx = if l.residual {
                dh.clone()
            } else {
                vec![0.0; l.inp]
            };
            for (i, dxi) in dx.iter_mut().enumerate().take(x.len()) {
                let row = &l.w[i * l.out..(i + 1) * l.out];
                *dxi += row.iter().zip(&dz).map(|(w, g)| w * g).sum::<f32>();
            }
            dh = dx;
        }
        // The first m inputs of the tower are the user's MLP embedding.
        for k in 0..m {
            grad[g + k] += dh[k];
        }
        loss * weight
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::rng::Rng;

    pub fn random_weights(objective: Objective, residual: bool, seed: u64) -> NcfWeights {
        let mut rng = Rng::new(seed);
        let mut r =
            |n: usize| -> Vec<f32> { (0..n).map(|_| (rng.unit() as f32 - 0.5) * 0.8).collect() };
        let (g, m, n) = (4, 3, 7);
        let layers = vec![
            Dense {
                inp: 6,
                out: 6,
                w: r(36),
                b: r(6),
                residual,
            },
            Dense {
                inp: 6,
                out: 4,
                w: r(24),
                b: r(4),
                residual: false,
            },
        ];
        NcfWeights {
            objective,
            gmf_dim: g,
            mlp_dim: m,
            n_items: n,
            item_gmf: r(n * g),
            item_mlp: r(n * m),
            item_bias: r(n),
            layers,
            out_w: r(g + 4),
            out_b: 0.1,
            global_mean: if objective == Objective::Explicit {
                3.5
            } else {
                0.0
            },
        }
    }

    #[test]
    fn an_ensemble_scores_the_mean_logit_of_its_members() {
        for residual in [false, true] {
            for objective in [Objective::Explicit, Objective::Implicit] {
                let members: Vec<(NcfWeights, Vec<f32>)> = (0..3)
                    .map(|seed| {
                        let w = random_weights(objective, residual, 10 + seed);
                        let mut rng = Rng::new(99 + seed);
                        let users = (0..2 * w.user_dim())
                            .map(|_| rng.unit() as f32 - 0.5)
                            .collect();
                        (w, users)
                    })
                    .collect();
                let (merged, users) = NcfWeights::ensemble(&members).expect("same shapes");
                merged.validate().expect("consistent tables");
                let (d, dk) = (members[0].0.user_dim(), merged.user_dim());
                for u in 0..2 {
                    for item in 0..merged.n_items {
                        let mean_logit = members
                            .iter()
                            .map(|(w, us)| w.trace(&us[u * d..(u + 1) * d], item).logit)
                            .sum::<f32>()
                            / 3.0;
                        let got = merged.trace(&users[u * dk..(u + 1) * dk], item).logit;
                        assert!((got - mean_logit).abs() < 1e-5, "{got} vs {mean_logit}");
                    }
                }
            }
        }
    }

    #[test]
    fn analytic_gradient_matches_finite_differences() {
        for objective in [Objective::Implicit, Objective::Explicit] {
            for residual in [false, true] {
                let w = random_weights(objective, residual, 11);
                w.validate().unwrap();
                let user: Vec<f32> = (0..w.user_dim()).map(|k| 0.3 - 0.07 * k as f32).collect();
                let target = if objective == Objective::Implicit {
                    1.0
                } else {
                    4.0
                };
                let mut grad = vec![0.0; w.user_dim()];
                w.accumulate_user_grad(&user, 2, target, 1.0, &mut grad);
                for k in 0..w.user_dim() {
                    let eps = 1e-3;
                    let mut up = user.clone();
                    up[k] += eps;
                    let mut down = user.clone();
                    down[k] -= eps;
                    let mut sink = vec![0.0; w.user_dim()];
                    let lp = w.accumulate_user_grad(&up, 2, target, 1.0, &mut sink);
                    let ld = w.accumulate_user_grad(&down, 2, target, 1.0, &mut sink);
                    let numeric = (lp - ld) / (2.0 * eps);
                    assert!(
                        (numeric - grad[k]).abs() < 2e-2 * (1.0 + numeric.abs()),
                        "{objective:?} residual={residual} dim {k}: {numeric} vs {}",
                        grad[k]
                    );
                }
            }
        }
    }
}
