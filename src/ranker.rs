//! The learned blend: a conditional-logit ranker over a candidate's signals
//! and the sources that proposed it, fitted on what users did next.
//!
//! The hand-set blend (`[blend]`) is a weighted sum of six signals; the
//! learned blend is a weighted sum of [`FEATURES`], with the weights found by
//! maximum likelihood: for each interaction of the training stream, the
//! candidate pool the engine held for the user just before it (the "list that
//! was live") is a choice set, and the item the user picked is the choice.
//! The model is `P(pick = i | pool) = softmax(w · x_i)` over the pool, a
//! multinomial (conditional) logit: a convex fit, solved by Newton's method.
//! Each pool is cut to the pick and a uniform sample of the rest (a random
//! subset of alternatives keeps the logit's estimates consistent, McFadden
//! 1978), and cases whose pick was not in the pool say nothing about the
//! order within it and are counted, not used.
//!
//! The fitted ranker is a small JSON artefact ([`LearnedBlend`]), versioned
//! and checked on load; experiment variants name it beside their model (see
//! `experiment.rs`), so it is loaded, hot-reloaded and A/B-tested like one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::blend::Signals;
use crate::config::BlendWeights;
use crate::experiment::source_bit;
use crate::output::Source;
use crate::rng::Rng;

pub const SCHEMA: &str = "recstream.learned-blend/1";

/// The features, in the order of [`LearnedBlend::weights`]. A file fitted on
/// another list is refused: its weights would be read against the wrong inputs.
pub const FEATURES: [&str; FEATURE_COUNT] = [
    "affinity",
    "similarity",
    "popularity",
    "trending",
    "co_watched",
    "ncf",
    "ln_ncf",
    "ln_co_watched",
    "ncf_missing",
    "from_popular",
    "from_trending",
    "from_genre",
    "from_similar",
    "from_co_watched",
    "from_model",
];
pub const FEATURE_COUNT: usize = 15;

/// `ln(x + LOG_FLOOR)`: the model's signal is a probability ratio, and a
/// softmax model ranks by its logarithm; the floor keeps zero finite.
const LOG_FLOOR: f64 = 1e-4;

const SOURCE_FEATURES: [(Source, usize); 6] = [
    (Source::Popular, 9),
    (Source::Trending, 10),
    (Source::Genre, 11),
    (Source::Similar, 12),
    (Source::CoWatched, 13),
    (Source::Model, 14),
];

/// A candidate's feature vector.
pub fn features(s: &Signals, sources: u8) -> [f64; FEATURE_COUNT] {
    let ncf = s.ncf.unwrap_or(0.0);
    let mut x = [0.0; FEATURE_COUNT];
    x[0] = s.affinity;
    x[1] = s.similarity;
    x[2] = s.popularity;
    x[3] = s.trending;
    x[4] = s.co_watched;
    x[5] = ncf;
    x[6] = (ncf.max(0.0) + LOG_FLOOR).ln();
    x[7] = (s.co_watched.max(0.0) + LOG_FLOOR).ln();
    x[8] = if s.ncf.is_none() { 1.0 } else { 0.0 };
    for (source, i) in SOURCE_FEATURES {
        x[i] = f64::from(sources & source_bit(source) != 0);
    }
    x
}

#[derive(Debug, thiserror::Error)]
pub enum RankerError {
    #[error("cannot read learned blend {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write learned blend {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("learned blend {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot fit a blend: {0}")]
    Fit(String),
}

/// What a learned blend was fitted on, and how well.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FitReport {
    /// Interactions whose pick was in the pool (the choice sets used).
    pub cases: usize,
    /// Interactions whose pick was not in the pool (not used).
    pub missed: usize,
    /// Alternatives kept per case besides the pick.
    pub negatives_per_case: usize,
    pub l2: f64,
    /// Mean log-likelihood per case on the last tenth of the cases in time,
    /// fitted on the first nine tenths (the model that chose `l2`).
    pub validation_log_likelihood: f64,
    /// How often the pick scores highest of its sampled choice set on that
    /// validation tenth, with the learned weights and with the hand-set blend.
    pub validation_top1: f64,
    pub validation_top1_hand_set: f64,
    pub newton_iterations: usize,
}

