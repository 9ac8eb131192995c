//! Partition handover, run on the engine thread when the consumer group
//! assigns partitions: each assigned partition's local state is kept when it is
//! current, or restored from the changelog topic before any of its records are
//! processed; partitions this instance no longer holds are dropped. The format
//! and the roll-back rule are in [`crate::changelog`].
//!
//! "Current" means: every changelog record after the last one this store knows
//! of was written by this store itself (its unacknowledged outbox, which is
//! then sent again). Anything written by another instance means it processed
//! the partition meanwhile, so the local copy is stale.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{info, warn};

use crate::changelog::{self, ChangelogError, Entry, Key, Marker, Restorer, APPLIED_KEY};
use crate::config::Guarantee;
use crate::engine::{Engine, EngineError};
use crate::global::FollowerControl;
use crate::metrics;
use crate::store::{PartitionMeta, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("kafka, partition {partition}: {source}")]
    Kafka { partition: u32, source: KafkaError },
    #[error("changelog partition {partition}: {source}")]
    Changelog {
        partition: u32,
        source: ChangelogError,
    },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

const KAFKA_TIMEOUT: Duration = Duration::from_secs(15);

/// Changelog batches the broker has: `(partition, seq, next changelog offset)`.
type Acknowledged = Vec<(u32, u64, i64)>;

pub struct Handover {
    /// Consumer settings for changelog readers (brokers, security).
    pub reader_config: ClientConfig,
    /// Non-transactional: probes and repair batches, written before the
    /// partition is processed.
    pub producer: FutureProducer,
    pub changelog_topic: String,
    pub input_topics: Vec<String>,
    pub guarantee: Guarantee,
    /// A changelog read that gets no record for this long fails the handover.
    pub no_progress: Duration,
    /// Global item tables: a partition lost keeps its item side instead of
    /// being dropped whole, and the follower is told to read it again from
    /// where its state was known; a partition held is not followed.
    pub follower: Option<tokio::sync::mpsc::UnboundedSender<FollowerControl>>,
}

impl Handover {
    /// Applies a new assignment: drops partitions no longer held, keeps or
    /// restores the assigned ones, and restricts processing to them.
    pub fn assign(
        &self,
        engine: &mut Engine,
        partitions: &BTreeSet<u32>,
    ) -> Result<(), HandoverError> {
        let topics: Vec<&str> = self.input_topics.iter().map(String::as_str).collect();
        for (p, _) in engine.store().partitions()? {
            if partitions.contains(&p) {
                continue;
            }
            metrics::partition_handover("dropped");
            if let Some(follower) = &self.follower {
                let offset = engine.release_partition(p, &topics)?;
                // The follower is gone only when the pipeline stops.
                let _ = follower.send(FollowerControl::Release {
                    partition: p,
                    offset,
                });
                info!(
                    partition = p,
                    "dropped the user state of a partition now held elsewhere; following its item side"
                );
            } else {
                engine.drop_partition(p, &topics)?;
                info!(
                    partition = p,
                    "dropped the state of a partition now held elsewhere"
                );
            }
        }
        if self.follower.is_none() {
            // Item sides followed while global item tables were on.
            for p in engine.item_side_partitions() {
                if !partitions.contains(&p) {
                    engine.drop_partition(p, &topics)?;
                }
            }
        }
        if partitions.is_empty() {
            engine.set_owned(Some(BTreeSet::new()));
            return Ok(());
        }
        let first = *partitions.iter().next().expect("not empty");
        let reader: BaseConsumer = self
            .reader_config
            .clone()
            .set("group.id", "recstream-changelog-reader")
            // A restore reads whole partitions: big fetches, a deep queue.
            .set("queued.max.messages.kbytes", "65536")
            // Partitions are read one after another, and the fetch for the
            // next one waits behind the last one's outstanding long poll:
            // with the default 500 ms wait, each partition of a handover
            // cost half a second on Apache Kafka even when empty.
            .set("fetch.wait.max.ms", "5")
            .set("max.partition.fetch.bytes", "8388608")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest")
            // Aborted transactions never reach the state.
            .set("isolation.level", "read_committed")
            .create()
            .map_err(|source| HandoverError::Kafka {
                partition: first,
                source,
            })?;
        // Each partition is read up to a probe of our own, all sent at once:
        // once the probe is read, so is everything acknowledged before it. On
        // Apache Kafka the end offset would do; the probe also covers brokers
        // whose end offset trails acknowledged writes (tansu 0.6).
        let writer = engine.store().writer_id();
        let probe = vec![(
            changelog::PROBE_KEY.to_vec(),
            Entry {
                writer,
                seq: 0,
                value: None,
                prev: None,
            }
            .encode(),
        )];
        let probes: Vec<changelog::Batch> = partitions
            .iter()
            .map(|p| changelog::Batch {
                partition: *p,
                seq: 0,
                records: probe.clone(),
            })
            .collect();
        let ends = send_all(&self.producer, &self.changelog_topic, &probes).map_err(|source| {
            HandoverError::Kafka {
                partition: first,
                source,
            }
        })?;
        for (p, high) in ends {
            self.take_over(engine, &reader, p, high)?;
        }
        engine.set_owned(Some(partitions.clone()));
        if let Some(follower) = &self.follower {
            for &p in partitions {
                let _ = follower.send(FollowerControl::Hold(p));
            }
        }
        Ok(())
    }

