//! The streaming job, top to bottom:
//!
//! ```text
//!  interactions + refresh ──► consume & decode ──► micro-batch ──► engine thread ──► publish ──► store offsets
//!   (Kafka, group member)      (bad input becomes     (size/time)    (RocksDB batch,    (outputs and     (after the broker
//!                               a dead letter)                        candidates,        dead letters,    acknowledged every
//!  catalog ──► catalog follower ──────────────────────────────────►   blend, rank)       keyed by user)   record of the batch)
//! ```
//!
//! Stages are connected by bounded channels, so a slow broker or a slow engine
//! slows consumption instead of growing memory. The engine runs on its own OS
//! thread (RocksDB and scoring block); the async runtime only moves records.
//! Offsets are stored for Kafka only after the batch's outputs were acknowledged
//! (at-least-once); redelivered events are recognised by their `event_id` and
//! applied once, and their users' outputs are republished with a new version.

use crate::experiment::{self, ExperimentError, ExperimentSource, ModelCache, Variants};
use std::collections::BTreeSet;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use rdkafka::bindings::rd_kafka_resp_err_t as RDKafkaRespErr;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::ToBytes;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::catalog::{Catalog, CatalogRecord};
use crate::changelog;
use crate::config::{Config, Guarantee, TopicNames};
use crate::engine::{
    Body, DeadLetter, Engine, EngineError, Record, Rejection, SourcePos, UserOutputList,
};
use crate::event::{decode_interaction, parse_refresh, Interaction};
use crate::global;
use crate::handover::Handover;
use crate::metrics;
use crate::output::{BatchEncoder, OutputKind};
use crate::routing::Assignment;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("opening state: {0}")]
    Store(#[from] StoreError),
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    #[error("loading the experiment or its models: {0}")]
    Experiment(#[from] ExperimentError),
    #[error(
        "publishing outputs failed; offsets were not stored, the batch will be redelivered: {0}"
    )]
    Publish(KafkaError),
    #[error("the engine thread stopped unexpectedly")]
    EngineGone,
    #[error("reading topic metadata: {0}")]
    Topics(String),
    #[error("shutdown did not finish within {0:?}")]
    ShutdownTimeout(Duration),
    #[error("taking over assigned partitions failed; the job restarts (another instance may take them meanwhile): {0}")]
    Handover(String),
    #[error("the pipeline needs tokio's multi-thread runtime: rebalances block while state is handed over")]
    NeedsMultiThreadRuntime,
    /// exactly_once: a transaction failed and was aborted (broker outage past
    /// the transaction timeout, a lost group generation). The local state is
    /// ahead of what Kafka committed: the job restarts from the committed state.
    #[error("transaction aborted; the job restarts from the committed state: {0}")]
    TransactionAborted(KafkaError),
    /// exactly_once: another producer with this instance's transactional id
    /// (a newer copy of this instance) took over; this one must stop writing.
    /// Or a newer group member with this `kafka.instance_id` joined.
    #[error("fenced: a newer instance took over ({0}); this instance stops writing")]
    Fenced(String),
}

impl PipelineError {
    /// Whether running the job again (re-joining the group, restoring what
    /// Kafka committed) may recover from this error: an aborted transaction,
    /// a handover that failed or metadata that could not be read (e.g. the
    /// broker went away meanwhile).
    pub fn restartable(&self) -> bool {
        matches!(
            self,
            PipelineError::TransactionAborted(_)
                | PipelineError::Handover(_)
                // Metadata or watermarks unavailable at start (a broker outage).
                | PipelineError::Kafka(KafkaError::MetadataFetch(_))
        )
    }
}

/// The running job as the HTTP server sees it: readiness, the input
/// partitions this instance owns, and interactive queries of its local state.
#[derive(Debug)]
pub struct JobHandle {
    catalog_loaded: AtomicBool,
    assignment: watch::Sender<Assignment>,
    /// The engine thread's queue while the job runs; queries wait their turn
    /// between batches, so they see every event applied before them.
    engine: Mutex<Option<mpsc::WeakSender<Work>>>,
    pending_queries: tokio::sync::Semaphore,
}

/// Interactive queries waiting for the engine thread at once; more get 503.
const MAX_PENDING_QUERIES: usize = 32;
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

impl Default for JobHandle {
    fn default() -> Self {
        JobHandle {
            catalog_loaded: AtomicBool::new(false),
            assignment: watch::channel(Assignment::default()).0,
            engine: Mutex::new(None),
            pending_queries: tokio::sync::Semaphore::new(MAX_PENDING_QUERIES),
        }
    }
}

/// Why a query could not be answered here.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("the engine is not running")]
    NotRunning,
    #[error("input partition {partition} is not owned by this instance")]
    NotOwned { partition: u32 },
    #[error("the input topic's partition count is not known yet")]
    NoPartitions,
    #[error("too many queries are waiting for the engine")]
    Busy,
    #[error("the engine did not answer within {0:?} (a partition restore may be running)")]
    Timeout(Duration),
    #[error("engine: {0}")]
    Engine(String),
}

/// A user's outputs computed from this instance's state.
#[derive(Debug)]
pub struct UserView {
    pub partition: u32,
    /// False for a user without any state: the outputs are cold-start rows.
    pub known: bool,
    pub outputs: crate::output::UserOutputs,
}

impl JobHandle {
    pub fn ready(&self) -> bool {
        self.catalog_loaded.load(Ordering::Relaxed)
            && !self.assignment.borrow().partitions.is_empty()
    }

    /// Follows the owned input partitions (for the instance announcements).
    pub fn assignment(&self) -> watch::Receiver<Assignment> {
        self.assignment.subscribe()
    }

    /// The user's outputs from this instance's state, as they would be
    /// published now. `home` is the partition the user's key maps to; a user
    /// found in another owned partition is answered from there.
    pub async fn query(&self, user_id: &str, home: u32) -> Result<UserView, QueryError> {
        let user_id = user_id.to_string();
        self.ask(|reply| Work::Query {
            user_id,
            home,
            reply,
        })
        .await
    }

    /// Up to `limit` users with state on this instance (for the live page's picker).
    pub async fn known_users(&self, limit: usize) -> Result<Vec<String>, QueryError> {
        self.ask(|reply| Work::KnownUsers { limit, reply }).await
    }

    /// Queues a query between the engine's batches and waits for the answer.
    /// Bounded in number and time: reads must not stall intake, and a reader
    /// gets a 503 rather than waiting on a long partition restore.
    async fn ask<T>(
        &self,
        work: impl FnOnce(tokio::sync::oneshot::Sender<Result<T, QueryError>>) -> Work,
    ) -> Result<T, QueryError> {
        let _permit = self
            .pending_queries
            .try_acquire()
            .map_err(|_| QueryError::Busy)?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let asked = async {
            let engine = self.engine_queue()?;
            engine
                .send(work(reply))
                .await
                .map_err(|_| QueryError::NotRunning)?;
            // Not held while waiting: the engine thread stops when the
            // consume loop drops the last sender.
            drop(engine);
            answer.await.map_err(|_| QueryError::NotRunning)?
        };
        tokio::time::timeout(QUERY_TIMEOUT, asked)
            .await
            .map_err(|_| QueryError::Timeout(QUERY_TIMEOUT))?
    }

    fn engine_queue(&self) -> Result<mpsc::Sender<Work>, QueryError> {
        self.engine
            .lock()
            .expect("not poisoned")
            .as_ref()
            .and_then(|w| w.upgrade())
            .ok_or(QueryError::NotRunning)
    }

    /// The input topic's partition count, once the job knows it.
    pub fn partition_count(&self) -> Result<u32, QueryError> {
        match self.assignment.borrow().partition_count {
            0 => Err(QueryError::NoPartitions),
            n => Ok(n),
        }
    }
}

/// Base librdkafka settings: brokers plus the user's passthrough (security etc.).
pub fn client_config(config: &Config) -> ClientConfig {
    base_config(config, &[])
}

/// Consumer settings on top of [`client_config`]; `kafka.client` still wins.
pub fn consumer_config(config: &Config) -> ClientConfig {
    // Memory: librdkafka pre-fetches up to `queued.max.messages.kbytes` per
    // assigned partition (64 MiB by default); 8 MiB keeps a flood's backlog
    // at the broker, where it belongs, and still saturates the engine.
    // The input consumer adds a fetch cadence (`input_consumer_config`).
    base_config(config, CONSUMER_DEFAULTS)
}

const CONSUMER_DEFAULTS: &[(&str, &str)] = &[("queued.max.messages.kbytes", "8192")];

/// The input consumer's settings: [`consumer_config`] plus a fetch cadence.
/// A fetch that the broker answers on the first byte (`fetch.min.bytes` = 1)
/// hands the engine the one or two events of each produce request; a fetch
/// that waits up to 5 ms for a megabyte takes what 5 ms brought. Measured on
/// Apache Kafka at 1,000 events/s (2 cores shared with the broker and the
/// load generator): event → published list p50 119 ms → 29–42 ms, p99 190 →
/// 55–147 ms; waits of 2 and 10 ms measured the same. An idle consumer then
/// fetches 200 times a second. `kafka.client` still wins.
fn input_consumer_config(config: &Config) -> ClientConfig {
    let cadence = [("fetch.wait.max.ms", "5"), ("fetch.min.bytes", "1048576")];
    base_config(config, &[CONSUMER_DEFAULTS, &cadence].concat())
}

fn base_config(config: &Config, defaults: &[(&str, &str)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.kafka.brokers);
    for (k, v) in defaults {
        c.set(*k, *v);
    }
    c.set_log_level(RDKafkaLogLevel::Warning);
    for (k, v) in &config.kafka.client {
        c.set(k, v);
    }
    c
}

/// Producer settings: these defaults, then `kafka.client` (an operator may
/// trade CPU for bytes with `compression.type`, or latency for batching with
/// `linger.ms`); each producer then sets what its guarantees rest on.
fn producer_config(config: &Config, linger_ms: &str) -> ClientConfig {
    base_config(
        config,
        &[
            ("linger.ms", linger_ms),
            ("compression.type", "lz4"),
            ("queue.buffering.max.messages", "200000"),
        ],
    )
}

/// The changelog's producer: one request in flight per connection, so a
/// retried request can never land after a later one (a partition's batches
/// must stay in order; the broker need not support idempotence). A batch's
/// records are enqueued within well under a millisecond; the 1 ms linger
/// lets each partition's records leave together (librdkafka sends one
/// request per partition), where with none the first record left alone and
/// the rest waited for its round trip.
fn changelog_producer(config: &Config) -> Result<FutureProducer, KafkaError> {
    changelog_settings(config).create()
}

fn changelog_settings(config: &Config) -> ClientConfig {
    let mut settings = acknowledged_settings(config, "1");
    settings.set("max.in.flight.requests.per.connection", "1");
    settings
}

pub fn producer(config: &Config) -> Result<FutureProducer, KafkaError> {
    output_settings(config).create()
}

fn output_settings(config: &Config) -> ClientConfig {
    acknowledged_settings(config, "2")
}

/// A non-transactional producer whose every record must reach all in-sync
/// replicas, or fail within a minute.
fn acknowledged_settings(config: &Config, linger_ms: &str) -> ClientConfig {
    let mut settings = producer_config(config, linger_ms);
    settings
        .set("acks", "all")
        .set("message.timeout.ms", "60000");
    settings
}