/// A fitted ranker: `score = Σ weights[i] · features[i]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LearnedBlend {
    pub schema: String,
    /// Names the artefact in logs and in published records.
    pub version: String,
    pub features: Vec<String>,
    pub weights: Vec<f64>,
    /// Where the training cases came from (free text: data and time span).
    pub trained_on: String,
    /// The model whose signal the cases carried (its version), if any.
    pub model_version: Option<String>,
    pub fit: FitReport,
}

impl LearnedBlend {
    pub fn score(&self, s: &Signals, sources: u8) -> f64 {
        let x = features(s, sources);
        self.weights.iter().zip(x).map(|(w, x)| w * x).sum()
    }

    /// Per-signal weights that name a list item's reason (which signal
    /// counted most): each signal's linear weight plus its log term's
    /// slope at 1, never below zero.
    pub fn reason_weights(&self) -> BlendWeights {
        let w = |i: usize| self.weights[i].max(0.0);
        BlendWeights {
            affinity: w(0),
            similarity: w(1),
            popularity: w(2),
            trending: w(3),
            co_watched: (self.weights[4] + self.weights[7]).max(0.0),
            ncf: (self.weights[5] + self.weights[6]).max(0.0),
        }
    }

    pub fn load(path: &Path) -> Result<LearnedBlend, RankerError> {
        let text = std::fs::read_to_string(path).map_err(|source| RankerError::Read {
            path: path.into(),
            source,
        })?;
        let invalid = |reason: String| RankerError::Invalid {
            path: path.into(),
            reason,
        };
        let blend: LearnedBlend =
            serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        blend.validate().map_err(invalid)?;
        Ok(blend)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.schema != SCHEMA {
            return Err(format!(
                "`schema` is {:?}, this engine reads {SCHEMA:?}",
                self.schema
            ));
        }
        if self.features != FEATURES {
            return Err(format!(
                "`features` are {:?}, this engine computes {FEATURES:?}",
                self.features
            ));
        }
        if self.weights.len() != FEATURE_COUNT {
            return Err(format!(
                "`weights` has {} entries for {FEATURE_COUNT} features",
                self.weights.len()
            ));
        }
        if let Some(i) = self.weights.iter().position(|w| !w.is_finite()) {
            return Err(format!("`weights[{i}]` ({}) is not finite", FEATURES[i]));
        }
        if self.version.is_empty() {
            return Err("`version` is empty".into());
        }
        Ok(())
    }

    pub fn save(&self, path: &Path) -> Result<(), RankerError> {
        let text = serde_json::to_string_pretty(self).expect("a blend serializes");
        std::fs::write(path, text + "\n").map_err(|source| RankerError::Write {
            path: path.into(),
            source,
        })
    }
}

/// One interaction's choice set: the pick first, then sampled alternatives.
#[derive(Debug, Clone)]
pub struct ChoiceSet {
    pub features: Vec<[f64; FEATURE_COUNT]>,
}

/// A candidate of the pool the engine held for a user.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolEntry {
    pub movie_id: u32,
    pub signals: Signals,
    pub sources: u8,
}

/// Collects choice sets from a stream of (pool, pick) pairs.
#[derive(Debug)]
pub struct CaseCollector {
    negatives: usize,
    rng: Rng,
    pub cases: Vec<ChoiceSet>,
    pub missed: usize,
}

impl CaseCollector {
    pub fn new(negatives: usize, seed: u64) -> CaseCollector {
        CaseCollector {
            negatives,
            rng: Rng::new(seed),
            cases: Vec::new(),
            missed: 0,
        }
    }

    /// Records the pool the user was shown and the item they picked next.
    pub fn observe(&mut self, pool: &[PoolEntry], pick: u32) {
        let Some(p) = pool.iter().position(|e| e.movie_id == pick) else {
            self.missed += 1;
            return;
        };
        let mut rest: Vec<usize> = (0..pool.len()).filter(|&i| i != p).collect();
        // A partial Fisher–Yates shuffle: the first `negatives` are a uniform sample.
        let keep = self.negatives.min(rest.len());
        for i in 0..keep {
            let j = i + (self.rng.next_u64() % (rest.len() - i) as u64) as usize;
            rest.swap(i, j);
        }
        let mut features = Vec::with_capacity(keep + 1);
        features.push(features_of(&pool[p]));
        features.extend(rest[..keep].iter().map(|&i| features_of(&pool[i])));
        self.cases.push(ChoiceSet { features });
    }
}

