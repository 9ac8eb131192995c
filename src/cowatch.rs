//! Item-to-item co-watch counts: the engine's collaborative candidate source.
//!
//! Every time a user consumes an item, the pair (item, each of the user's
//! previous recently consumed items) is counted in both directions. Each item
//! keeps a bounded list of its most co-watched neighbours with the
//! space-saving rule: a newcomer on a full list replaces the weakest entry and
//! inherits its count as `error`, so heavy neighbours are kept with a bounded
//! over-count while memory stays `cap` entries per item. `count - error` is a
//! lower bound of the true count; scoring uses it, so a newcomer earns its place.
//!
//! Lists are kept per input partition (they move with it, like the item
//! counters) and summed over the partitions an instance holds.

use std::cell::OnceCell;
use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::catalog::IdMap;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Neighbor {
    pub item: u32,
    pub count: f32,
    /// Over-count inherited on entry (space-saving).
    pub error: f32,
}

impl Neighbor {
    /// A slot known to exist but not yet read (a follower can read a list's
    /// slots out of order): counts nothing, and no merge or ranking sees it.
    pub const VACANT: Neighbor = Neighbor {
        item: u32::MAX,
        count: 0.0,
        error: 0.0,
    };

    pub fn is_vacant(&self) -> bool {
        self.item == u32::MAX && self.count == 0.0
    }

    /// A lower bound of the true co-watch count.
    pub fn guaranteed(&self) -> f32 {
        (self.count - self.error).max(0.0)
    }
}

/// One item's neighbours. Their order means nothing to scoring, but an
/// entry keeps its place (its *slot*) for good: a newcomer is appended or
/// takes over the weakest entry's slot, so a change is one slot's new value
/// (what the store and the changelog record) rather than the whole list.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Neighbors {
    pub entries: Vec<Neighbor>,
}

impl Neighbors {
    /// Counts `amount` more co-watches with `item`, keeping at most `cap`
    /// entries; returns the slot that changed and its value before (`None`:
    /// the slot is new).
    pub fn add(&mut self, item: u32, amount: f32, cap: usize) -> (usize, Option<Neighbor>) {
        let slot = self.slot_for(item, cap);
        let before = self.entries.get(slot).copied();
        match self.entries.get_mut(slot) {
            Some(n) if n.item == item => n.count += amount,
            Some(weakest) => {
                let floor = weakest.count;
                *weakest = Neighbor {
                    item,
                    count: floor + amount,
                    error: floor,
                };
            }
            None => self.entries.push(Neighbor {
                item,
                count: amount,
                error: 0.0,
            }),
        }
        (slot, before)
    }

    /// The slot counting `item` changes: its own, a new one while the list
    /// is below `cap`, else the weakest entry's (ties: the higher id, for
    /// determinism), which the newcomer takes over.
    fn slot_for(&self, item: u32, cap: usize) -> usize {
        if let Some(slot) = self.entries.iter().position(|n| n.item == item) {
            return slot;
        }
        if self.entries.len() < cap.max(1) {
            return self.entries.len();
        }
        self.entries
            .iter()
            .enumerate()
            .min_by(|(_, a), (_, b)| a.count.total_cmp(&b.count).then(b.item.cmp(&a.item)))
            .map_or(0, |(slot, _)| slot)
    }

    /// Sets one slot as the store or the changelog recorded it. `None`: the
    /// slot does not exist, and neither do the ones after it (slots are only
    /// ever appended). A slot past the end keeps its place: the slots before
    /// it are held [`Neighbor::VACANT`] until they are read.
    pub fn set_slot(&mut self, slot: usize, value: Option<Neighbor>) {
        match value {
            Some(n) => {
                if slot >= self.entries.len() {
                    self.entries.resize(slot + 1, Neighbor::VACANT);
                }
                self.entries[slot] = n;
            }
            None => self.entries.truncate(slot),
        }
    }