/// exactly_once: the producer of every batch's transaction. Its
/// transactional id is stable per state directory (group id and the store's
/// writer id), so a restarted instance fences its own previous incarnation and
/// aborts whatever transaction it left open, before any state is read.
async fn transactional_producer(
    config: &Config,
    writer_id: u64,
) -> Result<(FutureProducer, String), PipelineError> {
    let id = format!("{}-{writer_id:016x}", config.kafka.group_id);
    let producer: FutureProducer = producer_config(config, "2")
        .set("transactional.id", &id)
        // librdkafka bounds message.timeout.ms by this (and defaults it to it).
        .set(
            "transaction.timeout.ms",
            config.processing.transaction_timeout_ms.to_string(),
        )
        .create()?;
    let init = producer.clone();
    tokio::task::spawn_blocking(move || init.init_transactions(TRANSACTION_CALL_TIMEOUT))
        .await
        .map_err(|_| PipelineError::EngineGone)?
        .map_err(|e| transaction_error(e, &producer, &id, None))?;
    info!(transactional_id = %id, "exactly_once: transactions initialised (any transaction this instance left open is aborted)");
    Ok((producer, id))
}

/// How long one transactional call (init, offsets, commit, abort) may block.
/// A broker outage shorter than this is ridden out; a longer one aborts.
const TRANSACTION_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Broker outages seen so far ("all brokers are down"), for telling a
/// transaction the coordinator timed out during an outage from a fenced one.
static BROKER_OUTAGES: AtomicU64 = AtomicU64::new(0);

/// Classifies a failed transactional call: fenced (stop), or aborted (restart).
/// librdkafka reports both a newer producer with this transactional id and
/// the coordinator aborting a transaction that outlived its timeout as a
/// producer fence. Only the latter can follow a broker outage during the
/// transaction (`outages_at_begin`): then restart; otherwise stop. Losing
/// the static membership (FENCED_INSTANCE_ID) always stops.
fn transaction_error(
    e: KafkaError,
    producer: &FutureProducer,
    transactional_id: &str,
    outages_at_begin: Option<u64>,
) -> PipelineError {
    // After a fatal error every call fails with `Fatal`; the cause is kept.
    let code = producer
        .client()
        .fatal_error()
        .map(|(code, _)| code)
        .or(e.rdkafka_error_code());
    let epoch_fenced = matches!(
        code,
        Some(
            RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
        )
    );
    let outage = outages_at_begin.is_some_and(|n| BROKER_OUTAGES.load(Ordering::SeqCst) != n);
    let fenced = (epoch_fenced && !outage) || code == Some(RDKafkaErrorCode::FencedInstanceId);
    if fenced {
        metrics::transaction("fenced");
        tracing::error!(error = %e, transactional_id, "fenced by a newer instance with the same transactional id; this instance stops writing");
        PipelineError::Fenced(transactional_id.to_string())
    } else {
        metrics::transaction("aborted");
        PipelineError::TransactionAborted(e)
    }
}

/// Consumer context: hands partitions over on every rebalance (through the
/// engine thread, see [`crate::handover`]), resumes assigned partitions where
/// the local state says, reports lag and broker outages, tracks the assignment.
struct EngineContext {
    job: Arc<JobHandle>,
    store: Arc<Store>,
    guarantee: Guarantee,
    input_topic: String,
    /// Weak: the engine thread stops when the consume loop drops its sender.
    work_tx: mpsc::WeakSender<Work>,
    /// Set when a handover failed; the consume loop then stops the job.
    failure: Arc<Mutex<Option<String>>>,
    failed: Arc<tokio::sync::Notify>,
    /// Bumped on every assignment: records the consume loop buffered before
    /// it belong to an older assignment and are re-read from the resume offsets.
    assignments: Arc<std::sync::atomic::AtomicU64>,
}

impl EngineContext {
    /// Asks the engine thread to do `work` and waits for its answer. Rebalance
    /// callbacks run inside `recv()`; nothing else may happen on the consumer
    /// until the handover is complete, so blocking here is the point.
    fn ask_engine(
        &self,
        work: impl FnOnce(std::sync::mpsc::Sender<Result<(), String>>) -> Work,
    ) -> Result<(), String> {
        let Some(tx) = self.work_tx.upgrade() else {
            return Ok(()); // shutting down
        };
        let (reply_tx, reply_rx) = std::sync::mpsc::channel();
        let wait = move || {
            tx.blocking_send(work(reply_tx))
                .map_err(|_| "the engine thread stopped".to_string())?;
            reply_rx
                .recv()
                .unwrap_or_else(|_| Err("the engine thread stopped".to_string()))
        };
        match tokio::runtime::Handle::try_current() {
            Ok(_) => tokio::task::block_in_place(wait),
            Err(_) => wait(),
        }
    }

    fn fail(&self, reason: String) {
        tracing::error!(%reason, "partition handover failed");
        *self.failure.lock().expect("not poisoned") = Some(reason);
        self.failed.notify_one();
    }
}

impl EngineContext {
    /// Points each assigned partition at its resume offset from RocksDB; the
    /// group's committed offsets serve lag monitoring only. exactly_once
    /// resumes at the applied offsets: after the handover the local state is
    /// what Kafka committed, outputs included, so nothing needs republishing.
    fn resume(&self, tpl: &mut TopicPartitionList) {
        let parts: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        for (topic, partition) in parts {
            let resume = match self.guarantee {
                Guarantee::AtLeastOnce => self.store.resume_offset(&topic, partition),
                Guarantee::ExactlyOnce => self.store.offset(&topic, partition),
            };
            match resume {
                Ok(Some(offset)) => {
                    debug!(%topic, partition, offset, "resuming from local state");
                    if let Err(e) =
                        tpl.set_partition_offset(&topic, partition, Offset::Offset(offset))
                    {
                        warn!(%e, %topic, partition, "cannot set resume offset");
                    }
                }
                // Never processed here or restored: from the start of the log;
                // the group's committed offsets serve lag monitoring only.
                Ok(None) => {
                    if let Err(e) = tpl.set_partition_offset(&topic, partition, Offset::Beginning) {
                        warn!(%e, %topic, partition, "cannot set resume offset");
                    }
                }
                Err(e) => {
                    warn!(%e, %topic, partition, "cannot read resume offset; using the group's")
                }
            }
        }
    }
}

impl ClientContext for EngineContext {
    fn stats(&self, stats: Statistics) {
        // Up while any broker connection is, even with nothing to consume.
        let up = stats.brokers.values().any(|b| b.state == "UP");
        metrics::broker_up(up);
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 && p.consumer_lag >= 0 {
                    metrics::consumer_lag(topic, *partition, p.consumer_lag);
                }
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        metrics::kafka_error("client");
        report_client_error(&error, reason);
    }
}

/// A client error, whether librdkafka hands it to the context or, for the
/// consumer, to `recv()`: an outage is reported as such.
fn report_client_error(error: &KafkaError, reason: &str) {
    if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
        BROKER_OUTAGES.fetch_add(1, Ordering::SeqCst);
        metrics::broker_up(false);
        warn!(%error, reason, "all brokers are down; retrying until they are back");
    } else {
        warn!(%error, reason, "kafka client error");
    }
}

impl ConsumerContext for EngineContext {
    // The eager protocol (librdkafka's default): assign everything given, with
    // resume offsets, or drop the whole assignment on revoke.
    fn rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let outcome = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                // Input and refresh topics are co-partitioned: a partition
                // number is the unit of state.
                let partitions: BTreeSet<u32> = tpl
                    .elements()
                    .iter()
                    .map(|e| e.partition().max(0) as u32)
                    .collect();
                info!(?partitions, "partitions assigned; handing state over");
                match self.ask_engine(|reply| Work::Assign { partitions, reply }) {
                    Ok(()) => {
                        self.resume(tpl);
                        self.assignments.fetch_add(1, Ordering::SeqCst);
                        consumer.assign(tpl)
                    }
                    Err(reason) => {
                        self.fail(reason);
                        consumer.unassign()
                    }
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                info!(
                    partitions = tpl.count(),
                    "partitions revoked; finishing their in-flight batches"
                );
                // Everything consumed so far is applied, published and in the
                // changelog before the next owner restores it.
                if let Err(reason) = self.ask_engine(|reply| Work::Revoke { reply }) {
                    warn!(%reason, "revoke without a flush");
                }
                consumer.unassign()
            }
            other => {
                warn!(error = ?other, "rebalance error; dropping the assignment");
                consumer.unassign()
            }
        };
        if let Err(e) = outcome {
            metrics::kafka_error("rebalance");
            warn!(%e, "applying the rebalance failed");
        }
        let assigned = consumer.assignment().unwrap_or_default();
        let owned: BTreeSet<u32> = assigned
            .elements()
            .iter()
            .filter(|e| e.topic() == self.input_topic)
            .map(|e| e.partition().max(0) as u32)
            .collect();
        self.job.assignment.send_modify(|a| a.partitions = owned);
        metrics::assigned_partitions(assigned.count());
    }
}

type Reply = std::sync::mpsc::Sender<Result<(), String>>;

/// What the engine thread is asked to do.
enum Work {
    Batch(Vec<Record>, InFlight),
    /// Serve these A/B variants from the next batch on.
    Variants(Arc<Variants>),
    Catalog(Vec<(u32, Option<CatalogRecord>)>),
    /// Item-side changes of other instances' partitions (global item tables).
    Followed(global::Followed),
    /// Take these partitions over (keep, restore or drop state), then answer.
    Assign {
        partitions: BTreeSet<u32>,
        reply: Reply,
    },
    /// Finish and publish everything queued, stop processing, then answer.
    Revoke {
        reply: Reply,
    },
    /// An interactive query: the user's outputs from local state.
    Query {
        user_id: String,
        home: u32,
        reply: tokio::sync::oneshot::Sender<Result<UserView, QueryError>>,
    },
    KnownUsers {
        limit: usize,
        reply: tokio::sync::oneshot::Sender<Result<Vec<String>, QueryError>>,
    },
}

/// What the publisher is handed.
enum Publish {
    /// Outputs of the batch being processed, handed over before it ends so
    /// that a big batch's rendered outputs are not all held at once; the
    /// batch's own [`Publish::Batch`] follows with the rest and its offsets.
    Chunk(UserOutputList),
    /// Outputs that carry no offsets (pages of a refresh of everyone).
    Outputs {
        outputs: UserOutputList,
        changelog: Vec<changelog::Batch>,
    },
    Batch {
        outputs: UserOutputList,
        dead_letters: Vec<DeadLetter>,
        changelog: Vec<changelog::Batch>,
        offsets: Vec<(Arc<str>, i32, i64)>,
        received: Vec<Instant>,
        event_times: Vec<i64>,
        in_flight: InFlight,
    },
    /// Answered once everything before it is acknowledged.
    Barrier(std::sync::mpsc::Sender<()>),
}

/// Batches handed to the engine thread and not yet acknowledged by the broker
/// (at_least_once) or committed (exactly_once): the consume loop hands a
/// record over at once while fewer than [`MAX_BATCHES_IN_FLIGHT`] are, and
/// otherwise gathers records into a bigger batch.
#[derive(Debug, Default)]
pub(crate) struct BatchesInFlight {
    count: AtomicUsize,
    /// Woken when the count falls, so a gathered batch goes as soon as there
    /// is room rather than at the next record or the batch timer.
    room: tokio::sync::Notify,
}

