//! Embedded RocksDB state. Column families:
//! - `users`: `partition (u32 BE) ++ user_id` → [`UserState`]; partitioned like the input
//!   so a partition's state can be iterated, restored or dropped as a unit.
//! - `items`: `partition (u32 BE) ++ movie_id (u32 BE)` → [`Momentum`] of that
//!   partition's events: popularity moves with its partition.
//! - `genres`: `partition (u32 BE) ++ genre name` → [`Momentum`]
//! - `offsets`: `topic \0 partition (u32 BE)` → next offset to apply (i64 BE),
//!   written in the same batch as the state changes it caused.
//! - `published`: same key → next offset whose outputs the broker has not yet
//!   acknowledged. Records between it and `offsets` are recomputed and
//!   republished after a restart, never applied twice.
//!
//! - `meta`: the genre vocabulary that user state's genre ids refer to, this
//!   store's writer id, the layout version and where the global item
//!   follower resumes each changelog partition.
//! - `partitions`: `partition (u32 BE)` → [`PartitionMeta`]: present exactly for
//!   the partitions whose state this store holds.
//! - `outbox`: `partition ++ seq (u64 BE)` → changelog records committed with
//!   the state but not yet acknowledged by the broker (when the changelog is on).
//!
//! Values are postcard-encoded (compact varints).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use rocksdb::{BlockBasedOptions, Cache, ColumnFamilyDescriptor, Options, WriteBatch, DB};

use crate::catalog::IdMap;
use crate::changelog::{self, Entry, Key, Marker, APPLIED_KEY};
use crate::cowatch::{Neighbor, Neighbors, SlotChange};
use crate::decay::Momentum;
use crate::state::UserState;

const CF_USERS: &str = "users";
const CF_ITEMS: &str = "items";
const CF_GENRES: &str = "genres";
const CF_OFFSETS: &str = "offsets";
const CF_PUBLISHED: &str = "published";
const CF_META: &str = "meta";
const CF_PARTITIONS: &str = "partitions";
const CF_OUTBOX: &str = "outbox";
const CF_COWATCH: &str = "cowatch";
const ALL_CFS: [&str; 9] = [
    CF_USERS,
    CF_ITEMS,
    CF_GENRES,
    CF_OFFSETS,
    CF_PUBLISHED,
    CF_META,
    CF_PARTITIONS,
    CF_OUTBOX,
    CF_COWATCH,
];
const GENRE_VOCABULARY: &[u8] = b"genre_vocabulary";
const WRITER_ID: &[u8] = b"writer_id";
const LAYOUT: &[u8] = b"layout";
/// `follow` ++ partition (u32 BE) → the next changelog offset the global
/// item follower reads (i64 BE).
const FOLLOW_PREFIX: &[u8] = b"follow";
const MEMTABLE_BUDGET: usize = 64 * 1024 * 1024;
/// Bumped when keys change meaning. Layout 2 kept each co-watch list whole
/// under (partition, item); 3 keeps one entry per (partition, item, slot),
/// and [`Store::open`] migrates a layout-2 directory in place. Older ones
/// are refused.
const LAYOUT_VERSION: u32 = 3;
const LAYOUT_WHOLE_COWATCH_LISTS: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("corrupt value under {what}: {source}")]
    Codec {
        what: &'static str,
        source: postcard::Error,
    },
    #[error("{path}: state directory of an older recstream layout; delete it (a partition's state is restored from the changelog topic)")]
    OldLayout { path: String },
}

/// A changed key: its partition, store key, changelog key and new value.
type ChangedRow = (u32, Vec<u8>, Key, Vec<u8>);

pub struct Store {
    db: DB,
    statistics: Options,
    /// Random per state directory; stamped on every changelog record.
    writer: u64,
    /// Whether commits also write changelog records to the outbox.
    changelog: bool,
    /// Serialises read-modify-writes of `partitions` metadata: the engine
    /// thread commits batch N+1 while the publisher acknowledges batch N.
    meta_lock: std::sync::Mutex<()>,
}

/// What the store knows about a partition whose state it holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartitionMeta {
    /// The last changelog batch committed for it.
    pub seq: u64,
    /// Changelog offset up to which every record is known (ours, acknowledged,
    /// or read in a restore). Records past it written by another store mean
    /// this store's copy is stale.
    pub changelog_next: i64,
}

/// All changes of one micro-batch, written atomically.
#[derive(Debug, Default)]
pub struct Changes {
    pub users: Vec<(u32, String, UserState)>,
    /// `(partition, movie id, counters)`.
    pub items: Vec<(u32, u32, Momentum)>,
    /// `(partition, genre, counters)`.
    pub genres: Vec<(u32, String, Momentum)>,
    /// The co-watch slots that changed.
    pub cowatch: Vec<SlotChange>,
    /// `(topic, partition, next offset)`.
    pub offsets: Vec<(String, i32, i64)>,
}

