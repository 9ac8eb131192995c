//! Training runs end to end (data → model files → metrics through tract) and
//! the evaluation protocols behind `recstream eval`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::card::{ModelCard, ModelFiles, ParityCheck, UserVectorLayout, CARD_FORMAT};
use super::data::{self, Dataset, RankingCase, RawInteraction, Row};
use super::foldin::{Example, FoldInConfig};
use super::model::{NcfWeights, Objective};
use super::serve::{ModelError, NcfModel};
use super::train::{self, EpochReport, TrainConfig, TrainError, Validation};
use crate::fnv::Fnv;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Data(#[from] crate::catalog::CatalogError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot merge the ensemble: {0}")]
    Ensemble(String),
    #[error("{0}")]
    Other(String),
}

pub(crate) fn write(path: &Path, bytes: &[u8]) -> Result<(), EvalError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| EvalError::Write {
            path: parent.into(),
            source,
        })?;
    }
    std::fs::write(path, bytes).map_err(|source| EvalError::Write {
        path: path.into(),
        source,
    })
}

/// What a training run measured; written as `NAME.report.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    pub model_version: String,
    pub config: TrainConfig,
    pub training_data: String,
    pub training_data_hash: String,
    pub users: usize,
    pub items: usize,
    pub train_interactions: usize,
    pub best_epoch: usize,
    pub epochs: Vec<EpochReport>,
    pub train_seconds: f64,
    pub samples_per_second: f64,
    /// Test metrics computed through tract on the exported model.
    pub test: serde_json::Map<String, serde_json::Value>,
    pub files: Vec<String>,
}

/// Input of one training run.
pub struct RunInput<'a> {
    pub config: TrainConfig,
    /// Training interactions, and an optional test file's (explicit).
    pub train: &'a [RawInteraction],
    pub test: Option<&'a [RawInteraction]>,
    pub data_name: String,
    /// Model files go to `out.onnx`, `out.card.json`, …
    pub out: PathBuf,
    pub progress: bool,
}

pub(crate) fn data_hash(rows: &[Row], dataset: &Dataset) -> String {
    let mut h = Fnv::default();
    for r in rows {
        h.write(dataset.user_ids[r.user as usize].as_bytes());
        h.write(&dataset.item_ids[r.item as usize].to_le_bytes());
        h.write(&r.rating.to_le_bytes());
        h.write(&r.ts.to_le_bytes());
    }
    h.hex()
}

/// A trained, exported and reloaded model with its test metrics.
pub struct Run {
    pub report: RunReport,
    pub model: NcfModel,
    pub dataset: Dataset,
    /// Leave-one-out test cases (implicit runs without a test file).
    pub cases: Vec<RankingCase>,
    pub train_rows: Vec<Row>,
    pub test_rows: Vec<Row>,
    /// The trainer's model as training left it (the parity reference). With
    /// an ensemble or snapshots, the first member's last epoch: not what
    /// the exported, merged files hold.
    pub trainer: train::Model,
    pub files: ModelFiles,
}