/// Two keep the engine busy while the previous batch's changelog round trips
/// (at_least_once) or transaction (exactly_once, ≈ 100 ms) run. Handing over every
/// record the moment the engine thread is idle was measured worse at 1,000/s
/// (p99 31–34 ms against 22–26, 18 % more engine and broker CPU): each batch
/// costs an item-index rebuild, a RocksDB commit and its changelog requests,
/// and on a 2-core host shared with the broker that CPU is latency.
const MAX_BATCHES_IN_FLIGHT: usize = 2;

impl BatchesInFlight {
    fn has_room(&self) -> bool {
        self.count.load(Ordering::SeqCst) < MAX_BATCHES_IN_FLIGHT
    }
}

/// Counts a batch in [`BatchesInFlight`] from its hand-off to the engine
/// until the broker acknowledged everything it wrote. Dropped on every path,
/// so it never leaks.
pub(crate) struct InFlight(Arc<BatchesInFlight>);

impl InFlight {
    fn new(batches: &Arc<BatchesInFlight>) -> InFlight {
        batches.count.fetch_add(1, Ordering::SeqCst);
        InFlight(batches.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::SeqCst);
        self.0.room.notify_one();
    }
}

/// Bounded hand-off between stages: at most this many batches wait at each.
const STAGE_QUEUE: usize = 2;
/// A batch that recomputes more users than this hands their outputs to the
/// publisher in chunks of this many (≈ 8 MB rendered on the synthetic load),
/// so a big batch holds at most a few chunks in memory: with the whole
/// batch's outputs held until its end, a 20,000-record batch doubled the
/// engine's peak RSS (benches/README.md, "A coalescing window").
const OUTPUT_CHUNK_USERS: usize = 1000;
const REFRESH_PAGE: usize = 500;

/// Runs the job until `shutdown` resolves, then drains in-flight work, stores
/// offsets, flushes RocksDB and returns.
pub async fn run(
    config: Config,
    catalog: Catalog,
    job: Arc<JobHandle>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), PipelineError> {
    if tokio::runtime::Handle::current().runtime_flavor()
        != tokio::runtime::RuntimeFlavor::MultiThread
    {
        return Err(PipelineError::NeedsMultiThreadRuntime);
    }
    // Opening RocksDB and loading the item counters is disk work: off the runtime.
    let (dir, cache_mb, engine_config) = (
        config.state.dir.clone(),
        config.state.block_cache_mb,
        config.engine.clone(),
    );
    let experiment = ExperimentSource {
        file: config.experiment.file.clone(),
        blend: config.engine.blend.clone(),
        default_model: config.model.path.clone(),
        default_ranker: config.model.ranker.clone(),
        fold_in: config.model.fold_in,
    };
    let source = experiment.clone();
    let guarantee = config.processing.guarantee;
    let (mut engine, models, variants) = tokio::task::spawn_blocking(
        move || -> Result<(Engine, ModelCache, Arc<Variants>), PipelineError> {
            let mut store = Store::open(&dir, cache_mb)?;
            store.enable_changelog();
            let mut engine = Engine::new(engine_config, store, catalog)?;
            // Nothing is processed before the group assigns partitions.
            engine.set_owned(Some(BTreeSet::new()));
            engine.set_republish_unchanged(guarantee == Guarantee::AtLeastOnce);
            let mut models = ModelCache::default();
            let variants = Arc::new(load_variants(&source, &mut models)?);
            engine.set_variants(variants.clone());
            Ok((engine, models, variants))
        },
    )
    .await
    .map_err(|_| PipelineError::EngineGone)??;
    let store = engine.store_handle();
    let producer = producer(&config)?;
    // Before the group assigns anything: the handover must not read the
    // changelog while a transaction of this instance's previous run is open.
    let transactions = match guarantee {
        Guarantee::ExactlyOnce => Some(transactional_producer(&config, store.writer_id()).await?),
        Guarantee::AtLeastOnce => None,
    };
    info!(guarantee = guarantee.as_str(), "processing guarantee");

    // Catalog first: events on movies not yet in the catalog would be dead-lettered.
    let (catalog_updates, caught_up, catalog_follower) =
        follow_catalog(&config, producer.clone()).await?;
    for e in engine.update_catalog(caught_up) {
        warn!(error = %e, "catalog record rejected");
    }
    job.catalog_loaded.store(true, Ordering::Relaxed);
    info!(movies = engine.catalog().len(), "catalog loaded");

    let partition_count = input_partition_count(&config).await?;
    job.assignment
        .send_modify(|a| a.partition_count = partition_count);
    // The partitions this store held at its last stop are followed from
    // after its own last batch: the follower skips its own writes, and is
    // told which partitions it holds once the group has assigned them.
    let mut positions = store.follow_positions()?;
    for (p, meta) in store.partitions()? {
        let at = positions.entry(p).or_insert(0);
        *at = (*at).max(meta.changelog_next);
    }

    let (work_tx, work_rx) = mpsc::channel::<Work>(STAGE_QUEUE);
    *job.engine.lock().expect("not poisoned") = Some(work_tx.downgrade());
    let (publish_tx, publish_rx) = mpsc::channel::<Publish>(STAGE_QUEUE);
    let failure = Arc::new(Mutex::new(None));
    let failed = Arc::new(tokio::sync::Notify::new());
    let assignments = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut consumer_settings = input_consumer_config(&config);
    if let Some(id) = &config.kafka.instance_id {
        consumer_settings.set("group.instance.id", id);
    }
    let consumer: Arc<StreamConsumer<EngineContext>> = Arc::new(
        consumer_settings
            .set("group.id", &config.kafka.group_id)
            // at_least_once: the group's offsets (stored once published) serve
            // lag monitoring only; exactly_once commits them in each transaction.
            .set(
                "enable.auto.commit",
                (guarantee == Guarantee::AtLeastOnce).to_string(),
            )
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest")
            .set("statistics.interval.ms", "5000")
            .set("enable.partition.eof", "false")
            .create_with_context(EngineContext {
                job: job.clone(),
                store: store.clone(),
                guarantee,
                input_topic: config.topics.interactions.clone(),
                work_tx: work_tx.downgrade(),
                failure: failure.clone(),
                failed: failed.clone(),
                assignments: assignments.clone(),
            })?,
    );
    consumer.subscribe(&[&config.topics.interactions, &config.topics.refresh])?;
    if config.kafka.instance_id.is_none() {
        info!("kafka.instance_id not set: after a crash, partitions return only when the old membership expires");
    }

    let changelog_producer = changelog_producer(&config)?;
    // exactly_once: a crashed owner's open transaction holds a read_committed
    // restore back until the broker aborts it.
    let no_progress = Duration::from_secs(60)
        + match guarantee {
            Guarantee::ExactlyOnce => {
                Duration::from_millis(config.processing.transaction_timeout_ms)
            }
            Guarantee::AtLeastOnce => Duration::ZERO,
        };
    let (follower_tx, follower_rx) = match config.global_items.enabled {
        true => {
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        }
        false => (None, None),
    };
    let handover = Handover {
        no_progress,
        reader_config: consumer_config(&config),
        producer: changelog_producer.clone(),
        changelog_topic: config.topics.changelog.clone(),
        input_topics: vec![
            config.topics.interactions.clone(),
            config.topics.refresh.clone(),
        ],
        guarantee,
        follower: follower_tx,
    };
    let item_follower = match follower_rx {
        Some(control) => Some(tokio::spawn(follow_items(
            follower_settings(&config),
            config.topics.changelog.clone(),
            partition_count,
            positions,
            Duration::from_millis(config.global_items.flush_interval_ms),
            control,
            work_tx.clone(),
        ))),
        None => None,
    };
    let batches_in_flight = Arc::new(BatchesInFlight::default());
    let engine_thread = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || engine_loop(engine, handover, work_rx, publish_tx))
        .expect("spawn engine thread");
    let publishing: std::pin::Pin<Box<dyn Future<Output = Result<(), PipelineError>> + Send>> =
        match &transactions {
            None => Box::pin(publish_loop(
                Producers {
                    outputs: producer.clone(),
                    changelog: changelog_producer.clone(),
                },
                consumer.clone(),
                store,
                config.topics.clone(),
                publish_rx,
            )),
            Some((transactional, id)) => Box::pin(transaction_loop(
                Transactions {
                    producer: transactional.clone(),
                    id: id.clone(),
                },
                consumer.clone(),
                store,
                config.topics.clone(),
                publish_rx,
            )),
        };
    // The consume loop stops when the publisher fails, even with no input.
    let publisher_failed = Arc::new(tokio::sync::Notify::new());
    let signal = publisher_failed.clone();
    let publisher = tokio::spawn(async move {
        let published = publishing.await;
        if published.is_err() {
            signal.notify_one();
        }
        published
    });
    let catalog_task = tokio::spawn(forward_catalog(catalog_updates, work_tx.clone()));
    let experiment_task = tokio::spawn(watch_experiment(
        experiment,
        models,
        variants,
        Duration::from_millis(config.experiment.reload_interval_ms),
        work_tx.clone(),
    ));

    let failure_signal = async {
        tokio::select! {
            _ = failed.notified() => StageFailure::Handover(
                failure.lock().expect("not poisoned").clone().unwrap_or_default(),
            ),
            _ = publisher_failed.notified() => StageFailure::Publisher,
        }
    };
    let consumed = consume_loop(
        &config,
        &consumer,
        &assignments,
        &batches_in_flight,
        work_tx,
        shutdown,
        failure_signal,
    )
    .await;
    catalog_task.abort();
    experiment_task.abort();
    if let Some(follower) = item_follower {
        follower.abort();
        let _ = follower.await;
    }
    if let Some(follower) = catalog_follower {
        follower.abort();
        let _ = follower.await;
    }

    // Drain: the engine finishes queued batches, the publisher publishes them.
    let deadline = Duration::from_millis(config.processing.shutdown_timeout_ms);
    let drained = tokio::time::timeout(deadline, async {
        let published = publisher.await.unwrap_or(Err(PipelineError::EngineGone));
        let engine = tokio::task::spawn_blocking(move || engine_thread.join())
            .await
            .ok()
            .and_then(|r| r.ok());
        (published, engine)
    })
    .await;
    let (published, engine_result) =
        drained.map_err(|_| PipelineError::ShutdownTimeout(deadline))?;
    // A fenced instance stops, whichever stage saw it first; otherwise the
    // publisher's error: the consume loop then only saw the engine go.
    match (published, consumed) {
        (Err(e @ PipelineError::Fenced(_)), _) | (_, Err(e @ PipelineError::Fenced(_))) => {
            return Err(e)
        }
        (Err(e), _) | (Ok(()), Err(e)) => return Err(e),
        (Ok(()), Ok(())) => {}
    }
    match engine_result {
        Some(Ok(engine)) => tokio::task::spawn_blocking(move || engine.store().flush())
            .await
            .map_err(|_| PipelineError::EngineGone)??,
        Some(Err(e)) => return Err(e.into()),
        None => return Err(PipelineError::EngineGone),
    }
    // The final commit, the producer flush and closing the consumer (leaving the
    // group) all block on the network: do them off the runtime, and give up on
    // a broker that does not answer (librdkafka's close waits for it without
    // end). Every batch handed to the engine is applied and published by now
    // (records read but not handed over are read again by the next run): what
    // is left only tells the group this member leaves.
    let closing = tokio::task::spawn_blocking(move || {
        // exactly_once committed every batch's offsets in its transaction.
        let committed = match guarantee {
            Guarantee::AtLeastOnce => consumer.commit_consumer_state(CommitMode::Sync),
            Guarantee::ExactlyOnce => Ok(()),
        };
        if let Err(e) = committed {
            // Nothing stored since the last auto-commit is not an error; the
            // group's offsets only serve lag monitoring anyway.
            if e.rdkafka_error_code() != Some(RDKafkaErrorCode::NoOffset) {
                warn!(%e, "final offset commit failed");
            }
        }
        drop(consumer);
        if let Some((transactional, _)) = transactions {
            transactional.flush(Duration::from_secs(5))?;
        }
        changelog_producer.flush(Duration::from_secs(5))?;
        producer.flush(Duration::from_secs(5))
    });
    match tokio::time::timeout(deadline, closing).await {
        Ok(closed) => closed.map_err(|_| PipelineError::EngineGone)??,
        Err(_) => {
            warn!(
                ?deadline,
                "the broker did not answer the final commit and group leave; stopping without them"
            );
            return Ok(());
        }
    }
    info!("pipeline stopped cleanly");
    Ok(())
}

