//! Prequential replay: real interactions streamed in event-time order through
//! the engine's own processing code ([`Engine::process`], the function the
//! Kafka pipeline runs). Before each interaction is applied, the list the
//! engine would publish for that user at that moment ([`Engine::peek`], the
//! interactive query) is scored against it: no look-ahead of any kind.
//!
//! Models are trained inside the replay from the events before a cut only
//! (half of the event time span; periodic retraining every N days after it),
//! so every variant is measured on the second half with the same information.

pub mod broker;
pub mod command;
pub mod metrics;
pub mod report;
pub mod sweep;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::catalog::{self, Catalog, CatalogError, CatalogRecord, GenreSet};
use crate::config::EngineConfig;
use crate::engine::{Body, Engine, EngineError, Record, SourcePos};
use crate::event::{EventType, Interaction};
use crate::experiment::{source_bit, Variant, Variants, ALL_SOURCES};
use crate::ncf::data::RawInteraction;
use crate::ncf::eval::{self as ncf_eval, EvalError, RunInput};
use crate::ncf::foldin::FoldInConfig;
use crate::ncf::model::Objective;
use crate::ncf::sequence::SequenceConfig;
use crate::ncf::serve::{ModelError, NcfModel, NcfScorer};
use crate::ncf::train::TrainConfig;
use crate::output::{Source, UserOutputs};
use crate::ranker::{self, CaseCollector, LearnedBlend};
use crate::ratings::{self, Rating};
use crate::recommend::Scorer;
use crate::store::{Store, StoreError};
use metrics::{Accumulator, BiasBaseline, Case, Exposure, Summary};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Data(#[from] CatalogError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("training the replay's model: {0}")]
    Train(#[from] EvalError),
    #[error("loading the replay's model: {0}")]
    Model(#[from] ModelError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("exchanging item knowledge: {0}")]
    Changelog(#[from] crate::changelog::ChangelogError),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Ranker(#[from] crate::ranker::RankerError),
}

/// A ratings stream with its catalog, in replay order.
pub struct Stream {
    pub name: String,
    pub catalog: Catalog,
    /// Sorted by (event time, user, item).
    pub events: Vec<Rating>,
    /// Models see only events before this time; metrics are reported from it on.
    pub cut: i64,
}

impl Stream {
    /// Loads a MovieLens directory (ratings and movies) or a ratings file
    /// beside its catalog; keeps the first `limit` events when given.
    pub fn load(path: &Path, limit: Option<usize>) -> Result<Stream, ReplayError> {
        let dir = if path.is_dir() {
            path
        } else {
            path.parent().unwrap_or(Path::new("."))
        };
        let mut events = if path.is_dir() {
            ratings::load_dir(path)?
        } else {
            ratings::load(path)?
        };
        let catalog_file = ["movies.csv", "u.item", "movies.dat", "catalog.csv"]
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.exists())
            .ok_or_else(|| {
                ReplayError::Invalid(format!(
                    "no movies.csv, u.item, movies.dat or catalog.csv in {}",
                    dir.display()
                ))
            })?;
        let catalog = catalog::load(&catalog_file)?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "ratings".into());
        Ok(Stream::new(
            name,
            catalog,
            std::mem::take(&mut events),
            limit,
        ))
    }

    pub fn new(
        name: String,
        catalog: Catalog,
        mut events: Vec<Rating>,
        limit: Option<usize>,
    ) -> Stream {
        events.sort_by(|a, b| {
            (a.ts_ms, a.user_id, a.movie_id).cmp(&(b.ts_ms, b.user_id, b.movie_id))
        });
        if let Some(n) = limit {
            events.truncate(n);
        }
        let first = events.first().map_or(0, |e| e.ts_ms);
        let last = events.last().map_or(0, |e| e.ts_ms);
        Stream {
            name,
            catalog,
            events,
            cut: first + (last - first) / 2,
        }
    }

    /// A small synthetic stream for tests: 30 movies over three genres and
    /// `events` (at most 1,000) distinct ratings by 40 users whose tastes follow
    /// their genre, with repeated timestamps (ties are broken by user, then item).
    pub fn synthetic(events: usize, seed: u64) -> Stream {
        let mut catalog = Catalog::default();
        for id in 1..=30u32 {
            let genre = ["Comedy", "Drama", "Sci-Fi"][(id % 3) as usize];
            catalog
                .upsert(CatalogRecord {
                    movie_id: id,
                    title: format!("Movie {id}"),
                    genres: vec![genre.to_string()],
                    year: Some(1980 + id as u16),
                    tmdb_id: None,
                    imdb_id: None,
                    tags: vec![],
                })
                .expect("a valid catalog record");
        }
        let mut rng = crate::rng::Rng::new(seed);
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        while out.len() < events.min(1000) {
            let user = 1 + (rng.next_u64() % 40) as u32;
            // Users favour their genre; lower ids are more popular.
            let movie = if rng.next_u64() % 3 == 0 {
                1 + (rng.next_u64() % 30) as u32
            } else {
                let base = 1 + (rng.next_u64() % 10) as u32 * 3;
                (base + user % 3).min(30)
            };
            if !seen.insert((user, movie)) {
                continue;
            }
            out.push(Rating {
                user_id: user,
                movie_id: movie,
                rating: 1.0 + (rng.next_u64() % 5) as f64,
                // Coarse timestamps: ties are broken by user, then item.
                ts_ms: 1_000_000 + (out.len() as i64 / 3) * 60_000,
            });
        }
        out.reverse();
        Stream::new("synthetic".into(), catalog, out, None)
    }

    fn before(&self, t: i64) -> Vec<RawInteraction> {
        self.events
            .iter()
            .take_while(|e| e.ts_ms < t)
            .map(RawInteraction::from)
            .collect()
    }
}

/// How a variant uses the NCF model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum ModelPlan {
    None,
    /// Trained at the cut; users keep their trained (or the mean) vector.
    Frozen,
    /// Trained at the cut; user vectors folded in from every event.
    FoldIn,
    /// Trained at the cut and again every `every_days` of event time, folded in.
    Retrain {
        every_days: f64,
    },
}