/// Trains, exports the model files, reloads them through tract and measures
/// the test split with the served model.
pub fn run(input: RunInput) -> Result<Run, EvalError> {
    let config = input.config.clone();
    config.validate()?;
    let parts: Vec<&[RawInteraction]> = match input.test {
        Some(t) => vec![input.train, t],
        None => vec![input.train],
    };
    let (dataset, mut rows) = Dataset::index(&parts);
    let all_train = rows.remove(0);
    let given_test = rows.pop().unwrap_or_default();
    let (n_users, n_items) = (dataset.n_users(), dataset.n_items());
    let seed = config.seed;
    // Test split: the given file (explicit) or each user's latest interaction.
    let (train_pool, test_rows, cases) = match (config.objective, input.test) {
        (Objective::Explicit, Some(_)) => (all_train, given_test, Vec::new()),
        (Objective::Explicit, None) => {
            let (a, b) = data::random_split(&all_train, 0.2, seed ^ 0x7e57);
            (a, b, Vec::new())
        }
        (Objective::Implicit, _) => {
            let (a, c) = data::leave_one_out(&all_train, n_users, n_items, 99, seed ^ 0x7e57);
            (a, Vec::new(), c)
        }
    };
    // Validation for early stopping comes out of the training data only.
    let (train_rows, validation) = match config.objective {
        Objective::Explicit => {
            let (a, b) = data::random_split(&train_pool, config.validation_fraction, seed ^ 0x5a1);
            (a, Validation::Ratings(b))
        }
        Objective::Implicit => {
            let (a, c) = data::leave_one_out(&train_pool, n_users, n_items, 99, seed ^ 0x5a1);
            (a, Validation::Ranking(c))
        }
    };
    let started = std::time::Instant::now();
    // The members (one unless `ensemble`): seeds seed, seed + 1, …
    let mut runs = Vec::with_capacity(config.ensemble);
    for j in 0..config.ensemble as u64 {
        let member = TrainConfig {
            seed: config.seed + j,
            ..config.clone()
        };
        runs.push(train::train(
            &member,
            n_users,
            n_items,
            &train_rows,
            &validation,
            input.progress,
        )?);
    }
    let samples: f64 = runs.iter().map(|r| samples_seen(&r.epochs)).sum();
    let mut runs = runs.into_iter();
    let mut trained = runs.next().ok_or(TrainError::Empty)?;
    if config.ensemble > 1 {
        let members: Vec<(NcfWeights, Vec<f32>)> =
            std::iter::once((trained.weights.clone(), trained.user_vectors.clone()))
                .chain(runs.map(|m| (m.weights, m.user_vectors)))
                .collect();
        let (weights, users) = NcfWeights::ensemble(&members).map_err(EvalError::Ensemble)?;
        trained.weights = weights;
        trained.user_vectors = users;
    }
    let train_seconds = started.elapsed().as_secs_f64();
    let hash = data_hash(&train_rows, &dataset);
    let mut version_hash = Fnv::default();
    version_hash.write(
        serde_json::to_string(&config)
            .unwrap_or_default()
            .as_bytes(),
    );
    version_hash.write(hash.as_bytes());
    let model_version = format!(
        "ncf-{}-{}",
        config.objective.as_str(),
        &version_hash.hex()[..10]
    );

    // Export: ONNX, user vectors and the card.
    let files = ModelFiles::new(&input.out);
    let w = &trained.weights;
    let d = w.user_dim();
    write(&files.onnx, &super::onnx::export(w, &model_version))?;
    let users_bytes: Vec<u8> = trained
        .user_vectors
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    write(&files.users, &users_bytes)?;
    let new_user_prior = population_prior(w, &trained.user_vectors, &train_rows, seed);
    let (inputs, outputs) = ModelCard::io_specs(d);
    let rating_scale = (config.objective == Objective::Explicit).then(|| {
        let lo = train_rows
            .iter()
            .map(|r| r.rating)
            .fold(f32::INFINITY, f32::min);
        let hi = train_rows
            .iter()
            .map(|r| r.rating)
            .fold(f32::NEG_INFINITY, f32::max);
        [lo, hi]
    });
    let mut card = ModelCard {
        format: CARD_FORMAT.into(),
        model_version: model_version.clone(),
        objective: config.objective,
        inputs,
        outputs,
        user_vector: UserVectorLayout::of(w),
        item_ids: dataset.item_ids.clone(),
        user_ids: dataset.user_ids.clone(),
        rating_scale,
        training: serde_json::to_value(&config).unwrap_or_default(),
        training_data_hash: hash.clone(),
        training_data: input.data_name.clone(),
        metrics: serde_json::Map::new(),
        // The exported weights' own forward pass is the reference tract must meet.
        checks: ParityCheck::pairs(n_users, w.n_items, 16)
            .into_iter()
            .map(|(user_row, item)| ParityCheck {
                user_row,
                item,
                score: w.score(
                    &trained.user_vectors[user_row * d..(user_row + 1) * d],
                    item as usize,
                ),
                history: None,
            })
            .collect(),
        new_user_prior: Some(new_user_prior),
        history: None,
    };
    card.metrics.insert(
        format!("validation_{}", trained.validation_metric),
        // Of the model as served (members and snapshots merged).
        json!(train::validation_metric(
            &trained.weights,
            &trained.user_vectors,
            &validation
        )),
    );
    write(
        &files.card,
        &serde_json::to_vec_pretty(&card).unwrap_or_default(),
    )?;

    // Test metrics through the served model (tract), not the trainer.
    let mut model = NcfModel::load(&files.onnx, FoldInConfig::default())?;
    let predict = |u: &[u32], i: &[u32]| tract_scores(&model, u, i);
    let mut test = serde_json::Map::new();
    match config.objective {
        Objective::Explicit => {
            let scale = rating_scale.map_or((1.0, 5.0), |s| (s[0], s[1]));
            let (rmse, mae) = train::rating_errors(predict, &test_rows, scale);
            test.insert("rmse".into(), json!(rmse));
            test.insert("mae".into(), json!(mae));
            test.insert("test_ratings".into(), json!(test_rows.len()));
        }
        Objective::Implicit => {
            let (hr, ndcg) = train::ranking_metrics(predict, &cases);
            test.insert("hr@10".into(), json!(hr));
            test.insert("ndcg@10".into(), json!(ndcg));
            test.insert("test_users".into(), json!(cases.len()));
            let interacted = data::interacted(&train_rows, dataset.n_users());
            let all: Vec<u32> = (0..dataset.n_items() as u32).collect();
            let full = full_catalogue_hit_rate(&cases, &interacted, |u| {
                tract_scores(&model, &vec![u; all.len()], &all)
            });
            test.insert("hr@10_full_catalogue".into(), json!(full));
        }
    }
    // The loaded model's card gains the test metrics too; no second load.
    for (k, v) in &test {
        card.metrics.insert(format!("test_{k}"), v.clone());
    }
    model.card.metrics = card.metrics.clone();
    write(
        &files.card,
        &serde_json::to_vec_pretty(&card).unwrap_or_default(),
    )?;

    let curve = input.out.with_extension("curve.png");
    let report_path = input.out.with_extension("report.json");
    let report = RunReport {
        model_version,
        config: config.clone(),
        training_data: input.data_name,
        training_data_hash: hash,
        users: n_users,
        items: n_items,
        train_interactions: train_rows.len(),
        best_epoch: trained.best_epoch,
        epochs: trained.epochs.clone(),
        train_seconds,
        samples_per_second: samples / train_seconds,
        test,
        files: [&files.onnx, &files.card, &files.users, &curve, &report_path]
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
    };
    let metric_name = if trained.validation_metric == "rmse" {
        "validation RMSE"
    } else {
        "validation HR@10"
    };
    if let Err(e) = super::plot::training_curve(
        &curve,
        &format!(
            "NeuMF {} on {}",
            config.objective.as_str(),
            report.training_data
        ),
        metric_name,
        &trained.epochs,
        trained.best_epoch,
    ) {
        tracing::warn!("training curve not drawn: {e}");
    }
    write(
        &report_path,
        &serde_json::to_vec_pretty(&report).unwrap_or_default(),
    )?;
    Ok(Run {
        report,
        model,
        dataset,
        cases,
        train_rows,
        test_rows,
        trainer: trained.model,
        files,
    })
}

