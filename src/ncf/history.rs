//! The history encoder of a history-based NeuMF: the user vector computed
//! from the user's last `L` interactions, so every event changes the next
//! list at once, a brand-new user is served from their first event, and no
//! per-user training (fold-in) is needed.
//!
//! ```text
//! w_l  = position_weight[l] · kind_weight[kind_l] / sqrt(max(1, #non-padding))
//! user = base + Σ_l w_l · table[item_l]          (l = 0 is the most recent)
//! ```
//!
//! The vector has the NeuMF user layout `[gmf | mlp | bias]`, so the rest of
//! the model (and its serving form) is an ordinary NeuMF. The ONNX graph
//! computes the same sum from its `history` and `history_kind` inputs
//! (`models/README.md`).

use crate::config::EventWeights;
use crate::event::EventType;

/// Kinds of history entries: 0 is padding; 1..=6 bucket the signed
/// preference weight of the entry's latest event ([`kind_of_weight`]).
pub const HISTORY_KINDS: usize = 7;

/// The kind of a history entry from its signed preference weight (the
/// engine's `EventWeights::weight`, default scale): 1 strong dislike (a 1★
/// rating, a dislike), 2 dislike (2★, a skip), 3 neutral (3★, a view),
/// 4 mild interest (4★, a click, a play), 5 strong interest (5★, a
/// completion, a watchlist add), 6 a like.
pub fn kind_of_weight(weight: f32) -> u8 {
    match weight {
        w if w <= -2.0 => 1,
        w if w <= -0.75 => 2,
        w if w < 0.25 => 3,
        w if w < 1.25 => 4,
        w if w < 2.5 => 5,
        _ => 6,
    }
}

/// The kind of a rating event of `rating` stars under the default weights:
/// how training data (ratings) and the engine's events share one scale.
pub fn kind_of_rating(rating: f32) -> u8 {
    let weight = EventWeights::default().weight(EventType::Rate, Some(rating as f64));
    kind_of_weight(weight as f32)
}

#[derive(Debug, Clone, PartialEq)]
pub struct HistoryEncoder {
    /// `L`: how many of the user's most recent interactions the model reads.
    pub max_len: usize,
    /// `[L]`, position 0 the most recent.
    pub position_weight: Vec<f32>,
    /// `[HISTORY_KINDS]`; entry 0 (padding) is 0.
    pub kind_weight: Vec<f32>,
    /// `[n_items][dim]`
    pub table: Vec<f32>,
    /// `[dim]`: the vector of a user without history.
    pub base: Vec<f32>,
}

impl HistoryEncoder {
    pub fn dim(&self) -> usize {
        self.base.len()
    }

    pub fn n_items(&self) -> usize {
        self.table.len() / self.dim().max(1)
    }

    pub fn validate(&self, n_items: usize, user_dim: usize) -> Result<(), String> {
        let checks = [
            (
                "history.position_weight",
                self.position_weight.len(),
                self.max_len,
            ),
            ("history.kind_weight", self.kind_weight.len(), HISTORY_KINDS),
            ("history.base", self.base.len(), user_dim),
            ("history.table", self.table.len(), n_items * user_dim),
        ];
        for (name, got, want) in checks {
            if got != want {
                return Err(format!("{name} has {got} values, expected {want}"));
            }
        }
        if self.max_len == 0 {
            return Err("history.max_len must be at least 1".into());
        }
        Ok(())
    }

    /// The user vector of a history, most recent first, as `(item index,
    /// kind)`; entries past `max_len` are ignored, kind 0 is padding.
    pub fn user_vector(&self, history: &[(u32, u8)]) -> Vec<f32> {
        let dim = self.dim();
        let mut user = self.base.clone();
        let window = &history[..history.len().min(self.max_len)];
        let n = window.iter().filter(|(_, k)| *k != 0).count();
        let norm = 1.0 / (n.max(1) as f32).sqrt();
        for (l, &(item, kind)) in window.iter().enumerate() {
            if kind == 0 {
                continue;
            }
            let w = self.position_weight[l] * self.kind_weight[kind as usize] * norm;
            let row = &self.table[item as usize * dim..(item as usize + 1) * dim];
            for (u, t) in user.iter_mut().zip(row) {
                *u += w * t;
            }
        }
        user
    }

    /// A history as the graph's inputs: `max_len` item indices and kinds,
    /// padded with item 0 of kind 0.
    pub fn inputs(&self, history: &[(u32, u8)]) -> (Vec<i64>, Vec<i64>) {
        let mut items = vec![0i64; self.max_len];
        let mut kinds = vec![0i64; self.max_len];
        for (l, &(item, kind)) in history.iter().take(self.max_len).enumerate() {
            items[l] = item as i64;
            kinds[l] = kind as i64;
        }
        (items, kinds)
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::rng::Rng;

    pub fn random_encoder(n_items: usize, dim: usize, max_len: usize, seed: u64) -> HistoryEncoder {
        let mut rng = Rng::new(seed);
        let mut r = |n: usize, s: f64| -> Vec<f32> {
            (0..n).map(|_| ((rng.unit() - 0.5) * s) as f32).collect()
        };
        let mut kind_weight = r(HISTORY_KINDS, 2.0);
        kind_weight[0] = 0.0;
        HistoryEncoder {
            max_len,
            position_weight: r(max_len, 2.0),
            kind_weight,
            table: r(n_items * dim, 1.0),
            base: r(dim, 0.2),
        }
    }

    #[test]
    fn ratings_map_onto_the_engines_weight_buckets() {
        let kinds: Vec<u8> = [1.0, 2.0, 3.0, 4.0, 5.0, 0.5, 4.5]
            .iter()
            .map(|&r| kind_of_rating(r))
            .collect();
        assert_eq!(kinds, vec![1, 2, 3, 4, 5, 1, 5]);
        let w = EventWeights::default();
        assert_eq!(kind_of_weight(w.weight(EventType::Like, None) as f32), 6);
        assert_eq!(kind_of_weight(w.weight(EventType::Dislike, None) as f32), 1);
        assert_eq!(kind_of_weight(w.weight(EventType::Skip, None) as f32), 2);
        assert_eq!(
            kind_of_weight(w.weight(EventType::Complete, None) as f32),
            5
        );
    }

    #[test]
    fn an_empty_history_is_the_base_and_padding_changes_nothing() {
        let e = random_encoder(5, 4, 3, 1);
        assert_eq!(e.user_vector(&[]), e.base);
        let with_pad = e.user_vector(&[(2, 4), (0, 0)]);
        assert_eq!(with_pad, e.user_vector(&[(2, 4)]));
        // Entries past the window are ignored.
        assert_eq!(
            e.user_vector(&[(1, 3), (2, 4), (3, 5), (4, 6)]),
            e.user_vector(&[(1, 3), (2, 4), (3, 5)])
        );
    }

    #[test]
    fn the_sum_is_weighted_by_position_and_kind_and_normalised() {
        let e = random_encoder(3, 2, 2, 2);
        let u = e.user_vector(&[(1, 2), (2, 5)]);
        let norm = 1.0 / 2f32.sqrt();
        for (d, got) in u.iter().enumerate() {
            let want = e.base[d]
                + norm * e.position_weight[0] * e.kind_weight[2] * e.table[2 + d]
                + norm * e.position_weight[1] * e.kind_weight[5] * e.table[4 + d];
            assert!((got - want).abs() < 1e-6);
        }
    }
}