fn features_of(e: &PoolEntry) -> [f64; FEATURE_COUNT] {
    features(&e.signals, e.sources)
}

/// The ridge strengths tried, on standardized features.
const L2_GRID: [f64; 4] = [1e-4, 1e-3, 1e-2, 1e-1];
const MAX_NEWTON_ITERATIONS: usize = 50;

/// Fits a learned blend on `cases` (in time order): the ridge strength is
/// chosen on the last tenth, then the weights are refitted on all of them.
pub fn fit(
    cases: &[ChoiceSet],
    missed: usize,
    negatives_per_case: usize,
    hand_set: &BlendWeights,
) -> Result<(Vec<f64>, FitReport), RankerError> {
    let usable: Vec<&ChoiceSet> = cases.iter().filter(|c| c.features.len() > 1).collect();
    if usable.len() < 50 {
        return Err(RankerError::Fit(format!(
            "{} choice sets with alternatives; at least 50 are needed",
            usable.len()
        )));
    }
    let scale = Standardizer::of(&usable);
    let split = usable.len() * 9 / 10;
    let (train, valid) = usable.split_at(split);
    let mut best: Option<(f64, f64, Vec<f64>)> = None;
    for l2 in L2_GRID {
        let (w, _) = newton(train, &scale, l2);
        let ll = mean_log_likelihood(valid, &scale, &w);
        if best.as_ref().is_none_or(|(_, b, _)| ll > *b) {
            best = Some((l2, ll, w));
        }
    }
    let (l2, validation_log_likelihood, valid_w) = best.expect("the grid is not empty");
    let validation_top1 = top1_rate(valid, |x| dot(&valid_w, &scale.apply(x)));
    let hand = |x: &[f64; FEATURE_COUNT]| {
        hand_set.affinity * x[0]
            + hand_set.similarity * x[1]
            + hand_set.popularity * x[2]
            + hand_set.trending * x[3]
            + hand_set.co_watched * x[4]
            + hand_set.ncf * x[5]
    };
    let validation_top1_hand_set = top1_rate(valid, hand);
    let (w, newton_iterations) = newton(&usable, &scale, l2);
    Ok((
        scale.to_raw(&w),
        FitReport {
            cases: usable.len(),
            missed,
            negatives_per_case,
            l2,
            validation_log_likelihood,
            validation_top1,
            validation_top1_hand_set,
            newton_iterations,
        },
    ))
}

/// Centres and scales each feature (its mean and deviation over every
/// alternative), so that one ridge strength suits all of them; a constant
/// feature gets weight 0.
struct Standardizer {
    mean: [f64; FEATURE_COUNT],
    inv_sd: [f64; FEATURE_COUNT],
}

impl Standardizer {
    fn of(cases: &[&ChoiceSet]) -> Standardizer {
        let mut n = 0.0;
        let mut sum = [0.0; FEATURE_COUNT];
        let mut sq = [0.0; FEATURE_COUNT];
        for x in cases.iter().flat_map(|c| &c.features) {
            n += 1.0;
            for i in 0..FEATURE_COUNT {
                sum[i] += x[i];
                sq[i] += x[i] * x[i];
            }
        }
        let mut mean = [0.0; FEATURE_COUNT];
        let mut inv_sd = [0.0; FEATURE_COUNT];
        for i in 0..FEATURE_COUNT {
            mean[i] = sum[i] / n;
            let var = (sq[i] / n - mean[i] * mean[i]).max(0.0);
            inv_sd[i] = if var > 1e-12 { 1.0 / var.sqrt() } else { 0.0 };
        }
        Standardizer { mean, inv_sd }
    }

    fn apply(&self, x: &[f64; FEATURE_COUNT]) -> [f64; FEATURE_COUNT] {
        std::array::from_fn(|i| (x[i] - self.mean[i]) * self.inv_sd[i])
    }

    /// Weights on raw features that rank like `w` on standardized ones (the
    /// centring shifts every alternative's score equally, so it drops out).
    fn to_raw(&self, w: &[f64]) -> Vec<f64> {
        (0..FEATURE_COUNT).map(|i| w[i] * self.inv_sd[i]).collect()
    }
}

fn dot(w: &[f64], x: &[f64; FEATURE_COUNT]) -> f64 {
    w.iter().zip(x).map(|(w, x)| w * x).sum()
}

