//! Live updates for the page: the output topics, tailed from their end and
//! fanned out to the users someone is watching. The tail runs only while
//! somebody watches; it reads every partition (any instance can serve any
//! user's stream) and forwards a record without decoding it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{broadcast, watch};
use tracing::{info, warn};

use crate::config::TopicNames;
use crate::output::OutputKind;

/// Records a slow watcher may fall behind by before it is told to re-read.
const PER_USER_BUFFER: usize = 64;
/// The tail stops after this long without watchers.
const IDLE_STOP: Duration = Duration::from_secs(30);
const POSITION_TIMEOUT: Duration = Duration::from_secs(15);
/// Users watched at once per instance (each holds a small channel).
const MAX_WATCHED_USERS: usize = 10_000;

#[derive(Debug, Clone)]
pub struct Update {
    pub kind: OutputKind,
    /// The record as published (JSON).
    pub payload: Arc<str>,
}

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("the output topics could not be read from their end within {0:?}")]
    NotPositioned(Duration),
    #[error("{0} users are watched already")]
    TooMany(usize),
}

pub struct OutputFeed {
    client: ClientConfig,
    topics: [(String, OutputKind); 3],
    watchers: Mutex<HashMap<String, broadcast::Sender<Update>>>,
    /// `Some` while the tail runs: turns true once it reads from the end.
    tail: tokio::sync::Mutex<Option<watch::Receiver<bool>>>,
    /// Turns true at shutdown: the tail stops with the engine.
    stopping: watch::Receiver<bool>,
}

impl OutputFeed {
    pub fn new(
        client: ClientConfig,
        topics: &TopicNames,
        stopping: watch::Receiver<bool>,
    ) -> Arc<OutputFeed> {
        Arc::new(OutputFeed {
            client,
            topics: [
                (topics.recommendations.clone(), OutputKind::Recommendations),
                (topics.carousels.clone(), OutputKind::Carousels),
                (topics.insights.clone(), OutputKind::Insights),
            ],
            watchers: Mutex::new(HashMap::new()),
            tail: tokio::sync::Mutex::new(None),
            stopping,
        })
    }

    /// Every record published for `user_id` from now on. Returns once the tail
    /// reads from the end of the topics, so nothing published after this
    /// returns is missed.
    pub async fn watch(
        self: &Arc<Self>,
        user_id: &str,
    ) -> Result<broadcast::Receiver<Update>, FeedError> {
        let mut tail = self.tail.lock().await;
        let receiver = {
            let mut watchers = self.watchers.lock().expect("not poisoned");
            if !watchers.contains_key(user_id) && watchers.len() >= MAX_WATCHED_USERS {
                return Err(FeedError::TooMany(MAX_WATCHED_USERS));
            }
            watchers
                .entry(user_id.to_string())
                .or_insert_with(|| broadcast::channel(PER_USER_BUFFER).0)
                .subscribe()
        };
        let started = match tail.as_ref() {
            Some(p) => Ok(p.clone()),
            None => self.consumer().map(|consumer| {
                let (tx, rx) = watch::channel(false);
                tokio::spawn(self.clone().run_tail(consumer, tx));
                *tail = Some(rx.clone());
                rx
            }),
        };
        drop(tail);
        let failure = match started {
            Ok(mut positioned) => {
                // Err: the tail gave up (its sender is gone); Elapsed: too slow.
                match tokio::time::timeout(POSITION_TIMEOUT, positioned.wait_for(|p| *p)).await {
                    Ok(Ok(_)) => return Ok(receiver),
                    _ => FeedError::NotPositioned(POSITION_TIMEOUT),
                }
            }
            Err(e) => FeedError::Kafka(e),
        };
        drop(receiver);
        self.forget_unwatched(user_id);
        Err(failure)
    }

    fn forget_unwatched(&self, user_id: &str) {
        let mut watchers = self.watchers.lock().expect("not poisoned");
        if watchers
            .get(user_id)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            watchers.remove(user_id);
        }
    }

    fn consumer(&self) -> Result<StreamConsumer, KafkaError> {
        self.client
            .clone()
            .set("group.id", format!("recstream-live-{}", std::process::id()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "50")
            .create()
    }

    async fn run_tail(self: Arc<Self>, consumer: StreamConsumer, positioned: watch::Sender<bool>) {
        let consumer = Arc::new(consumer);
        let topics: Vec<String> = self.topics.iter().map(|(t, _)| t.clone()).collect();
        let c = consumer.clone();
        // Metadata and watermarks are blocking calls.
        let assigned = tokio::task::spawn_blocking(move || assign_at_end(c.as_ref(), &topics))
            .await
            .unwrap_or_else(|_| Err(KafkaError::Canceled));
        match assigned {
            Ok(partitions) => {
                info!(partitions, "live feed follows the output topics");
                let _ = positioned.send(true);
            }
            Err(e) => {
                warn!(%e, "live feed could not follow the output topics");
                *self.tail.lock().await = None;
                return;
            }
        }
        let mut idle_since: Option<tokio::time::Instant> = None;
        let mut sweep = tokio::time::interval(Duration::from_secs(5));
        let mut stopping = self.stopping.clone();
        loop {
            tokio::select! {
                // The guard `wait_for` returns must not live across an await.
                () = async { let _ = stopping.wait_for(|s| *s).await; } => break,
                received = consumer.recv() => match received {
                    Ok(m) => self.forward(m.topic(), m.key(), m.payload()),
                    Err(e) => {
                        warn!(%e, "live feed");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                },
                _ = sweep.tick() => {
                    let mut tail = self.tail.lock().await;
                    let mut watchers = self.watchers.lock().expect("not poisoned");
                    watchers.retain(|_, tx| tx.receiver_count() > 0);
                    if !watchers.is_empty() {
                        idle_since = None;
                    } else if idle_since.get_or_insert_with(tokio::time::Instant::now).elapsed() >= IDLE_STOP {
                        *tail = None;
                        info!("live feed stopped: nobody watches");
                        return;
                    }
                }
            }
        }
        // Shutdown: the consumer closes here, before the engine's clients.
        *self.tail.lock().await = None;
    }

    fn forward(&self, topic: &str, key: Option<&[u8]>, payload: Option<&[u8]>) {
        let (Some(key), Some(payload)) = (key, payload) else {
            return;
        };
        let Some((_, kind)) = self.topics.iter().find(|(t, _)| t == topic) else {
            return;
        };
        let Ok(user) = std::str::from_utf8(key) else {
            return;
        };
        let watchers = self.watchers.lock().expect("not poisoned");
        if let Some(tx) = watchers.get(user) {
            let _ = tx.send(Update {
                kind: *kind,
                payload: String::from_utf8_lossy(payload).into(),
            });
        }
    }
}

/// Assigns every partition of `topics` at its current end; returns how many.
fn assign_at_end<C: rdkafka::consumer::ConsumerContext>(
    consumer: &StreamConsumer<C>,
    topics: &[String],
) -> Result<usize, KafkaError> {
    let timeout = Duration::from_secs(10);
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
        for t in metadata.topics() {
            for p in t.partitions() {
                let (_, high) = consumer.fetch_watermarks(topic, p.id(), timeout)?;
                tpl.add_partition_offset(topic, p.id(), Offset::Offset(high))?;
            }
        }
    }
    consumer.assign(&tpl)?;
    Ok(tpl.count())
}