/// Item-side values read from other instances' changelog batches
/// (`None`: the key no longer exists) and where their partitions resume.
#[derive(Debug, Default)]
pub struct Followed {
    pub items: Vec<(u32, u32, Option<Vec<u8>>)>,
    pub genres: Vec<(u32, String, Option<Vec<u8>>)>,
    /// `(partition, item, write)`, in the order they were read.
    pub cowatch: Vec<(u32, u32, CoWatchWrite)>,
    /// `(partition, next changelog offset)`.
    pub positions: Vec<(u32, i64)>,
}

/// A followed change of one partition's co-watch list of an item.
#[derive(Debug, Clone, PartialEq)]
pub enum CoWatchWrite {
    /// The whole list (writers before the slots; `None`: no list).
    List(Option<Neighbors>),
    /// One slot: see [`Neighbors::set_slot`].
    Slot(u16, Option<Neighbor>),
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StoreStats {
    pub live_bytes: u64,
    pub sst_bytes: u64,
    pub memtable_bytes: u64,
    pub block_cache_hits: u64,
    pub block_cache_misses: u64,
}

pub fn user_key(partition: u32, user_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + user_id.len());
    k.extend_from_slice(&partition.to_be_bytes());
    k.extend_from_slice(user_id.as_bytes());
    k
}

fn partition_prefixed(partition: u32, rest: &[u8]) -> Vec<u8> {
    [&partition.to_be_bytes()[..], rest].concat()
}

/// A co-watch entry's key: partition, item and slot, big-endian.
fn slot_key(partition: u32, item: u32, slot: u16) -> Vec<u8> {
    [
        &partition.to_be_bytes()[..],
        &item.to_be_bytes(),
        &slot.to_be_bytes(),
    ]
    .concat()
}

/// The key range of an item's slots from `slot` on.
fn slots_from(partition: u32, item: u32, slot: u16) -> (Vec<u8>, Vec<u8>) {
    let mut to = slot_key(partition, item, u16::MAX);
    to.push(0xff);
    (slot_key(partition, item, slot), to)
}

/// Writes a whole list's entries under their slots.
fn put_slots(
    batch: &mut WriteBatch,
    cf: &rocksdb::ColumnFamily,
    partition: u32,
    item: u32,
    list: &Neighbors,
) {
    for (slot, n) in list.entries.iter().enumerate() {
        batch.put_cf(cf, slot_key(partition, item, slot as u16), encode(n));
    }
}

/// `(partition, movie id)` of a per-item key.
fn item_key_parts(key: &[u8]) -> Option<(u32, u32)> {
    let k: &[u8; 8] = key.try_into().ok()?;
    Some((
        u32::from_be_bytes([k[0], k[1], k[2], k[3]]),
        u32::from_be_bytes([k[4], k[5], k[6], k[7]]),
    ))
}

fn slot_key_parts(key: &[u8]) -> Option<(u32, u32, u16)> {
    let k: &[u8; 10] = key.try_into().ok()?;
    Some((
        u32::from_be_bytes([k[0], k[1], k[2], k[3]]),
        u32::from_be_bytes([k[4], k[5], k[6], k[7]]),
        u16::from_be_bytes([k[8], k[9]]),
    ))
}

/// Layout 2 → 3: every whole co-watch list (key: partition, item) becomes
/// one key per entry (partition, item, slot). Lists are converted a few
/// thousand at a time, each chunk atomically (a list is whole or split,
/// never half), and the layout is marked last: an interrupted migration
/// resumes at the next open with the lists still whole.
fn split_cowatch_lists(db: &DB) -> Result<(), StoreError> {
    const LISTS_PER_WRITE: usize = 4096;
    let cf = db.cf_handle(CF_COWATCH).expect("created at open");
    let mut lists = 0;
    // Keys sort by (partition, item): each chunk starts after the last list
    // the previous one converted.
    let mut after: Vec<u8> = Vec::new();
    loop {
        let mut batch = WriteBatch::default();
        let mut in_batch = 0;
        let start = after.clone();
        let from = rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward);
        for kv in db.iterator_cf(cf, from) {
            let (k, v) = kv?;
            let Some((partition, item)) = item_key_parts(&k) else {
                continue;
            };
            if k[..] == start[..] {
                continue;
            }
            after = k.to_vec();
            batch.delete_cf(cf, &k);
            put_slots(&mut batch, cf, partition, item, &decode(&v, CF_COWATCH)?);
            in_batch += 1;
            if in_batch == LISTS_PER_WRITE {
                break;
            }
        }
        if in_batch == 0 {
            break;
        }
        db.write(batch)?;
        lists += in_batch;
    }
    let meta = db.cf_handle(CF_META).expect("created at open");
    db.put_cf(meta, LAYOUT, LAYOUT_VERSION.to_be_bytes())?;
    tracing::info!(
        lists,
        "state directory migrated: co-watch lists stored per entry"
    );
    Ok(())
}

fn outbox_key(partition: u32, seq: u64) -> Vec<u8> {
    partition_prefixed(partition, &seq.to_be_bytes())
}

fn follow_key(partition: u32) -> Vec<u8> {
    [FOLLOW_PREFIX, &partition.to_be_bytes()[..]].concat()
}