    /// The sum of several partitions' lists, trimmed to the `cap` strongest
    /// (strongest first; ties: lower id). It takes up to `cap` entries per
    /// partition, so it sorts by id and sums runs instead of searching the
    /// merged list for every entry. Counts are whole numbers, so the sums do
    /// not depend on the order.
    pub fn merge<'a>(lists: impl IntoIterator<Item = &'a Neighbors>, cap: usize) -> Neighbors {
        let mut all: Vec<Neighbor> = lists
            .into_iter()
            .flat_map(|list| list.entries.iter().copied())
            .filter(|n| !n.is_vacant())
            .collect();
        all.sort_unstable_by_key(|n| n.item);
        all.dedup_by(|later, kept| {
            let same = later.item == kept.item;
            if same {
                kept.count += later.count;
                kept.error += later.error;
            }
            same
        });
        let strongest_first =
            |a: &Neighbor, b: &Neighbor| b.count.total_cmp(&a.count).then(a.item.cmp(&b.item));
        if all.len() > cap {
            all.select_nth_unstable_by(cap, strongest_first);
            all.truncate(cap);
        }
        all.sort_unstable_by(strongest_first);
        Neighbors { entries: all }
    }

    /// Neighbours by guaranteed count, strongest first (ties: lower id).
    pub fn strongest(&self) -> Vec<(u32, f32)> {
        let mut out: Vec<(u32, f32)> = self
            .entries
            .iter()
            .map(|n| (n.item, n.guaranteed()))
            .filter(|(_, c)| *c > 0.0)
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out
    }
}

/// The co-watch lists of the partitions an instance holds, and their sums:
/// what candidates see.
///
/// An event changes the lists of several items, while a recompute reads the
/// sums of a user's few seeds, so a change only forgets the item's sum and
/// the next read merges it again.
#[derive(Debug)]
pub struct CoWatchLists {
    /// In partition order: sums merge the same lists in the same order on
    /// every instance.
    parts: BTreeMap<u32, IdMap<Neighbors>>,
    /// One cell per item with a list in some partition; empty until read.
    sums: IdMap<OnceCell<Neighbors>>,
    cap: usize,
    /// The slots changed since the last [`CoWatchLists::take_changes`], with
    /// the value each had before (`None`: the slot was new).
    changed: BTreeMap<(u32, u32, u16), Option<Neighbor>>,
}

/// One co-watch slot's change over a micro-batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlotChange {
    pub partition: u32,
    pub item: u32,
    pub slot: u16,
    pub value: Neighbor,
    /// Its value before the batch (`None`: the slot is new).
    pub prev: Option<Neighbor>,
}

impl CoWatchLists {
    /// Lists of at most `cap` neighbours each, per partition.
    pub fn new(parts: HashMap<u32, IdMap<Neighbors>>, cap: usize) -> CoWatchLists {
        let mut lists = CoWatchLists {
            parts: parts.into_iter().collect(),
            sums: IdMap::default(),
            cap,
            changed: BTreeMap::new(),
        };
        lists.forget_sums();
        lists
    }

    /// Counts `amount` more co-watches of `item` with `other` in `partition`.
    pub fn add(&mut self, partition: u32, item: u32, other: u32, amount: f32) {
        let list = self
            .parts
            .entry(partition)
            .or_default()
            .entry(item)
            .or_default();
        // A slot's value before the batch is the one before its first change.
        let (slot, before) = list.add(other, amount, self.cap);
        self.changed
            .entry((partition, item, slot as u16))
            .or_insert(before);
        self.sums.insert(item, OnceCell::new());
    }

    /// The slots changed since the last call, in (partition, item, slot) order.
    pub fn take_changes(&mut self) -> Vec<SlotChange> {
        std::mem::take(&mut self.changed)
            .into_iter()
            .map(|((partition, item, slot), prev)| SlotChange {
                partition,
                item,
                slot,
                value: self.parts[&partition][&item].entries[slot as usize],
                prev,
            })
            .collect()
    }

    /// `item`'s neighbours summed over the partitions held (merged on the
    /// first read after a change).
    pub fn get(&self, item: u32) -> Option<&Neighbors> {
        let cell = self.sums.get(&item)?;
        Some(cell.get_or_init(|| {
            let lists = self.parts.values().filter_map(|part| part.get(&item));
            Neighbors::merge(lists, self.cap)
        }))
    }