/// How many partitions the interactions topic has: a user's partition (for
/// query routing) follows from it.
async fn input_partition_count(config: &Config) -> Result<u32, PipelineError> {
    let client = client_config(config);
    let topic = config.topics.interactions.clone();
    let counts = tokio::task::spawn_blocking(move || crate::topics::partition_counts(&client))
        .await
        .map_err(|_| PipelineError::EngineGone)?
        .map_err(|e| PipelineError::Topics(e.to_string()))?;
    match counts.get(&topic) {
        Some(&n) => Ok(n as u32),
        None => Err(PipelineError::Topics(format!(
            "the interactions topic {topic} does not exist (see `recstream topics apply`)"
        ))),
    }
}

/// Why another stage stops the consume loop.
enum StageFailure {
    /// A partition handover failed (the reason).
    Handover(String),
    /// The publisher stopped with an error.
    Publisher,
}

/// One `select!` over incoming records, the batch timer and shutdown.
///
/// Micro-batches form only while the pipeline is busy: a record that finds
/// fewer than [`MAX_BATCHES_IN_FLIGHT`] batches unconfirmed is sent at once (no batching delay at
/// light load); otherwise records gather until the next record finds room,
/// the batch is full, or `batch_max_wait_ms` has passed since its first record.
async fn consume_loop(
    config: &Config,
    consumer: &StreamConsumer<EngineContext>,
    assignments: &std::sync::atomic::AtomicU64,
    batches_in_flight: &Arc<BatchesInFlight>,
    work_tx: mpsc::Sender<Work>,
    shutdown: impl Future<Output = ()>,
    stage_failed: impl Future<Output = StageFailure>,
) -> Result<(), PipelineError> {
    tokio::pin!(shutdown);
    tokio::pin!(stage_failed);
    let max_records = config.processing.batch_max_records;
    let max_wait = Duration::from_millis(config.processing.batch_max_wait_ms);
    let mut batch: Vec<Record> = Vec::with_capacity(max_records);
    let mut batch_deadline: Option<tokio::time::Instant> = None;
    let mut batch_assignment = assignments.load(Ordering::SeqCst);
    let topics: HashMap<String, Arc<str>> = [&config.topics.interactions, &config.topics.refresh]
        .into_iter()
        .map(|t| (t.clone(), Arc::from(t.as_str())))
        .collect();
    let guarantee = config.processing.guarantee;
    loop {
        let flush_at = batch_deadline
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        // Whether the gathered batch goes to the engine now.
        let send_now = tokio::select! {
            biased;
            _ = &mut shutdown => {
                info!("shutdown requested; draining");
                break;
            }
            failure = &mut stage_failed => match failure {
                StageFailure::Handover(reason) => {
                    send_batch(&work_tx, &mut batch, batches_in_flight).await?;
                    return Err(PipelineError::Handover(reason));
                }
                // Its error is the one the job reports.
                StageFailure::Publisher => return Err(PipelineError::EngineGone),
            },
            // The gathered batch goes once there is room; under exactly_once the
            // timer alone does not send it while the transactions in flight
            // run (≈ 100 ms each, see `transaction_loop`): it keeps growing instead of queueing
            // behind them as many 10 ms batches, and goes when one commits or
            // when it is full.
            _ = batches_in_flight.room.notified(), if !batch.is_empty() => batches_in_flight.has_room(),
            _ = tokio::time::sleep_until(flush_at), if batch_deadline.is_some() => {
                let hold = guarantee == Guarantee::ExactlyOnce && !batches_in_flight.has_room();
                if hold {
                    batch_deadline = Some(tokio::time::Instant::now() + max_wait);
                }
                !hold
            }
            message = consumer.recv() => {
                let assignment = assignments.load(Ordering::SeqCst);
                if assignment != batch_assignment {
                    // A rebalance ran inside recv(): what was buffered before it
                    // is re-read from the new assignment's resume offsets.
                    for _ in batch.drain(..) {
                        metrics::record_not_owned();
                    }
                    batch_deadline = None;
                    batch_assignment = assignment;
                }
                let message = match message {
                    Ok(m) => {
                        metrics::broker_up(true);
                        m
                    }
                    // A fatal consumer error (e.g. FENCED_INSTANCE_ID: a newer
                    // member with this kafka.instance_id joined) ends this member.
                    Err(e @ KafkaError::MessageConsumptionFatal(_)) => {
                        metrics::kafka_error("consume");
                        tracing::error!(%e, "the consumer was fenced out of the group; this instance stops");
                        return Err(PipelineError::Fenced(format!("consumer: {e}")));
                    }
                    Err(e) => {
                        metrics::kafka_error("consume");
                        report_client_error(&e, "consume");
                        continue;
                    }
                };
                let topic = topics
                    .get(message.topic())
                    .cloned()
                    .unwrap_or_else(|| Arc::from(message.topic()));
                let refresh = *topic == *config.topics.refresh;
                batch.push(decode(
                    SourcePos { topic, partition: message.partition(), offset: message.offset() },
                    message.key(),
                    message.payload().unwrap_or_default(),
                    refresh,
                    config.processing.max_event_bytes,
                ));
                if batch.len() == 1 {
                    batch_deadline = Some(tokio::time::Instant::now() + max_wait);
                }
                batch.len() >= max_records || batches_in_flight.has_room()
            }
        };
        if send_now {
            if assignments.load(Ordering::SeqCst) != batch_assignment {
                // A rebalance ran since these were read (as above).
                for _ in batch.drain(..) {
                    metrics::record_not_owned();
                }
                batch_assignment = assignments.load(Ordering::SeqCst);
            }
            send_batch(&work_tx, &mut batch, batches_in_flight).await?;
            batch_deadline = None;
        }
    }
    // Records gathered but not handed over are left to be read again (their
    // offsets are not stored), as after a rebalance: the drain then waits for
    // the batches in flight only, however big a batch may grow.
    if !batch.is_empty() {
        info!(
            records = batch.len(),
            "records read but not processed are left for the next run"
        );
    }
    Ok(())
}

async fn send_batch(
    work_tx: &mpsc::Sender<Work>,
    batch: &mut Vec<Record>,
    batches_in_flight: &Arc<BatchesInFlight>,
) -> Result<(), PipelineError> {
    if batch.is_empty() {
        return Ok(());
    }
    let records = std::mem::take(batch);
    let in_flight = InFlight::new(batches_in_flight);
    work_tx
        .send(Work::Batch(records, in_flight))
        .await
        .map_err(|_| PipelineError::EngineGone)
}

/// Largest payload copied into a dead letter (default broker limit is 1 MiB).
const MAX_DEAD_LETTER_PAYLOAD: usize = 900 * 1024;

/// How far ahead of this host's clock an event time may be.
const MAX_FUTURE_MS: i64 = 24 * 3_600_000;

/// Wall-clock milliseconds: for input bounds and latency metrics, never for decay.
pub fn wall_clock_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Decodes one input record; anything invalid becomes a rejection, never an error.
/// One event from the far future would move the event-time watermark and
/// decay every counter to nothing; the clock only bounds input.
pub fn check_not_far_future(event: &Interaction, now_ms: i64) -> Result<(), Rejection> {
    if event.ts > now_ms + MAX_FUTURE_MS {
        return Err(Rejection {
            reason: "out_of_range",
            detail: format!(
                "field `ts` out of range: {} is more than 24 h in the future",
                event.ts
            ),
        });
    }
    Ok(())
}

pub fn decode(
    source: SourcePos,
    key: Option<&[u8]>,
    payload: &[u8],
    is_refresh: bool,
    max_bytes: usize,
) -> Record {
    let mut body = if is_refresh {
        match parse_refresh(payload, max_bytes) {
            Ok(cmd) => Body::Refresh(cmd),
            Err(e) => Body::Invalid(Rejection {
                reason: e.reason(),
                detail: e.to_string(),
            }),
        }
    } else {
        match decode_interaction(key, payload, max_bytes) {
            Ok(event) => match check_not_far_future(&event, wall_clock_ms()) {
                Ok(()) => Body::Event(event),
                Err(rejection) => {
                    metrics::event(event.kind.as_str(), "dead_lettered");
                    Body::Invalid(rejection)
                }
            },
            Err(e) => {
                metrics::event("invalid", "dead_lettered");
                Body::Invalid(Rejection {
                    reason: e.reason(),
                    detail: e.to_string(),
                })
            }
        }
    };
    // The dead letter carries the original bytes, up to what fits in one
    // default-sized Kafka record; the detail says when it was cut.
    let kept = payload.len().min(MAX_DEAD_LETTER_PAYLOAD);
    if let Body::Invalid(rejection) = &mut body {
        if kept < payload.len() {
            rejection
                .detail
                .push_str(&format!(" (payload truncated to its first {kept} bytes)"));
        }
    }
    Record {
        source,
        key: key.map(<[u8]>::to_vec),
        payload: payload[..kept].to_vec(),
        received: Instant::now(),
        body,
    }
}

