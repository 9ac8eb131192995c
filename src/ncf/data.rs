//! Training data: interactions indexed densely by user and item, the splits the
//! evaluation protocols use, and negative sampling.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::catalog::CatalogError;
use crate::ratings::{self, Rating};
use crate::rng::Rng;

/// One interaction with dense indices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Row {
    pub user: u32,
    pub item: u32,
    /// The explicit rating; 0 when the interaction has none.
    pub rating: f32,
    pub ts: i64,
}

/// The id spaces interactions are indexed in.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    /// External user ids, by index.
    pub user_ids: Vec<String>,
    /// Catalog movie ids, by index.
    pub item_ids: Vec<u32>,
}

/// A raw interaction before indexing.
#[derive(Debug, Clone, PartialEq)]
pub struct RawInteraction {
    pub user: String,
    pub movie_id: u32,
    pub rating: f32,
    pub ts: i64,
}

impl From<&Rating> for RawInteraction {
    fn from(r: &Rating) -> Self {
        RawInteraction {
            user: r.user_id.to_string(),
            movie_id: r.movie_id,
            rating: r.rating as f32,
            ts: r.ts_ms,
        }
    }
}

/// Reads interactions from a MovieLens ratings file or directory, an
/// interaction topic dump (`.parquet` / `.arrow`), or an archive directory.
pub fn load_interactions(path: &Path) -> Result<Vec<RawInteraction>, CatalogError> {
    let name = path.to_string_lossy();
    if name.ends_with(".parquet") || name.ends_with(".arrow") || name.ends_with(".ipc") {
        return ratings::load_dump(path);
    }
    let has_ratings = ["ratings.csv", "u.data", "ratings.dat"]
        .iter()
        .any(|f| path.join(f).exists());
    if path.is_dir() && !has_ratings {
        // An archive directory written by `recstream archive`.
        return crate::archive::load(path);
    }
    let list = if path.is_dir() {
        ratings::load_dir(path)?
    } else {
        ratings::load(path)?
    };
    Ok(list.iter().map(RawInteraction::from).collect())
}

impl Dataset {
    /// Indexes every id that appears in any of the parts, so a test split's
    /// users and items exist in the model even if training never saw them.
    /// Returns one row list per part, in the same index space.
    pub fn index(parts: &[&[RawInteraction]]) -> (Dataset, Vec<Vec<Row>>) {
        let users: BTreeSet<&str> = parts
            .iter()
            .flat_map(|p| p.iter().map(|r| r.user.as_str()))
            .collect();
        let items: BTreeSet<u32> = parts
            .iter()
            .flat_map(|p| p.iter().map(|r| r.movie_id))
            .collect();
        let user_index: BTreeMap<&str, u32> = users
            .iter()
            .enumerate()
            .map(|(i, u)| (*u, i as u32))
            .collect();
        let item_index: BTreeMap<u32, u32> = items
            .iter()
            .enumerate()
            .map(|(i, m)| (*m, i as u32))
            .collect();
        let rows = parts
            .iter()
            .map(|p| {
                p.iter()
                    .map(|r| Row {
                        user: user_index[r.user.as_str()],
                        item: item_index[&r.movie_id],
                        rating: r.rating,
                        ts: r.ts,
                    })
                    .collect()
            })
            .collect();
        let dataset = Dataset {
            user_ids: users.iter().map(|u| u.to_string()).collect(),
            item_ids: items.into_iter().collect(),
        };
        (dataset, rows)
    }

    pub fn n_users(&self) -> usize {
        self.user_ids.len()
    }

    pub fn n_items(&self) -> usize {
        self.item_ids.len()
    }
}

/// Items each user interacted with, sorted, for negative sampling.
pub fn interacted(rows: &[Row], n_users: usize) -> Vec<Vec<u32>> {
    let mut sets = vec![Vec::new(); n_users];
    for r in rows {
        sets[r.user as usize].push(r.item);
    }
    for s in &mut sets {
        s.sort_unstable();
        s.dedup();
    }
    sets
}

/// A uniformly drawn item the user has not interacted with.
pub fn sample_negative(rng: &mut Rng, n_items: usize, seen: &[u32]) -> u32 {
    loop {
        let item = (rng.next_u64() % n_items as u64) as u32;
        if seen.binary_search(&item).is_err() {
            return item;
        }
    }
}

/// One leave-one-out ranking case: the held-out item among sampled negatives.
#[derive(Debug, Clone, PartialEq)]
pub struct RankingCase {
    pub user: u32,
    pub positive: u32,
    pub negatives: Vec<u32>,
}

