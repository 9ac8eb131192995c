//! Blending and ranking: pure functions from normalized signals to an ordered,
//! diversified list.
//!
//! The blended score of a candidate is the weighted sum
//! `affinity·w_a + similarity·w_s + popularity·w_p + trending·w_t + co_watched·w_c (+ ncf·w_n)`
//! of signals that are each normalized to `[0, 1]` (affinity to `[-1, 1]`:
//! disliked genres push items down). The NCF term is present only when a model
//! scorer produced a score for the candidate.

use serde::{Deserialize, Serialize};

use crate::catalog::GenreSet;
use crate::config::BlendWeights;

/// The normalized signals of one candidate, published with every item.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Signals {
    pub affinity: f64,
    pub similarity: f64,
    pub popularity: f64,
    pub trending: f64,
    pub co_watched: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ncf: Option<f64>,
}

/// Which signal contributed most; drives the human reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dominant {
    Affinity,
    Similarity,
    Popularity,
    Trending,
    CoWatched,
    Ncf,
}

pub fn blend(s: &Signals, w: &BlendWeights) -> f64 {
    s.affinity * w.affinity
        + s.similarity * w.similarity
        + s.popularity * w.popularity
        + s.trending * w.trending
        + s.co_watched * w.co_watched
        + s.ncf.unwrap_or(0.0) * w.ncf
}

pub fn dominant(s: &Signals, w: &BlendWeights) -> Dominant {
    let parts = [
        (Dominant::CoWatched, s.co_watched * w.co_watched),
        (Dominant::Similarity, s.similarity * w.similarity),
        (Dominant::Affinity, s.affinity * w.affinity),
        (Dominant::Ncf, s.ncf.unwrap_or(0.0) * w.ncf),
        (Dominant::Trending, s.trending * w.trending),
        (Dominant::Popularity, s.popularity * w.popularity),
    ];
    parts
        .iter()
        .fold((Dominant::Popularity, f64::MIN), |best, &(d, v)| {
            if v > best.1 {
                (d, v)
            } else {
                best
            }
        })
        .0
}

/// `ln(1 + x) / ln(1 + max)`: popularity is heavy-tailed, so compare on a
/// log scale. One `max`, its denominator computed once.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogScale {
    max: f64,
    ln1p_max: f64,
}

impl LogScale {
    pub fn new(max: f64) -> LogScale {
        LogScale {
            max,
            ln1p_max: (1.0 + max).ln(),
        }
    }

    pub fn normalize(self, x: f64) -> f64 {
        if self.max <= 0.0 || x <= 0.0 {
            0.0
        } else {
            ((1.0 + x).ln() / self.ln1p_max).min(1.0)
        }
    }
}

/// A scored candidate before ranking.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub movie_id: u32,
    pub score: f64,
    pub genres: GenreSet,
}

/// Orders by score (descending), ties by movie id (ascending): total and deterministic.
pub fn rank(items: &mut [Scored]) {
    // Ids are unique, so the order is total and an unstable sort is deterministic.
    items.sort_unstable_by(by_rank);
}

/// Items in a total `order`, put in it only as far as they are read: a
/// user's few hundred candidates, or a thousand co-watched items, are read
/// for their first few dozen, so most are never sorted.
#[derive(Debug)]
pub struct LazyOrder<T> {
    items: Vec<T>,
    /// `items[..sorted]` holds the first items in final order.
    sorted: usize,
    /// The first chunk put in order; each later one is as long as all before.
    first_chunk: usize,
    /// Where iteration goes on.
    next: usize,
}

/// A total order for ranking, best first: no two items compare equal, so
/// unstable sorting is deterministic. A trait rather than a function
/// pointer so that every selection and sort inlines its comparisons (a
/// recompute makes a few thousand).
pub trait Ranked: Copy {
    fn rank_order(&self, other: &Self) -> std::cmp::Ordering;
}

impl Ranked for Scored {
    fn rank_order(&self, other: &Self) -> std::cmp::Ordering {
        by_rank(self, other)
    }
}