fn offset_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut k = topic.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&(partition as u32).to_be_bytes());
    k
}

impl Store {
    pub fn open(path: &Path, block_cache_mb: usize) -> Result<Store, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.enable_statistics();
        opts.set_max_background_jobs(2);
        // All column families' memtables together stay under this; without it
        // each of the 8 could hold 2 x 64 MiB under a write flood.
        opts.set_db_write_buffer_size(MEMTABLE_BUDGET);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let cache = Cache::new_lru_cache(block_cache_mb * 1024 * 1024);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_bloom_filter(10.0, false);
        let mut cf_opts = Options::default();
        cf_opts.set_block_based_table_factory(&table);
        cf_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let cfs = ALL_CFS.map(|name| ColumnFamilyDescriptor::new(name, cf_opts.clone()));
        let db = DB::open_cf_descriptors(&opts, path, cfs)?;
        let meta = db.cf_handle(CF_META).expect("created at open");
        match db.get_cf(meta, LAYOUT)? {
            Some(v) if v.as_slice() == LAYOUT_VERSION.to_be_bytes() => {}
            Some(v) if v.as_slice() == LAYOUT_WHOLE_COWATCH_LISTS.to_be_bytes() => {
                split_cowatch_lists(&db)?;
            }
            Some(_) => {
                return Err(StoreError::OldLayout {
                    path: path.display().to_string(),
                })
            }
            None => {
                let users = db.cf_handle(CF_USERS).expect("created at open");
                let empty = db
                    .iterator_cf(users, rocksdb::IteratorMode::Start)
                    .next()
                    .is_none()
                    && db.get_cf(meta, GENRE_VOCABULARY)?.is_none();
                if !empty {
                    return Err(StoreError::OldLayout {
                        path: path.display().to_string(),
                    });
                }
                db.put_cf(meta, LAYOUT, LAYOUT_VERSION.to_be_bytes())?;
            }
        }
        let writer = match db.get_cf(meta, WRITER_ID)? {
            Some(v) if v.len() == 8 => {
                u64::from_be_bytes(v.as_slice().try_into().expect("8 bytes"))
            }
            _ => {
                let id = new_writer_id(path);
                db.put_cf(meta, WRITER_ID, id.to_be_bytes())?;
                id
            }
        };
        Ok(Store {
            db,
            statistics: opts,
            writer,
            changelog: false,
            meta_lock: std::sync::Mutex::new(()),
        })
    }

    /// From now on, every commit also writes its changelog records to the
    /// outbox (the Kafka pipeline publishes and then clears them).
    pub fn enable_changelog(&mut self) {
        self.changelog = true;
    }

    pub fn writer_id(&self) -> u64 {
        self.writer
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created at open")
    }

    pub fn user(&self, partition: u32, user_id: &str) -> Result<Option<UserState>, StoreError> {
        self.db
            .get_pinned_cf(self.cf(CF_USERS), user_key(partition, user_id))?
            .map(|v| decode(&v, "users"))
            .transpose()
    }

    /// Users of one partition, in key order, starting after `after` (for paging).
    pub fn users_page(
        &self,
        partition: u32,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, UserState)>, StoreError> {
        let prefix = partition.to_be_bytes();
        let start = match after {
            Some(u) => {
                let mut k = user_key(partition, u);
                k.push(0);
                k
            }
            None => prefix.to_vec(),
        };
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(
            self.cf(CF_USERS),
            rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward),
        );
        for kv in iter {
            let (k, v) = kv?;
            if !k.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            let user = String::from_utf8_lossy(&k[4..]).into_owned();
            out.push((user, decode(&v, "users")?));
        }
        Ok(out)
    }

    /// Partitions that hold user state.
    pub fn user_partitions(&self) -> Result<Vec<u32>, StoreError> {
        let mut parts = Vec::new();
        let mut from = vec![0u8; 4];
        loop {
            let mut iter = self.db.iterator_cf(
                self.cf(CF_USERS),
                rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward),
            );
            match iter.next() {
                Some(kv) => {
                    let (k, _) = kv?;
                    let p = u32::from_be_bytes([k[0], k[1], k[2], k[3]]);
                    parts.push(p);
                    match p.checked_add(1) {
                        Some(next) => from = next.to_be_bytes().to_vec(),
                        None => break,
                    }
                }
                None => break,
            }
        }
        Ok(parts)
    }

    /// Item counters per partition.
    pub fn items(&self) -> Result<HashMap<u32, IdMap<Momentum>>, StoreError> {
        self.per_item(CF_ITEMS)
    }

    /// Co-watch neighbours per partition.
    pub fn cowatch(&self) -> Result<HashMap<u32, IdMap<Neighbors>>, StoreError> {
        let mut out: HashMap<u32, IdMap<Neighbors>> = HashMap::new();
        // Keys sort by (partition, item, slot): each list's entries in slot order.
        for kv in self
            .db
            .iterator_cf(self.cf(CF_COWATCH), rocksdb::IteratorMode::Start)
        {
            let (k, v) = kv?;
            if let Some((partition, item, slot)) = slot_key_parts(&k) {
                let list = out.entry(partition).or_default().entry(item).or_default();
                list.set_slot(slot as usize, Some(decode(&v, CF_COWATCH)?));
            }
        }
        Ok(out)
    }

    /// Values keyed by (partition, movie id).
    fn per_item<T: serde::de::DeserializeOwned>(
        &self,
        cf: &'static str,
    ) -> Result<HashMap<u32, IdMap<T>>, StoreError> {
        let mut out: HashMap<u32, IdMap<T>> = HashMap::new();
        for kv in self
            .db
            .iterator_cf(self.cf(cf), rocksdb::IteratorMode::Start)
        {
            let (k, v) = kv?;
            if let Some((partition, id)) = item_key_parts(&k) {
                out.entry(partition)
                    .or_default()
                    .insert(id, decode(&v, cf)?);
            }
        }
        Ok(out)
    }

    /// Genre counters per partition.
    pub fn genres(&self) -> Result<HashMap<u32, HashMap<String, Momentum>>, StoreError> {
        let mut out: HashMap<u32, HashMap<String, Momentum>> = HashMap::new();
        for kv in self
            .db
            .iterator_cf(self.cf(CF_GENRES), rocksdb::IteratorMode::Start)
        {
            let (k, v) = kv?;
            if k.len() > 4 {
                let partition = u32::from_be_bytes([k[0], k[1], k[2], k[3]]);
                out.entry(partition).or_default().insert(
                    String::from_utf8_lossy(&k[4..]).into_owned(),
                    decode(&v, "genres")?,
                );
            }
        }
        Ok(out)
    }

    /// The partitions whose state this store holds, with what it knows of them.
    pub fn partitions(&self) -> Result<Vec<(u32, PartitionMeta)>, StoreError> {
        let mut out = Vec::new();
        for kv in self
            .db
            .iterator_cf(self.cf(CF_PARTITIONS), rocksdb::IteratorMode::Start)
        {
            let (k, v) = kv?;
            if let Ok(p) = <[u8; 4]>::try_from(&k[..]) {
                out.push((u32::from_be_bytes(p), decode(&v, "partitions")?));
            }
        }
        Ok(out)
    }

    pub fn partition_meta(&self, partition: u32) -> Result<Option<PartitionMeta>, StoreError> {
        self.db
            .get_pinned_cf(self.cf(CF_PARTITIONS), partition.to_be_bytes())?
            .map(|v| decode(&v, "partitions"))
            .transpose()
    }

    /// Changelog batches of a partition committed but not yet acknowledged, oldest first.
    pub fn outbox(&self, partition: u32) -> Result<Vec<changelog::Batch>, StoreError> {
        let prefix = partition.to_be_bytes();
        let mut out = Vec::new();
        for kv in self.db.iterator_cf(
            self.cf(CF_OUTBOX),
            rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward),
        ) {
            let (k, v) = kv?;
            if !k.starts_with(&prefix) || k.len() != 12 {
                break;
            }
            let seq = u64::from_be_bytes(k[4..].try_into().expect("8 bytes"));
            out.push(changelog::Batch {
                partition,
                seq,
                records: decode(&v, "outbox")?,
            });
        }
        Ok(out)
    }

    /// After the broker acknowledged changelog batches and a batch's outputs:
    /// clears them from the outbox, moves each partition's known changelog end
    /// and the published offsets, in one write.
    pub fn acknowledge(
        &self,
        changelog: &[(u32, u64, i64)],
        published: &[(String, i32, i64)],
    ) -> Result<(), StoreError> {
        let _meta = self.meta_lock.lock().expect("not poisoned");
        let mut batch = WriteBatch::default();
        let mut ends: HashMap<u32, i64> = HashMap::new();
        for (partition, seq, next) in changelog {
            batch.delete_cf(self.cf(CF_OUTBOX), outbox_key(*partition, *seq));
            let end = ends.entry(*partition).or_insert(*next);
            *end = (*end).max(*next);
        }
        for (partition, next) in ends {
            if let Some(mut meta) = self.partition_meta(partition)? {
                meta.changelog_next = meta.changelog_next.max(next);
                batch.put_cf(
                    self.cf(CF_PARTITIONS),
                    partition.to_be_bytes(),
                    encode(&meta),
                );
            }
        }
        let cf = self.cf(CF_PUBLISHED);
        for (topic, partition, offset) in published {
            batch.put_cf(cf, offset_key(topic, *partition), offset.to_be_bytes());
        }
        self.db.write(batch)?;
        Ok(())
    }

    /// Forgets everything about a partition (it moved to another instance).
    pub fn drop_partition(&self, partition: u32, input_topics: &[&str]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        self.drop_into(&mut batch, partition, input_topics);
        self.db.write(batch)?;
        Ok(())
    }

    fn drop_into(&self, batch: &mut WriteBatch, partition: u32, input_topics: &[&str]) {
        let all = [CF_USERS, CF_ITEMS, CF_GENRES, CF_OUTBOX, CF_COWATCH];
        self.drop_cfs_into(batch, partition, input_topics, &all);
    }

    /// Deletes partition `p`'s keys of `cfs`, its metadata and its offsets.
    fn drop_cfs_into(
        &self,
        batch: &mut WriteBatch,
        partition: u32,
        input_topics: &[&str],
        cfs: &[&str],
    ) {
        // Every key of partition p starts with its 4 big-endian bytes, so it
        // sorts below the next partition's prefix.
        let to = match partition.checked_add(1) {
            Some(next) => next.to_be_bytes().to_vec(),
            None => vec![0xff; 5],
        };
        for &cf in cfs {
            batch.delete_range_cf(self.cf(cf), &partition.to_be_bytes()[..], &to[..]);
        }
        batch.delete_cf(self.cf(CF_PARTITIONS), partition.to_be_bytes());
        for topic in input_topics {
            batch.delete_cf(self.cf(CF_OFFSETS), offset_key(topic, partition as i32));
            batch.delete_cf(self.cf(CF_PUBLISHED), offset_key(topic, partition as i32));
        }
    }

    /// Forgets a partition's users, outbox and offsets but keeps its item
    /// side (counters, co-watch lists): the global item tables go on
    /// following it from the changelog.
    pub fn drop_user_side(&self, partition: u32, input_topics: &[&str]) -> Result<(), StoreError> {
        let _meta = self.meta_lock.lock().expect("not poisoned");
        let mut batch = WriteBatch::default();
        self.drop_cfs_into(&mut batch, partition, input_topics, &[CF_USERS, CF_OUTBOX]);
        self.db.write(batch)?;
        Ok(())
    }

    /// Writes item-side values followed from other instances' changelog
    /// batches, with the changelog positions to resume from, atomically.
    pub fn apply_followed(&self, followed: &Followed) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        let mut put = |cf: &str, partition: u32, key: &[u8], value: &Option<Vec<u8>>| {
            let k = partition_prefixed(partition, key);
            match value {
                Some(v) => batch.put_cf(self.cf(cf), k, v),
                None => batch.delete_cf(self.cf(cf), k),
            }
        };
        for (p, id, v) in &followed.items {
            put(CF_ITEMS, *p, &id.to_be_bytes(), v);
        }
        for (p, genre, v) in &followed.genres {
            put(CF_GENRES, *p, genre.as_bytes(), v);
        }
        let cowatch = self.cf(CF_COWATCH);
        for (p, id, write) in &followed.cowatch {
            match write {
                CoWatchWrite::List(list) => {
                    let (from, to) = slots_from(*p, *id, 0);
                    batch.delete_range_cf(cowatch, from, to);
                    if let Some(list) = list {
                        put_slots(&mut batch, cowatch, *p, *id, list);
                    }
                }
                CoWatchWrite::Slot(slot, Some(n)) => {
                    batch.put_cf(cowatch, slot_key(*p, *id, *slot), encode(n))
                }
                // The slot and every one after it.
                CoWatchWrite::Slot(slot, None) => {
                    let (from, to) = slots_from(*p, *id, *slot);
                    batch.delete_range_cf(cowatch, from, to);
                }
            }
        }
        for (p, next) in &followed.positions {
            batch.put_cf(self.cf(CF_META), follow_key(*p), next.to_be_bytes());
        }
        self.db.write(batch)?;
        Ok(())
    }

    /// Where the global item follower resumes each changelog partition.
    pub fn follow_positions(&self) -> Result<HashMap<u32, i64>, StoreError> {
        let mut out = HashMap::new();
        for kv in self.db.iterator_cf(
            self.cf(CF_META),
            rocksdb::IteratorMode::From(FOLLOW_PREFIX, rocksdb::Direction::Forward),
        ) {
            let (k, v) = kv?;
            let Some(rest) = k.strip_prefix(FOLLOW_PREFIX) else {
                break;
            };
            if let (Ok(p), Ok(o)) = (<[u8; 4]>::try_from(rest), <[u8; 8]>::try_from(&v[..])) {
                out.insert(u32::from_be_bytes(p), i64::from_be_bytes(o));
            }
        }
        Ok(out)
    }

    /// Replaces a partition's state with one restored from the changelog, atomically.
    pub fn install(
        &self,
        partition: u32,
        restored: &changelog::Restored,
        meta: PartitionMeta,
        input_topics: &[&str],
    ) -> Result<(), StoreError> {
        let _meta = self.meta_lock.lock().expect("not poisoned");
        let mut batch = WriteBatch::default();
        self.drop_into(&mut batch, partition, input_topics);
        for (user, v) in &restored.users {
            batch.put_cf(self.cf(CF_USERS), user_key(partition, user), v);
        }
        for (id, v) in &restored.items {
            batch.put_cf(
                self.cf(CF_ITEMS),
                partition_prefixed(partition, &id.to_be_bytes()),
                v,
            );
        }
        for (id, list) in &restored.cowatch {
            put_slots(&mut batch, self.cf(CF_COWATCH), partition, *id, list);
        }
        for (genre, v) in &restored.genres {
            batch.put_cf(
                self.cf(CF_GENRES),
                partition_prefixed(partition, genre.as_bytes()),
                v,
            );
        }
        if let Some(marker) = &restored.marker {
            for (topic, next) in &marker.offsets {
                batch.put_cf(
                    self.cf(CF_OFFSETS),
                    offset_key(topic, partition as i32),
                    next.to_be_bytes(),
                );
            }
        }
        for (topic, next) in &restored.published {
            batch.put_cf(
                self.cf(CF_PUBLISHED),
                offset_key(topic, partition as i32),
                next.to_be_bytes(),
            );
        }
        batch.put_cf(
            self.cf(CF_PARTITIONS),
            partition.to_be_bytes(),
            encode(&meta),
        );
        self.db.write(batch)?;
        Ok(())
    }

    /// Moves a partition's known changelog end (after a check found nothing new).
    pub fn set_partition_meta(
        &self,
        partition: u32,
        meta: PartitionMeta,
    ) -> Result<(), StoreError> {
        let _meta = self.meta_lock.lock().expect("not poisoned");
        self.db.put_cf(
            self.cf(CF_PARTITIONS),
            partition.to_be_bytes(),
            encode(&meta),
        )?;
        Ok(())
    }

    /// The next offset to apply for a partition, if this store has processed it.
    pub fn offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, StoreError> {
        self.read_offset(CF_OFFSETS, topic, partition)
    }

    /// Genre names in id order, as user state was written with them.
    pub fn genre_vocabulary(&self) -> Result<Option<Vec<String>>, StoreError> {
        self.db
            .get_pinned_cf(self.cf(CF_META), GENRE_VOCABULARY)?
            .map(|v| decode(&v, "meta"))
            .transpose()
    }

    pub fn set_genre_vocabulary(&self, names: &[String]) -> Result<(), StoreError> {
        self.db
            .put_cf(self.cf(CF_META), GENRE_VOCABULARY, encode(&names))?;
        Ok(())
    }

    /// The first offset whose outputs were not yet acknowledged by the broker.
    pub fn published_offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, StoreError> {
        self.read_offset(CF_PUBLISHED, topic, partition)
    }

    /// Records that outputs of everything before these offsets were acknowledged.
    pub fn mark_published(&self, offsets: &[(String, i32, i64)]) -> Result<(), StoreError> {
        self.acknowledge(&[], offsets)
    }

    /// Where consumption of a partition resumes: the first record whose outputs
    /// may be unpublished. `None` when this store never processed the partition.
    pub fn resume_offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, StoreError> {
        match (
            self.published_offset(topic, partition)?,
            self.offset(topic, partition)?,
        ) {
            (Some(published), _) => Ok(Some(published)),
            // Applied but never published: replay from the start of the log.
            (None, Some(_)) => Ok(Some(0)),
            (None, None) => Ok(None),
        }
    }

    fn read_offset(
        &self,
        cf: &str,
        topic: &str,
        partition: i32,
    ) -> Result<Option<i64>, StoreError> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(cf), offset_key(topic, partition))?
            .and_then(|v| v.as_ref().try_into().ok().map(i64::from_be_bytes)))
    }

    /// Writes one micro-batch of changes atomically. With the changelog on,
    /// the same write puts one changelog batch per touched partition into the
    /// outbox (returned, for the publisher): every changed key with its value
    /// before and after, then the partition's applied offsets.
    pub fn commit(&self, changes: &Changes) -> Result<Vec<changelog::Batch>, StoreError> {
        let _meta = self.meta_lock.lock().expect("not poisoned");
        let mut batch = WriteBatch::default();
        // Per partition: (key, value before, value after).
        type Pending = Vec<(Key, Option<Vec<u8>>, Vec<u8>)>;
        let mut records: BTreeMap<u32, Pending> = BTreeMap::new();
        // `prev`: the value before the batch (the changelog carries it).
        let mut change = |cf: &str,
                          (partition, store_key, key, value): ChangedRow,
                          prev: Option<Vec<u8>>|
         -> Result<(), StoreError> {
            if !self.changelog {
                batch.put_cf(self.cf(cf), store_key, value);
                return Ok(());
            }
            // The batch copies the value in; the changelog record keeps it.
            batch.put_cf(self.cf(cf), store_key, &value);
            records
                .entry(partition)
                .or_default()
                .push((key, prev, value));
            Ok(())
        };
        let users = changes.users.iter().map(|(partition, user, state)| {
            let store_key = user_key(*partition, user);
            (
                *partition,
                store_key,
                Key::User(user.clone()),
                encode(state),
            )
        });
        for (row, prev) in self.with_values_before(CF_USERS, users)? {
            change(CF_USERS, row, prev)?;
        }
        let items = changes.items.iter().map(|(partition, id, m)| {
            let store_key = partition_prefixed(*partition, &id.to_be_bytes());
            (*partition, store_key, Key::Item(*id), encode(m))
        });
        for (row, prev) in self.with_values_before(CF_ITEMS, items)? {
            change(CF_ITEMS, row, prev)?;
        }
        // Co-watch slots carry their previous value.
        for c in &changes.cowatch {
            let store_key = slot_key(c.partition, c.item, c.slot);
            let key = Key::CoWatchSlot(c.item, c.slot);
            let row = (c.partition, store_key, key, encode(&c.value));
            change(CF_COWATCH, row, c.prev.as_ref().map(encode))?;
        }
        let genres = changes.genres.iter().map(|(partition, name, m)| {
            let store_key = partition_prefixed(*partition, name.as_bytes());
            (*partition, store_key, Key::Genre(name.clone()), encode(m))
        });
        for (row, prev) in self.with_values_before(CF_GENRES, genres)? {
            change(CF_GENRES, row, prev)?;
        }
        let offsets = self.cf(CF_OFFSETS);
        for (topic, partition, offset) in &changes.offsets {
            batch.put_cf(offsets, offset_key(topic, *partition), offset.to_be_bytes());
            if self.changelog {
                records.entry(*partition as u32).or_default();
            }
        }
        let mut out = Vec::new();
        if self.changelog {
            let vocabulary = self.genre_vocabulary()?.unwrap_or_default();
            for (partition, pending) in records {
                let mut meta = self.partition_meta(partition)?.unwrap_or_default();
                meta.seq += 1;
                let mut recs: Vec<(Vec<u8>, Vec<u8>)> = pending
                    .into_iter()
                    .map(|(key, prev, value)| {
                        let entry = Entry {
                            writer: self.writer,
                            seq: meta.seq,
                            value: Some(value),
                            prev,
                        };
                        (key.encode(), entry.encode())
                    })
                    .collect();
                let mut applied: BTreeMap<String, i64> = self.stored_offsets(partition)?;
                for (topic, p, offset) in &changes.offsets {
                    if *p as u32 == partition {
                        applied.insert(topic.clone(), *offset);
                    }
                }
                let marker = Marker {
                    offsets: applied.into_iter().collect(),
                    genre_vocabulary: vocabulary.clone(),
                };
                recs.push((
                    APPLIED_KEY.to_vec(),
                    Entry {
                        writer: self.writer,
                        seq: meta.seq,
                        value: Some(encode(&marker)),
                        prev: None,
                    }
                    .encode(),
                ));
                batch.put_cf(
                    self.cf(CF_PARTITIONS),
                    partition.to_be_bytes(),
                    encode(&meta),
                );
                batch.put_cf(
                    self.cf(CF_OUTBOX),
                    outbox_key(partition, meta.seq),
                    encode(&recs),
                );
                out.push(changelog::Batch {
                    partition,
                    seq: meta.seq,
                    records: recs,
                });
            }
        }
        self.db.write(batch)?;
        Ok(out)
    }

    /// `rows` each with the value its key holds in `cf` before this batch,
    /// for the changelog (nothing is read without it): one batched MultiGet,
    /// not a point read per key.
    fn with_values_before(
        &self,
        cf: &str,
        rows: impl Iterator<Item = ChangedRow>,
    ) -> Result<impl Iterator<Item = (ChangedRow, Option<Vec<u8>>)>, StoreError> {
        let rows: Vec<ChangedRow> = rows.collect();
        let before: Vec<Option<Vec<u8>>> = if self.changelog {
            let keys = rows.iter().map(|(_, store_key, _, _)| store_key);
            let values = self.db.batched_multi_get_cf(self.cf(cf), keys, false);
            values
                .into_iter()
                .map(|value| Ok(value?.map(|v| v.to_vec())))
                .collect::<Result<_, StoreError>>()?
        } else {
            vec![None; rows.len()]
        };
        Ok(rows.into_iter().zip(before))
    }

    /// Applied offsets of one partition's input topics.
    fn stored_offsets(&self, partition: u32) -> Result<BTreeMap<String, i64>, StoreError> {
        let mut out = BTreeMap::new();
        for kv in self
            .db
            .iterator_cf(self.cf(CF_OFFSETS), rocksdb::IteratorMode::Start)
        {
            let (k, v) = kv?;
            if k.len() > 5 && k[k.len() - 4..] == partition.to_be_bytes() && k[k.len() - 5] == 0 {
                if let Ok(bytes) = <[u8; 8]>::try_from(&v[..]) {
                    out.insert(
                        String::from_utf8_lossy(&k[..k.len() - 5]).into_owned(),
                        i64::from_be_bytes(bytes),
                    );
                }
            }
        }
        Ok(out)
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        for cf in ALL_CFS {
            self.db.flush_cf(self.cf(cf))?;
        }
        Ok(())
    }

    pub fn stats(&self) -> StoreStats {
        let prop = |name: &str| -> u64 {
            ALL_CFS
                .iter()
                .filter_map(|cf| {
                    self.db
                        .property_int_value_cf(self.cf(cf), name)
                        .ok()
                        .flatten()
                })
                .sum()
        };
        StoreStats {
            live_bytes: prop("rocksdb.estimate-live-data-size"),
            sst_bytes: prop("rocksdb.total-sst-files-size"),
            memtable_bytes: prop("rocksdb.cur-size-all-mem-tables"),
            block_cache_hits: self
                .statistics
                .get_ticker_count(rocksdb::statistics::Ticker::BlockCacheHit),
            block_cache_misses: self
                .statistics
                .get_ticker_count(rocksdb::statistics::Ticker::BlockCacheMiss),
        }
    }
}