fn engine_loop(
    mut engine: Engine,
    handover: Handover,
    mut work_rx: mpsc::Receiver<Work>,
    publish_tx: mpsc::Sender<Publish>,
) -> Result<Engine, EngineError> {
    let mut stats_reported = Instant::now();
    while let Some(work) = work_rx.blocking_recv() {
        if stats_reported.elapsed() > Duration::from_secs(5) {
            metrics::rocksdb(&engine.store().stats());
            stats_reported = Instant::now();
        }
        match work {
            Work::Catalog(updates) => {
                for e in engine.update_catalog(updates) {
                    warn!(error = %e, "catalog record rejected");
                }
            }
            Work::Variants(variants) => engine.set_variants(variants),
            Work::Followed(followed) => {
                let started = Instant::now();
                engine.apply_followed(&followed.batches)?;
                engine.settle_item_tables();
                metrics::stage("follow", started.elapsed().as_secs_f64());
            }
            Work::Query {
                user_id,
                home,
                reply,
            } => {
                let _ = reply.send(answer_query(&mut engine, &user_id, home));
            }
            Work::KnownUsers { limit, reply } => {
                let users = engine
                    .known_users(limit)
                    .map_err(|e| QueryError::Engine(e.to_string()));
                let _ = reply.send(users);
            }
            Work::Assign { partitions, reply } => {
                let result = handover
                    .assign(&mut engine, &partitions)
                    .map_err(|e| e.to_string());
                let _ = reply.send(result);
            }
            Work::Revoke { reply } => {
                // Batches queued before the revoke are processed by now; wait
                // until their outputs and changelog records are acknowledged.
                let (done_tx, done_rx) = std::sync::mpsc::channel();
                if publish_tx.blocking_send(Publish::Barrier(done_tx)).is_err() {
                    break;
                }
                let _ = done_rx.recv();
                engine.set_owned(Some(BTreeSet::new()));
                let _ = reply.send(Ok(()));
            }
            Work::Batch(records, in_flight) => {
                let received: Vec<Instant> = records.iter().map(|r| r.received).collect();
                let result =
                    engine.process_in_chunks(records, OUTPUT_CHUNK_USERS, &mut |outputs| {
                        metrics::output_chunk();
                        publish_tx.blocking_send(Publish::Chunk(outputs)).is_ok()
                    })?;
                let msg = Publish::Batch {
                    outputs: result.outputs,
                    dead_letters: result.dead_letters,
                    changelog: result.changelog,
                    offsets: result.offsets,
                    received,
                    event_times: result.event_times,
                    in_flight,
                };
                if publish_tx.blocking_send(msg).is_err() {
                    break;
                }
                // After the batch's own outputs, so the refreshed (higher) versions
                // are the last ones on the compacted topics. Best-effort: a crash
                // part-way does not resume it.
                for partition in result.refresh_all {
                    let mut after: Option<String> = None;
                    loop {
                        let page =
                            engine.refresh_page(partition, after.as_deref(), REFRESH_PAGE)?;
                        if page.outputs.is_empty() {
                            break;
                        }
                        after = page.last;
                        let msg = Publish::Outputs {
                            outputs: page.outputs,
                            changelog: page.changelog,
                        };
                        if publish_tx.blocking_send(msg).is_err() {
                            return Ok(engine);
                        }
                    }
                }
            }
        }
    }
    Ok(engine)
}

fn answer_query(engine: &mut Engine, user_id: &str, home: u32) -> Result<UserView, QueryError> {
    let engine_error = |e: EngineError| QueryError::Engine(e.to_string());
    let (partition, known) = match engine.locate_user(user_id).map_err(engine_error)? {
        Some(partition) => (partition, true),
        None if engine.owns(home) => (home, false),
        None => return Err(QueryError::NotOwned { partition: home }),
    };
    let outputs = engine.peek(partition, user_id).map_err(engine_error)?;
    Ok(UserView {
        partition,
        known,
        outputs,
    })
}

struct Producers {
    outputs: FutureProducer,
    changelog: FutureProducer,
}

/// The publish stage, in two steps so that the next batch's outputs do not wait
/// for this batch's changelog round trips: `send` enqueues a batch's outputs
/// as soon as the engine hands it over (consumers see them one broker hop
/// later), `confirm` then writes its changelog, waits for every
/// acknowledgement and only then marks its offsets as processed. Both keep
/// batch order; the queue between them is bounded like every other stage.
async fn publish_loop(
    producers: Producers,
    consumer: Arc<StreamConsumer<EngineContext>>,
    store: Arc<Store>,
    topics: TopicNames,
    mut publish_rx: mpsc::Receiver<Publish>,
) -> Result<(), PipelineError> {
    let (confirm_tx, confirm_rx) = mpsc::channel::<Confirm>(CONFIRM_QUEUE);
    let send = async {
        let mut encoder = BatchEncoder::default();
        while let Some(msg) = publish_rx.recv().await {
            let next = match msg {
                Publish::Barrier(done) => Confirm::Barrier(done),
                // Confirmed before the batch's own offsets (the confirmer keeps order).
                Publish::Chunk(outputs) => Confirm::Sent(SentBatch::without_offsets(
                    send_outputs(&producers.outputs, &topics, &mut encoder, &outputs, &[]).await?,
                    Vec::new(),
                )),
                Publish::Outputs { outputs, changelog } => {
                    Confirm::Sent(SentBatch::without_offsets(
                        send_outputs(&producers.outputs, &topics, &mut encoder, &outputs, &[])
                            .await?,
                        changelog,
                    ))
                }
                Publish::Batch {
                    outputs,
                    dead_letters,
                    changelog,
                    offsets,
                    received,
                    event_times,
                    in_flight,
                } => Confirm::Sent(SentBatch {
                    outputs: send_outputs(
                        &producers.outputs,
                        &topics,
                        &mut encoder,
                        &outputs,
                        &dead_letters,
                    )
                    .await?,
                    changelog,
                    offsets,
                    received,
                    event_times,
                    in_flight: Some(in_flight),
                }),
            };
            if confirm_tx.send(next).await.is_err() {
                break; // the confirmer failed; its error is the one reported
            }
        }
        drop(confirm_tx);
        Ok(())
    };
    let confirm = confirm_loop(&producers, &consumer, &store, &topics, confirm_rx);
    futures::try_join!(send, confirm)?;
    Ok(())
}

/// Bounded queue of batches whose outputs are sent, waiting to be confirmed.
const CONFIRM_QUEUE: usize = 4;

/// What the publisher's confirming step is handed.
enum Confirm {
    Sent(SentBatch),
    /// Answered once everything before it is acknowledged.
    Barrier(std::sync::mpsc::Sender<()>),
}

/// A batch whose outputs are on their way to the broker.
struct SentBatch {
    outputs: SentOutputs,
    changelog: Vec<changelog::Batch>,
    /// Empty for outputs that carry no offsets (pages of a refresh of everyone).
    offsets: Vec<(Arc<str>, i32, i64)>,
    received: Vec<Instant>,
    event_times: Vec<i64>,
    /// Released once the batch is confirmed.
    in_flight: Option<InFlight>,
}

impl SentBatch {
    /// Outputs that store no input offsets: a batch's chunk, a refresh page.
    fn without_offsets(outputs: SentOutputs, changelog: Vec<changelog::Batch>) -> SentBatch {
        SentBatch {
            outputs,
            changelog,
            offsets: Vec::new(),
            received: Vec::new(),
            event_times: Vec::new(),
            in_flight: None,
        }
    }
}

/// Writes each batch's changelog (data, then marker: one batch at a time, so
/// a restore never has more than one unfinished batch to roll back), waits
/// for its outputs, then records its offsets as published.
async fn confirm_loop(
    producers: &Producers,
    consumer: &StreamConsumer<EngineContext>,
    store: &Store,
    topics: &TopicNames,
    mut confirm_rx: mpsc::Receiver<Confirm>,
) -> Result<(), PipelineError> {
    let mut unmarked = UnmarkedPublished::default();
    while let Some(msg) = confirm_rx.recv().await {
        let batch = match msg {
            Confirm::Barrier(done) => {
                // A handover follows: the next owner resumes from these.
                unmarked.flush(&producers.changelog, &topics.changelog, store);
                let _ = done.send(());
                continue;
            }
            Confirm::Sent(batch) => batch,
        };
        let sent =
            publish_changelog(&producers.changelog, &topics.changelog, &batch.changelog).await?;
        let acked = await_changelog(&producers.changelog, &topics.changelog, sent).await?;
        batch.outputs.confirm().await?;
        // A few keys without fsync: microseconds, fine on the runtime.
        let published: Vec<(String, i32, i64)> = batch
            .offsets
            .iter()
            .map(|(t, p, o)| (t.to_string(), *p, *o))
            .collect();
        store.acknowledge(&acked, &published)?;
        unmarked.add(published);
        if unmarked.due() {
            unmarked.flush(&producers.changelog, &topics.changelog, store);
        }
        for (topic, partition, next) in batch.offsets {
            // Fails only for partitions revoked meanwhile; their new owner
            // re-reads them and de-duplicates by event id.
            if let Err(e) = consumer.store_offset(&topic, partition, next - 1) {
                debug!(%e, %topic, partition, "offset not stored");
            }
        }
        // The consumer may now hand the engine more records.
        drop(batch.in_flight);
        observe_published(batch.received, batch.event_times);
    }
    unmarked.flush(&producers.changelog, &topics.changelog, store);
    Ok(())
}

/// The exactly-once publisher's producer and its transactional id (for messages).
struct Transactions {
    producer: FutureProducer,
    id: String,
}

impl Transactions {
    fn begin(&self) -> Result<OpenTransaction, PipelineError> {
        let outages = BROKER_OUTAGES.load(Ordering::SeqCst);
        // Local bookkeeping in librdkafka: no network round trip.
        self.producer
            .begin_transaction()
            .map_err(|e| self.failed(e, outages))?;
        Ok(OpenTransaction {
            outages,
            sent: Vec::new(),
        })
    }

    fn failed(&self, e: KafkaError, outages_at_begin: u64) -> PipelineError {
        transaction_error(e, &self.producer, &self.id, Some(outages_at_begin))
    }

    fn publish_failed(&self, e: PipelineError, outages_at_begin: u64) -> PipelineError {
        match e {
            PipelineError::Publish(k) => self.failed(k, outages_at_begin),
            other => other,
        }
    }
}

/// A transaction begun before its batch ended: a big batch's outputs are
/// sent into it chunk by chunk as they come, never held whole.
struct OpenTransaction {
    /// Broker outages counted when it began (see [`transaction_error`]).
    outages: u64,
    /// Chunks already handed to the producer.
    sent: Vec<SentOutputs>,
}

/// The records of one transaction: the batches queued behind the last one.
#[derive(Default)]
struct TransactionBatch {
    outputs: UserOutputList,
    dead_letters: Vec<DeadLetter>,
    changelog: Vec<changelog::Batch>,
    /// `(input topic, partition, next offset)`, the furthest per partition.
    offsets: Vec<(Arc<str>, i32, i64)>,
    received: Vec<Instant>,
    event_times: Vec<i64>,
    /// Released once the transaction commits.
    in_flight: Vec<InFlight>,
}