/// Softmax probabilities of one choice set's alternatives.
fn probabilities(
    case: &ChoiceSet,
    scale: &Standardizer,
    w: &[f64],
) -> (Vec<f64>, Vec<[f64; FEATURE_COUNT]>) {
    let xs: Vec<[f64; FEATURE_COUNT]> = case.features.iter().map(|x| scale.apply(x)).collect();
    let scores: Vec<f64> = xs.iter().map(|x| dot(w, x)).collect();
    let max = scores.iter().copied().fold(f64::MIN, f64::max);
    let exp: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f64 = exp.iter().sum();
    (exp.into_iter().map(|e| e / total).collect(), xs)
}

fn mean_log_likelihood(cases: &[&ChoiceSet], scale: &Standardizer, w: &[f64]) -> f64 {
    let sum: f64 = cases
        .iter()
        .map(|c| probabilities(c, scale, w).0[0].max(1e-300).ln())
        .sum();
    sum / cases.len().max(1) as f64
}

/// How often the pick (alternative 0) scores highest of its set (ties
/// count against it).
fn top1_rate(cases: &[&ChoiceSet], score: impl Fn(&[f64; FEATURE_COUNT]) -> f64) -> f64 {
    let hits = cases
        .iter()
        .filter(|c| {
            let pick = score(&c.features[0]);
            c.features[1..].iter().all(|x| score(x) < pick)
        })
        .count();
    hits as f64 / cases.len().max(1) as f64
}

/// Newton's method on the penalized negative log-likelihood
/// `-Σ ln P(pick) + l2/2 · n · |w|²`; returns the weights and the iterations taken.
#[allow(clippy::needless_range_loop)] // matrix code reads best with indices
fn newton(cases: &[&ChoiceSet], scale: &Standardizer, l2: f64) -> (Vec<f64>, usize) {
    const D: usize = FEATURE_COUNT;
    let n = cases.len() as f64;
    let mut w = vec![0.0; D];
    let objective = |w: &[f64]| -> f64 {
        let ll: f64 = cases
            .iter()
            .map(|c| probabilities(c, scale, w).0[0].max(1e-300).ln())
            .sum();
        -ll + 0.5 * l2 * n * w.iter().map(|v| v * v).sum::<f64>()
    };
    let mut current = objective(&w);
    for iteration in 1..=MAX_NEWTON_ITERATIONS {
        let mut grad = [0.0; D];
        let mut hess = [[0.0; D]; D];
        for c in cases {
            let (p, xs) = probabilities(c, scale, &w);
            let mut mean = [0.0; D];
            for (pj, x) in p.iter().zip(&xs) {
                for i in 0..D {
                    mean[i] += pj * x[i];
                }
            }
            for i in 0..D {
                grad[i] += mean[i] - xs[0][i];
            }
            for (pj, x) in p.iter().zip(&xs) {
                for i in 0..D {
                    let d = x[i] - mean[i];
                    for k in 0..=i {
                        hess[i][k] += pj * d * (x[k] - mean[k]);
                    }
                }
            }
        }
        for i in 0..D {
            grad[i] += l2 * n * w[i];
            hess[i][i] += l2 * n;
            for k in 0..i {
                hess[k][i] = hess[i][k];
            }
        }
        let Some(step) = solve_spd(hess, grad) else {
            return (w, iteration);
        };
        // Backtracking keeps every step a descent (the objective is convex).
        let mut t = 1.0;
        let mut accepted = false;
        while t > 1e-6 {
            let trial: Vec<f64> = (0..D).map(|i| w[i] - t * step[i]).collect();
            let value = objective(&trial);
            if value <= current {
                let gain = current - value;
                w = trial;
                current = value;
                accepted = gain > 1e-9 * current.abs().max(1.0);
                break;
            }
            t *= 0.5;
        }
        if !accepted {
            return (w, iteration);
        }
    }
    (w, MAX_NEWTON_ITERATIONS)
}

