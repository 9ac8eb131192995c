//! The state changelog: how a partition's state travels between instances.
//!
//! Every commit of the engine that touches input partition `p` becomes one
//! changelog *batch* on partition `p` of a compacted topic: one record per
//! changed key, then a marker record (`m`) carrying the batch's sequence
//! number and the applied input offsets. Without broker transactions a batch
//! can land half-written (its writer died mid-produce), so every record also
//! carries the value its key had before the batch (`prev`). A restore keeps
//! the latest record per key, like compaction does, and rolls back every key
//! whose latest record belongs to a batch newer than the last marker: the
//! result is exactly the state as of the last complete batch, and the offsets
//! in that marker say where to resume. The restoring instance then rewrites
//! the rolled-back keys (a repair batch) so later restores agree.
//!
//! Keys: `u` + user id, `i` + movie id (u32 BE), `C` + movie id (u32 BE) +
//! slot (u16 BE: one entry of its co-watch list), `g` + genre name, `m`
//! (applied offsets), `p` (published offsets; advisory, never rolled back).
//! Values: a postcard-encoded [`Entry`] whose `value`/`prev` are the raw
//! RocksDB values (postcard `UserState`, `Momentum` or `Neighbor`).
//!
//! A co-watch list changes one or two of its ≈ 200 entries per event, so it
//! travels as slots ([`Neighbors`]' entries keep their place): a few dozen
//! bytes per change instead of the whole ≈ 2 KB list with its previous
//! value. Slots are bounded per item like the lists, so the compacted topic
//! stays as small. Changelogs written before (`c` + movie id: the whole
//! list) are still read: a list is its latest whole value, then its slots
//! written since, in slot order.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::cowatch::{Neighbor, Neighbors};

pub const APPLIED_KEY: &[u8] = b"m";
pub const PUBLISHED_KEY: &[u8] = b"p";
/// A record an instance appends before reading a partition: once it is read
/// back, everything acknowledged before it has been read too (a broker's end
/// offset can trail acknowledged writes). Carries no state.
pub const PROBE_KEY: &[u8] = b"n";

#[derive(Debug, thiserror::Error)]
pub enum ChangelogError {
    #[error("changelog record with key {key:?} is not a recstream changelog entry: {source}")]
    Decode {
        key: String,
        source: postcard::Error,
    },
    #[error("changelog key {0:?} is not a user, item, co-watch, genre or marker key")]
    UnknownKey(String),
}

/// What a changelog key names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    User(String),
    Item(u32),
    /// A whole co-watch list: written by releases before the slots, still read.
    CoWatch(u32),
    /// One slot of an item's co-watch list.
    CoWatchSlot(u32, u16),
    Genre(String),
    Applied,
    Published,
    Probe,
}

impl Key {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Key::User(u) => [b"u", u.as_bytes()].concat(),
            Key::Item(id) => [&b"i"[..], &id.to_be_bytes()].concat(),
            Key::CoWatch(id) => [&b"c"[..], &id.to_be_bytes()].concat(),
            Key::CoWatchSlot(id, slot) => {
                [&b"C"[..], &id.to_be_bytes(), &slot.to_be_bytes()].concat()
            }
            Key::Genre(g) => [b"g", g.as_bytes()].concat(),
            Key::Applied => APPLIED_KEY.to_vec(),
            Key::Published => PUBLISHED_KEY.to_vec(),
            Key::Probe => PROBE_KEY.to_vec(),
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Key, ChangelogError> {
        let unknown = || ChangelogError::UnknownKey(String::from_utf8_lossy(bytes).into_owned());
        let (tag, rest) = bytes.split_first().ok_or_else(unknown)?;
        Ok(match (tag, rest) {
            (b'u', u) => Key::User(String::from_utf8(u.to_vec()).map_err(|_| unknown())?),
            (b'i', id) => Key::Item(u32::from_be_bytes(id.try_into().map_err(|_| unknown())?)),
            (b'c', id) => Key::CoWatch(u32::from_be_bytes(id.try_into().map_err(|_| unknown())?)),
            (b'C', [a, b, c, d, s0, s1]) => Key::CoWatchSlot(
                u32::from_be_bytes([*a, *b, *c, *d]),
                u16::from_be_bytes([*s0, *s1]),
            ),
            (b'g', g) => Key::Genre(String::from_utf8(g.to_vec()).map_err(|_| unknown())?),
            (b'm', []) => Key::Applied,
            (b'p', []) => Key::Published,
            (b'n', []) => Key::Probe,
            _ => return Err(unknown()),
        })
    }
}