    /// Keeps or restores one partition; `high` is the offset after our probe.
    fn take_over(
        &self,
        engine: &mut Engine,
        reader: &BaseConsumer,
        partition: u32,
        high: i64,
    ) -> Result<(), HandoverError> {
        let kafka = |source| HandoverError::Kafka { partition, source };
        let writer = engine.store().writer_id();
        let (low, _) = reader
            .fetch_watermarks(&self.changelog_topic, partition as i32, KAFKA_TIMEOUT)
            .map_err(kafka)?;
        if let Some(meta) = engine.store().partition_meta(partition)? {
            if meta.changelog_next >= low {
                let pending = engine.store().outbox(partition)?;
                let known = meta.changelog_next;
                let kept = match self.guarantee {
                    Guarantee::AtLeastOnce => {
                        if self.is_current(reader, writer, partition, known, high)? {
                            // The outbox was committed locally and may be
                            // missing from the changelog: send it again.
                            let acked = send(&self.producer, &self.changelog_topic, &pending)
                                .map_err(kafka)?;
                            engine.store().acknowledge(&acked, &[])?;
                            Some(pending.len())
                        } else {
                            None
                        }
                    }
                    // The outbox must not be sent again: its outputs were in
                    // the same transactions. Committed, it is acknowledged;
                    // aborted, the local state is ahead of Kafka: restore.
                    Guarantee::ExactlyOnce => {
                        match self
                            .committed_outbox(reader, writer, partition, known, high, &pending)?
                        {
                            Some(acked) => {
                                engine.store().acknowledge(&acked, &[])?;
                                Some(0)
                            }
                            None => None,
                        }
                    }
                };
                if let Some(resent) = kept {
                    metrics::partition_handover("kept");
                    info!(
                        partition,
                        resent, "kept local partition state (the changelog has nothing newer)"
                    );
                    return Ok(());
                }
            }
        }

        let started = Instant::now();
        let mut restorer = Restorer::default();
        let read_to = self.read(reader, partition, low, high, |key, value| {
            restorer.push(key, value)
        })?;
        let restored = restorer
            .finish()
            .map_err(|source| HandoverError::Changelog { partition, source })?;
        let mut meta = PartitionMeta {
            seq: restored.max_seq,
            changelog_next: read_to,
        };
        if !restored.repairs.is_empty() {
            // Rewrite what an unfinished batch left behind, so every later
            // restore sees the same state without relying on `prev`.
            meta.seq += 1;
            let repair = repair_batch(partition, meta.seq, writer, &restored, engine);
            let acked = send(&self.producer, &self.changelog_topic, &[repair]).map_err(kafka)?;
            if let Some((_, _, next)) = acked.first() {
                meta.changelog_next = meta.changelog_next.max(*next);
            }
            warn!(
                partition,
                keys = restored.repairs.len(),
                "rolled back a half-written changelog batch left by a crashed owner"
            );
        }
        let topics: Vec<&str> = self.input_topics.iter().map(String::as_str).collect();
        engine.install_partition(partition, &restored, meta, &topics)?;
        let seconds = started.elapsed().as_secs_f64();
        metrics::restore_finished(seconds);
        metrics::partition_handover("restored");
        info!(
            partition,
            users = restored.users.len(),
            records = restored.records,
            seconds,
            "restored partition state from the changelog"
        );
        Ok(())
    }