impl<T: Ranked> LazyOrder<T> {
    pub fn new(items: Vec<T>, first_chunk: usize) -> Self {
        LazyOrder {
            items,
            sorted: 0,
            first_chunk: first_chunk.max(1),
            next: 0,
        }
    }

    /// The item at place `i` of the order (0 first).
    pub fn get(&mut self, i: usize) -> Option<T> {
        while i >= self.sorted && self.sorted < self.items.len() {
            // The next chunk (doubling): selected from the rest, then ordered.
            let rest = &mut self.items[self.sorted..];
            let chunk = self.sorted.max(self.first_chunk).min(rest.len());
            if chunk < rest.len() {
                rest.select_nth_unstable_by(chunk - 1, T::rank_order);
            }
            rest[..chunk].sort_unstable_by(T::rank_order);
            self.sorted += chunk;
        }
        self.items.get(i).copied()
    }

    /// The items' storage, for reuse.
    pub fn into_items(self) -> Vec<T> {
        self.items
    }
}

impl LazyOrder<Scored> {
    /// Scored items in [`rank`] order.
    pub fn ranked(items: Vec<Scored>) -> Self {
        LazyOrder::new(items, 32)
    }
}

impl<T: Ranked> Iterator for LazyOrder<T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        let item = self.get(self.next);
        self.next += item.is_some() as usize;
        item
    }
}

fn by_rank(a: &Scored, b: &Scored) -> std::cmp::Ordering {
    b.score
        .total_cmp(&a.score)
        .then_with(|| a.movie_id.cmp(&b.movie_id))
}

/// The `k` best of `items` in [`rank`] order, in one pass that keeps the
/// best `k` so far: most items lose a single comparison with the current
/// last place.
pub fn best_k(items: impl IntoIterator<Item = Scored>, k: usize) -> Vec<Scored> {
    let mut best = BestK::new(k);
    for item in items {
        best.offer(item);
    }
    best.into_best()
}

/// [`best_k`] fed one item at a time, so that one pass over a pool can fill
/// several rows.
#[derive(Debug)]
pub struct BestK {
    k: usize,
    best: Vec<Scored>,
}

impl BestK {
    pub fn new(k: usize) -> BestK {
        BestK {
            k,
            best: Vec::with_capacity(k + 1),
        }
    }

    #[inline]
    pub fn offer(&mut self, item: Scored) {
        let k = self.k;
        if self.best.len() == k {
            // Most items lose to the last place on the score alone (a plain
            // comparison: the total order breaks only the rarer ties).
            match self.best.last() {
                Some(last) if item.score < last.score || by_rank(&item, last).is_ge() => return,
                // Full and empty: k is 0, nothing is kept.
                None => return,
                Some(_) => {}
            }
        }
        let at = self.best.partition_point(|b| by_rank(b, &item).is_lt());
        self.best.insert(at, item);
        self.best.truncate(k);
    }

    /// The best items, best first.
    pub fn into_best(self) -> Vec<Scored> {
        self.best
    }
}