/// The exactly-once publish stage: the batches queued behind the last commit
/// (at most [`MAX_BATCHES_PER_TRANSACTION`]) are one Kafka transaction of their
/// outputs, dead letters, changelog records (data and marker together: the
/// transaction makes them atomic, so no marker needs to wait for its data) and
/// the consumer offsets (`send_offsets_to_transaction` with the group's
/// metadata, so a zombie of an older generation is fenced by the
/// coordinator). Transactions run one at a time, in batch order; the engine
/// computes the next batches meanwhile. Only a committed batch is acknowledged
/// in the store; a failure stops the job (see [`PipelineError::restartable`]).
async fn transaction_loop(
    transactions: Transactions,
    consumer: Arc<StreamConsumer<EngineContext>>,
    store: Arc<Store>,
    topics: TopicNames,
    mut publish_rx: mpsc::Receiver<Publish>,
) -> Result<(), PipelineError> {
    // The first chunk of a batch that arrived while a transaction was being
    // filled: it begins the next one.
    let mut carried: Option<Publish> = None;
    let mut encoder = BatchEncoder::default();
    loop {
        let first = match carried.take() {
            Some(msg) => msg,
            None => match publish_rx.recv().await {
                Some(msg) => msg,
                None => break,
            },
        };
        // Every batch queued while the last transaction committed goes into
        // this one: a transaction costs about 100 ms even on a local broker
        // (librdkafka sends one produce request per partition, and Apache Kafka
        // handles a connection's requests one at a time, verifying each
        // partition against the transaction coordinator first), so it
        // is paid once per wait, not once per micro-batch (one transaction a
        // batch let a queue of batches form, each waiting for the commits of
        // those before it: ≈ 1 s of freshness at any rate).
        let mut batch = TransactionBatch::default();
        let mut open: Option<OpenTransaction> = None;
        let mut barrier = None;
        let mut next = Some(first);
        let mut taken = 0;
        let mut records = 0;
        // A chunk is taken and its batch's own message is not yet.
        let mut inside_batch = false;
        while let Some(msg) = next.take() {
            match msg {
                // Answered once everything before it is committed.
                Publish::Barrier(done) => {
                    barrier = Some(done);
                    break;
                }
                // Sent into the open transaction at once; the batch's outputs
                // commit with its offsets: wait for the rest of it, however
                // full this transaction is. A later batch's first chunk waits
                // for the next transaction: the outputs taken before it are
                // only sent at the commit, and a user's versions must reach
                // the compacted topics in order.
                Publish::Chunk(outputs) => {
                    if taken > 0 && !inside_batch {
                        carried = Some(Publish::Chunk(outputs));
                        break;
                    }
                    inside_batch = true;
                    let txn = match open.as_mut() {
                        Some(txn) => txn,
                        None => match transactions.begin() {
                            Ok(txn) => open.insert(txn),
                            Err(e) => return Err(abort(&transactions, e).await),
                        },
                    };
                    match send_outputs(&transactions.producer, &topics, &mut encoder, &outputs, &[])
                        .await
                    {
                        Ok(sent) => txn.sent.push(sent),
                        Err(e) => {
                            let e = transactions.publish_failed(e, txn.outages);
                            return Err(abort(&transactions, e).await);
                        }
                    }
                    next = publish_rx.recv().await;
                    if next.is_none() {
                        // The engine stopped inside the batch (its error is the
                        // one reported): none of it may commit.
                        let _ = abort(&transactions, PipelineError::EngineGone).await;
                        return Ok(());
                    }
                    continue;
                }
                // Pages of a refresh of everyone read no input of their own;
                // they commit their partitions' applied offsets again, so that
                // the group coordinator fences a zombie's pages like its batches.
                Publish::Outputs { outputs, changelog } => {
                    let offsets = match applied_offsets(&store, &topics, &changelog) {
                        Ok(offsets) => offsets,
                        Err(e) if open.is_some() => return Err(abort(&transactions, e).await),
                        Err(e) => return Err(e),
                    };
                    batch.outputs.extend(outputs);
                    batch.changelog.extend(changelog);
                    batch.add_offsets(offsets);
                }
                Publish::Batch {
                    outputs,
                    dead_letters,
                    changelog,
                    offsets,
                    received,
                    event_times,
                    in_flight,
                } => {
                    inside_batch = false;
                    records += received.len();
                    batch.outputs.extend(outputs);
                    batch.dead_letters.extend(dead_letters);
                    batch.changelog.extend(changelog);
                    batch.add_offsets(offsets);
                    batch.received.extend(received);
                    batch.event_times.extend(event_times);
                    batch.in_flight.push(in_flight);
                }
            }
            taken += 1;
            if taken < MAX_BATCHES_PER_TRANSACTION && records < MAX_RECORDS_PER_TRANSACTION {
                next = publish_rx.try_recv().ok();
            }
        }
        if taken > 0 {
            let acked = match transact(
                &transactions,
                open,
                &consumer,
                &topics,
                &mut encoder,
                &batch,
            )
            .await
            {
                Ok(acked) => acked,
                Err(e) => return Err(abort(&transactions, e).await),
            };
            // Outputs committed with the state: published up to the applied offsets.
            let published: Vec<(String, i32, i64)> = batch
                .offsets
                .iter()
                .map(|(t, p, o)| (t.to_string(), *p, *o))
                .collect();
            store.acknowledge(&acked, &published)?;
            drop(batch.in_flight);
            observe_published(batch.received, batch.event_times);
        }
        if let Some(done) = barrier {
            let _ = done.send(());
        }
    }
    Ok(())
}

/// At most this many queued batches (each at most `batch_max_records`
/// records) go into one transaction...
const MAX_BATCHES_PER_TRANSACTION: usize = 16;
/// ...and no more batches join once it holds this many input records, so a
/// transaction of big batches (a coalescing window) is one batch, not 16.
/// A transaction begun by a big batch's first chunk stays open while the
/// rest of that batch is computed (≈ 2 s for 20,000 records without a
/// model, 4 s with NCF on the 2-core bench host): keep `batch_max_records`
/// such that a batch computes well inside `transaction_timeout_ms`.
const MAX_RECORDS_PER_TRANSACTION: usize = 16_000;

impl TransactionBatch {
    /// Adds input offsets, keeping the furthest per partition.
    fn add_offsets(&mut self, offsets: Vec<(Arc<str>, i32, i64)>) {
        for (topic, partition, next) in offsets {
            match self
                .offsets
                .iter_mut()
                .find(|(t, p, _)| *t == topic && *p == partition)
            {
                Some(entry) => entry.2 = entry.2.max(next),
                None => self.offsets.push((topic, partition, next)),
            }
        }
    }
}

/// The applied offsets of both input topics of the partitions these changelog
/// batches belong to.
fn applied_offsets(
    store: &Store,
    topics: &TopicNames,
    changelog: &[changelog::Batch],
) -> Result<Vec<(Arc<str>, i32, i64)>, PipelineError> {
    let partitions: BTreeSet<u32> = changelog.iter().map(|b| b.partition).collect();
    let mut offsets = Vec::new();
    for partition in partitions {
        for topic in [&topics.interactions, &topics.refresh] {
            if let Some(next) = store.offset(topic, partition as i32)? {
                offsets.push((Arc::from(topic.as_str()), partition as i32, next));
            }
        }
    }
    Ok(offsets)
}

/// Writes one batch as one transaction (begun here, or `open` already, with
/// chunks of its outputs sent) and commits it; returns the changelog
/// batches as `(partition, seq, next changelog offset)`.
async fn transact(
    transactions: &Transactions,
    open: Option<OpenTransaction>,
    consumer: &Arc<StreamConsumer<EngineContext>>,
    topics: &TopicNames,
    encoder: &mut BatchEncoder,
    batch: &TransactionBatch,
) -> Result<Vec<(u32, u64, i64)>, PipelineError> {
    let producer = &transactions.producer;
    let txn = match open {
        Some(txn) => txn,
        None => transactions.begin()?,
    };
    let outages = txn.outages;
    let failed = |e: KafkaError| transactions.failed(e, outages);
    let publish_failed = |e: PipelineError| transactions.publish_failed(e, outages);
    let outputs = send_outputs(
        producer,
        topics,
        encoder,
        &batch.outputs,
        &batch.dead_letters,
    )
    .await
    .map_err(publish_failed)?;
    let mut changelog = Vec::with_capacity(batch.changelog.len());
    for cb in &batch.changelog {
        let mut deliveries = Vec::with_capacity(cb.records.len());
        for (key, value) in &cb.records {
            let record = FutureRecord::to(&topics.changelog)
                .partition(cb.partition as i32)
                .key(key)
                .payload(value);
            deliveries.push(enqueue(producer, record).await.map_err(failed)?);
        }
        changelog.push((cb.partition, cb.seq, cb.records.len() as u64, deliveries));
    }
    let mut offsets = TopicPartitionList::new();
    for (topic, partition, next) in &batch.offsets {
        offsets
            .add_partition_offset(topic, *partition, Offset::Offset(*next))
            .map_err(failed)?;
    }
    // Every record acknowledged before the commit: rust-rdkafka's
    // commit_transaction flushes first, and its flush, finding anything
    // outstanding, polls for a whole 100 ms (measured: every commit took
    // 102–106 ms on a local broker). Deliveries resolve on the producer's own
    // polling thread as soon as the broker answers.
    // A failed record fails the transaction (librdkafka aborts it): report
    // the delivery error, the commit would only repeat it.
    let acked = async {
        for chunk in txn.sent {
            chunk.confirm().await?;
        }
        outputs.confirm().await?;
        let mut acked = Vec::with_capacity(changelog.len());
        for (partition, seq, records, deliveries) in changelog {
            acked.push((partition, seq, records, await_offsets(deliveries).await?));
        }
        Ok(acked)
    }
    .await
    .map_err(publish_failed)?;
    // Offsets and commit block on broker round trips: off the runtime.
    let (txn_producer, txn_consumer) = (producer.clone(), consumer.clone());
    let started = Instant::now();
    tokio::task::spawn_blocking(move || -> Result<(), KafkaError> {
        if offsets.count() > 0 {
            let group = txn_consumer
                .group_metadata()
                // Not a group member (any more): nothing to commit offsets for.
                .ok_or(KafkaError::ConsumerCommit(
                    RDKafkaErrorCode::UnknownMemberId,
                ))?;
            txn_producer.send_offsets_to_transaction(&offsets, &group, TRANSACTION_CALL_TIMEOUT)?;
        }
        wait_until_delivered(&txn_producer);
        txn_producer.commit_transaction(TRANSACTION_CALL_TIMEOUT)
    })
    .await
    .map_err(|_| PipelineError::EngineGone)?
    .map_err(failed)?;
    metrics::transaction_commit(started.elapsed().as_secs_f64());
    metrics::transaction("committed");
    let acked = acked
        .into_iter()
        .map(|(partition, seq, records, next)| {
            metrics::changelog_written(records);
            (partition, seq, next)
        })
        .collect();
    Ok(acked)
}

