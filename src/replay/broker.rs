//! The same replay through a real broker: every rating is produced to the
//! interactions topic and consumed by the full Kafka pipeline; the list scored
//! before it is the pipeline's interactive query (answered on the engine
//! thread between batches), and the next rating is produced only once the
//! engine has applied this one. Slow (a broker round trip per event) and
//! meant for checking that the Kafka path gives the in-process figures.
//!
//! The replay gets its own topics (one partition each, so the one engine
//! instance sums nothing across partitions, as in-process) and consumer group.
//! Variants with a model get it the way a running engine does: when the
//! stream reaches a training time, the model trained on the events before it
//! is named in the pipeline's experiment file, and the next event is produced
//! only once the pipeline's outputs carry that model's version. Ranking
//! metrics match the in-process replay; rating predictions (RMSE/MAE) come
//! from the online baseline here, since the pipeline publishes no ratings.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::FutureRecord;

use super::{Models, ReplayError, Scoring, Settings, Stream, VariantResult, VariantSpec};
use crate::config::Config;
use crate::event::{EventType, Interaction};
use crate::experiment::source_bit;
use crate::output::Source;
use crate::pipeline::{self, JobHandle};
use crate::topics;

const APPLY_TIMEOUT: Duration = Duration::from_secs(30);

fn failed(what: &str, e: impl std::fmt::Display) -> ReplayError {
    ReplayError::Invalid(format!("broker replay: {what}: {e}"))
}

/// Replays `stream` through the Kafka pipeline on `brokers`; models are
/// trained (or taken) from `models`, as in-process.
pub async fn run_variant(
    stream: &Stream,
    spec: &VariantSpec,
    settings: &Settings,
    models: &mut Models,
    brokers: &str,
) -> Result<VariantResult, ReplayError> {
    let started = Instant::now();
    let scratch = tempfile::tempdir().map_err(|source| ReplayError::Io {
        path: std::env::temp_dir(),
        source,
    })?;
    let run = format!(
        "replay-{}-{}",
        std::process::id(),
        started.elapsed().as_nanos()
    );
    let mut config = Config::default();
    config.kafka.brokers = brokers.to_string();
    config.kafka.group_id = run.clone();
    config.state.dir = scratch.path().join("state");
    config.http.listen = String::new();
    config.processing.batch_max_wait_ms = 1;
    config.engine = super::exact_rankings(&spec.config);
    config.model.fold_in = spec.model.fold_in(settings);
    config.experiment.reload_interval_ms = 100;
    let t = &mut config.topics;
    for name in [
        &mut t.interactions,
        &mut t.catalog,
        &mut t.recommendations,
        &mut t.carousels,
        &mut t.insights,
        &mut t.refresh,
        &mut t.dead_letters,
        &mut t.changelog,
        &mut t.instances,
    ] {
        *name = format!("{run}.{name}");
    }
    // The variant's candidate sources, as an experiment of one variant.
    let sources: Vec<&str> = [
        (Source::Popular, "popular"),
        (Source::Trending, "trending"),
        (Source::Genre, "genre"),
        (Source::Similar, "similar"),
        (Source::CoWatched, "co_watched"),
        (Source::Model, "model"),
    ]
    .iter()
    .filter(|(s, _)| spec.sources & source_bit(*s) != 0)
    .map(|(_, n)| *n)
    .collect();
    let experiment = scratch.path().join("experiment.toml");
    let write_experiment = |model: &str| {
        std::fs::write(
            &experiment,
            format!(
                "salt = \"replay\"\n[[variants]]\nname = \"{}\"\nshare = 1.0\nmodel = {model:?}\nsources = {sources:?}\n",
                spec.name
            ),
        )
        .map_err(|source| ReplayError::Io {
            path: experiment.clone(),
            source,
        })
    };
    write_experiment("none")?;
    config.experiment.file = Some(experiment.clone());
    config
        .validate()
        .map_err(|e| failed("the replay's engine config", e))?;

    let decls: Vec<topics::TopicDecl> = topics::with_names(topics::builtin(), &config.topics)
        .into_iter()
        .map(|mut d| {
            d.partitions = 1;
            d
        })
        .collect();
    topics::apply(&pipeline::client_config(&config), &decls)
        .await
        .map_err(|e| failed("creating the replay's topics", e))?;

    let job = Arc::new(JobHandle::default());
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let pipeline_task = tokio::spawn(pipeline::run(
        config.clone(),
        stream.catalog.clone(),
        job.clone(),
        async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        },
    ));
    let producer = pipeline::producer(&config).map_err(|e| failed("producer", e))?;
    let deadline = Instant::now() + APPLY_TIMEOUT;
    while !job.ready() {
        if Instant::now() > deadline || pipeline_task.is_finished() {
            return Err(failed("the pipeline", "never became ready"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut scoring = Scoring::new(stream, settings, spec.config.lists.top_n);
    let mut next_training = spec.model.first_training(stream);
    let mut trainings = 0;
    for event in &stream.events {
        let user = event.user_id.to_string();
        if let Some(t) = next_training.filter(|t| event.ts_ms >= *t) {
            // Training takes seconds: off the async workers' hands.
            let file = tokio::task::block_in_place(|| {
                models.file(stream, t, (spec.objective, spec.history), settings)
            })?;
            // The version only: the pipeline loads (and checks) the model itself.
            let version = crate::ncf::serve::read_card(&file)?.model_version;
            write_experiment(&file.display().to_string())?;
            await_model(&job, &user, &version).await?;
            trainings += 1;
            next_training = spec.model.next_training(t, event.ts_ms);
        }
        let before = job.query(&user, 0).await.map_err(|e| failed("query", e))?;
        scoring.score(event, &before.outputs, None);
        let version = before.outputs.recommendations.version;
        let payload = serde_json::to_vec(&Interaction {
            event_id: format!("{}-{}-{}", event.user_id, event.movie_id, event.ts_ms),
            user_id: user.clone(),
            movie_id: event.movie_id,
            kind: EventType::Rate,
            value: Some(event.rating),
            ts: event.ts_ms,
            context: None,
        })
        .map_err(|e| failed("encoding", e))?;
        let record = FutureRecord::to(&config.topics.interactions)
            .key(&user)
            .payload(&payload);
        let delivery = pipeline::enqueue(&producer, record)
            .await
            .map_err(|e| failed("produce", e))?;
        pipeline::await_deliveries(vec![delivery])
            .await
            .map_err(|e| failed("produce", e))?;
        // Wait until the engine applied it: the user's version moves on.
        let deadline = Instant::now() + APPLY_TIMEOUT;
        loop {
            let now = job.query(&user, 0).await.map_err(|e| failed("query", e))?;
            if now.outputs.recommendations.version > version {
                break;
            }
            if Instant::now() > deadline {
                return Err(failed(
                    "waiting for the engine",
                    "the event was not applied",
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let _ = stop_tx.send(true);
    pipeline_task
        .await
        .map_err(|e| failed("the pipeline task", e))?
        .map_err(|e| failed("the pipeline", e))?;
    Ok(scoring.finish(&spec.name, started.elapsed().as_secs_f64(), trainings))
}

/// Waits until the pipeline's outputs (a query for `user`) carry `version`.
async fn await_model(job: &JobHandle, user: &str, version: &str) -> Result<(), ReplayError> {
    let deadline = Instant::now() + APPLY_TIMEOUT;
    loop {
        let view = job.query(user, 0).await.map_err(|e| failed("query", e))?;
        let live = view.outputs.recommendations.model.as_ref();
        if live.is_some_and(|m| m.version == version) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(failed(
                "installing the model",
                format!("the pipeline never served model {version}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