/// A writer id that differs between state directories and between
/// re-creations of the same directory.
fn new_writer_id(path: &Path) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let seed = format!("{}:{}:{nanos}", path.display(), std::process::id());
    let mut h = crate::fnv::Fnv::default();
    h.write(seed.as_bytes());
    h.0
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("state values always encode")
}

fn decode<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|source| StoreError::Codec { what, source })
}

/// Encoded size of a user's state, for the bytes-per-user figure.
pub fn encoded_len(state: &UserState) -> usize {
    encode(state).len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_trip_and_page_by_partition() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8).unwrap();
        let mut changes = Changes::default();
        for (p, u) in [(0, "a"), (0, "b"), (1, "c"), (7, "d")] {
            let s = UserState {
                version: u.len() as u64,
                ..Default::default()
            };
            changes.users.push((p, u.to_string(), s));
        }
        changes.items.push((
            7,
            42,
            Momentum {
                count: 3,
                ..Default::default()
            },
        ));
        changes.offsets.push(("in".into(), 1, 99));
        store.commit(&changes).unwrap();
        drop(store);

        let store = Store::open(dir.path(), 8).unwrap();
        assert_eq!(store.user(0, "a").unwrap().unwrap().version, 1);
        assert!(store.user(1, "a").unwrap().is_none());
        let page = store.users_page(0, None, 10).unwrap();
        assert_eq!(
            page.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        let page = store.users_page(0, Some("a"), 10).unwrap();
        assert_eq!(page.len(), 1);
        assert_eq!(store.user_partitions().unwrap(), vec![0, 1, 7]);
        assert_eq!(store.items().unwrap()[&7][&42].count, 3);
        assert_eq!(store.offset("in", 1).unwrap(), Some(99));
        assert_eq!(store.offset("in", 2).unwrap(), None);
        assert_eq!(
            store.resume_offset("in", 1).unwrap(),
            Some(0),
            "applied, never published"
        );
        store.mark_published(&[("in".into(), 1, 90)]).unwrap();
        assert_eq!(store.resume_offset("in", 1).unwrap(), Some(90));
        assert_eq!(store.resume_offset("in", 2).unwrap(), None);
    }

    #[test]
    fn co_watch_lists_are_stored_per_slot_and_older_directories_migrate() {
        let n = |item, count| Neighbor {
            item,
            count,
            error: 0.0,
        };
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8).unwrap();
        let mut changes = Changes::default();
        for (slot, value) in [(0, n(3, 2.0)), (1, n(4, 1.0))] {
            changes.cowatch.push(SlotChange {
                partition: 1,
                item: 9,
                slot,
                value,
                prev: None,
            });
        }
        store.commit(&changes).unwrap();
        assert_eq!(
            store.cowatch().unwrap()[&1][&9].entries,
            vec![n(3, 2.0), n(4, 1.0)]
        );
        // A follower's truncation drops the slot and the ones after it.
        let followed = Followed {
            cowatch: vec![(1, 9, CoWatchWrite::Slot(1, None))],
            ..Followed::default()
        };
        store.apply_followed(&followed).unwrap();
        assert_eq!(store.cowatch().unwrap()[&1][&9].entries, vec![n(3, 2.0)]);

        // A layout-2 directory: whole lists under (partition, item).
        let list = Neighbors {
            entries: vec![n(7, 5.0), n(8, 1.0)],
        };
        let cf = store.cf(CF_COWATCH);
        store
            .db
            .put_cf(
                cf,
                partition_prefixed(2, &5u32.to_be_bytes()),
                encode(&list),
            )
            .unwrap();
        let meta = store.cf(CF_META);
        store
            .db
            .put_cf(meta, LAYOUT, LAYOUT_WHOLE_COWATCH_LISTS.to_be_bytes())
            .unwrap();
        drop(store);
        let store = Store::open(dir.path(), 8).unwrap();
        let lists = store.cowatch().unwrap();
        assert_eq!(lists[&2][&5], list);
        assert_eq!(lists[&1][&9].entries, vec![n(3, 2.0)]);
        let keys: Vec<usize> = store
            .db
            .iterator_cf(store.cf(CF_COWATCH), rocksdb::IteratorMode::Start)
            .map(|kv| kv.unwrap().0.len())
            .collect();
        assert_eq!(keys, vec![10, 10, 10], "every list split into slots");
        drop(store);
        assert!(Store::open(dir.path(), 8).is_ok(), "migrated once");
    }
}