/// Leave-one-out: each user's latest interaction is held out (ties go to the
/// later row) and ranked against `negatives` distinct items the user never
/// interacted with. Users with a single interaction stay in training only.
pub fn leave_one_out(
    rows: &[Row],
    n_users: usize,
    n_items: usize,
    negatives: usize,
    seed: u64,
) -> (Vec<Row>, Vec<RankingCase>) {
    let mut latest: Vec<Option<usize>> = vec![None; n_users];
    let mut count = vec![0usize; n_users];
    for (i, r) in rows.iter().enumerate() {
        let u = r.user as usize;
        count[u] += 1;
        if latest[u].is_none_or(|j| rows[j].ts <= r.ts) {
            latest[u] = Some(i);
        }
    }
    let held: BTreeSet<usize> = latest
        .iter()
        .zip(&count)
        .filter(|(_, &c)| c > 1)
        .filter_map(|(l, _)| *l)
        .collect();
    let seen = interacted(rows, n_users);
    let mut rng = Rng::new(seed);
    let mut cases = Vec::with_capacity(held.len());
    for &i in &held {
        let r = rows[i];
        let user_seen = &seen[r.user as usize];
        let available = n_items.saturating_sub(user_seen.len());
        let mut chosen = BTreeSet::new();
        while chosen.len() < negatives.min(available) {
            chosen.insert(sample_negative(&mut rng, n_items, user_seen));
        }
        cases.push(RankingCase {
            user: r.user,
            positive: r.item,
            // Shuffled order, so ties never favour the positive by position.
            negatives: shuffled(chosen.into_iter().collect(), &mut rng),
        });
    }
    let train = rows
        .iter()
        .enumerate()
        .filter(|(i, _)| !held.contains(i))
        .map(|(_, r)| *r)
        .collect();
    (train, cases)
}

pub fn shuffled<T>(mut v: Vec<T>, rng: &mut Rng) -> Vec<T> {
    for i in (1..v.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

/// A seeded random split: `fraction` of the rows go to the second part.
pub fn random_split(rows: &[Row], fraction: f64, seed: u64) -> (Vec<Row>, Vec<Row>) {
    let mut rng = Rng::new(seed);
    let mut keep = Vec::new();
    let mut held = Vec::new();
    for r in rows {
        if rng.unit() < fraction {
            held.push(*r);
        } else {
            keep.push(*r);
        }
    }
    (keep, held)
}

/// Rank metrics of one case from the positive's and the negatives' scores.
/// Ties count against the positive (pessimistic).
pub fn hit_and_ndcg(positive: f32, negatives: &[f32], k: usize) -> (f64, f64) {
    let rank = negatives.iter().filter(|&&s| s >= positive).count();
    if rank < k {
        (1.0, 1.0 / ((rank + 2) as f64).log2())
    } else {
        (0.0, 0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(user: &str, movie_id: u32, ts: i64) -> RawInteraction {
        RawInteraction {
            user: user.into(),
            movie_id,
            rating: 4.0,
            ts,
        }
    }

    #[test]
    fn leave_one_out_holds_out_the_latest_with_distinct_unseen_negatives() {
        let input = vec![
            raw("a", 1, 10),
            raw("a", 2, 30),
            raw("a", 3, 20),
            raw("b", 1, 5),
            raw("c", 4, 1),
            raw("c", 5, 2),
        ];
        let (d, parts) = Dataset::index(&[&input]);
        let (train, cases) = leave_one_out(&parts[0], d.n_users(), d.n_items(), 2, 7);
        assert_eq!(cases.len(), 2, "b has a single interaction");
        assert_eq!(d.item_ids[cases[0].positive as usize], 2);
        assert_eq!(train.len(), 4);
        for c in &cases {
            let seen = &interacted(&parts[0], d.n_users())[c.user as usize];
            assert_eq!(c.negatives.len(), 2);
            assert!(c.negatives.iter().all(|n| seen.binary_search(n).is_err()));
            let mut sorted = c.negatives.clone();
            sorted.dedup();
            assert_eq!(sorted.len(), 2);
        }
    }

    #[test]
    fn ranking_metrics() {
        assert_eq!(hit_and_ndcg(0.9, &[0.1, 0.2], 10), (1.0, 1.0));
        let (hit, ndcg) = hit_and_ndcg(0.5, &[0.9, 0.1], 10);
        assert_eq!(hit, 1.0);
        assert!((ndcg - 1.0 / 3f64.log2()).abs() < 1e-12);
        assert_eq!(hit_and_ndcg(0.0, &[0.5; 10], 10), (0.0, 0.0));
    }
}