/// Solves `a · x = b` for a symmetric positive definite `a` (Cholesky).
#[allow(clippy::needless_range_loop)] // matrix code reads best with indices
fn solve_spd<const D: usize>(mut a: [[f64; D]; D], b: [f64; D]) -> Option<[f64; D]> {
    for j in 0..D {
        let mut d = a[j][j];
        for k in 0..j {
            d -= a[j][k] * a[j][k];
        }
        if d <= 0.0 || !d.is_finite() {
            return None;
        }
        let d = d.sqrt();
        a[j][j] = d;
        for i in j + 1..D {
            let mut s = a[i][j];
            for k in 0..j {
                s -= a[i][k] * a[j][k];
            }
            a[i][j] = s / d;
        }
    }
    let mut y = [0.0; D];
    for i in 0..D {
        let mut s = b[i];
        for k in 0..i {
            s -= a[i][k] * y[k];
        }
        y[i] = s / a[i][i];
    }
    let mut x = [0.0; D];
    for i in (0..D).rev() {
        let mut s = y[i];
        for k in i + 1..D {
            s -= a[k][i] * x[k];
        }
        x[i] = s / a[i][i];
    }
    Some(x)
}

/// Builds the artefact from a fit.
pub fn learned_blend(
    version: String,
    trained_on: String,
    model_version: Option<String>,
    weights: Vec<f64>,
    fit: FitReport,
) -> LearnedBlend {
    LearnedBlend {
        schema: SCHEMA.into(),
        version,
        features: FEATURES.iter().map(|f| f.to_string()).collect(),
        weights,
        trained_on,
        model_version,
        fit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use proptest::prelude::*;

    /// Pools whose picks follow a known logit on co-watch and the model.
    fn synthetic_cases(n: usize, seed: u64) -> Vec<ChoiceSet> {
        let mut rng = Rng::new(seed);
        let mut collector = CaseCollector::new(20, seed);
        for _ in 0..n {
            let pool: Vec<PoolEntry> = (0..40)
                .map(|id| PoolEntry {
                    movie_id: id,
                    signals: Signals {
                        affinity: rng.unit() * 2.0 - 1.0,
                        similarity: rng.unit(),
                        popularity: rng.unit(),
                        trending: rng.unit(),
                        co_watched: rng.unit(),
                        ncf: Some(rng.unit()),
                    },
                    sources: (rng.next_u64() % 64) as u8,
                })
                .collect();
            let utility = |e: &PoolEntry| 4.0 * e.signals.co_watched + 2.0 * e.signals.ncf.unwrap();
            let weights: Vec<f64> = pool.iter().map(|e| utility(e).exp()).collect();
            let total: f64 = weights.iter().sum();
            let mut u = rng.unit() * total;
            let mut pick = pool.len() - 1;
            for (i, w) in weights.iter().enumerate() {
                if u < *w {
                    pick = i;
                    break;
                }
                u -= w;
            }
            collector.observe(&pool, pool[pick].movie_id);
        }
        collector.cases
    }

    #[test]
    fn fit_recovers_the_ranking_that_generated_the_picks() {
        let cases = synthetic_cases(3_000, 7);
        let (w, report) = fit(&cases, 0, 20, &BlendWeights::default()).unwrap();
        // x and ln x share the co-watch and model effects; the others are noise.
        for (i, v) in w.iter().enumerate() {
            if ![4, 5, 6, 7].contains(&i) {
                assert!(v.abs() < 0.3, "{} got {v} in {w:?}", FEATURES[i]);
            }
        }
        assert!(w[4] > 1.0 && w[5] > 0.5, "{w:?}");
        // On fresh pools the fitted weights pick the true utility's best item.
        let blend = learned_blend("t".into(), String::new(), None, w, report.clone());
        let mut rng = Rng::new(99);
        let mut agree = 0;
        for _ in 0..300 {
            let pool: Vec<Signals> = (0..40)
                .map(|_| Signals {
                    co_watched: rng.unit(),
                    ncf: Some(rng.unit()),
                    popularity: rng.unit(),
                    ..Signals::default()
                })
                .collect();
            let best_by = |f: &dyn Fn(&Signals) -> f64| {
                (0..pool.len())
                    .max_by(|&a, &b| f(&pool[a]).total_cmp(&f(&pool[b])))
                    .unwrap()
            };
            let truth = best_by(&|s| 4.0 * s.co_watched + 2.0 * s.ncf.unwrap());
            agree += usize::from(best_by(&|s| blend.score(s, 0)) == truth);
        }
        assert!(agree >= 270, "{agree} of 300");
        assert!(
            report.validation_top1 >= report.validation_top1_hand_set,
            "{report:?}"
        );
        assert_eq!(report.cases, 3_000);
    }

    #[test]
    fn fitting_is_deterministic() {
        let cases = synthetic_cases(300, 3);
        let a = fit(&cases, 0, 20, &BlendWeights::default()).unwrap();
        let b = fit(&cases, 0, 20, &BlendWeights::default()).unwrap();
        assert_eq!(a.0, b.0);
    }

    #[test]
    fn too_few_cases_are_refused() {
        let cases = synthetic_cases(10, 3);
        let e = fit(&cases, 0, 20, &BlendWeights::default()).unwrap_err();
        assert!(e.to_string().contains("at least 50"), "{e}");
    }

    #[test]
    fn a_pick_outside_the_pool_is_counted_not_used() {
        let mut c = CaseCollector::new(5, 1);
        let pool = [PoolEntry {
            movie_id: 1,
            signals: Signals::default(),
            sources: 1,
        }];
        c.observe(&pool, 2);
        c.observe(&pool, 1);
        assert_eq!((c.missed, c.cases.len()), (1, 1));
        assert_eq!(c.cases[0].features.len(), 1);
    }

    #[test]
    fn files_round_trip_and_bad_files_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let cases = synthetic_cases(200, 5);
        let (weights, report) = fit(&cases, 3, 20, &BlendWeights::default()).unwrap();
        let blend = learned_blend("b1".into(), "synthetic".into(), None, weights, report);
        let path = dir.path().join("b.blend.json");
        blend.save(&path).unwrap();
        let loaded = LearnedBlend::load(&path).unwrap();
        // JSON keeps each weight to within its last bit.
        for (a, b) in loaded.weights.iter().zip(&blend.weights) {
            assert!((a - b).abs() <= 1e-15 * b.abs().max(1.0), "{a} {b}");
        }
        assert_eq!(
            LearnedBlend {
                weights: blend.weights.clone(),
                ..loaded
            },
            blend
        );

        let mut bad = blend.clone();
        bad.features.swap(0, 1);
        bad.save(&path).unwrap();
        let e = LearnedBlend::load(&path).unwrap_err().to_string();
        assert!(e.contains("`features`"), "{e}");
        let mut bad = blend.clone();
        bad.weights[3] = f64::NAN;
        // NaN is not JSON: written as null, refused as a parse error.
        bad.save(&path).unwrap();
        assert!(LearnedBlend::load(&path).is_err());
        let mut bad = blend.clone();
        bad.weights.pop();
        bad.save(&path).unwrap();
        let e = LearnedBlend::load(&path).unwrap_err().to_string();
        assert!(e.contains("`weights` has 14"), "{e}");
        let mut bad = blend;
        bad.schema = "other/1".into();
        bad.save(&path).unwrap();
        let e = LearnedBlend::load(&path).unwrap_err().to_string();
        assert!(e.contains("`schema`"), "{e}");
    }

    #[test]
    fn cholesky_solves_a_known_system() {
        let a = [[4.0, 2.0], [2.0, 3.0]];
        let x = solve_spd(a, [2.0, 1.0]).unwrap();
        assert!((x[0] - 0.5).abs() < 1e-12 && x[1].abs() < 1e-12, "{x:?}");
    }

    proptest! {
        #[test]
        fn the_score_is_the_weighted_sum_of_the_features(
            w in prop::collection::vec(-5.0f64..5.0, FEATURE_COUNT),
            co in 0.0f64..1.0, ncf in prop::option::of(0.0f64..1.0), sources in 0u8..64,
        ) {
            let blend = learned_blend("v".into(), String::new(), None, w.clone(), FitReport::default());
            let s = Signals { co_watched: co, ncf, ..Signals::default() };
            let x = features(&s, sources);
            let expected: f64 = w.iter().zip(x).map(|(a, b)| a * b).sum();
            prop_assert!((blend.score(&s, sources) - expected).abs() < 1e-9);
            prop_assert!(x.iter().all(|v| v.is_finite()));
            // More co-watch never lowers the score when its weights are positive.
            if w[4] >= 0.0 && w[7] >= 0.0 {
                let more = Signals { co_watched: (co + 0.1).min(1.0), ..s };
                prop_assert!(blend.score(&more, sources) >= blend.score(&s, sources) - 1e-12);
            }
        }
    }
}