    /// Whether no partition held has a list.
    pub fn is_empty(&self) -> bool {
        self.sums.is_empty()
    }

    /// Replaces (or with `None`, drops) one partition's list of `item`, as
    /// followed from the instance that holds the partition.
    pub fn set(&mut self, partition: u32, item: u32, list: Option<Neighbors>) {
        let part = self.parts.entry(partition).or_default();
        match list {
            Some(list) => {
                part.insert(item, list);
            }
            None => {
                part.remove(&item);
            }
        }
        // A sum cell stays for an item no partition lists any more: it reads empty.
        self.sums.insert(item, OnceCell::new());
    }

    /// Sets one slot of one partition's list of `item`, as followed from the
    /// instance that holds the partition ([`Neighbors::set_slot`]).
    pub fn set_slot(&mut self, partition: u32, item: u32, slot: u16, value: Option<Neighbor>) {
        let part = self.parts.entry(partition).or_default();
        let list = part.entry(item).or_default();
        list.set_slot(slot as usize, value);
        if list.entries.is_empty() {
            part.remove(&item);
            if part.is_empty() {
                self.parts.remove(&partition);
            }
        }
        self.sums.insert(item, OnceCell::new());
    }

    /// The partitions with lists.
    pub fn partitions(&self) -> impl Iterator<Item = u32> + '_ {
        self.parts.keys().copied()
    }

    /// Replaces (or with `None`, drops) one partition's lists.
    pub fn set_partition(&mut self, partition: u32, lists: Option<IdMap<Neighbors>>) {
        match lists {
            Some(lists) => self.parts.insert(partition, lists),
            None => self.parts.remove(&partition),
        };
        self.changed.retain(|(p, _, _), _| *p != partition);
        self.forget_sums();
    }

    fn forget_sums(&mut self) {
        self.sums = self
            .parts
            .values()
            .flat_map(|part| part.keys())
            .map(|id| (*id, OnceCell::new()))
            .collect();
    }
}

/// Equal when they hold the same partitions' lists and give the same sums.
impl PartialEq for CoWatchLists {
    fn eq(&self, other: &CoWatchLists) -> bool {
        // Equal lists have the same items, so one side's keys cover both.
        self.parts == other.parts && self.sums.keys().all(|id| self.get(*id) == other.get(*id))
    }
}

/// How strongly a seed's co-watch count with a candidate speaks for it:
/// `count / (n_seed^(1-alpha) · n_candidate^alpha)`. `alpha = 0` is the
/// conditional probability of the candidate given the seed (favours popular
/// items), `alpha = 0.5` the cosine; item counts below 1 count as 1.
pub fn association(count: f32, seed_count: f64, candidate_count: f64, alpha: f64) -> f64 {
    association_of_factors(
        count,
        seed_factor(seed_count, alpha),
        candidate_factor(candidate_count, alpha),
    )
}

/// The seed's part of [`association`]'s denominator (one per seed).
pub fn seed_factor(seed_count: f64, alpha: f64) -> f64 {
    seed_count.max(1.0).powf(1.0 - alpha)
}

/// The candidate's part of [`association`]'s denominator (one per candidate).
pub fn candidate_factor(candidate_count: f64, alpha: f64) -> f64 {
    candidate_count.max(1.0).powf(alpha)
}

/// [`association`] from its two precomputed factors.
pub fn association_of_factors(count: f32, seed_factor: f64, candidate_factor: f64) -> f64 {
    count.max(0.0) as f64 / (seed_factor * candidate_factor)
}