/// Waits (briefly) until librdkafka has released every delivered message: a
/// delivery future resolves just before the producer's polling thread frees
/// its report, and a flush that still counts it would poll for 100 ms.
fn wait_until_delivered(producer: &FutureProducer) {
    let deadline = Instant::now() + Duration::from_millis(50);
    while producer.in_flight_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Aborts the open transaction after a failure (unless fenced: then there is
/// nothing this instance may still write) and returns the error to stop with.
async fn abort(transactions: &Transactions, error: PipelineError) -> PipelineError {
    if matches!(error, PipelineError::Fenced(_)) {
        return error;
    }
    warn!(%error, "aborting the transaction");
    let producer = transactions.producer.clone();
    let aborted =
        tokio::task::spawn_blocking(move || producer.abort_transaction(TRANSACTION_CALL_TIMEOUT))
            .await;
    if let Ok(Err(e)) = aborted {
        // The broker aborts it after transaction_timeout_ms, or the restarted
        // job's init_transactions does.
        warn!(%e, "abort failed");
    }
    match error {
        PipelineError::Publish(e) => PipelineError::TransactionAborted(e),
        other => other,
    }
}

/// Latency metrics of a batch whose outputs the broker has (acknowledged or
/// committed): from receiving each record, and from each event's time.
fn observe_published(received: Vec<Instant>, event_times: Vec<i64>) {
    for r in received {
        metrics::processing_latency(r.elapsed().as_secs_f64());
    }
    let now_ms = wall_clock_ms();
    for ts in event_times {
        metrics::event_to_publish_lag((now_ms - ts) as f64 / 1000.0);
    }
}

/// Changelog batches whose data records are on their way: `(partition, seq,
/// deliveries, the marker to send once they are acknowledged)`.
type SentChangelog = Vec<(u32, u64, Vec<DeliveryFuture>, (Vec<u8>, Vec<u8>))>;

/// Enqueues the data records of changelog batches to their partitions. The
/// markers wait (see [`await_changelog`]).
async fn publish_changelog(
    producer: &FutureProducer,
    topic: &str,
    batches: &[changelog::Batch],
) -> Result<SentChangelog, PipelineError> {
    let mut sent = Vec::with_capacity(batches.len());
    for batch in batches {
        let Some((marker, data)) = batch.records.split_last() else {
            continue;
        };
        let mut futures = Vec::with_capacity(data.len());
        for (key, value) in data {
            let record = FutureRecord::to(topic)
                .partition(batch.partition as i32)
                .key(key)
                .payload(value);
            futures.push(
                enqueue(producer, record)
                    .await
                    .map_err(PipelineError::Publish)?,
            );
        }
        sent.push((batch.partition, batch.seq, futures, marker.clone()));
    }
    Ok(sent)
}

/// Waits for the data records, then sends each batch's marker and waits for
/// it: a marker never lands without its batch, whatever the broker drops or
/// reorders. Every partition's data is awaited first and then all markers
/// are enqueued at once, rather than each partition's marker waiting for the
/// acknowledgement of the next partition's data. Returns `(partition, seq,
/// next changelog offset)`.
async fn await_changelog(
    producer: &FutureProducer,
    topic: &str,
    sent: SentChangelog,
) -> Result<Vec<(u32, u64, i64)>, PipelineError> {
    let mut data = Vec::with_capacity(sent.len());
    let mut pending_markers = Vec::with_capacity(sent.len());
    for (partition, seq, futures, marker) in sent {
        pending_markers.push((partition, seq, futures.len() as u64 + 1, marker));
        data.push(await_offsets(futures));
    }
    for written in join_all(data).await {
        written?;
    }
    let mut markers = Vec::with_capacity(pending_markers.len());
    for (partition, seq, records, (key, value)) in pending_markers {
        let record = FutureRecord::to(topic)
            .partition(partition as i32)
            .key(&key)
            .payload(&value);
        let marker = enqueue(producer, record)
            .await
            .map_err(PipelineError::Publish)?;
        markers.push((partition, seq, records, marker));
    }
    let mut acked = Vec::with_capacity(markers.len());
    for (partition, seq, records, marker) in markers {
        let next = await_offsets(vec![marker]).await?;
        metrics::changelog_written(records);
        acked.push((partition, seq, next));
    }
    Ok(acked)
}

/// Waits for deliveries; returns the offset after the last one.
async fn await_offsets(futures: Vec<DeliveryFuture>) -> Result<i64, PipelineError> {
    let mut next = 0;
    for delivery in join_all(futures).await {
        match delivery {
            Ok(Ok(d)) => next = next.max(d.offset + 1),
            Ok(Err((e, _))) => {
                metrics::kafka_error("produce");
                return Err(PipelineError::Publish(e));
            }
            Err(_) => return Err(PipelineError::Publish(KafkaError::Canceled)),
        }
    }
    Ok(next)
}

/// How often the published markers go out while batches are confirmed.
/// librdkafka sends one produce request per partition, so a marker for every
/// batch cost up to one request per input partition per batch; a marker at
/// most every second costs a new owner at most a second more of re-read input
/// after a crash (a clean handover sends them first).
const PUBLISHED_MARKER_INTERVAL: Duration = Duration::from_secs(1);

/// Published offsets not yet in a changelog marker.
#[derive(Default)]
struct UnmarkedPublished {
    offsets: std::collections::BTreeMap<(String, i32), i64>,
    last_sent: Option<Instant>,
}

impl UnmarkedPublished {
    fn add(&mut self, published: Vec<(String, i32, i64)>) {
        for (topic, partition, offset) in published {
            self.offsets.insert((topic, partition), offset);
        }
    }

    fn due(&self) -> bool {
        !self.offsets.is_empty()
            && self
                .last_sent
                .is_none_or(|at| at.elapsed() >= PUBLISHED_MARKER_INTERVAL)
    }

    fn flush(&mut self, producer: &FutureProducer, topic: &str, store: &Store) {
        if self.offsets.is_empty() {
            return;
        }
        let published: Vec<(String, i32, i64)> = std::mem::take(&mut self.offsets)
            .into_iter()
            .map(|((t, p), o)| (t, p, o))
            .collect();
        publish_published_markers(producer, topic, store, &published);
        self.last_sent = Some(Instant::now());
    }
}

/// Tells a future owner of each partition how far outputs are published, so it
/// republishes less after a handover. Advisory: not awaited, never rolled back.
fn publish_published_markers(
    producer: &FutureProducer,
    topic: &str,
    store: &Store,
    published: &[(String, i32, i64)],
) {
    let mut by_partition: std::collections::BTreeMap<i32, Vec<(String, i64)>> = Default::default();
    for (t, p, o) in published {
        by_partition.entry(*p).or_default().push((t.clone(), *o));
    }
    for (partition, mut offsets) in by_partition {
        // Both input topics of the partition, not just the ones in this batch.
        for (t, o) in &mut offsets {
            *o = store
                .published_offset(t, partition)
                .ok()
                .flatten()
                .unwrap_or(*o);
        }
        let seq = store
            .partition_meta(partition as u32)
            .ok()
            .flatten()
            .map_or(0, |m| m.seq);
        let entry = changelog::Entry {
            writer: store.writer_id(),
            seq,
            value: Some(postcard::to_stdvec(&offsets).expect("offsets encode")),
            prev: None,
        }
        .encode();
        let record = FutureRecord::to(topic)
            .partition(partition)
            .key(changelog::PUBLISHED_KEY)
            .payload(&entry);
        if producer.send_result(record).is_err() {
            debug!(partition, "published marker not sent (queue full)");
        }
    }
}

/// Sends every record of a batch and waits until the broker acknowledged all.
pub async fn publish_outputs(
    producer: &FutureProducer,
    topics: &TopicNames,
    outputs: &[(String, crate::output::UserOutputs)],
    dead_letters: &[DeadLetter],
) -> Result<(), PipelineError> {
    send_outputs(
        producer,
        topics,
        &mut BatchEncoder::default(),
        outputs,
        dead_letters,
    )
    .await?
    .confirm()
    .await
}

/// Output records handed to the producer, with what to count once they land.
pub struct SentOutputs {
    pending: Vec<DeliveryFuture>,
    /// Users whose records were sent: one record of every output kind each.
    users: u64,
    dead_letters: u64,
}

impl SentOutputs {
    /// Waits until the broker acknowledged every record.
    pub async fn confirm(self) -> Result<(), PipelineError> {
        await_deliveries(self.pending)
            .await
            .map_err(PipelineError::Publish)?;
        for kind in OutputKind::ALL {
            metrics::output_published(kind.as_str(), self.users);
        }
        if self.dead_letters > 0 {
            metrics::output_published("dead_letters", self.dead_letters);
        }
        Ok(())
    }
}

/// Enqueues every record of a batch (waiting only while the producer's queue
/// is full); [`SentOutputs::confirm`] waits for the acknowledgements.
///
/// Every record is encoded (into `encoder`'s reused buffer) before the first
/// is enqueued, so the batch reaches librdkafka in one burst: a transactional
/// producer then registers all the partitions a transaction writes to in one
/// AddPartitionsToTxn request (the broker's request log shows one request for
/// all 24).
pub async fn send_outputs(
    producer: &FutureProducer,
    topics: &TopicNames,
    encoder: &mut BatchEncoder,
    outputs: &[(String, crate::output::UserOutputs)],
    dead_letters: &[DeadLetter],
) -> Result<SentOutputs, PipelineError> {
    let mut pending = Vec::with_capacity(outputs.len() * 3 + dead_letters.len());
    for record in encoder.encode(outputs) {
        let topic = match record.kind {
            OutputKind::Recommendations => &topics.recommendations,
            OutputKind::Carousels => &topics.carousels,
            OutputKind::Insights => &topics.insights,
        };
        let headers = OwnedHeaders::new_with_capacity(1).insert(Header {
            key: crate::output::PREVIOUS_VERSION_HEADER,
            value: Some(record.previous_version),
        });
        let queued = FutureRecord::to(topic)
            .key(record.user.as_bytes())
            .payload(record.payload)
            .headers(headers);
        pending.push(
            enqueue(producer, queued)
                .await
                .map_err(PipelineError::Publish)?,
        );
    }
    let dead_letter_records: Vec<_> = dead_letters.iter().map(dead_letter_headers).collect();
    for (dl, headers) in dead_letters.iter().zip(dead_letter_records) {
        let mut record = FutureRecord::to(&topics.dead_letters)
            .payload(&dl.payload)
            .headers(headers);
        if let Some(k) = &dl.key {
            record = record.key(k);
        }
        pending.push(
            enqueue(producer, record)
                .await
                .map_err(PipelineError::Publish)?,
        );
    }
    Ok(SentOutputs {
        pending,
        users: outputs.len() as u64,
        dead_letters: dead_letters.len() as u64,
    })
}

/// A dead letter's headers: why it was rejected and where it was read.
fn dead_letter_headers(dl: &DeadLetter) -> OwnedHeaders {
    let partition = dl.source.partition.to_string();
    let offset = dl.source.offset.to_string();
    OwnedHeaders::new()
        .insert(Header {
            key: "dlq.reason",
            value: Some(dl.reason),
        })
        .insert(Header {
            key: "dlq.detail",
            value: Some(&dl.detail),
        })
        .insert(Header {
            key: "dlq.topic",
            value: Some(&*dl.source.topic),
        })
        .insert(Header {
            key: "dlq.partition",
            value: Some(&partition),
        })
        .insert(Header {
            key: "dlq.offset",
            value: Some(&offset),
        })
}

/// Enqueues one record, waiting while librdkafka's queue is full. The returned
/// future resolves when the broker acknowledged (or finally rejected) it.
pub async fn enqueue<K: ToBytes + ?Sized, P: ToBytes + ?Sized>(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, K, P>,
) -> Result<DeliveryFuture, KafkaError> {
    loop {
        match producer.send_result(record) {
            Ok(f) => return Ok(f),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, _)) => {
                metrics::kafka_error("produce");
                return Err(e);
            }
        }
    }
}

/// Waits for every delivery; the first failure is the error.
pub async fn await_deliveries(pending: Vec<DeliveryFuture>) -> Result<(), KafkaError> {
    for delivery in join_all(pending).await {
        match delivery {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => {
                metrics::kafka_error("produce");
                return Err(e);
            }
            Err(_) => return Err(KafkaError::Canceled),
        }
    }
    Ok(())
}

type CatalogUpdates = Vec<(u32, Option<CatalogRecord>)>;

/// Reads the catalog topic from the beginning up to its current end (returned),
/// then keeps following it (the receiver). Invalid records are dead-lettered.
async fn follow_catalog(
    config: &Config,
    producer: FutureProducer,
) -> Result<
    (
        mpsc::Receiver<CatalogUpdates>,
        CatalogUpdates,
        Option<JoinHandle<()>>,
    ),
    PipelineError,