/// One engine configuration under test.
#[derive(Debug, Clone)]
pub struct VariantSpec {
    pub name: String,
    pub config: EngineConfig,
    pub sources: u8,
    pub model: ModelPlan,
    pub objective: Objective,
    /// The history-based NeuMF (user vector from recent interactions)
    /// instead of per-user vectors.
    pub history: bool,
    /// Ranks with a learned blend (see [`BlendFitting`]) refitted every
    /// this many days of event time, instead of the config's weights.
    pub learned_blend: Option<f64>,
}

/// Replay settings shared by every variant of a run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Sliding window of event time for the HR plot.
    pub window_days: f64,
    /// Training epochs of the replay's models (`None`: the trainer's defaults).
    pub epochs: Option<usize>,
    /// Where model files go.
    pub work_dir: PathBuf,
    pub fold_in: FoldInConfig,
    /// Metrics are also reported on events from this time on (the held-back tail).
    pub tail_from: Option<i64>,
    /// The history model's training settings (`epochs` overrides theirs).
    pub history: SequenceConfig,
}

#[derive(Debug, Clone, Serialize)]
pub struct VariantResult {
    pub name: String,
    /// Every event of the stream (the popularity anchor's protocol).
    pub all: Summary,
    /// Events from the cut on: the figure variants are compared by.
    pub second_half: Summary,
    /// Events from `Settings::tail_from` on (the sweep's confirmation).
    pub tail: Option<Summary>,
    /// Events from the cut up to `Settings::tail_from` (what the sweep tunes on).
    pub validation: Option<Summary>,
    pub seconds: f64,
    pub trainings: usize,
    /// Per event, in stream order: the item's 1-based rank in the list, 0 when absent.
    #[serde(skip)]
    pub ranks: Vec<u16>,
    /// The learned blends fitted during the replay, in order.
    pub blend_fits: Vec<BlendFit>,
}

/// One fit of a variant's learned blend.
#[derive(Debug, Clone, Serialize)]
pub struct BlendFit {
    /// Event time (ms) of the fit.
    pub at: i64,
    pub version: String,
    pub weights: Vec<f64>,
    pub report: crate::ranker::FitReport,
}

/// Trained model files per (cut time, objective, history model), shared by variants.
#[derive(Default)]
pub struct Models {
    files: HashMap<(i64, Objective, bool), PathBuf>,
}

