//! Prequential metrics: each interaction is scored against the list the
//! engine would have shown just before it, then learned from.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::catalog::{GenreSet, IdMap};

/// Running sums of the ranking and rating metrics of one variant.
#[derive(Debug, Clone, Default)]
pub struct Accumulator {
    pub cases: u64,
    pub hits: u64,
    pub ndcg: f64,
    pub mrr: f64,
    pub carousel_hits: u64,
    diversity_sum: f64,
    novelty_sum: f64,
    shown: IdMap<()>,
    rating_cases: u64,
    squared_error: f64,
    absolute_error: f64,
    /// Hits and cases per window of event time (window index → counts).
    windows: BTreeMap<i64, (u64, u64)>,
}

/// One scored interaction.
pub struct Case<'a> {
    /// 1-based rank of the item in the top-N list, if there.
    pub rank: Option<usize>,
    pub in_carousels: bool,
    /// Genres of the listed items (intra-list diversity).
    pub list_genres: &'a [GenreSet],
    /// Self-information of each listed item (novelty).
    pub list_novelty: &'a [f64],
    pub listed: &'a [u32],
    /// The window of event time the interaction falls in.
    pub window: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub cases: u64,
    pub hr: f64,
    pub ndcg: f64,
    pub mrr: f64,
    pub carousel_hr: f64,
    /// Distinct items shown over the catalog's size.
    pub coverage: f64,
    /// Mean pairwise genre distance (1 − Jaccard) within a list.
    pub diversity: f64,
    /// Mean self-information, −log2 p(item), of listed items.
    pub novelty: f64,
    pub rating_cases: u64,
    pub rmse: Option<f64>,
    pub mae: Option<f64>,
    /// `(window index, HR)` for windows with at least one case.
    pub hr_by_window: Vec<(i64, f64)>,
}

impl Accumulator {
    pub fn add(&mut self, case: &Case) {
        self.cases += 1;
        let w = self.windows.entry(case.window).or_default();
        w.1 += 1;
        if let Some(rank) = case.rank {
            self.hits += 1;
            self.ndcg += 1.0 / (rank as f64 + 1.0).log2();
            self.mrr += 1.0 / rank as f64;
            w.0 += 1;
        }
        if case.in_carousels {
            self.carousel_hits += 1;
        }
        self.diversity_sum += intra_list_distance(case.list_genres);
        if !case.list_novelty.is_empty() {
            self.novelty_sum +=
                case.list_novelty.iter().sum::<f64>() / case.list_novelty.len() as f64;
        }
        for id in case.listed {
            self.shown.insert(*id, ());
        }
    }

    pub fn add_rating(&mut self, predicted: f64, actual: f64) {
        let e = predicted - actual;
        self.rating_cases += 1;
        self.squared_error += e * e;
        self.absolute_error += e.abs();
    }

    pub fn summary(&self, catalog_size: usize) -> Summary {
        let n = self.cases.max(1) as f64;
        let r = self.rating_cases as f64;
        Summary {
            cases: self.cases,
            hr: self.hits as f64 / n,
            ndcg: self.ndcg / n,
            mrr: self.mrr / n,
            carousel_hr: self.carousel_hits as f64 / n,
            coverage: self.shown.len() as f64 / catalog_size.max(1) as f64,
            diversity: self.diversity_sum / n,
            novelty: self.novelty_sum / n,
            rating_cases: self.rating_cases,
            rmse: (self.rating_cases > 0).then(|| (self.squared_error / r).sqrt()),
            mae: (self.rating_cases > 0).then(|| self.absolute_error / r),
            hr_by_window: self
                .windows
                .iter()
                .map(|(w, (h, c))| (*w, *h as f64 / (*c).max(1) as f64))
                .collect(),
        }
    }
}

/// Mean pairwise genre distance, `1 − Jaccard`, over a list (0 for < 2 items).
pub fn intra_list_distance(genres: &[GenreSet]) -> f64 {
    let n = genres.len();
    if n < 2 {
        return 0.0;
    }
    let mut sum = 0.0;
    for i in 0..n {
        for j in i + 1..n {
            sum += 1.0 - genres[i].jaccard(genres[j]);
        }
    }
    sum / (n * (n - 1) / 2) as f64
}

/// Interaction counts seen so far, for novelty: `p(item) = (count + 1) / (total + catalog)`.
#[derive(Debug, Default)]
pub struct Exposure {
    counts: IdMap<u64>,
    total: u64,
}