> {
    let client = consumer_config(config)
        .set("group.id", format!("{}-catalog", config.kafka.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        // Catalog changes need no millisecond freshness: whatever wait
        // `kafka.client` sets for the interactions (1 ms on tansu, which
        // answers fetches only when the wait ends), 100 ms here.
        .set("fetch.wait.max.ms", "100")
        .clone();
    let topic = config.topics.catalog.clone();
    // Metadata and watermark look-ups block on the network: keep them off the runtime.
    let (consumer, mut remaining, found) = tokio::task::spawn_blocking(move || {
        let consumer: StreamConsumer = client.create()?;
        let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(15))?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        let mut tpl = TopicPartitionList::new();
        let mut remaining: HashMap<i32, i64> = HashMap::new();
        for p in &partitions {
            tpl.add_partition_offset(&topic, *p, Offset::Beginning)?;
            let (low, high) = consumer.fetch_watermarks(&topic, *p, Duration::from_secs(15))?;
            if high > low {
                remaining.insert(*p, high);
            }
        }
        if !partitions.is_empty() {
            consumer.assign(&tpl)?;
        }
        Ok::<_, KafkaError>((consumer, remaining, !partitions.is_empty()))
    })
    .await
    .map_err(|_| PipelineError::EngineGone)??;
    if !found {
        warn!(topic = %config.topics.catalog, "catalog topic not found; using the catalog file only");
    }
    let topics = config.topics.clone();
    let mut initial = Vec::new();
    while !remaining.is_empty() {
        let m = consumer.recv().await?;
        if let Some(u) = catalog_update(&m, &producer, &topics).await? {
            initial.push(u);
        }
        if remaining
            .get(&m.partition())
            .is_some_and(|high| m.offset() + 1 >= *high)
        {
            remaining.remove(&m.partition());
        }
    }
    let (tx, rx) = mpsc::channel(16);
    let follower = found.then(|| {
        tokio::spawn(async move {
            loop {
                let update = match consumer.recv().await {
                    Ok(m) => catalog_update(&m, &producer, &topics).await,
                    Err(e) => Err(PipelineError::Kafka(e)),
                };
                match update {
                    Ok(Some(u)) => {
                        if tx.send(vec![u]).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        metrics::kafka_error("consume");
                        warn!(%e, "catalog follower error");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        })
    });
    Ok((rx, initial, follower))
}

/// Decodes a catalog record; a null value deletes. Invalid records go to the dead-letter topic.
async fn catalog_update(
    m: &rdkafka::message::BorrowedMessage<'_>,
    producer: &FutureProducer,
    topics: &TopicNames,
) -> Result<Option<(u32, Option<CatalogRecord>)>, PipelineError> {
    let key = m
        .key()
        .and_then(|k| std::str::from_utf8(k).ok()?.parse::<u32>().ok());
    let rejection = match (key, m.payload()) {
        (Some(id), None) => return Ok(Some((id, None))),
        (None, None) => Rejection {
            reason: "missing_key",
            detail: "a catalog tombstone needs the movie id as key".into(),
        },
        (key, Some(payload)) => match crate::catalog::parse_record(payload) {
            Ok(r) if key.is_none_or(|k| k == r.movie_id) => return Ok(Some((r.movie_id, Some(r)))),
            Ok(r) => Rejection {
                reason: "key_mismatch",
                detail: format!("key {key:?} does not match movie_id {}", r.movie_id),
            },
            Err(detail) => Rejection {
                reason: "schema_violation",
                detail,
            },
        },
    };
    metrics::dead_letter(rejection.reason);
    let dead_letter = DeadLetter {
        source: SourcePos {
            topic: Arc::from(m.topic()),
            partition: m.partition(),
            offset: m.offset(),
        },
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().unwrap_or_default().to_vec(),
        reason: rejection.reason,
        detail: rejection.detail,
    };
    publish_outputs(producer, topics, &[], &[dead_letter]).await?;
    Ok(None)
}

/// The global item follower's consumer: assigned, never in a group's
/// rebalances; `read_committed`, so aborted transactions never reach the tables.
fn follower_settings(config: &Config) -> ClientConfig {
    consumer_config(config)
        .set(
            "group.id",
            format!("{}-global-items", config.kafka.group_id),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        // The tables are folded in once per flush interval: no need to fetch
        // more often than every 100 ms. Without a minimum size the broker
        // answered on the first byte, i.e. after every changelog write of any
        // instance (≈ 400 fetches a second at 1,000 events/s, each waking this
        // consumer and the broker), which cost the input path's freshness
        // more than anything else on a 2-core host.
        .set("fetch.wait.max.ms", "100")
        .set("fetch.min.bytes", "1048576")
        .clone()
}

/// Follows every changelog partition and hands complete batches to the engine
/// thread once per flush interval. Not fatal: a follower that cannot start
/// leaves the tables as they are, and says so.
async fn follow_items(
    settings: ClientConfig,
    topic: String,
    partitions: u32,
    positions: HashMap<u32, i64>,
    flush_interval: Duration,
    control: mpsc::UnboundedReceiver<global::FollowerControl>,
    work_tx: mpsc::Sender<Work>,
) {
    let follower = match settings.create_with_context(global::FollowerContext) {
        Ok(consumer) => global::Follower {
            consumer,
            topic,
            flush_interval,
        },
        Err(e) => {
            warn!(%e, "global item follower could not start; item tables cover only this instance's partitions");
            return;
        }
    };
    if let Err(e) = follower.assign(partitions, &positions) {
        warn!(%e, "global item follower could not assign the changelog partitions; item tables cover only this instance's partitions");
        return;
    }
    info!(
        partitions,
        "following every partition's item side (global item tables)"
    );
    let (tx, mut rx) = mpsc::channel::<global::Followed>(1);
    let forward = async {
        while let Some(followed) = rx.recv().await {
            if work_tx.send(Work::Followed(followed)).await.is_err() {
                break;
            }
        }
    };
    // One task: aborting it at shutdown drops the follower's consumer with
    // it, before the broker connections go (a spawned reader outlived the
    // abort and logged the closed connections).
    tokio::select! {
        _ = follower.run(tx, control) => {}
        _ = forward => {}
    }
}

async fn forward_catalog(mut updates: mpsc::Receiver<CatalogUpdates>, work_tx: mpsc::Sender<Work>) {
    while let Some(u) = updates.recv().await {
        if work_tx.send(Work::Catalog(u)).await.is_err() {
            break;
        }
    }
}

/// Builds the variants (loading new or changed models), logs what is served
/// and updates the experiment metrics.
fn load_variants(
    source: &ExperimentSource,
    models: &mut ModelCache,
) -> Result<Variants, ExperimentError> {
    let built = source.build(models)?;
    for (variant, version) in &built.newly_loaded {
        metrics::model_load("loaded");
        info!(%variant, model = %version, "NCF model loaded and parity-checked against its card");
    }
    let served: Vec<(&str, f64, Option<String>)> = built
        .variants
        .list()
        .iter()
        .map(|v| {
            (
                &*v.name,
                v.share,
                v.scorer.as_ref().map(|s| s.info().version),
            )
        })
        .collect();
    metrics::experiment(
        &served
            .iter()
            .map(|(n, s, m)| (*n, *s, m.as_deref()))
            .collect::<Vec<_>>(),
    );
    let rankers: Vec<(&str, &str)> = built
        .variants
        .list()
        .iter()
        .filter_map(|v| Some((&*v.name, v.ranker.as_ref()?.version.as_str())))
        .collect();
    info!(variants = ?served, learned_blends = ?rankers, "serving variants");
    Ok(built.variants)
}

/// Follows the experiment file and the model files of the variants in force:
/// on a change, builds the new variants off the runtime and hands them to the
/// engine thread. A file that does not load or a model that fails its parity
/// check is rejected with a log line and a metric; the old variants keep serving.
async fn watch_experiment(
    source: ExperimentSource,
    mut models: ModelCache,
    mut variants: Arc<Variants>,
    interval: Duration,
    work_tx: mpsc::Sender<Work>,
) {
    let mut seen = experiment::fingerprint(&source.watched_files(&variants));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let now = experiment::fingerprint(&source.watched_files(&variants));
        if now == seen {
            continue;
        }
        seen = now;
        let job = source.clone();
        let (returned, built) = match tokio::task::spawn_blocking(move || {
            let built = load_variants(&job, &mut models);
            (models, built)
        })
        .await
        {
            Ok(done) => done,
            Err(_) => return,
        };
        models = returned;
        match built {
            Ok(new) => {
                variants = Arc::new(new);
                // Files named by the new variants are followed from now on.
                seen = experiment::fingerprint(&source.watched_files(&variants));
                if work_tx
                    .send(Work::Variants(variants.clone()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                metrics::model_load("rejected");
                tracing::error!(error = %e, "new experiment or model rejected; the previous one keeps serving");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> SourcePos {
        SourcePos {
            topic: Arc::from("in"),
            partition: 0,
            offset: 7,
        }
    }

    #[test]
    fn bad_records_become_rejections_with_their_bytes() {
        let r = decode(source(), Some(b"u1"), b"{oops", false, 1024);
        match r.body {
            Body::Invalid(rej) => assert_eq!(rej.reason, "malformed_json"),
            other => panic!("{other:?}"),
        }
        assert_eq!(r.payload, b"{oops");
        assert_eq!(r.key.as_deref(), Some(&b"u1"[..]));
        let r = decode(source(), Some(b"*"), b"{}", true, 1024);
        assert!(matches!(r.body, Body::Invalid(ref rej) if rej.reason == "schema_violation"));
    }

    #[test]
    fn the_input_consumer_fetches_on_a_cadence_operators_can_change() {
        let defaults = input_consumer_config(&Config::default());
        assert_eq!(defaults.get("fetch.wait.max.ms"), Some("5"));
        assert_eq!(defaults.get("fetch.min.bytes"), Some("1048576"));
        let mut config = Config::default();
        config
            .kafka
            .client
            .insert("fetch.min.bytes".into(), "1".into());
        assert_eq!(
            input_consumer_config(&config).get("fetch.min.bytes"),
            Some("1")
        );
        // Other consumers keep librdkafka's defaults.
        assert_eq!(
            consumer_config(&Config::default()).get("fetch.min.bytes"),
            None
        );
    }

    #[test]
    fn operators_tune_producers_but_not_their_guarantees() {
        let mut config = Config::default();
        config.kafka.brokers = "localhost:9092".into();
        for (k, v) in [
            ("compression.type", "zstd"),
            ("linger.ms", "20"),
            ("acks", "1"),
            ("max.in.flight.requests.per.connection", "5"),
        ] {
            config.kafka.client.insert(k.into(), v.into());
        }
        for settings in [output_settings(&config), changelog_settings(&config)] {
            assert_eq!(settings.get("compression.type"), Some("zstd"));
            assert_eq!(settings.get("linger.ms"), Some("20"));
            assert_eq!(settings.get("acks"), Some("all"));
        }
        let changelog = changelog_settings(&config);
        assert_eq!(
            changelog.get("max.in.flight.requests.per.connection"),
            Some("1")
        );
        let defaults = output_settings(&Config::default());
        assert_eq!(defaults.get("compression.type"), Some("lz4"));
        assert_eq!(defaults.get("linger.ms"), Some("2"));
        assert_eq!(
            changelog_settings(&Config::default()).get("linger.ms"),
            Some("1")
        );
    }

    #[test]
    fn events_from_the_far_future_are_rejected() {
        let ts = wall_clock_ms() + 2 * MAX_FUTURE_MS;
        let payload =
            format!(r#"{{"event_id":"e","user_id":"u1","movie_id":1,"type":"like","ts":{ts}}}"#);
        let r = decode(source(), Some(b"u1"), payload.as_bytes(), false, 1024);
        assert!(
            matches!(r.body, Body::Invalid(ref rej) if rej.reason == "out_of_range"),
            "{:?}",
            r.body
        );
        let payload =
            r#"{"event_id":"e","user_id":"u1","movie_id":1,"type":"like","ts":1700000000000}"#;
        let r = decode(source(), Some(b"u1"), payload.as_bytes(), false, 1024);
        assert!(matches!(r.body, Body::Event(_)));
    }
}
