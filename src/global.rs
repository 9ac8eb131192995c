//! Global item tables: every instance knows the item side of every input
//! partition, not only of the partitions it holds.
//!
//! User state is partitioned: a user's events, profile and lists live with one
//! instance. Item knowledge (popularity and trending overall and per genre,
//! co-watch neighbours) is learned from every user, so an instance holding a
//! third of the partitions would otherwise see a third of the crowd. The
//! engine already keeps item counters per input partition and writes every
//! change of them to the changelog topic, keyed by item within the partition
//! (`i`, `g`, `c` records; see [`crate::changelog`]). That topic is the
//! item-keyed stream of each partition's latest values: every instance follows
//! the partitions it does not hold like a Kafka Streams GlobalKTable (a held
//! partition's changelog is its own writes), keeps their item side in RocksDB
//! (beside its own, under the same per-partition keys) and sums all partitions
//! in partition order, so every instance computes the same popular lists and
//! co-watch sums as one instance holding everything.
//!
//! Values, not deltas: a record replaces the partition's copy of its key, so a
//! record read twice (a redelivered outbox after a crash, a restart of the
//! follower) changes nothing, and no change is ever counted twice. Records
//! are applied when a marker completes their batch or a later one: a batch
//! whose marker compaction removed is as complete as one whose marker is
//! read, and one whose writer died is rewritten by the next owner's repair
//! batch before the next marker (see [`Assembler::push`]). Under
//! `exactly_once` the follower reads `read_committed`, so aborted batches
//! are never seen.
//!
//! Staleness: followed batches are handed to the engine every
//! `global_items.flush_interval_ms`; the engine folds them in and re-sums its
//! tables then. [`Follower`] reports how far behind the changelog the handed
//! view is (`recstream_global_items_lag_seconds`).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::StreamExt;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tracing::warn;

use crate::changelog::{ChangelogError, Entry, Key};
use crate::metrics;

/// One complete changelog batch's item-side values, as raw store values
/// (`None`: the key no longer exists).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ItemBatch {
    pub partition: u32,
    pub seq: u64,
    pub items: Vec<(u32, Option<Vec<u8>>)>,
    pub genres: Vec<(String, Option<Vec<u8>>)>,
    /// `(item, slot, entry)` in the order read; no slot: the whole list
    /// (writers before the slots).
    pub cowatch: Vec<(u32, Option<u16>, Option<Vec<u8>>)>,
    /// The changelog offset after the batch's marker: where to resume.
    pub next_offset: i64,
}

impl ItemBatch {
    pub fn is_empty(&self) -> bool {
        self.items.is_empty() && self.genres.is_empty() && self.cowatch.is_empty()
    }
}

/// Gathers a changelog partition's records into complete batches.
///
/// A writer sends several batches' data before their markers (the publisher
/// sends a round's data, then each batch's marker once its data is
/// acknowledged), so records of consecutive batches interleave; markers come
/// in batch order.
#[derive(Debug, Default)]
pub struct Assembler {
    /// Per partition, the batches whose marker has not come yet, by seq.
    pending: HashMap<u32, BTreeMap<u64, ItemBatch>>,
}

impl Assembler {
    /// Drops a partition's unfinished batches (before reading it again).
    pub fn forget(&mut self, partition: u32) {
        self.pending.remove(&partition);
    }

    /// Adds the next record of `partition` (at `offset`); returns the batch
    /// it completes, if it is a marker. Markers come in batch order, so the
    /// batches still pending below a marker will never see theirs: either
    /// compaction removed it (the topic keeps one `m` record per partition,
    /// so a follower reading from the beginning finds most batches without
    /// their marker) or their writer died before completing them, and then
    /// the next owner's repair batch, at or below this marker, rewrites every
    /// key they touched. Either way their records are applied first, in
    /// batch order, as part of the completed batch.
    pub fn push(
        &mut self,
        partition: u32,
        offset: i64,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<Option<ItemBatch>, ChangelogError> {
        // Kafka tombstones: the engine never writes them.
        let Some(value) = value else { return Ok(None) };
        let key = Key::decode(key)?;
        if matches!(key, Key::Probe | Key::Published | Key::User(_)) {
            return Ok(None);
        }
        let entry = Entry::decode(&key.encode(), value)?;
        let pending = self.pending.entry(partition).or_default();
        if key == Key::Applied {
            let later = pending.split_off(&(entry.seq + 1));
            let mut done = ItemBatch {
                partition,
                seq: entry.seq,
                ..ItemBatch::default()
            };
            for (_, batch) in std::mem::replace(pending, later) {
                done.items.extend(batch.items);
                done.genres.extend(batch.genres);
                done.cowatch.extend(batch.cowatch);
            }
            done.next_offset = offset + 1;
            return Ok(Some(done));
        }
        let batch = pending.entry(entry.seq).or_insert_with(|| ItemBatch {
            partition,
            seq: entry.seq,
            ..ItemBatch::default()
        });
        match key {
            Key::Item(id) => batch.items.push((id, entry.value)),
            Key::Genre(g) => batch.genres.push((g, entry.value)),
            Key::CoWatch(id) => batch.cowatch.push((id, None, entry.value)),
            Key::CoWatchSlot(id, slot) => batch.cowatch.push((id, Some(slot), entry.value)),
            Key::Applied | Key::User(_) | Key::Probe | Key::Published => {
                unreachable!("handled above")
            }
        }
        Ok(None)
    }
}

/// What the follower hands the engine at each flush.
#[derive(Debug, Default)]
pub struct Followed {
    pub batches: Vec<ItemBatch>,
}

/// Reaching a partition's end is how the follower knows it is current, not
/// an error: librdkafka's default context would log each one as an error.
pub struct FollowerContext;

impl ClientContext for FollowerContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let end = matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        );
        if !end {
            warn!(%error, reason, "global item follower");
        }
    }
}