impl Models {
    /// Trains on the stream's events before `t` (once per `t` and objective)
    /// and loads the model with this fold-in setting.
    pub fn at(
        &mut self,
        stream: &Stream,
        t: i64,
        (objective, history): (Objective, bool),
        settings: &Settings,
        fold_in: FoldInConfig,
    ) -> Result<NcfModel, ReplayError> {
        let file = self.file(stream, t, (objective, history), settings)?;
        Ok(NcfModel::load(&file, fold_in)?)
    }

    /// The model file trained on the stream's events before `t` (trained on
    /// first use).
    pub fn file(
        &mut self,
        stream: &Stream,
        t: i64,
        (objective, history): (Objective, bool),
        settings: &Settings,
    ) -> Result<PathBuf, ReplayError> {
        let key = (t, objective, history);
        if history {
            if let std::collections::hash_map::Entry::Vacant(slot) = self.files.entry(key) {
                // The rating head has its own defaults (`--history-config`
                // tunes the next-item model).
                let mut config = match objective {
                    Objective::Implicit => settings.history.clone(),
                    Objective::Explicit => SequenceConfig::rating_head(),
                };
                if let Some(e) = settings.epochs {
                    config.epochs = e;
                }
                // Named by the training settings too: a later run with the
                // same settings and cut reuses the files (they are loaded
                // and parity-checked again like any model).
                // Also by the code's version and the training data.
                let train = stream.before(t);
                let mut fingerprint = crate::fnv::Fnv::default();
                fingerprint.write(env!("CARGO_PKG_VERSION").as_bytes());
                fingerprint.write(
                    serde_json::to_string(&config)
                        .unwrap_or_default()
                        .as_bytes(),
                );
                for r in &train {
                    fingerprint.write(r.user.as_bytes());
                    fingerprint.write(&r.movie_id.to_le_bytes());
                    fingerprint.write(&r.rating.to_le_bytes());
                    fingerprint.write(&r.ts.to_le_bytes());
                }
                let out = settings.work_dir.join(format!(
                    "{}-history-{t}-{}",
                    stream.name,
                    &fingerprint.hex()[..10]
                ));
                let files = crate::ncf::card::ModelFiles::new(&out);
                if !files.card.exists() {
                    crate::ncf::sequence::train_and_export(
                        &config,
                        &train,
                        &format!("{} before {t}", stream.name),
                        &out,
                        false,
                    )?;
                }
                slot.insert(files.onnx);
            }
            return Ok(self.files[&key].clone());
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = self.files.entry(key) {
            let train = stream.before(t);
            let mut config = TrainConfig::defaults(objective);
            if objective == Objective::Explicit {
                // One plain NeuMF, as this replay was tuned with: the
                // explicit default's histories train slowly on
                // ml-latest-small's 9.7k items (a dense product per batch),
                // and its fifteen merged members (5 seeds × 3 snapshots)
                // make every fold-in many times dearer.
                config = TrainConfig {
                    hidden: vec![64, 32, 16],
                    history: false,
                    item_history: false,
                    ensemble: 1,
                    snapshots: 1,
                    l2: 0.05,
                    ..config
                };
            }
            if let Some(e) = settings.epochs {
                config.epochs = e;
            }
            let out =
                settings
                    .work_dir
                    .join(format!("{}-{}-{}", stream.name, objective.as_str(), t));
            if let Some(parent) = out.parent() {
                std::fs::create_dir_all(parent).map_err(|source| ReplayError::Io {
                    path: parent.into(),
                    source,
                })?;
            }
            let run = ncf_eval::run(RunInput {
                config,
                train: &train,
                test: None,
                data_name: format!("{} before {t}", stream.name),
                out: out.clone(),
                progress: false,
            })?;
            slot.insert(run.files.onnx.clone());
        }
        Ok(self.files[&key].clone())
    }
}

const PARTITION: u32 = 0;
const DAY_MS: f64 = 86_400_000.0;

impl ModelPlan {
    /// The fold-in of a variant's model: frozen models keep their vectors.
    pub fn fold_in(self, settings: &Settings) -> FoldInConfig {
        match self {
            ModelPlan::Frozen => FoldInConfig {
                steps: 0,
                warm_steps: 0,
                ..settings.fold_in
            },
            _ => settings.fold_in,
        }
    }

