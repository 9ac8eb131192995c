//! Fold-in: a user's latent vector learned from their own interactions at
//! serving time, without retraining. Item vectors and the network stay fixed;
//! a few steps of gradient descent move the user vector to fit the user's
//! recent interactions, regularised towards a prior (the trained embedding for
//! known users, the mean trained user — the "average viewer" — for new ones).
//!
//! ```text
//! L(u) = 1/n · Σ_j w_j · ℓ(f(u, i_j), y_j)  +  λ · ‖u − u_prior‖²
//! ```
//!
//! Pure and deterministic: the same examples from the same start give the same
//! vector bit for bit, so replays after a crash reproduce the state exactly.

use serde::{Deserialize, Serialize};

use super::model::NcfWeights;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FoldInConfig {
    /// Gradient steps per update (0 keeps the prior).
    pub steps: usize,
    pub learning_rate: f32,
    /// Pull towards the prior vector.
    pub l2: f32,
    /// Sampled negatives per positive interaction (implicit models).
    pub negatives: usize,
    /// Most recent interactions fitted.
    pub max_history: usize,
}

impl Default for FoldInConfig {
    fn default() -> Self {
        FoldInConfig {
            steps: 20,
            learning_rate: 0.5,
            l2: 0.05,
            negatives: 4,
            max_history: 30,
        }
    }
}

/// One observed (or sampled) interaction in model item space.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Example {
    pub item: usize,
    /// 0..1 for implicit models, a rating for explicit ones.
    pub target: f32,
    pub weight: f32,
}

/// Fits the user vector to `examples`, starting from `start`.
pub fn fold_in(
    weights: &NcfWeights,
    prior: &[f32],
    start: &[f32],
    examples: &[Example],
    config: &FoldInConfig,
) -> Vec<f32> {
    let mut user = start.to_vec();
    if examples.is_empty() {
        return user;
    }
    let total_weight: f32 = examples.iter().map(|e| e.weight).sum::<f32>().max(1e-6);
    let mut grad = vec![0.0f32; user.len()];
    for _ in 0..config.steps {
        grad.iter_mut().for_each(|g| *g = 0.0);
        for e in examples {
            weights.accumulate_user_grad(
                &user,
                e.item,
                e.target,
                e.weight / total_weight,
                &mut grad,
            );
        }
        for ((u, g), p) in user.iter_mut().zip(&grad).zip(prior) {
            *u -= config.learning_rate * (g + 2.0 * config.l2 * (*u - p));
        }
    }
    user
}

/// Loss of the user vector on the examples (without the prior term).
pub fn loss(weights: &NcfWeights, user: &[f32], examples: &[Example]) -> f32 {
    let mut sink = vec![0.0; user.len()];
    examples
        .iter()
        .map(|e| weights.accumulate_user_grad(user, e.item, e.target, e.weight, &mut sink))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ncf::model::tests::random_weights;
    use crate::ncf::model::Objective;

    #[test]
    fn folding_in_lowers_the_loss_and_is_deterministic() {
        let w = random_weights(Objective::Implicit, true, 5);
        let prior = vec![0.0; w.user_dim()];
        let examples = [
            Example {
                item: 1,
                target: 1.0,
                weight: 1.0,
            },
            Example {
                item: 4,
                target: 1.0,
                weight: 1.0,
            },
            Example {
                item: 2,
                target: 0.0,
                weight: 1.0,
            },
            Example {
                item: 6,
                target: 0.0,
                weight: 1.0,
            },
        ];
        let config = FoldInConfig::default();
        let folded = fold_in(&w, &prior, &prior, &examples, &config);
        assert!(loss(&w, &folded, &examples) < loss(&w, &prior, &examples));
        assert_eq!(folded, fold_in(&w, &prior, &prior, &examples, &config));
        assert!(w.score(&folded, 1) > w.score(&prior, 1));
        assert!(w.score(&folded, 6) < w.score(&prior, 6));
    }

    #[test]
    fn no_examples_keep_the_start() {
        let w = random_weights(Objective::Explicit, false, 5);
        let start = vec![0.25; w.user_dim()];
        assert_eq!(
            fold_in(&w, &start, &start, &[], &FoldInConfig::default()),
            start
        );
    }
}