/// One changelog record's value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The store that wrote it (random per state directory): lets an instance
    /// tell its own unacknowledged writes from another owner's.
    pub writer: u64,
    /// The batch it belongs to; per partition, increasing across owners.
    pub seq: u64,
    /// The value after the batch (`None`: the key does not exist).
    pub value: Option<Vec<u8>>,
    /// The value before the batch, for rolling back an unfinished batch.
    pub prev: Option<Vec<u8>>,
}

impl Entry {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("entries always encode")
    }

    pub fn decode(key: &[u8], bytes: &[u8]) -> Result<Entry, ChangelogError> {
        postcard::from_bytes(bytes).map_err(|source| ChangelogError::Decode {
            key: String::from_utf8_lossy(key).into_owned(),
            source,
        })
    }
}

/// The value of the `m` record: where the batch leaves each input topic of the
/// partition, and the genre vocabulary that user states' genre ids refer to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Marker {
    /// `(input topic, next offset to apply)`.
    pub offsets: Vec<(String, i64)>,
    pub genre_vocabulary: Vec<String>,
}

/// All changelog records of one commit for one partition, in produce order
/// (the marker last).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub partition: u32,
    pub seq: u64,
    /// `(encoded key, encoded entry)`.
    pub records: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A partition's state as of its last complete batch, as raw store values.
#[derive(Debug, Default)]
pub struct Restored {
    pub users: Vec<(String, Vec<u8>)>,
    pub items: Vec<(u32, Vec<u8>)>,
    /// Assembled from whole lists and slots, in item order.
    pub cowatch: Vec<(u32, Neighbors)>,
    pub genres: Vec<(String, Vec<u8>)>,
    /// The last complete batch's marker (`None`: nothing was ever committed).
    pub marker: Option<Marker>,
    pub committed_seq: u64,
    /// Published offsets, never ahead of the applied ones.
    pub published: Vec<(String, i64)>,
    /// The highest sequence number seen; the next owner continues above it.
    pub max_seq: u64,
    /// Keys whose latest record belongs to an unfinished batch, with the value
    /// they were rolled back to: rewrite them before processing.
    pub repairs: Vec<(Key, Option<Vec<u8>>)>,
    /// Records read.
    pub records: u64,
}

/// Folds a partition's changelog, read from its beginning in offset order.
#[derive(Debug, Default)]
pub struct Restorer {
    latest: HashMap<Key, Entry>,
    records: u64,
}

impl Restorer {
    /// Adds the next record. Kafka tombstones (no value) are ignored: the
    /// engine never writes them.
    pub fn push(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), ChangelogError> {
        self.records += 1;
        let Some(value) = value else { return Ok(()) };
        let k = Key::decode(key)?;
        let entry = Entry::decode(key, value)?;
        if k != Key::Probe {
            self.latest.insert(k, entry);
        }
        Ok(())
    }