    /// When the model is trained first: at the cut (never without a model).
    pub fn first_training(self, stream: &Stream) -> Option<i64> {
        (self != ModelPlan::None).then_some(stream.cut)
    }

    /// After a training at `t` that `event_ts` triggered: the next one, if
    /// the plan retrains (the next boundary after the event; quiet spans are
    /// skipped).
    pub fn next_training(self, t: i64, event_ts: i64) -> Option<i64> {
        match self {
            ModelPlan::Retrain { every_days } => {
                let every = (every_days * DAY_MS) as i64;
                Some(next_boundary(t + every, every, event_ts))
            }
            _ => None,
        }
    }
}

/// The first of `first`, `first + every`, … after `now` (a schedule skips
/// the boundaries of a quiet span instead of catching up on them).
fn next_boundary(first: i64, every: i64, now: i64) -> i64 {
    let mut next = first;
    while next <= now {
        next += every;
    }
    next
}

/// The protocol scores each list against the rankings of every event before
/// it, so the replay never lets them trail (`lists.ranking_refresh_ms` = 0).
pub fn exact_rankings(config: &EngineConfig) -> EngineConfig {
    let mut config = config.clone();
    config.lists.ranking_refresh_ms = 0;
    config
}

/// Replays the stream through one variant and scores every interaction.
pub fn run_variant(
    stream: &Stream,
    spec: &VariantSpec,
    settings: &Settings,
    models: &mut Models,
) -> Result<VariantResult, ReplayError> {
    run_split(stream, spec, settings, models, Split::ONE)
}

/// How the replay spreads users over simulated engine instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    /// Instances, one input partition each; users go to a partition by the
    /// engine's partitioner, as a Kafka producer keyed by user sends them.
    pub instances: usize,
    /// Whether instances exchange item knowledge through the global item
    /// tables (each one's changelog batches, assembled and applied by the
    /// others as the live follower does); without, each instance knows only
    /// its own users' interactions (the design before global item tables).
    pub global_items: bool,
}

impl Split {
    pub const ONE: Split = Split {
        instances: 1,
        global_items: true,
    };
}