/// How much `n` co-occurrences are trusted: `n / (n + support)`, 1 when
/// `support` is 0.
pub fn confidence(n: f64, support: f64) -> f64 {
    if support <= 0.0 {
        return 1.0;
    }
    let n = n.max(0.0);
    n / (n + support)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn confidence_grows_with_evidence_and_is_off_at_zero_support() {
        assert_eq!(confidence(0.0, 3.0), 0.0);
        assert_eq!(confidence(3.0, 3.0), 0.5);
        assert!(confidence(50.0, 3.0) > confidence(5.0, 3.0));
        assert!(confidence(1e9, 3.0) <= 1.0);
        assert_eq!(confidence(1.0, 0.0), 1.0);
    }

    #[test]
    fn counts_add_up_below_the_cap() {
        let mut n = Neighbors::default();
        for item in [3, 4, 3, 3] {
            n.add(item, 1.0, 8);
        }
        assert_eq!(n.strongest(), vec![(3, 3.0), (4, 1.0)]);
    }

    #[test]
    fn a_newcomer_on_a_full_list_inherits_the_weakest_count() {
        let mut n = Neighbors::default();
        n.add(1, 5.0, 2);
        n.add(2, 1.0, 2);
        n.add(3, 1.0, 2);
        assert_eq!(n.entries.len(), 2);
        let three = n.entries.iter().find(|e| e.item == 3).unwrap();
        assert_eq!((three.count, three.error), (2.0, 1.0));
        assert_eq!(
            n.strongest(),
            vec![(1, 5.0), (3, 1.0)],
            "guaranteed counts rank"
        );
    }

    #[test]
    fn slots_read_out_of_order_keep_their_places() {
        let n = |item| Neighbor {
            item,
            count: 1.0,
            error: 0.0,
        };
        let mut list = Neighbors::default();
        list.set_slot(2, Some(n(30)));
        assert_eq!(
            list.strongest(),
            vec![(30, 1.0)],
            "vacant slots count nothing"
        );
        list.set_slot(0, Some(n(10)));
        list.set_slot(1, Some(n(20)));
        assert_eq!(list.entries, vec![n(10), n(20), n(30)]);
        list.set_slot(1, None);
        assert_eq!(
            list.entries,
            vec![n(10)],
            "a slot gone takes the later ones"
        );
        let mut gap = Neighbors::default();
        gap.set_slot(3, Some(n(40)));
        assert_eq!(
            Neighbors::merge([&gap, &list], 8).entries,
            vec![n(10), n(40)]
        );
    }

    #[test]
    fn merge_sums_partitions() {
        let (mut a, mut b) = (Neighbors::default(), Neighbors::default());
        a.add(1, 2.0, 4);
        a.add(2, 1.0, 4);
        b.add(2, 3.0, 4);
        let m = Neighbors::merge([&a, &b], 1);
        assert_eq!(m.strongest(), vec![(2, 4.0)]);
    }

    #[test]
    fn association_prefers_specific_pairs_as_alpha_grows() {
        // Same count with a popular and a rare candidate.
        let popular = association(10.0, 100.0, 1000.0, 0.5);
        let rare = association(10.0, 100.0, 20.0, 0.5);
        assert!(rare > popular);
        assert_eq!(
            association(10.0, 100.0, 1000.0, 0.0),
            association(10.0, 100.0, 20.0, 0.0)
        );
    }

    #[test]
    fn sums_follow_changes_and_partitions() {
        let mut lists = CoWatchLists::new(HashMap::new(), 4);
        lists.add(0, 1, 2, 1.0);
        assert_eq!(lists.get(1).unwrap().strongest(), vec![(2, 1.0)]);
        assert_eq!(lists.take_changes().len(), 1);
        assert!(lists.take_changes().is_empty());
        // A change after a read is seen by the next read.
        lists.add(3, 1, 2, 2.0);
        lists.add(3, 1, 5, 1.0);
        lists.add(0, 1, 2, 1.0);
        assert_eq!(lists.get(1).unwrap().strongest(), vec![(2, 4.0), (5, 1.0)]);
        // Each changed slot once, as it is now, with its value before the batch.
        let changes = lists.take_changes();
        let seen: Vec<(u32, u32, u16, u32, f32, Option<f32>)> = changes
            .iter()
            .map(|c| {
                let prev = c.prev.map(|p| p.count);
                (
                    c.partition,
                    c.item,
                    c.slot,
                    c.value.item,
                    c.value.count,
                    prev,
                )
            })
            .collect();
        assert_eq!(
            seen,
            vec![
                (0, 1, 0, 2, 2.0, Some(1.0)),
                (3, 1, 0, 2, 2.0, None),
                (3, 1, 1, 5, 1.0, None)
            ]
        );
        assert!(
            lists.get(2).is_none(),
            "only pairs counted in this direction"
        );
        // Dropping a partition leaves the others' sums.
        lists.set_partition(3, None);
        assert_eq!(lists.get(1).unwrap().strongest(), vec![(2, 2.0)]);
        lists.set_partition(0, None);
        assert!(lists.is_empty() && lists.get(1).is_none());
    }

    /// The merge as first written: search the merged list for every entry.
    fn merge_by_search(lists: &[Neighbors], cap: usize) -> Neighbors {
        let mut all: Vec<Neighbor> = Vec::new();
        for list in lists {
            for n in &list.entries {
                match all.iter_mut().find(|m| m.item == n.item) {
                    Some(m) => {
                        m.count += n.count;
                        m.error += n.error;
                    }
                    None => all.push(*n),
                }
            }
        }
        all.sort_by(|a, b| b.count.total_cmp(&a.count).then(a.item.cmp(&b.item)));
        all.truncate(cap);
        Neighbors { entries: all }
    }

    proptest! {
        /// Sorting by id and summing runs gives the searched merge, entry for
        /// entry, whatever the partitions' orders and the cap.
        #[test]
        fn merge_equals_the_searched_merge(
            parts in proptest::collection::vec(proptest::collection::vec((0u32..40, 0u8..4), 0..80), 0..7),
            cap in 1usize..50,
        ) {
            let lists: Vec<Neighbors> = parts
                .iter()
                .map(|adds| {
                    let mut n = Neighbors::default();
                    for &(item, amount) in adds {
                        n.add(item, f32::from(amount) + 1.0, 12);
                    }
                    n
                })
                .collect();
            prop_assert_eq!(Neighbors::merge(&lists, cap), merge_by_search(&lists, cap));
        }
    }

    proptest! {
        /// A batch's slot changes carry the lists from before it to after it
        /// (the changelog's values), and back (its `prev`s, for a rollback).
        #[test]
        fn slot_changes_replay_and_roll_back(
            first in proptest::collection::vec((0u32..3, 0u32..20), 0..60),
            second in proptest::collection::vec((0u32..3, 0u32..20), 1..60),
            cap in 1usize..8,
        ) {
            let mut lists = CoWatchLists::new(HashMap::new(), cap);
            for &(item, other) in &first {
                lists.add(0, item, other, 1.0);
            }
            lists.take_changes();
            let before = lists.parts.clone();
            for &(item, other) in &second {
                lists.add(0, item, other, 1.0);
            }
            let after = lists.parts.clone();
            let changes = lists.take_changes();
            let mut replayed = CoWatchLists::new(before.clone().into_iter().collect(), cap);
            for c in &changes {
                replayed.set_slot(c.partition, c.item, c.slot, Some(c.value));
            }
            prop_assert_eq!(&replayed.parts, &after);
            let mut rolled_back = CoWatchLists::new(after.into_iter().collect(), cap);
            for c in &changes {
                rolled_back.set_slot(c.partition, c.item, c.slot, c.prev);
            }
            prop_assert_eq!(&rolled_back.parts, &before);
        }
    }

    proptest! {
        /// Space-saving never loses mass: every added amount is in some count,
        /// the list never exceeds its cap, and a guaranteed count never exceeds
        /// the true one.
        #[test]
        fn space_saving_bounds(items in proptest::collection::vec(0u32..30, 1..300), cap in 1usize..12) {
            let mut n = Neighbors::default();
            let mut truth = std::collections::HashMap::new();
            for &i in &items {
                n.add(i, 1.0, cap);
                *truth.entry(i).or_insert(0.0f32) += 1.0;
            }
            prop_assert!(n.entries.len() <= cap);
            let total: f32 = n.entries.iter().map(|e| e.count).sum();
            prop_assert_eq!(total, items.len() as f32);
            for e in &n.entries {
                prop_assert!(e.guaranteed() <= truth[&e.item]);
                prop_assert!(e.count >= truth[&e.item]);
            }
        }
    }
}