    /// Whether every changelog record from `known_end` to `high` was written by `writer`.
    fn is_current(
        &self,
        reader: &BaseConsumer,
        writer: u64,
        partition: u32,
        known_end: i64,
        high: i64,
    ) -> Result<bool, HandoverError> {
        Ok(self
            .own_markers(reader, writer, partition, known_end, high)?
            .is_some())
    }

    /// exactly_once: whether the local state is what Kafka committed. It is
    /// when every committed changelog record from `known_end` to `high` is
    /// this store's own and every batch of its outbox is among them (its
    /// transaction committed before the instance could acknowledge it).
    /// Returns the outbox batches' acknowledgements, or `None`: restore.
    fn committed_outbox(
        &self,
        reader: &BaseConsumer,
        writer: u64,
        partition: u32,
        known_end: i64,
        high: i64,
        pending: &[changelog::Batch],
    ) -> Result<Option<Acknowledged>, HandoverError> {
        let Some(committed) = self.own_markers(reader, writer, partition, known_end, high)? else {
            return Ok(None);
        };
        let mut acked = Vec::with_capacity(pending.len());
        for batch in pending {
            match committed.get(&batch.seq) {
                Some(next) => acked.push((partition, batch.seq, *next)),
                None => {
                    info!(
                        partition,
                        seq = batch.seq,
                        "a batch applied locally was not committed to Kafka (its transaction aborted)"
                    );
                    return Ok(None);
                }
            }
        }
        Ok(Some(acked))
    }

    /// Reads the changelog from `known_end` to `high`: `None` when another
    /// writer's record is there or the changelog ends before `known_end` (the
    /// local copy is stale), else this writer's markers there (seq -> the
    /// offset after the marker).
    fn own_markers(
        &self,
        reader: &BaseConsumer,
        writer: u64,
        partition: u32,
        known_end: i64,
        high: i64,
    ) -> Result<Option<std::collections::HashMap<u64, i64>>, HandoverError> {
        if high < known_end {
            // The changelog lost records this store saw acknowledged
            // (recreated topic?): trust the changelog, not the local copy.
            warn!(
                partition,
                known_end, high, "changelog ends before what this instance wrote"
            );
            return Ok(None);
        }
        let mut foreign = false;
        let mut markers = std::collections::HashMap::new();
        self.read_with_offsets(reader, partition, known_end, high, |offset, key, value| {
            match value.map(|v| Entry::decode(key, v)) {
                Some(Ok(e)) if e.writer == writer => {
                    if key == APPLIED_KEY {
                        markers.insert(e.seq, offset + 1);
                    }
                }
                _ => foreign = true,
            }
            Ok(())
        })?;
        Ok((!foreign).then_some(markers))
    }

    /// Reads a changelog partition from `from` up to `to` (exclusive; `to` is
    /// known to exist: our probe's offset + 1); returns the offset reached.
    fn read(
        &self,
        reader: &BaseConsumer,
        partition: u32,
        from: i64,
        to: i64,
        mut each: impl FnMut(&[u8], Option<&[u8]>) -> Result<(), ChangelogError>,
    ) -> Result<i64, HandoverError> {
        self.read_with_offsets(reader, partition, from, to, |_, key, value| {
            each(key, value)
        })
    }

    /// [`Handover::read`], telling `each` every record's offset too.
    fn read_with_offsets(
        &self,
        reader: &BaseConsumer,
        partition: u32,
        from: i64,
        to: i64,
        mut each: impl FnMut(i64, &[u8], Option<&[u8]>) -> Result<(), ChangelogError>,
    ) -> Result<i64, HandoverError> {
        let kafka = |source| HandoverError::Kafka { partition, source };
        if to <= from {
            return Ok(from.max(to));
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(
            &self.changelog_topic,
            partition as i32,
            Offset::Offset(from),
        )
        .map_err(kafka)?;
        reader.assign(&tpl).map_err(kafka)?;
        let mut next = from;
        let mut read = 0u64;
        let mut last_progress = Instant::now();
        while next < to {
            match reader.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    if m.offset() < to {
                        each(m.offset(), m.key().unwrap_or_default(), m.payload())
                            .map_err(|source| HandoverError::Changelog { partition, source })?;
                        read += 1;
                    }
                    next = m.offset() + 1;
                    last_progress = Instant::now();
                    if read % 10_000 == 0 {
                        metrics::restore_progress(10_000, to - next);
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(e))
                    if e.rdkafka_error_code() == Some(RDKafkaErrorCode::OperationTimedOut) => {}
                Some(Err(e)) => return Err(kafka(e)),
                None if last_progress.elapsed() > self.no_progress => {
                    return Err(kafka(KafkaError::Canceled));
                }
                None => {}
            }
        }
        metrics::restore_progress(read % 10_000, 0);
        reader.unassign().map_err(kafka)?;
        Ok(next)
    }
}