/// Replays the stream through one variant spread over `split.instances`
/// engines and scores every interaction against its owner's list. With
/// global item tables, each instance's changelog batches reach every other
/// instance before the next event (the live pipeline's flush interval, a
/// second by default, is far below the time between a stream's events).
pub fn run_split(
    stream: &Stream,
    spec: &VariantSpec,
    settings: &Settings,
    models: &mut Models,
    split: Split,
) -> Result<VariantResult, ReplayError> {
    let started = Instant::now();
    let n = split.instances.max(1);
    let mut dirs = Vec::with_capacity(n);
    let mut engines = Vec::with_capacity(n);
    for k in 0..n {
        let dir = tempfile::tempdir().map_err(|source| ReplayError::Io {
            path: std::env::temp_dir(),
            source,
        })?;
        let mut store = Store::open(dir.path(), 64)?;
        let exchange = n > 1 && split.global_items;
        if exchange {
            store.enable_changelog();
        }
        let mut engine = Engine::new(exact_rankings(&spec.config), store, stream.catalog.clone())?;
        // Lists are read through `peek` before each event; the outputs of each
        // one-event batch would go unused.
        engine.compute_outputs(false);
        if n > 1 {
            engine.set_owned(Some(std::iter::once(k as u32).collect()));
        }
        dirs.push(dir);
        engines.push(engine);
    }
    let install = |engine: &mut Engine,
                   scorer: Option<Arc<dyn Scorer>>,
                   ranker: Option<Arc<LearnedBlend>>| {
        engine.set_variants(Arc::new(Variants::only(Variant {
            name: spec.name.as_str().into(),
            share: 1.0,
            blend: ranker
                .as_ref()
                .map_or_else(|| spec.config.blend.clone(), |r| r.reason_weights()),
            scorer,
            sources: spec.sources,
            model_path: None,
            ranker,
            ranker_path: None,
        })));
    };
    for engine in &mut engines {
        install(engine, None, None);
    }
    let fold_in = spec.model.fold_in(settings);
    let mut fitting = spec
        .learned_blend
        .map(|every_days| BlendFitting::new(stream, every_days));
    let mut next_training = match &fitting {
        // The model goes live before the cut, so that the blend's training
        // cases carry its signal from a model that has not seen them.
        Some(f) if spec.model != ModelPlan::None => Some(f.collect_from),
        _ => spec.model.first_training(stream),
    };
    let mut model: Option<Arc<NcfModel>> = None;
    let mut ranker: Option<Arc<LearnedBlend>> = None;
    let mut blend_fits = Vec::new();
    let mut trainings = 0;
    // The engine's producers key by user with librdkafka's default partitioner.
    let partitioner = crate::routing::Partitioner::Crc32;
    let mut assembler = crate::global::Assembler::default();

    let mut scoring = Scoring::new(stream, settings, spec.config.lists.top_n);
    for (k, event) in stream.events.iter().enumerate() {
        let mut changed = false;
        if let Some(t) = next_training.filter(|t| event.ts_ms >= *t) {
            let kind = (spec.objective, spec.history);
            model = Some(Arc::new(models.at(stream, t, kind, settings, fold_in)?));
            trainings += 1;
            next_training = match t < stream.cut {
                true => Some(stream.cut),
                false => spec.model.next_training(t, event.ts_ms),
            };
            changed = true;
        }
        if let Some(f) = fitting.as_mut() {
            if let Some(r) = f.refit_due(stream, spec, settings, model.as_deref(), event.ts_ms)? {
                blend_fits.push(BlendFit {
                    at: event.ts_ms,
                    version: r.version.clone(),
                    weights: r.weights.clone(),
                    report: r.fit.clone(),
                });
                ranker = Some(Arc::new(r));
                changed = true;
            }
        }
        if changed {
            for engine in &mut engines {
                let scorer = model
                    .as_ref()
                    .map(|m| Arc::new(NcfScorer { model: m.clone() }) as Arc<dyn Scorer>);
                install(engine, scorer, ranker.clone());
            }
        }
        let user = event.user_id.to_string();
        let partition = match n {
            1 => PARTITION,
            _ => partitioner.partition(user.as_bytes(), n as u32),
        };
        let engine = &mut engines[partition as usize];
        // What the engine would publish for this user right now.
        let outputs = match fitting.as_mut().filter(|f| event.ts_ms >= f.collect_from) {
            Some(f) => {
                let (outputs, pool) = engine.peek_with_pool(partition, &user)?;
                f.cases.observe(&pool, event.movie_id);
                outputs
            }
            None => engine.peek(partition, &user)?,
        };
        // The engine's rating prediction when its model is an explicit one.
        let predicted = match (&model, spec.objective) {
            (Some(m), Objective::Explicit) => {
                let state = engine.store().user(partition, &user)?.unwrap_or_default();
                m.item_index(event.movie_id)
                    .map(|i| {
                        m.score_user(&m.user_vector(&user, &state), &[i as i64])
                            .map(|s| s[0] as f64)
                    })
                    .transpose()?
            }
            _ => None,
        };
        scoring.score(event, &outputs, predicted);
        let result = engine.process(vec![record(k as i64, partition, event)])?;
        if n > 1 && split.global_items {
            let mut batches = Vec::new();
            for batch in &result.changelog {
                for (offset, (key, value)) in batch.records.iter().enumerate() {
                    if let Some(b) =
                        assembler.push(batch.partition, offset as i64, key, Some(value))?
                    {
                        batches.push(b);
                    }
                }
            }
            for engine in &mut engines {
                engine.apply_followed(&batches)?;
                engine.settle_item_tables();
            }
        }
    }
    drop(engines);
    drop(dirs);
    Ok(VariantResult {
        blend_fits,
        ..scoring.finish(&spec.name, started.elapsed().as_secs_f64(), trainings)
    })
}

/// A variant's learned blend: choice sets collected from the candidate pools
/// of every interaction from `collect_from` on (half-way to the cut, with the
/// variant's model live and trained before them), fitted at the cut and
/// refitted on everything collected so far every `every` of event time.
pub struct BlendFitting {
    pub collect_from: i64,
    every: i64,
    next_fit: i64,
    pub cases: CaseCollector,
}