fn samples_seen(epochs: &[EpochReport]) -> f64 {
    epochs
        .iter()
        .map(|e| e.samples_per_second * e.seconds)
        .sum()
}

/// Training rows fitted as one anonymous user's history.
const PRIOR_SAMPLE: usize = 4000;

/// The vector for users the model never saw, written to the card. It is the
/// whole population fitted as one user: fold-in from the mean trained vector
/// on a uniform sample of training rows (so items weigh by popularity), with
/// uniform negatives for implicit models. A nonlinear model does not map the
/// mean of its user vectors to the average taste; this prior does score a
/// newcomer like the crowd, and fold-in moves them away from it from their
/// first event.
pub fn population_prior(weights: &NcfWeights, users: &[f32], rows: &[Row], seed: u64) -> Vec<f32> {
    let mean = super::model::mean_row(users, weights.user_dim());
    if rows.is_empty() {
        return mean;
    }
    let mut rng = crate::rng::Rng::new(seed ^ 0x9a1);
    let mut pick = |n: usize| ((rng.unit() * n as f64) as usize).min(n - 1);
    // Its own settings, not the serving defaults: tuning how the engine
    // folds users in must not change what `train` writes into the card.
    let config = FoldInConfig {
        steps: 100,
        warm_steps: 0,
        learning_rate: Some(0.5),
        l2: 0.0,
        negatives: 4,
        max_history: 30, // unused: the examples are given
    };
    let mut examples = Vec::new();
    for _ in 0..PRIOR_SAMPLE.min(rows.len()) {
        let row = &rows[pick(rows.len())];
        match weights.objective {
            Objective::Explicit => examples.push(Example {
                item: row.item as usize,
                target: row.rating,
                weight: 1.0,
            }),
            Objective::Implicit => {
                examples.push(Example {
                    item: row.item as usize,
                    target: 1.0,
                    weight: 1.0,
                });
                for _ in 0..config.negatives {
                    examples.push(Example {
                        item: pick(weights.n_items),
                        target: 0.0,
                        weight: 1.0,
                    });
                }
            }
        }
    }
    let first_layer = weights.item_first_layer();
    super::foldin::fold_in(
        weights,
        first_layer.as_deref(),
        &mean,
        &mean,
        &examples,
        &config,
    )
}

/// Whether `positive` ranks in the top 10 of `scores` among the items not
/// in `interacted` (sorted); ties count against it.
pub fn full_catalogue_hit(scores: &[f32], positive: u32, interacted: &[u32]) -> f64 {
    let target = scores[positive as usize];
    let better = scores
        .iter()
        .enumerate()
        .filter(|&(i, &s)| {
            s >= target && i as u32 != positive && interacted.binary_search(&(i as u32)).is_err()
        })
        .count();
    f64::from(u8::from(better < 10))
}

/// HR@10 of the leave-one-out cases against the whole catalogue (every item
/// the user never interacted with), `scores(user)` scoring every item.
pub fn full_catalogue_hit_rate(
    cases: &[RankingCase],
    interacted: &[Vec<u32>],
    scores: impl Fn(u32) -> Vec<f32>,
) -> f64 {
    let hits: f64 = cases
        .iter()
        .map(|c| full_catalogue_hit(&scores(c.user), c.positive, &interacted[c.user as usize]))
        .sum();
    hits / cases.len().max(1) as f64
}

/// Scores dense (user index, item index) pairs with the served model.
pub fn tract_scores(model: &NcfModel, users: &[u32], items: &[u32]) -> Vec<f32> {
    let d = model.user_dim();
    let mut vectors = Vec::with_capacity(users.len() * d);
    for &u in users {
        vectors.extend_from_slice(model.prior(&model.card.user_ids[u as usize]));
    }
    let items: Vec<i64> = items.iter().map(|&i| i as i64).collect();
    model
        .score_pairs(&vectors, &items)
        .expect("a loaded model scores its own item indices")
}