impl ConsumerContext for FollowerContext {}

/// What the pipeline tells the follower about the partitions this instance
/// holds. A held partition's changelog is this instance's own writes, whose
/// item side it already has: the follower stops fetching it (on real
/// sessions, where co-watch lists make up most of the changelog, reading
/// one's own batches back only to skip them cost ≈ a fifth of the engine's
/// CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowerControl {
    /// This instance holds the partition now: stop reading it.
    Hold(u32),
    /// This instance gave the partition up: read it again from this
    /// changelog offset (where its kept item side was known).
    Release { partition: u32, offset: i64 },
}

/// Follows every partition of the changelog topic from the positions the
/// store kept (the beginning for partitions never followed), but the ones
/// this instance holds.
pub struct Follower {
    pub consumer: StreamConsumer<FollowerContext>,
    pub topic: String,
    pub flush_interval: Duration,
}

impl Follower {
    /// Assigns every partition at its resume position.
    pub fn assign(&self, partitions: u32, positions: &HashMap<u32, i64>) -> Result<(), KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            let at = positions
                .get(&p)
                .map_or(Offset::Beginning, |o| Offset::Offset(*o));
            tpl.add_partition_offset(&self.topic, p as i32, at)?;
        }
        self.consumer.assign(&tpl)
    }

    fn one(&self, partition: u32) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, partition as i32);
        tpl
    }

    /// Reads until `updates` closes, handing complete batches over at each
    /// flush. Read errors are counted and logged, never fatal: the view
    /// only ages (and the lag gauge says so).
    ///
    /// `control` says which partitions this instance holds (paused: never
    /// fetched) and which it gave up (read again from the offset given).
    pub async fn run(
        self,
        updates: mpsc::Sender<Followed>,
        mut control: mpsc::UnboundedReceiver<FollowerControl>,
    ) {
        let mut held: std::collections::HashSet<u32> = std::collections::HashSet::new();
        let mut assembler = Assembler::default();
        let mut ready: Vec<ItemBatch> = Vec::new();
        let mut lag = Lag::new(wall_ms());
        let mut ticker = tokio::time::interval(self.flush_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stream = self.consumer.stream();
        loop {
            tokio::select! {
                message = stream.next() => match message {
                    Some(Ok(m)) => {
                        let partition = m.partition().max(0) as u32;
                        // Fetched before the pause took effect.
                        if held.contains(&partition) {
                            continue;
                        }
                        lag.reading(partition);
                        match assembler.push(partition, m.offset(), m.key().unwrap_or_default(), m.payload()) {
                            Ok(Some(batch)) => {
                                lag.complete(partition, m.timestamp().to_millis().unwrap_or_else(wall_ms));
                                ready.push(batch);
                            }
                            Ok(None) => {}
                            Err(e) => {
                                metrics::global_items_batch("undecodable");
                                warn!(%e, partition, offset = m.offset(), "changelog record the item follower cannot read; skipped");
                            }
                        }
                    }
                    Some(Err(KafkaError::PartitionEOF(p))) => lag.at_end(p.max(0) as u32),
                    Some(Err(e)) => {
                        metrics::kafka_error("consume");
                        warn!(%e, "global item follower error");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    None => return,
                },
                Some(order) = control.recv() => match order {
                    FollowerControl::Hold(partition) => {
                        if held.insert(partition) {
                            assembler.forget(partition);
                            lag.at_end(partition);
                            if let Err(e) = self.consumer.pause(&self.one(partition)) {
                                warn!(%e, partition, "global item follower could not pause a held partition; it reads its own batches and skips them");
                            }
                        }
                    }
                    FollowerControl::Release { partition, offset } => {
                        held.remove(&partition);
                        assembler.forget(partition);
                        lag.reading(partition);
                        // Asynchronous (no wait): the next fetch starts
                        // there. Seek, then resume, so that no fetch reads
                        // from where the pause left it.
                        if let Err(e) = self.consumer.seek(
                            &self.topic,
                            partition as i32,
                            Offset::Offset(offset),
                            Duration::ZERO,
                        ) {
                            warn!(%e, partition, offset, "global item follower could not read a released partition again; its item side stays as this instance left it");
                        }
                        if let Err(e) = self.consumer.resume(&self.one(partition)) {
                            warn!(%e, partition, "global item follower could not resume a released partition; its item side stays as this instance left it");
                        }
                    }
                },
                _ = ticker.tick() => {
                    metrics::global_items_lag(lag.seconds(wall_ms()));
                    let batches = std::mem::take(&mut ready);
                    if updates.send(Followed { batches }).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

fn wall_ms() -> i64 {
    crate::pipeline::wall_clock_ms()
}

/// How far behind the changelog the handed view is: per partition, zero once
/// it was read to its end with nothing new since, else the time since the
/// last complete batch read was produced (or since the follower started).
#[derive(Debug)]
struct Lag {
    started_ms: i64,
    /// Per partition: read to the end (and nothing newer read since), and
    /// the produce time of its last complete batch.
    partitions: HashMap<u32, (bool, Option<i64>)>,
}

impl Lag {
    fn new(now_ms: i64) -> Lag {
        Lag {
            started_ms: now_ms,
            partitions: HashMap::new(),
        }
    }

    fn reading(&mut self, partition: u32) {
        self.partitions.entry(partition).or_default().0 = false;
    }

    fn complete(&mut self, partition: u32, produced_ms: i64) {
        self.partitions.entry(partition).or_default().1 = Some(produced_ms);
    }

    fn at_end(&mut self, partition: u32) {
        self.partitions.entry(partition).or_default().0 = true;
    }

    fn seconds(&self, now_ms: i64) -> f64 {
        self.partitions
            .values()
            .filter(|(at_end, _)| !at_end)
            .map(|(_, produced)| now_ms - produced.unwrap_or(self.started_ms))
            .max()
            .unwrap_or(0)
            .max(0) as f64
            / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changelog::{Marker, APPLIED_KEY};

    fn entry(seq: u64, value: &[u8]) -> Vec<u8> {
        Entry {
            writer: 1,
            seq,
            value: Some(value.to_vec()),
            prev: None,
        }
        .encode()
    }

    fn marker(seq: u64) -> Vec<u8> {
        let m = postcard::to_stdvec(&Marker::default()).unwrap();
        entry(seq, &m)
    }

    #[test]
    fn a_batch_is_handed_over_when_its_marker_arrives() {
        let mut a = Assembler::default();
        let item = Key::Item(7).encode();
        let user = Key::User("u".into()).encode();
        let genre = Key::Genre("Drama".into()).encode();
        let cowatch = Key::CoWatch(7).encode();
        let slot = Key::CoWatchSlot(7, 3).encode();
        assert_eq!(a.push(0, 10, &user, Some(&entry(1, b"u"))).unwrap(), None);
        assert_eq!(a.push(0, 11, &item, Some(&entry(1, b"i"))).unwrap(), None);
        assert_eq!(a.push(0, 12, &genre, Some(&entry(1, b"g"))).unwrap(), None);
        assert_eq!(
            a.push(0, 13, &cowatch, Some(&entry(1, b"c"))).unwrap(),
            None
        );
        assert_eq!(a.push(0, 14, &slot, Some(&entry(1, b"s"))).unwrap(), None);
        let batch = a.push(0, 15, APPLIED_KEY, Some(&marker(1))).unwrap();
        assert_eq!(
            batch,
            Some(ItemBatch {
                partition: 0,
                seq: 1,
                items: vec![(7, Some(b"i".to_vec()))],
                genres: vec![("Drama".into(), Some(b"g".to_vec()))],
                cowatch: vec![
                    (7, None, Some(b"c".to_vec())),
                    (7, Some(3), Some(b"s".to_vec()))
                ],
                next_offset: 16,
            })
        );
    }

    #[test]
    fn batches_without_their_marker_are_applied_before_the_next_marker() {
        let mut a = Assembler::default();
        let item = Key::Item(7).encode();
        let other = Key::Item(8).encode();
        // Compaction kept batch 2's records but not its marker; batch 3 follows.
        a.push(1, 0, &item, Some(&entry(2, b"two"))).unwrap();
        a.push(1, 1, &other, Some(&entry(2, b"kept"))).unwrap();
        a.push(1, 2, &item, Some(&entry(3, b"three"))).unwrap();
        let batch = a
            .push(1, 3, APPLIED_KEY, Some(&marker(3)))
            .unwrap()
            .unwrap();
        assert_eq!(
            batch.items,
            vec![
                (7, Some(b"two".to_vec())),
                (8, Some(b"kept".to_vec())),
                (7, Some(b"three".to_vec()))
            ],
            "in batch order: the later value wins"
        );
        assert_eq!((batch.seq, batch.next_offset), (3, 4));
        // Batch 4's writer died mid-batch; the next owner's repair batch 5
        // puts back what batch 4 changed, and a batch sent ahead of its
        // marker (6) stays pending.
        a.push(1, 4, &item, Some(&entry(4, b"lost"))).unwrap();
        a.push(1, 5, &item, Some(&entry(5, b"three"))).unwrap();
        a.push(1, 6, &other, Some(&entry(6, b"six"))).unwrap();
        let batch = a
            .push(1, 7, APPLIED_KEY, Some(&marker(5)))
            .unwrap()
            .unwrap();
        assert_eq!(batch.seq, 5);
        assert_eq!(batch.items.last(), Some(&(7, Some(b"three".to_vec()))));
        let batch = a
            .push(1, 8, APPLIED_KEY, Some(&marker(6)))
            .unwrap()
            .unwrap();
        assert_eq!(batch.items, vec![(8, Some(b"six".to_vec()))]);
    }

    #[test]
    fn interleaved_batches_of_one_writer_are_both_applied() {
        let mut a = Assembler::default();
        let (one, two) = (Key::Item(1).encode(), Key::Item(2).encode());
        // Two batches' data, then their markers in order.
        a.push(0, 0, &one, Some(&entry(4, b"a"))).unwrap();
        a.push(0, 1, &two, Some(&entry(5, b"b"))).unwrap();
        a.push(0, 2, &one, Some(&entry(5, b"c"))).unwrap();
        let four = a
            .push(0, 3, APPLIED_KEY, Some(&marker(4)))
            .unwrap()
            .unwrap();
        let five = a
            .push(0, 4, APPLIED_KEY, Some(&marker(5)))
            .unwrap()
            .unwrap();
        assert_eq!(four.items, vec![(1, Some(b"a".to_vec()))]);
        assert_eq!(
            five.items,
            vec![(2, Some(b"b".to_vec())), (1, Some(b"c".to_vec()))]
        );
        assert_eq!((four.next_offset, five.next_offset), (4, 5));
    }

    #[test]
    fn partitions_are_assembled_apart() {
        let mut a = Assembler::default();
        let item = Key::Item(1).encode();
        a.push(0, 0, &item, Some(&entry(5, b"p0"))).unwrap();
        a.push(1, 0, &item, Some(&entry(9, b"p1"))).unwrap();
        let p0 = a
            .push(0, 1, APPLIED_KEY, Some(&marker(5)))
            .unwrap()
            .unwrap();
        let p1 = a
            .push(1, 1, APPLIED_KEY, Some(&marker(9)))
            .unwrap()
            .unwrap();
        assert_eq!(p0.items, vec![(1, Some(b"p0".to_vec()))]);
        assert_eq!(p1.items, vec![(1, Some(b"p1".to_vec()))]);
    }

    #[test]
    fn probes_tombstones_and_garbage_do_not_stop_it() {
        let mut a = Assembler::default();
        assert_eq!(
            a.push(0, 0, crate::changelog::PROBE_KEY, Some(&entry(0, b"")))
                .unwrap(),
            None
        );
        assert_eq!(a.push(0, 1, &Key::Item(1).encode(), None).unwrap(), None);
        assert!(a.push(0, 2, b"?", Some(b"x")).is_err());
        assert!(a.push(0, 3, &Key::Item(1).encode(), Some(b"\xff")).is_err());
        let item = Key::Item(1).encode();
        a.push(0, 4, &item, Some(&entry(1, b"v"))).unwrap();
        assert!(a
            .push(0, 5, APPLIED_KEY, Some(&marker(1)))
            .unwrap()
            .is_some());
    }

    #[test]
    fn the_lag_is_zero_at_the_end_and_grows_behind_it() {
        let mut lag = Lag::new(1_000);
        assert_eq!(lag.seconds(1_000), 0.0);
        lag.reading(0);
        assert_eq!(lag.seconds(3_000), 2.0, "nothing complete yet: since start");
        lag.complete(0, 2_500);
        assert_eq!(lag.seconds(3_000), 0.5);
        lag.at_end(0);
        assert_eq!(lag.seconds(9_000), 0.0, "caught up stays fresh while idle");
    }
}