/// Alternatives kept per choice set besides the pick.
const BLEND_NEGATIVES: usize = 30;

impl BlendFitting {
    pub fn new(stream: &Stream, every_days: f64) -> BlendFitting {
        let first = stream.events.first().map_or(stream.cut, |e| e.ts_ms);
        BlendFitting {
            collect_from: first + (stream.cut - first) / 2,
            every: ((every_days * DAY_MS) as i64).max(1),
            next_fit: stream.cut,
            cases: CaseCollector::new(BLEND_NEGATIVES, 0x5eed_b1e2d),
        }
    }

    /// Fits (and saves in the work directory) a new blend when one is due at `now`.
    fn refit_due(
        &mut self,
        stream: &Stream,
        spec: &VariantSpec,
        settings: &Settings,
        model: Option<&NcfModel>,
        now: i64,
    ) -> Result<Option<LearnedBlend>, ReplayError> {
        if now < self.next_fit {
            return Ok(None);
        }
        let fitted_at = self.next_fit;
        self.next_fit = next_boundary(self.next_fit, self.every, now);
        let (weights, report) = match ranker::fit(
            &self.cases.cases,
            self.cases.missed,
            BLEND_NEGATIVES,
            &spec.config.blend,
        ) {
            Ok(fit) => fit,
            // Too few cases yet: the blend in force stays until the next fit.
            Err(e @ crate::ranker::RankerError::Fit(_)) => {
                tracing::warn!("{}: no blend fitted at {fitted_at}: {e}", spec.name);
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let name = format!("{}-{}-{fitted_at}", stream.name, spec.name);
        let blend = ranker::learned_blend(
            name.clone(),
            format!(
                "{}: the candidate pools of its interactions from {} to {fitted_at} (ms)",
                stream.name, self.collect_from
            ),
            model.map(|m| m.card.model_version.clone()),
            weights,
            report,
        );
        std::fs::create_dir_all(&settings.work_dir).map_err(|source| ReplayError::Io {
            path: settings.work_dir.clone(),
            source,
        })?;
        blend.save(&settings.work_dir.join(format!("{name}.blend.json")))?;
        Ok(Some(blend))
    }
}

/// Scores each interaction against the outputs shown just before it.
pub(crate) struct Scoring<'s> {
    stream: &'s Stream,
    tail_from: Option<i64>,
    top_n: usize,
    t0: i64,
    window_ms: f64,
    all: Accumulator,
    second: Accumulator,
    tail: Accumulator,
    validation: Accumulator,
    exposure: Exposure,
    baseline: BiasBaseline,
    ranks: Vec<u16>,
}

impl<'s> Scoring<'s> {
    pub(crate) fn new(stream: &'s Stream, settings: &Settings, top_n: usize) -> Scoring<'s> {
        Scoring {
            stream,
            tail_from: settings.tail_from,
            top_n,
            t0: stream.events.first().map_or(0, |e| e.ts_ms),
            window_ms: (settings.window_days * DAY_MS).max(1.0),
            all: Accumulator::default(),
            second: Accumulator::default(),
            tail: Accumulator::default(),
            validation: Accumulator::default(),
            exposure: Exposure::default(),
            baseline: BiasBaseline::default(),
            ranks: Vec::with_capacity(stream.events.len()),
        }
    }

    /// Scores `event` against `outputs`, then learns it (novelty counts and
    /// the rating baseline). `predicted`: the model's rating, if it made one;
    /// else the online bias baseline predicts.
    pub(crate) fn score(&mut self, event: &Rating, outputs: &UserOutputs, predicted: Option<f64>) {
        let catalog = &self.stream.catalog;
        let listed: Vec<u32> = outputs
            .recommendations
            .items
            .iter()
            .take(self.top_n)
            .map(|i| i.movie_id)
            .collect();
        let rank = listed
            .iter()
            .position(|id| *id == event.movie_id)
            .map(|p| p + 1);
        self.ranks.push(rank.unwrap_or(0) as u16);
        let in_carousels = outputs
            .carousels
            .rows
            .iter()
            .any(|row| row.movie_ids.contains(&event.movie_id));
        let genres: Vec<GenreSet> = listed
            .iter()
            .map(|id| catalog.get(*id).map(|m| m.genres).unwrap_or_default())
            .collect();
        let novelty: Vec<f64> = listed
            .iter()
            .map(|id| self.exposure.self_information(*id, catalog.len()))
            .collect();
        let case = Case {
            rank,
            in_carousels,
            list_genres: &genres,
            list_novelty: &novelty,
            listed: &listed,
            window: ((event.ts_ms - self.t0) as f64 / self.window_ms) as i64,
        };
        let user = event.user_id.to_string();
        let predicted = predicted.unwrap_or_else(|| self.baseline.predict(&user, event.movie_id));
        let score = |acc: &mut Accumulator| {
            acc.add(&case);
            acc.add_rating(predicted.clamp(0.5, 5.0), event.rating);
        };
        score(&mut self.all);
        if event.ts_ms >= self.stream.cut {
            score(&mut self.second);
        }
        match self.tail_from {
            Some(t) if event.ts_ms >= t => score(&mut self.tail),
            Some(_) if event.ts_ms >= self.stream.cut => score(&mut self.validation),
            _ => {}
        }
        self.exposure.observe(event.movie_id);
        self.baseline.learn(&user, event.movie_id, event.rating);
    }

    pub(crate) fn finish(self, name: &str, seconds: f64, trainings: usize) -> VariantResult {
        let n = self.stream.catalog.len();
        VariantResult {
            name: name.to_string(),
            all: self.all.summary(n),
            second_half: self.second.summary(n),
            tail: self.tail_from.map(|_| self.tail.summary(n)),
            validation: self.tail_from.map(|_| self.validation.summary(n)),
            seconds,
            trainings,
            ranks: self.ranks,
            blend_fits: Vec::new(),
        }
    }
}

/// A rating as the interaction record the Kafka path would decode.
fn record(offset: i64, partition: u32, r: &Rating) -> Record {
    let user = r.user_id.to_string();
    Record {
        source: SourcePos {
            topic: Arc::from("replay"),
            partition: partition as i32,
            offset,
        },
        key: Some(user.as_bytes().to_vec()),
        payload: Vec::new(),
        received: Instant::now(),
        body: Body::Event(Interaction {
            event_id: format!("{}-{}-{}", r.user_id, r.movie_id, r.ts_ms),
            user_id: user,
            movie_id: r.movie_id,
            kind: EventType::Rate,
            value: Some(r.rating),
            ts: r.ts_ms,
            context: None,
        }),
    }
}

/// Blend weights with every signal off; variants turn on what they test.
fn only(config: &EngineConfig) -> EngineConfig {
    let mut c = config.clone();
    c.blend = crate::config::BlendWeights {
        affinity: 0.0,
        similarity: 0.0,
        popularity: 0.0,
        trending: 0.0,
        co_watched: 0.0,
        ncf: 0.0,
    };
    c
}

/// A tie-breaker weight: small enough never to outvote the signal under test.
const TIE_BREAK: f64 = 1e-3;

/// The variants compared side by side, built on `base` (the engine's defaults
/// or a sweep's choice). Single sources rank by their own signal (popularity
/// breaks ties); NCF variants re-score every source's candidates.
pub fn standard_variants(
    base: &EngineConfig,
    retrain_days: f64,
    history_ncf: f64,
) -> Vec<VariantSpec> {
    let single = |name: &str, source: Source, set: &dyn Fn(&mut EngineConfig)| {
        let mut config = only(base);
        config.blend.popularity = TIE_BREAK;
        set(&mut config);
        VariantSpec {
            name: name.into(),
            config,
            sources: source_bit(source),
            model: ModelPlan::None,
            objective: Objective::Implicit,
            history: false,
            learned_blend: None,
        }
    };
    // All-time popularity: every rating counted once, never decayed, no genre cap.
    let popularity = single("popularity", Source::Popular, &|c| {
        c.blend.popularity = 1.0;
        c.decay.popularity_half_life_hours = f64::INFINITY;
        c.lists.max_genre_share = 1.0;
    });
    let ncf = |name: &str, model: ModelPlan, objective: Objective| {
        let mut config = only(base);
        config.blend.ncf = 1.0;
        config.blend.popularity = TIE_BREAK;
        // The model is the ranking here, not a re-scoring of a first stage's head.
        config.lists.rescore_depth = 0;
        VariantSpec {
            name: name.into(),
            config,
            sources: CLASSIC_SOURCES,
            model,
            objective,
            history: false,
            learned_blend: None,
        }
    };
    let full = |name: &str, model: ModelPlan| VariantSpec {
        name: name.into(),
        config: base.clone(),
        sources: CLASSIC_SOURCES,
        model,
        objective: Objective::Implicit,
        history: false,
        learned_blend: None,
    };
    let retrained = ModelPlan::Retrain {
        every_days: retrain_days,
    };
    // The history model alone: its own candidates, ranked by its score.
    let history_alone = {
        let mut config = only(base);
        config.blend.ncf = 1.0;
        config.blend.popularity = TIE_BREAK;
        VariantSpec {
            name: "ncf-history".into(),
            config,
            sources: source_bit(Source::Model),
            model: retrained,
            objective: Objective::Implicit,
            history: true,
            learned_blend: None,
        }
    };
    // The rating head: the same history, trained on the next rating.
    let history_ratings = VariantSpec {
        name: "ncf-history-ratings".into(),
        objective: Objective::Explicit,
        sources: CLASSIC_SOURCES,
        ..history_alone.clone()
    };
    let mut history_blend_config = base.clone();
    history_blend_config.blend.ncf = history_ncf;
    let history_blend = VariantSpec {
        name: "full-blend-history".into(),
        config: history_blend_config,
        sources: ALL_SOURCES,
        model: retrained,
        objective: Objective::Implicit,
        history: true,
        learned_blend: None,
    };
    // Recency-aware popularity: the popular source's decayed counts with a
    // one-week half-life (published time-split studies find recent
    // popularity close to strong sequential models on MovieLens).
    let recent_popularity = single("popularity-7d", Source::Popular, &|c| {
        c.blend.popularity = 1.0;
        c.decay.popularity_half_life_hours = RECENT_POPULARITY_HALF_LIFE_HOURS;
        c.lists.max_genre_share = 1.0;
    });
    // The learned blends: the same sources (and model) as their hand-set
    // counterparts, ranked by weights fitted on the stream (`ranker.rs`).
    let learned_no_model = VariantSpec {
        name: "learned-blend-no-model".into(),
        learned_blend: Some(retrain_days),
        ..full("blend-no-model", ModelPlan::None)
    };
    let learned = VariantSpec {
        name: "learned-blend".into(),
        learned_blend: Some(retrain_days),
        ..history_blend.clone()
    };
    vec![
        popularity,
        recent_popularity,
        single("trending", Source::Trending, &|c| c.blend.trending = 1.0),
        single("genre-affinity", Source::Genre, &|c| c.blend.affinity = 1.0),
        single("content-similarity", Source::Similar, &|c| {
            c.blend.similarity = 1.0
        }),
        single("co-watched", Source::CoWatched, &|c| {
            c.blend.co_watched = 1.0
        }),
        ncf("ncf-frozen", ModelPlan::Frozen, Objective::Implicit),
        ncf("ncf-fold-in", ModelPlan::FoldIn, Objective::Implicit),
        ncf(
            "ncf-ratings-fold-in",
            ModelPlan::FoldIn,
            Objective::Explicit,
        ),
        full("blend-no-model", ModelPlan::None),
        full("full-blend", ModelPlan::FoldIn),
        full("full-blend-retrained", retrained),
        history_alone,
        history_ratings,
        history_blend,
        learned_no_model,
        learned,
    ]
}

/// `popularity-7d`'s half-life (the trending half-life, 6 h by default,
/// stays below it as the config requires).
pub const RECENT_POPULARITY_HALF_LIFE_HOURS: f64 = 168.0;

/// The sources every variant before the history model drew from (the
/// model's own source came with it), so their rows stay comparable.
pub const CLASSIC_SOURCES: u8 = ALL_SOURCES & !32;

/// The history model's weight in `full-blend-history` (its signal is the
/// probability relative to the user's best item, as co-watch's is relative
/// to the strongest candidate). Of 1, 2, 3, 4 and 8 (`--history-ncf`), 2 is
/// the one that gains on both datasets (eval/REPLAY.md).
pub const HISTORY_BLEND_NCF: f64 = 2.0;

#[cfg(test)]
mod tests;
