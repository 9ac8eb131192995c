//! Embedded RocksDB state. Column families:
//! - `users`: `partition (u32 BE) ++ user_id` → [`UserState`]; partitioned like the input
//!   so a partition's state can be iterated, restored or dropped as a unit.
//! - `items`: `movie_id (u32 BE)` → [`Momentum`]
//! - `genres`: genre name → [`Momentum`]
//! - `offsets`: `topic \0 partition (u32 BE)` → next offset to apply (i64 BE),
//!   written in the same batch as the state changes it caused.
//! - `published`: same key → next offset whose outputs the broker has not yet
//!   acknowledged. Records between it and `offsets` are recomputed and
//!   republished after a restart, never applied twice.
//!
//! - `meta`: the genre vocabulary that user state's genre ids refer to.
//!
//! Values are postcard-encoded (compact varints).

use std::collections::HashMap;
use std::path::Path;

use rocksdb::{BlockBasedOptions, Cache, ColumnFamilyDescriptor, Options, WriteBatch, DB};

use crate::catalog::IdMap;
use crate::decay::Momentum;
use crate::state::UserState;

const CF_USERS: &str = "users";
const CF_ITEMS: &str = "items";
const CF_GENRES: &str = "genres";
const CF_OFFSETS: &str = "offsets";
const CF_PUBLISHED: &str = "published";
const CF_META: &str = "meta";
const ALL_CFS: [&str; 6] = [
    CF_USERS,
    CF_ITEMS,
    CF_GENRES,
    CF_OFFSETS,
    CF_PUBLISHED,
    CF_META,
];
const GENRE_VOCABULARY: &[u8] = b"genre_vocabulary";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("corrupt value under {what}: {source}")]
    Codec {
        what: &'static str,
        source: postcard::Error,
    },
}

pub struct Store {
    db: DB,
    statistics: Options,
}

/// All changes of one micro-batch, written atomically.
#[derive(Debug, Default)]
pub struct Changes {
    pub users: Vec<(u32, String, UserState)>,
    pub items: Vec<(u32, Momentum)>,
    pub genres: Vec<(String, Momentum)>,
    /// `(topic, partition, next offset)`.
    pub offsets: Vec<(String, i32, i64)>,
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
        Ok(Store {
            db,
            statistics: opts,
        })
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

    pub fn items(&self) -> Result<IdMap<Momentum>, StoreError> {
        let mut out = IdMap::default();
        for kv in self
            .db
            .iterator_cf(self.cf(CF_ITEMS), rocksdb::IteratorMode::Start)
        {
            let (k, v) = kv?;
            if k.len() == 4 {
                out.insert(
                    u32::from_be_bytes([k[0], k[1], k[2], k[3]]),
                    decode(&v, "items")?,
                );
            }
        }
        Ok(out)
    }

    pub fn genres(&self) -> Result<HashMap<String, Momentum>, StoreError> {
        let mut out = HashMap::new();
        for kv in self
            .db
            .iterator_cf(self.cf(CF_GENRES), rocksdb::IteratorMode::Start)
        {
            let (k, v) = kv?;
            out.insert(
                String::from_utf8_lossy(&k).into_owned(),
                decode(&v, "genres")?,
            );
        }
        Ok(out)
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
        let mut batch = WriteBatch::default();
        let cf = self.cf(CF_PUBLISHED);
        for (topic, partition, offset) in offsets {
            batch.put_cf(cf, offset_key(topic, *partition), offset.to_be_bytes());
        }
        self.db.write(batch)?;
        Ok(())
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

    /// Writes one micro-batch of changes atomically.
    pub fn commit(&self, changes: &Changes) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        let users = self.cf(CF_USERS);
        for (partition, user, state) in &changes.users {
            batch.put_cf(users, user_key(*partition, user), encode(state));
        }
        let items = self.cf(CF_ITEMS);
        for (id, m) in &changes.items {
            batch.put_cf(items, id.to_be_bytes(), encode(m));
        }
        let genres = self.cf(CF_GENRES);
        for (name, m) in &changes.genres {
            batch.put_cf(genres, name.as_bytes(), encode(m));
        }
        let offsets = self.cf(CF_OFFSETS);
        for (topic, partition, offset) in &changes.offsets {
            batch.put_cf(offsets, offset_key(topic, *partition), offset.to_be_bytes());
        }
        self.db.write(batch)?;
        Ok(())
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
        assert_eq!(store.items().unwrap()[&42].count, 3);
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
}