/// Picks `n` items from a ranked list such that no genre appears in more than
/// `ceil(max_share · n)` of them. When the candidates cannot satisfy the cap the
/// list is filled with the best remaining items rather than left short.
pub fn diversify(
    ranked: impl IntoIterator<Item = Scored>,
    n: usize,
    max_share: f64,
) -> Vec<Scored> {
    let cap = ((max_share * n as f64).ceil() as usize).max(1);
    let mut per_genre = [0usize; 64];
    let mut chosen = Vec::with_capacity(n);
    let mut skipped = Vec::new();
    for item in ranked {
        if chosen.len() == n {
            break;
        }
        if item.genres.iter().all(|g| per_genre[g as usize] < cap) {
            for g in item.genres.iter() {
                per_genre[g as usize] += 1;
            }
            chosen.push(item);
        } else {
            skipped.push(item);
        }
    }
    if chosen.len() < n {
        chosen.extend(skipped.into_iter().take(n - chosen.len()));
        rank(&mut chosen);
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn scored() -> impl Strategy<Value = Vec<Scored>> {
        prop::collection::vec((0u32..500, -1.0f64..2.0, 1u64..64), 0..80).prop_map(|v| {
            let mut seen = std::collections::HashSet::new();
            v.into_iter()
                .filter(|(id, _, _)| seen.insert(*id))
                .map(|(movie_id, score, g)| Scored {
                    movie_id,
                    score,
                    genres: GenreSet(g),
                })
                .collect()
        })
    }

    #[test]
    fn dominant_signal_names_the_reason() {
        let w = BlendWeights::default();
        let s = Signals {
            similarity: 0.9,
            popularity: 0.1,
            ..Default::default()
        };
        assert_eq!(dominant(&s, &w), Dominant::Similarity);
        assert!(blend(&s, &w) > 0.0);
    }

    proptest! {
        #[test]
        fn ranking_is_sorted_and_total(mut items in scored()) {
            rank(&mut items);
            for pair in items.windows(2) {
                prop_assert!(pair[0].score > pair[1].score
                    || (pair[0].score == pair[1].score && pair[0].movie_id < pair[1].movie_id));
            }
        }

        #[test]
        fn a_lazy_ranking_reads_as_the_full_ranking(items in scored(), reads in prop::collection::vec(0usize..90, 0..6)) {
            let mut full = items.clone();
            rank(&mut full);
            let mut lazy = LazyOrder::ranked(items);
            // Random reads first (they sort as far as they reach), then all.
            for i in reads {
                prop_assert_eq!(lazy.get(i), full.get(i).copied());
            }
            prop_assert_eq!(lazy.collect::<Vec<_>>(), full);
        }

        #[test]
        fn best_k_equals_the_head_of_a_full_ranking(items in scored(), k in 0usize..30) {
            let mut full = items.clone();
            rank(&mut full);
            prop_assert_eq!(best_k(items, k), full.into_iter().take(k).collect::<Vec<_>>());
        }

        #[test]
        fn diversified_lists_respect_the_genre_cap_when_possible(mut items in scored(), n in 1usize..20, share in 0.1f64..1.0) {
            rank(&mut items);
            let list = diversify(items.iter().copied(), n, share);
            prop_assert_eq!(list.len(), n.min(items.len()));
            let ids: std::collections::HashSet<_> = list.iter().map(|s| s.movie_id).collect();
            prop_assert_eq!(ids.len(), list.len());
            let cap = ((share * n as f64).ceil() as usize).max(1);
            // Without fill-up, no genre exceeds the cap.
            let greedy: Vec<_> = {
                let mut per = [0usize; 64];
                let mut out = vec![];
                for it in &items {
                    if out.len() == n { break; }
                    if it.genres.iter().all(|g| per[g as usize] < cap) {
                        for g in it.genres.iter() { per[g as usize] += 1; }
                        out.push(*it);
                    }
                }
                out
            };
            if greedy.len() == n.min(items.len()) {
                for g in 0..64u8 {
                    prop_assert!(list.iter().filter(|s| s.genres.contains(g)).count() <= cap);
                }
            }
        }

        #[test]
        fn higher_signals_never_lower_the_score(a in 0.0f64..1.0, b in 0.0f64..1.0, d in 0.0f64..0.5) {
            let w = BlendWeights::default();
            let s = Signals { affinity: a, similarity: b, popularity: a, trending: b, co_watched: b, ncf: Some(a) };
            let mut t = s;
            t.popularity += d;
            t.similarity += d;
            prop_assert!(blend(&t, &w) >= blend(&s, &w));
        }

        #[test]
        fn log_scale_is_monotone_and_bounded(x in 0.0f64..1e6, y in 0.0f64..1e6, max in 1.0f64..1e6) {
            let (lo, hi) = if x < y { (x, y) } else { (y, x) };
            prop_assert!(LogScale::new(max).normalize(lo) <= LogScale::new(max).normalize(hi));
            prop_assert!((0.0..=1.0).contains(&LogScale::new(max).normalize(x)));
        }
    }
}