    pub fn finish(self) -> Result<Restored, ChangelogError> {
        let mut out = Restored {
            records: self.records,
            ..Restored::default()
        };
        out.max_seq = self.latest.values().map(|e| e.seq).max().unwrap_or(0);
        if let Some(m) = self.latest.get(&Key::Applied) {
            out.committed_seq = m.seq;
            out.marker = match &m.value {
                Some(v) => {
                    Some(
                        postcard::from_bytes(v).map_err(|source| ChangelogError::Decode {
                            key: "m".into(),
                            source,
                        })?,
                    )
                }
                None => None,
            };
        }
        let mut keys: Vec<&Key> = self.latest.keys().collect();
        // Deterministic order: restores and repairs are replayable.
        keys.sort_by_key(|k| k.encode());
        // Per item: its whole list with the batch that wrote it, and its slots.
        let mut lists: BTreeMap<u32, (u64, Neighbors)> = BTreeMap::new();
        let mut slots: BTreeMap<u32, Vec<(u16, u64, Neighbor)>> = BTreeMap::new();
        let decode_err = |key: &Key, source| ChangelogError::Decode {
            key: String::from_utf8_lossy(&key.encode()).into_owned(),
            source,
        };
        for key in keys {
            let entry = &self.latest[key];
            let value = if entry.seq > out.committed_seq {
                if !matches!(key, Key::Published) {
                    out.repairs.push((key.clone(), entry.prev.clone()));
                }
                entry.prev.clone()
            } else {
                entry.value.clone()
            };
            match (key, value) {
                (Key::User(u), Some(v)) => out.users.push((u.clone(), v)),
                (Key::Item(id), Some(v)) => out.items.push((*id, v)),
                (Key::CoWatch(id), Some(v)) => {
                    let list = postcard::from_bytes(&v).map_err(|e| decode_err(key, e))?;
                    lists.insert(*id, (entry.seq, list));
                }
                (Key::CoWatchSlot(id, slot), Some(v)) => {
                    let n = postcard::from_bytes(&v).map_err(|e| decode_err(key, e))?;
                    slots.entry(*id).or_default().push((*slot, entry.seq, n));
                }
                (Key::Genre(g), Some(v)) => out.genres.push((g.clone(), v)),
                (Key::Published, _) => {
                    let published: Vec<(String, i64)> = entry
                        .value
                        .as_deref()
                        .map(postcard::from_bytes)
                        .transpose()
                        .map_err(|source| ChangelogError::Decode {
                            key: "p".into(),
                            source,
                        })?
                        .unwrap_or_default();
                    out.published = published;
                }
                _ => {}
            }
        }
        // A list is its latest whole value (older writers), then the slots
        // written after it (a whole list written later replaces them all).
        for (id, mut slots) in slots {
            slots.sort_unstable_by_key(|(slot, _, _)| *slot);
            let (whole_seq, list) = lists.entry(id).or_default();
            for (slot, seq, n) in slots {
                if seq >= *whole_seq {
                    list.set_slot(slot as usize, Some(n));
                }
            }
        }
        out.cowatch = lists
            .into_iter()
            .map(|(id, (_, list))| (id, list))
            .filter(|(_, l)| !l.entries.is_empty())
            .collect();
        // Outputs can only have been published for what was applied.
        let applied: HashMap<&str, i64> = out
            .marker
            .iter()
            .flat_map(|m| m.offsets.iter().map(|(t, o)| (t.as_str(), *o)))
            .collect();
        out.published = out
            .published
            .iter()
            .filter_map(|(t, o)| applied.get(t.as_str()).map(|a| (t.clone(), (*o).min(*a))))
            .collect();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(seq: u64, value: Option<&[u8]>, prev: Option<&[u8]>) -> Vec<u8> {
        Entry {
            writer: 1,
            seq,
            value: value.map(<[u8]>::to_vec),
            prev: prev.map(<[u8]>::to_vec),
        }
        .encode()
    }

    fn marker(seq: u64, offset: i64) -> Vec<u8> {
        let m = Marker {
            offsets: vec![("in".into(), offset)],
            genre_vocabulary: vec![],
        };
        entry(seq, Some(&postcard::to_stdvec(&m).unwrap()), None)
    }

    #[test]
    fn keys_round_trip() {
        for k in [
            Key::User("u1".into()),
            Key::Item(7),
            Key::CoWatch(7),
            Key::CoWatchSlot(7, 199),
            Key::Genre("Drama".into()),
            Key::Applied,
            Key::Published,
            Key::Probe,
        ] {
            assert_eq!(Key::decode(&k.encode()).unwrap(), k);
        }
        assert!(Key::decode(b"x").is_err());
        assert!(Key::decode(b"i12").is_err());
        assert!(
            Key::decode(b"C\0\0\0\x07\0").is_err(),
            "a slot key without its slot"
        );
        assert!(Key::decode(b"").is_err());
    }

    #[test]
    fn an_unfinished_batch_is_rolled_back_to_the_last_marker() {
        let mut r = Restorer::default();
        let u = Key::User("a".into()).encode();
        let v = Key::User("b".into()).encode();
        // Batch 1 complete.
        r.push(&u, Some(&entry(1, Some(b"a1"), None))).unwrap();
        r.push(APPLIED_KEY, Some(&marker(1, 10))).unwrap();
        // Batch 2: `a` and `b` written, the marker never landed.
        r.push(&u, Some(&entry(2, Some(b"a2"), Some(b"a1"))))
            .unwrap();
        r.push(&v, Some(&entry(2, Some(b"b2"), None))).unwrap();
        let restored = r.finish().unwrap();
        assert_eq!(restored.users, vec![("a".to_string(), b"a1".to_vec())]);
        assert_eq!(restored.marker.unwrap().offsets, vec![("in".into(), 10)]);
        assert_eq!(restored.committed_seq, 1);
        assert_eq!(restored.max_seq, 2);
        assert_eq!(
            restored.repairs,
            vec![
                (Key::User("a".into()), Some(b"a1".to_vec())),
                (Key::User("b".into()), None)
            ]
        );
    }

    #[test]
    fn co_watch_lists_are_whole_lists_then_their_slots_and_roll_back_per_slot() {
        let n = |item, count| Neighbor {
            item,
            count,
            error: 0.0,
        };
        let enc = |n: &Neighbor| postcard::to_stdvec(n).unwrap();
        let mut r = Restorer::default();
        // An older writer's whole list of item 5, then slots written since.
        let whole = Neighbors {
            entries: vec![n(1, 3.0), n(2, 1.0)],
        };
        let whole = postcard::to_stdvec(&whole).unwrap();
        r.push(
            &Key::CoWatch(5).encode(),
            Some(&entry(1, Some(&whole), None)),
        )
        .unwrap();
        r.push(APPLIED_KEY, Some(&marker(1, 10))).unwrap();
        let slot = |item, slot| Key::CoWatchSlot(item, slot).encode();
        r.push(&slot(5, 1), Some(&entry(2, Some(&enc(&n(2, 2.0))), None)))
            .unwrap();
        r.push(&slot(5, 2), Some(&entry(2, Some(&enc(&n(4, 1.0))), None)))
            .unwrap();
        r.push(&slot(6, 0), Some(&entry(2, Some(&enc(&n(5, 1.0))), None)))
            .unwrap();
        r.push(APPLIED_KEY, Some(&marker(2, 11))).unwrap();
        // Batch 3 never completed: its slots go back to what batch 2 left.
        r.push(
            &slot(5, 2),
            Some(&entry(3, Some(&enc(&n(4, 2.0))), Some(&enc(&n(4, 1.0))))),
        )
        .unwrap();
        r.push(&slot(6, 1), Some(&entry(3, Some(&enc(&n(9, 1.0))), None)))
            .unwrap();
        let restored = r.finish().unwrap();
        let lists: Vec<(u32, Vec<Neighbor>)> = restored
            .cowatch
            .into_iter()
            .map(|(id, l)| (id, l.entries))
            .collect();
        assert_eq!(
            lists,
            vec![
                (5, vec![n(1, 3.0), n(2, 2.0), n(4, 1.0)]),
                (6, vec![n(5, 1.0)])
            ]
        );
        assert_eq!(
            restored.repairs,
            vec![
                (Key::CoWatchSlot(5, 2), Some(enc(&n(4, 1.0)))),
                (Key::CoWatchSlot(6, 1), None)
            ]
        );
    }

    #[test]
    fn published_offsets_never_pass_the_applied_ones() {
        let mut r = Restorer::default();
        r.push(APPLIED_KEY, Some(&marker(3, 10))).unwrap();
        let p = postcard::to_stdvec(&vec![("in".to_string(), 12i64), ("gone".into(), 4)]).unwrap();
        r.push(PUBLISHED_KEY, Some(&entry(3, Some(&p), None)))
            .unwrap();
        let restored = r.finish().unwrap();
        assert_eq!(restored.published, vec![("in".into(), 10)]);
        assert!(restored.repairs.is_empty());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut r = Restorer::default();
        assert!(r.push(b"ua", Some(b"\xff\xff\xff")).is_err());
        assert!(r.push(b"?", Some(&entry(1, None, None))).is_err());
    }

    proptest! {
        /// Any prefix of a log of complete batches plus a partial one restores
        /// the state of the last complete batch, whatever subset of the
        /// partial batch's records landed.
        #[test]
        fn restore_equals_the_last_complete_batch(
            batches in proptest::collection::vec(proptest::collection::btree_map(0u8..6, any::<u8>(), 1..4), 1..6),
            landed in proptest::collection::vec(any::<bool>(), 6),
        ) {
            let mut r = Restorer::default();
            let mut state: HashMap<u8, u8> = HashMap::new();
            let last = batches.len() - 1;
            for (i, batch) in batches.iter().enumerate() {
                let seq = i as u64 + 1;
                for (j, (user, value)) in batch.iter().enumerate() {
                    let key = Key::User(user.to_string()).encode();
                    let prev = state.get(user).map(|p| vec![*p]);
                    if i < last || landed[j % landed.len()] {
                        r.push(&key, Some(&entry(seq, Some(&[*value]), prev.as_deref()))).unwrap();
                    }
                    if i < last {
                        state.insert(*user, *value);
                    }
                }
                if i < last {
                    r.push(APPLIED_KEY, Some(&marker(seq, seq as i64))).unwrap();
                }
            }
            let restored = r.finish().unwrap();
            let got: HashMap<u8, u8> = restored
                .users
                .iter()
                .map(|(u, v)| (u.parse().unwrap(), v[0]))
                .collect();
            prop_assert_eq!(got, state);
        }
    }
}