impl Exposure {
    pub fn observe(&mut self, item: u32) {
        *self.counts.entry(item).or_default() += 1;
        self.total += 1;
    }

    pub fn self_information(&self, item: u32, catalog_size: usize) -> f64 {
        let c = self.counts.get(&item).copied().unwrap_or(0) as f64;
        -((c + 1.0) / (self.total as f64 + catalog_size as f64)).log2()
    }
}

/// The rating baseline learned online: `mean + user bias + item bias`, each
/// bias a damped mean of residuals (Koren's baseline predictor, predict then learn).
#[derive(Debug, Default)]
pub struct BiasBaseline {
    sum: f64,
    n: u64,
    items: IdMap<(f64, u64)>,
    users: std::collections::HashMap<String, (f64, u64)>,
}

const ITEM_DAMPING: f64 = 25.0;
const USER_DAMPING: f64 = 10.0;

impl BiasBaseline {
    fn mean(&self) -> f64 {
        if self.n == 0 {
            3.5
        } else {
            self.sum / self.n as f64
        }
    }

    fn item_bias(&self, item: u32) -> f64 {
        self.items
            .get(&item)
            .map_or(0.0, |(s, n)| s / (*n as f64 + ITEM_DAMPING))
    }

    pub fn predict(&self, user: &str, item: u32) -> f64 {
        let user_bias = self
            .users
            .get(user)
            .map_or(0.0, |(s, n)| s / (*n as f64 + USER_DAMPING));
        self.mean() + self.item_bias(item) + user_bias
    }

    pub fn learn(&mut self, user: &str, item: u32, rating: f64) {
        let mean = self.mean();
        let item_residual = rating - mean;
        let user_residual = rating - mean - self.item_bias(item);
        let i = self.items.entry(item).or_default();
        i.0 += item_residual;
        i.1 += 1;
        let u = self.users.entry(user.to_string()).or_default();
        u.0 += user_residual;
        u.1 += 1;
        self.sum += rating;
        self.n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(bits: u64) -> GenreSet {
        GenreSet(bits)
    }

    #[test]
    fn ranks_score_hit_ndcg_and_mrr() {
        let mut a = Accumulator::default();
        let genres = [set(1), set(2)];
        for rank in [Some(1), Some(3), None, None] {
            a.add(&Case {
                rank,
                in_carousels: rank.is_some(),
                list_genres: &genres,
                list_novelty: &[1.0, 3.0],
                listed: &[7, 8],
                window: 0,
            });
        }
        let s = a.summary(4);
        assert_eq!(s.hr, 0.5);
        assert!((s.ndcg - (1.0 + 0.5) / 4.0).abs() < 1e-12);
        assert!((s.mrr - (1.0 + 1.0 / 3.0) / 4.0).abs() < 1e-12);
        assert_eq!(s.carousel_hr, 0.5);
        assert_eq!(s.coverage, 0.5);
        assert_eq!(s.diversity, 1.0);
        assert_eq!(s.novelty, 2.0);
        assert_eq!(s.hr_by_window, vec![(0, 0.5)]);
        assert_eq!(s.rmse, None);
    }

    #[test]
    fn identical_genres_have_no_diversity() {
        assert_eq!(intra_list_distance(&[set(3), set(3), set(3)]), 0.0);
        assert_eq!(intra_list_distance(&[set(1)]), 0.0);
    }

    #[test]
    fn errors_are_rmse_and_mae() {
        let mut a = Accumulator::default();
        a.add_rating(4.0, 5.0);
        a.add_rating(3.0, 1.0);
        let s = a.summary(1);
        assert_eq!(s.mae, Some(1.5));
        assert!((s.rmse.unwrap() - (2.5f64).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn the_baseline_learns_user_and_item_offsets() {
        let mut b = BiasBaseline::default();
        assert_eq!(b.predict("u", 1), 3.5, "nothing learned yet");
        for _ in 0..200 {
            b.learn("generous", 1, 5.0);
            b.learn("harsh", 2, 1.0);
        }
        assert!(b.predict("generous", 1) > 4.5);
        assert!(b.predict("harsh", 2) < 1.5);
    }

    #[test]
    fn rarely_seen_items_are_novel() {
        let mut e = Exposure::default();
        for _ in 0..10 {
            e.observe(1);
        }
        assert!(e.self_information(2, 5) > e.self_information(1, 5));
    }
}