/// The records that put rolled-back keys back to their restored values, and a
/// marker that commits them.
fn repair_batch(
    partition: u32,
    seq: u64,
    writer: u64,
    restored: &changelog::Restored,
    engine: &Engine,
) -> changelog::Batch {
    let mut records: Vec<(Vec<u8>, Vec<u8>)> = restored
        .repairs
        .iter()
        .map(|(key, value)| {
            let entry = Entry {
                writer,
                seq,
                value: value.clone(),
                prev: value.clone(),
            };
            (key.encode(), entry.encode())
        })
        .collect();
    let marker = restored.marker.clone().unwrap_or_else(|| Marker {
        offsets: Vec::new(),
        genre_vocabulary: engine.catalog().genre_vocabulary(),
    });
    let entry = Entry {
        writer,
        seq,
        value: Some(postcard::to_stdvec(&marker).expect("markers encode")),
        prev: None,
    };
    debug_assert_eq!(Key::Applied.encode(), APPLIED_KEY);
    records.push((APPLIED_KEY.to_vec(), entry.encode()));
    changelog::Batch {
        partition,
        seq,
        records,
    }
}

/// Sends changelog batches from a plain thread and waits for the broker:
/// each batch's data records, then (once they are acknowledged) its marker.
/// Returns `(partition, seq, next changelog offset)` per batch.
pub fn send(
    producer: &FutureProducer,
    topic: &str,
    batches: &[changelog::Batch],
) -> Result<Vec<(u32, u64, i64)>, KafkaError> {
    let mut acked = Vec::with_capacity(batches.len());
    for batch in batches {
        let Some((marker, data)) = batch.records.split_last() else {
            continue;
        };
        produce_and_wait(producer, topic, batch.partition, data)?;
        let next = produce_and_wait(
            producer,
            topic,
            batch.partition,
            std::slice::from_ref(marker),
        )?;
        metrics::changelog_written(batch.records.len() as u64);
        acked.push((batch.partition, batch.seq, next));
    }
    Ok(acked)
}

/// Produces one record batch per partition, all at once, and waits;
/// returns `(partition, offset after its last record)`.
fn send_all(
    producer: &FutureProducer,
    topic: &str,
    batches: &[changelog::Batch],
) -> Result<Vec<(u32, i64)>, KafkaError> {
    let mut pending = Vec::with_capacity(batches.len());
    for batch in batches {
        pending.push((
            batch.partition,
            enqueue_sync(producer, topic, batch.partition, &batch.records)?,
        ));
    }
    pending
        .into_iter()
        .map(|(p, futures)| Ok((p, wait_sync(futures)?)))
        .collect()
}

/// Produces records to one partition and waits; returns the offset after the last.
fn produce_and_wait(
    producer: &FutureProducer,
    topic: &str,
    partition: u32,
    records: &[(Vec<u8>, Vec<u8>)],
) -> Result<i64, KafkaError> {
    wait_sync(enqueue_sync(producer, topic, partition, records)?)
}

/// Enqueues records from a plain thread, waiting while the queue is full.
fn enqueue_sync(
    producer: &FutureProducer,
    topic: &str,
    partition: u32,
    records: &[(Vec<u8>, Vec<u8>)],
) -> Result<Vec<rdkafka::producer::DeliveryFuture>, KafkaError> {
    let mut futures = Vec::with_capacity(records.len());
    for (key, value) in records {
        let mut record = FutureRecord::to(topic)
            .partition(partition as i32)
            .key(key)
            .payload(value);
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    futures.push(f);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }
    Ok(futures)
}

/// Waits for deliveries from a plain thread; returns the offset after the last.
fn wait_sync(futures: Vec<rdkafka::producer::DeliveryFuture>) -> Result<i64, KafkaError> {
    let mut next = 0;
    for delivery in futures::executor::block_on(join_all(futures)) {
        match delivery {
            Ok(Ok(d)) => next = next.max(d.offset + 1),
            Ok(Err((e, _))) => return Err(e),
            Err(_) => return Err(KafkaError::Canceled),
        }
    }
    Ok(next)
}
