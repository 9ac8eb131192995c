//! The processing core: applies a micro-batch of decoded records to the state in
//! RocksDB and computes the outputs of every affected user. Synchronous and
//! deterministic; the Kafka pipeline runs it on a dedicated thread, and
//! in-process callers (tests, benchmarks, the demo) call it directly.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use crate::catalog::{Catalog, CatalogRecord, IdMap};
use crate::changelog;
use crate::config::EngineConfig;
use crate::cowatch::{CoWatchLists, Neighbor, Neighbors};
use crate::decay::Momentum;
use crate::event::{Interaction, RefreshCommand};
use crate::experiment::Variants;
use crate::feedback::Feedback;
use crate::global::ItemBatch;
use crate::metrics;
use crate::output::UserOutputs;
use crate::recommend::{
    self, Context, ItemIndex, PopularOrder, RecomputeCache, ScoreError, Scorer,
};
use crate::state::{Applied, UserState};
use crate::store::{Changes, CoWatchWrite, Followed, PartitionMeta, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Score(#[from] ScoreError),
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error("restored state of partition {partition} is unusable: {detail}")]
    Restore { partition: u32, detail: String },
}

/// Where a record came from; its offset is committed with the state it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcePos {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, Clone)]
pub enum Body {
    Event(Interaction),
    Refresh(RefreshCommand),
    /// Rejected by the decoder; goes to the dead-letter topic.
    Invalid(Rejection),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub reason: &'static str,
    pub detail: String,
}

#[derive(Debug, Clone)]
pub struct Record {
    pub source: SourcePos,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub received: Instant,
    pub body: Body,
}

/// A record for the dead-letter topic: the original bytes and why.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub source: SourcePos,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub reason: &'static str,
    pub detail: String,
}

/// Outputs keyed by user id.
pub type UserOutputList = Vec<(String, UserOutputs)>;

#[derive(Debug, Default)]
pub struct BatchResult {
    /// Outputs per affected user, ordered by (partition, user id).
    pub outputs: UserOutputList,
    pub dead_letters: Vec<DeadLetter>,
    /// Next offset per consumed partition.
    pub offsets: Vec<(Arc<str>, i32, i64)>,
    /// Event times of applied events (for the event-to-publish lag metric).
    pub event_times: Vec<i64>,
    /// Partitions whose users all must be refreshed (the refresh topic is
    /// co-partitioned with the input); see [`Engine::refresh_page`].
    pub refresh_all: Vec<u32>,
    /// Changelog records of this batch's state changes (when the store's
    /// changelog is on), one batch per touched partition.
    pub changelog: Vec<changelog::Batch>,
}

/// One page of a refresh of everyone.
#[derive(Debug, Default)]
pub struct RefreshPage {
    pub outputs: UserOutputList,
    /// The last user of the page, to continue after.
    pub last: Option<String>,
    pub changelog: Vec<changelog::Batch>,
}

pub struct Engine {
    config: EngineConfig,
    /// Shared with the consumer, which resumes partitions at their stored offsets.
    store: Arc<Store>,
    catalog: Catalog,
    /// Item and genre counters per input partition: they move with their
    /// partition when it changes owner. Besides the partitions held, the
    /// ones followed from other instances (global item tables). Summed in
    /// partition order, so every instance's sums agree to the bit.
    item_parts: BTreeMap<u32, IdMap<Momentum>>,
    genre_parts: BTreeMap<u32, HashMap<String, Momentum>>,
    /// Co-watch neighbours per partition, like the item counters, and
    /// their sums.
    cowatch: CoWatchLists,
    /// Item and genre sums over the partitions this instance holds: what
    /// candidates see.
    items: IdMap<Momentum>,
    genres: HashMap<String, Momentum>,
    /// Catalog items by popularity, updated as items get events.
    popular: PopularOrder,
    /// Items with an event within the trending horizon (id, latest event time).
    active: IdMap<i64>,
    recompute_cache: RecomputeCache,
    /// The A/B variants in force (one `default` variant without an experiment).
    variants: Arc<Variants>,
    feedback: Feedback,
    watermark: i64,
    genre_share_ewma: BTreeMap<String, f64>,
    /// Next offset to apply per input partition, as committed with the state.
    applied: HashMap<(Arc<str>, i32), i64>,
    /// Partitions this instance may change (`None`: all, for in-process use).
    /// Records of others are left to their owner.
    owned: Option<BTreeSet<u32>>,
    /// The item index of the current state, shared by queries until the
    /// state changes (it ranks the whole catalog: too costly per query).
    index_cache: Option<Arc<ItemIndex>>,
    /// Whether `process` computes the affected users' outputs (the replay
    /// reads lists through `peek` instead and turns this off).
    outputs: bool,
    /// Whether a user whose state a batch did not change (only duplicates or
    /// replayed records) gets outputs again. At-least-once needs them: those
    /// outputs may never have reached the broker. Exactly-once does not (every
    /// committed batch's outputs are committed with it) and must not repeat a version.
    republish_unchanged: bool,
    /// Items and genres whose sums moved since they were last folded from
    /// the partitions (batches add to the sums incrementally, followed
    /// values replace parts): [`Engine::settle_item_tables`] folds them again.
    stale_items: BTreeSet<u32>,
    stale_genres: bool,
}

/// Users whose last published lists the feedback metrics remember.
const FEEDBACK_USERS: usize = 100_000;

/// Weight of the newest batch in the genre drift gauge.
const DRIFT_SMOOTHING: f64 = 0.05;

/// A batch's recomputed users' genre shares, summed as they are recomputed
/// (their outputs may leave in chunks before the batch ends), and how many
/// users were recomputed.
#[derive(Default)]
struct GenreDrift {
    share_sums: BTreeMap<String, f64>,
    users: u64,
}

impl GenreDrift {
    fn add(&mut self, outputs: &UserOutputs) {
        for g in &outputs.insights.genres {
            match self.share_sums.get_mut(g.genre.as_str()) {
                Some(sum) => *sum += g.share,
                None => {
                    self.share_sums.insert(g.genre.clone(), g.share);
                }
            }
        }
        self.users += 1;
    }
}

impl Engine {
    pub fn new(
        config: EngineConfig,
        store: Store,
        mut catalog: Catalog,
    ) -> Result<Engine, EngineError> {
        // Genre ids in stored user state keep their meaning across restarts.
        if let Some(vocabulary) = store.genre_vocabulary()? {
            catalog.adopt_genre_vocabulary(&vocabulary)?;
        }
        store.set_genre_vocabulary(&catalog.genre_vocabulary())?;
        let item_parts = store.items()?.into_iter().collect();
        let genre_parts = store.genres()?.into_iter().collect();
        let cowatch = CoWatchLists::new(store.cowatch()?, config.co_watch.neighbors);
        metrics::catalog_size(catalog.len());
        let variants = Arc::new(Variants::single(config.blend.clone(), None));
        let mut engine = Engine {
            config,
            store: Arc::new(store),
            catalog,
            item_parts,
            genre_parts,
            cowatch,
            items: IdMap::default(),
            genres: HashMap::new(),
            popular: PopularOrder::default(),
            active: IdMap::default(),
            variants,
            feedback: Feedback::new(FEEDBACK_USERS),
            recompute_cache: RecomputeCache::default(),
            watermark: 0,
            genre_share_ewma: BTreeMap::new(),
            applied: HashMap::new(),
            owned: None,
            index_cache: None,
            outputs: true,
            republish_unchanged: true,
            stale_items: BTreeSet::new(),
            stale_genres: false,
        };
        engine.sum_partitions();
        Ok(engine)
    }

    /// Recomputes the counters candidates see from the per-partition ones.
    fn sum_partitions(&mut self) {
        self.index_cache = None;
        self.stale_items.clear();
        self.stale_genres = false;
        let hl = self.config.decay.item_half_lives();
        self.items.clear();
        for part in self.item_parts.values() {
            for (id, m) in part.iter() {
                let total = self.items.entry(*id).or_default();
                *total = total.merge(*m, hl);
            }
        }
        self.genres.clear();
        for part in self.genre_parts.values() {
            for (g, m) in part {
                let total = self.genres.entry(g.clone()).or_default();
                *total = total.merge(*m, hl);
            }
        }
        self.watermark = self
            .items
            .values()
            .map(|m| m.long.as_of)
            .max()
            .unwrap_or(0)
            .max(self.watermark);
        self.popular = PopularOrder::build(&self.catalog, &self.items, hl);
        self.active = self
            .items
            .iter()
            .map(|(id, m)| (*id, m.short.as_of))
            .collect();
    }

    /// Restricts processing to these partitions (the consumer's assignment).
    /// Whether users whose state a batch left unchanged get outputs again
    /// (true by default; the exactly-once pipeline turns it off).
    pub fn set_republish_unchanged(&mut self, republish: bool) {
        self.republish_unchanged = republish;
    }

    pub fn set_owned(&mut self, partitions: Option<BTreeSet<u32>>) {
        self.owned = partitions;
    }

    pub fn owns(&self, partition: u32) -> bool {
        self.owned.as_ref().is_none_or(|o| o.contains(&partition))
    }

    /// Up to `limit` users with state in owned partitions, by partition and id.
    pub fn known_users(&self, limit: usize) -> Result<Vec<String>, EngineError> {
        let partitions: Vec<u32> = match &self.owned {
            Some(owned) => owned.iter().copied().collect(),
            None => self.store.user_partitions()?,
        };
        let mut users = Vec::new();
        for p in partitions {
            if users.len() >= limit {
                break;
            }
            let page = self.store.users_page(p, None, limit - users.len())?;
            users.extend(page.into_iter().map(|(user, _)| user));
        }
        Ok(users)
    }

    /// The owned partition that holds state for `user_id`, if any.
    pub fn locate_user(&self, user_id: &str) -> Result<Option<u32>, EngineError> {
        let partitions: Vec<u32> = match &self.owned {
            Some(owned) => owned.iter().copied().collect(),
            None => self.store.user_partitions()?,
        };
        for p in partitions {
            if self.store.user(p, user_id)?.is_some() {
                return Ok(Some(p));
            }
        }
        Ok(None)
    }

    /// Forgets a partition this instance lost: its state, counters and offsets.
    pub fn drop_partition(
        &mut self,
        partition: u32,
        input_topics: &[&str],
    ) -> Result<(), EngineError> {
        self.store.drop_partition(partition, input_topics)?;
        self.forget_in_memory(partition);
        Ok(())
    }

    /// Gives up a partition this instance lost but keeps following its item
    /// side (global item tables): its users, outbox and offsets go; its
    /// counters and co-watch lists stay, as of this instance's last commit,
    /// and the follower updates them from the new owner's changelog.
    ///
    /// Returns the changelog offset up to which the kept item side reflects
    /// every record: the follower must read the partition again from there,
    /// since it skipped the partition's batches while this store held it.
    pub fn release_partition(
        &mut self,
        partition: u32,
        input_topics: &[&str],
    ) -> Result<i64, EngineError> {
        let known = self
            .store
            .partition_meta(partition)?
            .map_or(0, |m| m.changelog_next);
        self.store.drop_user_side(partition, input_topics)?;
        self.applied.retain(|(_, p), _| *p as u32 != partition);
        Ok(known)
    }

    /// Partitions whose item side (counters or co-watch lists) this
    /// instance keeps, held or followed.
    pub fn item_side_partitions(&self) -> BTreeSet<u32> {
        self.item_parts
            .keys()
            .chain(self.genre_parts.keys())
            .copied()
            .chain(self.cowatch.partitions())
            .collect()
    }

    /// Applies the item side of other instances' complete changelog batches
    /// (global item tables) and stores where to resume following. Batches of
    /// partitions whose whole state this store holds are skipped (held now,
    /// or between a revoke and the next assignment): its own state is at
    /// least as new, and a lagging follower's older batches must not
    /// overwrite it. A partition it gives up is read again from where its
    /// state was known ([`Engine::release_partition`]).
    /// The sums candidates read change at the next [`Engine::settle_item_tables`].
    /// Returns how many batches were applied.
    pub fn apply_followed(&mut self, batches: &[ItemBatch]) -> Result<usize, EngineError> {
        let mut followed = Followed::default();
        let mut applied = 0;
        let held: BTreeSet<u32> = self
            .store
            .partitions()?
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        for batch in batches {
            let partition = batch.partition;
            followed.positions.push((partition, batch.next_offset));
            if held.contains(&partition) || self.owned.is_none() {
                metrics::global_items_batch("own");
                continue;
            }
            metrics::global_items_batch("applied");
            applied += 1;
            for (id, raw) in &batch.items {
                let Some(value) = decoded::<Momentum>(raw, "item counters") else {
                    continue;
                };
                let part = self.item_parts.entry(partition).or_default();
                match value {
                    Some(m) => part.insert(*id, m),
                    None => part.remove(id),
                };
                followed.items.push((partition, *id, raw.clone()));
                self.stale_items.insert(*id);
            }
            for (genre, raw) in &batch.genres {
                let Some(value) = decoded::<Momentum>(raw, "genre counters") else {
                    continue;
                };
                let part = self.genre_parts.entry(partition).or_default();
                match value {
                    Some(m) => part.insert(genre.clone(), m),
                    None => part.remove(genre),
                };
                followed
                    .genres
                    .push((partition, genre.clone(), raw.clone()));
                self.stale_genres = true;
            }
            for (id, slot, raw) in &batch.cowatch {
                let write = match slot {
                    None => {
                        let Some(list) = decoded::<Neighbors>(raw, "co-watch list") else {
                            continue;
                        };
                        self.cowatch.set(partition, *id, list.clone());
                        CoWatchWrite::List(list)
                    }
                    Some(slot) => {
                        let Some(entry) = decoded::<Neighbor>(raw, "co-watch entry") else {
                            continue;
                        };
                        self.cowatch.set_slot(partition, *id, *slot, entry);
                        CoWatchWrite::Slot(*slot, entry)
                    }
                };
                followed.cowatch.push((partition, *id, write));
            }
        }
        self.store.apply_followed(&followed)?;
        Ok(applied)
    }

    /// Folds the sums of the items and genres that moved since the last call
    /// from every partition's counters (held and followed), in partition
    /// order, as [`Engine::sum_partitions`] does for all: every instance
    /// then ranks the catalog from the same sums to the bit, whatever order
    /// its batches came in. The pipeline calls it at each global flush.
    pub fn settle_item_tables(&mut self) {
        if self.stale_items.is_empty() && !self.stale_genres {
            return;
        }
        let hl = self.config.decay.item_half_lives();
        for id in std::mem::take(&mut self.stale_items) {
            let sum = self
                .item_parts
                .values()
                .filter_map(|part| part.get(&id))
                .fold(None, |total: Option<Momentum>, m| {
                    Some(total.unwrap_or_default().merge(*m, hl))
                });
            match sum {
                Some(m) => {
                    self.items.insert(id, m);
                    self.active.insert(id, m.short.as_of);
                    self.watermark = self.watermark.max(m.long.as_of);
                }
                None => {
                    self.items.remove(&id);
                    self.active.remove(&id);
                }
            }
            self.popular.update(id, self.items.get(&id), hl);
        }
        if std::mem::take(&mut self.stale_genres) {
            self.genres.clear();
            for part in self.genre_parts.values() {
                for (g, m) in part {
                    let total = self.genres.entry(g.clone()).or_default();
                    *total = total.merge(*m, hl);
                }
            }
        }
        self.index_cache = None;
    }

    fn forget_in_memory(&mut self, partition: u32) {
        self.item_parts.remove(&partition);
        self.genre_parts.remove(&partition);
        self.cowatch.set_partition(partition, None);
        self.applied.retain(|(_, p), _| *p as u32 != partition);
        self.sum_partitions();
    }

    /// Replaces a partition's state with one restored from the changelog.
    pub fn install_partition(
        &mut self,
        partition: u32,
        restored: &changelog::Restored,
        meta: PartitionMeta,
        input_topics: &[&str],
    ) -> Result<(), EngineError> {
        let bad = |detail: String| EngineError::Restore { partition, detail };
        // Genre ids inside user states must keep their meaning here.
        if let Some(marker) = &restored.marker {
            let ours = self.catalog.genre_vocabulary();
            let theirs = &marker.genre_vocabulary;
            if ours.iter().zip(theirs).any(|(a, b)| a != b) {
                return Err(bad(format!(
                    "its genre ids follow the vocabulary {theirs:?}, which disagrees with this instance's {ours:?}"
                )));
            }
            if theirs.len() > ours.len() {
                self.catalog
                    .adopt_genre_vocabulary(&marker.genre_vocabulary)
                    .map_err(|e| bad(format!("genre vocabulary: {e}")))?;
                self.store
                    .set_genre_vocabulary(&self.catalog.genre_vocabulary())?;
                // Adopting rebuilds the catalog's genre records (appended
                // genres): drop what was derived from the old ones (the
                // candidate index is dropped by `sum_partitions` below).
                self.recompute_cache.catalog_changed();
            }
        }
        let mut items = IdMap::default();
        for (id, v) in &restored.items {
            let m: Momentum =
                postcard::from_bytes(v).map_err(|e| bad(format!("item {id}: {e}")))?;
            items.insert(*id, m);
        }
        let mut genres = HashMap::new();
        for (g, v) in &restored.genres {
            let m: Momentum =
                postcard::from_bytes(v).map_err(|e| bad(format!("genre {g}: {e}")))?;
            genres.insert(g.clone(), m);
        }
        let cowatch: IdMap<Neighbors> = restored.cowatch.iter().cloned().collect();
        for (user, v) in &restored.users {
            postcard::from_bytes::<UserState>(v).map_err(|e| bad(format!("user {user}: {e}")))?;
        }
        self.store
            .install(partition, restored, meta, input_topics)?;
        self.forget_in_memory(partition);
        self.item_parts.insert(partition, items);
        self.genre_parts.insert(partition, genres);
        self.cowatch.set_partition(partition, Some(cowatch));
        self.sum_partitions();
        Ok(())
    }

    /// One `default` variant with the engine's blend and this scorer.
    pub fn set_scorer(&mut self, scorer: Option<Arc<dyn Scorer>>) {
        self.variants = Arc::new(Variants::single(self.config.blend.clone(), scorer));
    }

    /// Swaps the A/B variants (a new experiment file or model) between batches.
    pub fn set_variants(&mut self, variants: Arc<Variants>) {
        let kept = self.config.lists.recent_items;
        for v in variants.list() {
            let wanted = v.scorer.as_ref().and_then(|s| s.history_len());
            if let Some(wanted) = wanted.filter(|&l| l > kept) {
                tracing::warn!(
                    variant = %v.name,
                    model_history = wanted,
                    recent_items = kept,
                    "the model reads a longer history than engine.lists.recent_items keeps; \
                     it sees shorter histories than it was trained on"
                );
            }
        }
        self.variants = variants;
    }

    /// Whether `process` computes outputs (on by default). An in-process
    /// replay that reads every list through [`Engine::peek`] turns it off:
    /// the state changes are the same, only the unused outputs are skipped.
    pub fn compute_outputs(&mut self, on: bool) {
        self.outputs = on;
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn store_handle(&self) -> Arc<Store> {
        self.store.clone()
    }

    pub fn watermark(&self) -> i64 {
        self.watermark
    }

    /// Applies catalog-topic records (`None` deletes a movie).
    pub fn update_catalog(&mut self, updates: Vec<(u32, Option<CatalogRecord>)>) -> Vec<String> {
        self.index_cache = None;
        let mut errors = Vec::new();
        for (id, record) in updates {
            match record {
                Some(r) => {
                    if let Err(e) = self.catalog.upsert(r) {
                        errors.push(format!("movie {id}: {e}"));
                    }
                }
                None => self.catalog.remove(id),
            }
        }
        self.recompute_cache.catalog_changed();
        self.popular = PopularOrder::build(
            &self.catalog,
            &self.items,
            self.config.decay.item_half_lives(),
        );
        metrics::catalog_size(self.catalog.len());
        // New genres are appended, so persisting the grown vocabulary suffices.
        if let Err(e) = self
            .store
            .set_genre_vocabulary(&self.catalog.genre_vocabulary())
        {
            errors.push(format!("persisting the genre vocabulary: {e}"));
        }
        errors
    }

    /// Applies one micro-batch and computes the outputs of every affected user.
    /// An error leaves the in-memory counters and co-watch lists ahead of the
    /// store: drop the engine and start again from the store (the pipeline
    /// and the replay stop on it).
    pub fn process(&mut self, records: Vec<Record>) -> Result<BatchResult, EngineError> {
        self.process_in_chunks(records, usize::MAX, &mut |_| true)
    }

    /// [`Engine::process`], handing the outputs to `emit` every `chunk_users`
    /// recomputed users instead of returning them, so that a big batch's
    /// rendered outputs are not all held at once (the rest, fewer than
    /// `chunk_users`, are in the result). `emit` returns false when nobody
    /// takes outputs any more; the batch is still applied and committed.
    /// Emitted outputs may be published before the batch's state is committed
    /// (under at_least_once they reach consumers then; under exactly_once
    /// they wait in the batch's transaction): after a crash its events are
    /// read again and give the same versions.
    pub fn process_in_chunks(
        &mut self,
        records: Vec<Record>,
        chunk_users: usize,
        emit: &mut dyn FnMut(UserOutputList) -> bool,
    ) -> Result<BatchResult, EngineError> {
        let started = Instant::now();
        metrics::batch(records.len());
        let mut result = BatchResult::default();
        let mut users: BTreeMap<(u32, String), UserState> = BTreeMap::new();
        let mut touched_items: Vec<(u32, u32)> = Vec::new();
        let mut touched_genres: Vec<(u32, String)> = Vec::new();
        let mut offsets: BTreeMap<(Arc<str>, i32), i64> = BTreeMap::new();
        // Users whose events were applied in this batch (their model vector moves).
        let mut learned: BTreeSet<(u32, String)> = BTreeSet::new();
        // Each touched user's version before the batch.
        let mut before: HashMap<(u32, String), u64> = HashMap::new();
        let hl = self.config.decay.item_half_lives();

        for record in records {
            let partition = record.source.partition.max(0) as u32;
            if !self.owns(partition) {
                // Consumed just before its partition was revoked: the new owner
                // reads it again from the offsets in the changelog.
                metrics::record_not_owned();
                continue;
            }
            // Records below the offset stored with the state were applied before a
            // restart, but their outputs may not have been published: recompute
            // and republish them (same version), never apply them twice.
            let replayed = record.source.offset < self.applied_offset(&record.source)?;
            let next = offsets
                .entry((record.source.topic.clone(), record.source.partition))
                .or_insert(0);
            *next = (*next).max(record.source.offset + 1);
            match record.body {
                // Its dead letter went out with the batch that first read it,
                // in the same transaction under exactly-once.
                Body::Invalid(_) if replayed && !self.republish_unchanged => {}
                Body::Invalid(rejection) => {
                    result.dead_letters.push(dead_letter(
                        record.source,
                        record.key,
                        record.payload,
                        rejection,
                    ));
                }
                Body::Event(event) => {
                    let Some(movie) = self.catalog.get(event.movie_id) else {
                        if replayed && !self.republish_unchanged {
                            continue;
                        }
                        let rejection = Rejection {
                            reason: "unknown_movie",
                            detail: format!("movie_id {} is not in the catalog", event.movie_id),
                        };
                        metrics::event(event.kind.as_str(), "dead_lettered");
                        result.dead_letters.push(dead_letter(
                            record.source,
                            record.key,
                            record.payload,
                            rejection,
                        ));
                        continue;
                    };
                    let state = user_entry(
                        &self.store,
                        &mut users,
                        &mut before,
                        partition,
                        &event.user_id,
                    )?;
                    if replayed {
                        metrics::event(event.kind.as_str(), "replayed");
                        continue;
                    }
                    match state.apply(&event, movie, &self.config) {
                        Applied::Duplicate => metrics::event(event.kind.as_str(), "duplicate"),
                        Applied::Applied => {
                            metrics::event(event.kind.as_str(), "applied");
                            let variant = self.variants.assign(&event.user_id);
                            self.feedback.interaction(&variant.name, &event);
                            learned.insert((partition, event.user_id.clone()));
                            result.event_times.push(event.ts);
                            self.watermark = self.watermark.max(event.ts);
                            if event.kind.engages() {
                                count_cowatch(
                                    &mut self.cowatch,
                                    &self.config.co_watch,
                                    partition,
                                    movie.id,
                                    state,
                                );
                            }
                            // Popularity counts engagement, not its sign: a
                            // low rating still means the movie was watched.
                            if event.kind.engages()
                                || self.config.event_weights.weight(event.kind, event.value) > 0.0
                            {
                                let part = self.item_parts.entry(partition).or_default();
                                let m = part.entry(movie.id).or_default();
                                *m = m.add(1.0, event.ts, hl);
                                let m = self.items.entry(movie.id).or_default();
                                *m = m.add(1.0, event.ts, hl);
                                touched_items.push((partition, movie.id));
                                self.stale_items.insert(movie.id);
                                self.stale_genres = true;
                                for g in movie.genres.iter() {
                                    let name = self.catalog.genre_name(g).to_string();
                                    let part = self.genre_parts.entry(partition).or_default();
                                    let m = part.entry(name.clone()).or_default();
                                    *m = m.add(1.0, event.ts, hl);
                                    let m = self.genres.entry(name.clone()).or_default();
                                    *m = m.add(1.0, event.ts, hl);
                                    touched_genres.push((partition, name));
                                }
                            }
                        }
                    }
                }
                Body::Refresh(cmd) => match cmd.user_id {
                    Some(user) => {
                        metrics::refresh("user");
                        let state =
                            user_entry(&self.store, &mut users, &mut before, partition, &user)?;
                        if !replayed {
                            state.refresh();
                        }
                    }
                    // A refresh of everyone is best-effort: interrupted by a crash, it
                    // is not resumed (send it again).
                    None if !replayed => {
                        metrics::refresh("all");
                        if !result.refresh_all.contains(&partition) {
                            result.refresh_all.push(partition);
                        }
                    }
                    None => {}
                },
            }
        }
        for key in &learned {
            if let (Some(state), Some(scorer)) = (
                users.get_mut(key),
                self.variants.assign(&key.1).scorer.as_ref(),
            ) {
                scorer.observe(&key.1, state);
            }
        }
        let mut moved: Vec<u32> = touched_items.iter().map(|(_, id)| *id).collect();
        moved.sort_unstable();
        moved.dedup();
        for id in moved {
            let m = self.items.get(&id);
            self.popular.update(id, m, hl);
            if let Some(m) = m {
                self.active.insert(id, m.short.as_of);
            }
        }
        metrics::stage("apply", started.elapsed().as_secs_f64());

        let recompute_started = Instant::now();
        let index = self.current_index();
        let mut changes = Changes::default();
        let mut drift = GenreDrift::default();
        let mut emitting = true;
        for (key, state) in users {
            let previous_version = before.get(&key).copied().unwrap_or(state.version);
            let (partition, user) = key;
            let unchanged = state.version == previous_version;
            if !self.outputs || (unchanged && !self.republish_unchanged) {
                changes.users.push((partition, user, state));
                continue;
            }
            let mut outputs = self.outputs_for(&index, &user, &state)?;
            outputs.previous_version = previous_version;
            self.feedback.published(&user, &outputs);
            drift.add(&outputs);
            result.outputs.push((user.clone(), outputs));
            changes.users.push((partition, user, state));
            if result.outputs.len() >= chunk_users && emitting {
                emitting = emit(std::mem::take(&mut result.outputs));
            }
        }
        metrics::users_recomputed(drift.users);
        metrics::stage("recompute", recompute_started.elapsed().as_secs_f64());
        self.track_genre_drift(drift);

        touched_items.sort_unstable();
        touched_items.dedup();
        touched_genres.sort_unstable();
        touched_genres.dedup();
        changes.cowatch = self.cowatch.take_changes();
        changes.items = touched_items
            .iter()
            .map(|(p, id)| (*p, *id, self.item_parts[p][id]))
            .collect();
        changes.genres = touched_genres
            .into_iter()
            .map(|(p, g)| {
                let m = self.genre_parts[&p][&g];
                (p, g, m)
            })
            .collect();
        // A replayed batch must not move the applied offset back.
        for ((t, p), o) in &offsets {
            let applied = self.applied.entry((t.clone(), *p)).or_insert(0);
            *applied = (*applied).max(*o);
            changes.offsets.push((t.to_string(), *p, *applied));
        }
        result.offsets = offsets.into_iter().map(|((t, p), o)| (t, p, o)).collect();
        let commit_started = Instant::now();
        result.changelog = self.store.commit(&changes)?;
        metrics::stage("commit", commit_started.elapsed().as_secs_f64());
        Ok(result)
    }

    /// The first offset of a partition not yet applied to the state.
    fn applied_offset(&mut self, source: &SourcePos) -> Result<i64, StoreError> {
        let key = (source.topic.clone(), source.partition);
        if let Some(o) = self.applied.get(&key) {
            return Ok(*o);
        }
        let o = self
            .store
            .offset(&source.topic, source.partition)?
            .unwrap_or(0);
        self.applied.insert(key, o);
        Ok(o)
    }

    /// Recomputes one page of stored users (for a refresh of everyone), returning
    /// their outputs and the last user id to continue after.
    pub fn refresh_page(
        &mut self,
        partition: u32,
        after: Option<&str>,
        limit: usize,
    ) -> Result<RefreshPage, EngineError> {
        let page = self.store.users_page(partition, after, limit)?;
        let last = page.last().map(|(u, _)| u.clone());
        let index = self.current_index();
        let mut outputs = Vec::with_capacity(page.len());
        let mut changes = Changes::default();
        for (user, mut state) in page {
            let previous_version = state.version;
            state.refresh();
            let mut o = self.outputs_for(&index, &user, &state)?;
            o.previous_version = previous_version;
            self.feedback.published(&user, &o);
            outputs.push((user.clone(), o));
            changes.users.push((partition, user, state));
        }
        let changelog = self.store.commit(&changes)?;
        metrics::users_recomputed(outputs.len() as u64);
        Ok(RefreshPage {
            outputs,
            last,
            changelog,
        })
    }

    /// The outputs a user would get now, without changing any state.
    pub fn peek(&mut self, partition: u32, user_id: &str) -> Result<UserOutputs, EngineError> {
        let state = self.store.user(partition, user_id)?.unwrap_or_default();
        let index = self.current_index();
        self.outputs_for(&index, user_id, &state)
    }

    /// [`Engine::peek`], and the candidate pool the outputs were ranked from
    /// (what a learned blend is fitted on).
    pub fn peek_with_pool(
        &mut self,
        partition: u32,
        user_id: &str,
    ) -> Result<(UserOutputs, Vec<crate::ranker::PoolEntry>), EngineError> {
        self.recompute_cache.pool = Some(Vec::new());
        let outputs = self.peek(partition, user_id);
        let pool = self.recompute_cache.pool.take().unwrap_or_default();
        Ok((outputs?, pool))
    }

    fn current_index(&mut self) -> Arc<ItemIndex> {
        // Rebuilt once the newest event is `ranking_refresh_ms` past it.
        if let Some(index) = &self.index_cache {
            if self.watermark
                < index
                    .now
                    .saturating_add(self.config.lists.ranking_refresh_ms)
            {
                return index.clone();
            }
        }
        let hl = self.config.decay.item_half_lives();
        let horizon = self
            .watermark
            .saturating_sub(recommend::trending_horizon(hl));
        self.active.retain(|_, last| *last >= horizon);
        // In hash order: the index ranks them by a total order.
        let active: Vec<u32> = self.active.keys().copied().collect();
        let index = Arc::new(ItemIndex::build(
            &self.catalog,
            &self.items,
            &self.genres,
            self.watermark,
            hl,
            &self.popular,
            &active,
        ));
        self.index_cache = Some(index.clone());
        index
    }

    fn outputs_for(
        &mut self,
        index: &ItemIndex,
        user: &str,
        state: &UserState,
    ) -> Result<UserOutputs, EngineError> {
        let variant = self.variants.assign(user);
        let ctx = Context {
            catalog: &self.catalog,
            items: &self.items,
            cowatch: &self.cowatch,
            index,
            config: &self.config,
            variant,
        };
        let started = Instant::now();
        let outputs = recommend::build_outputs(&ctx, &mut self.recompute_cache, user, state)?;
        if variant.scorer.is_some() {
            metrics::scorer_latency(started.elapsed().as_secs_f64());
        }
        Ok(outputs)
    }

    /// Genre drift: a smoothed mean of each genre's share in updated users'
    /// preferences, one step per batch.
    fn track_genre_drift(&mut self, drift: GenreDrift) {
        if drift.users == 0 {
            return;
        }
        let n = drift.users as f64;
        for g in self.genre_share_ewma.values_mut() {
            *g *= 1.0 - DRIFT_SMOOTHING;
        }
        for (genre, sum) in drift.share_sums {
            let e = self.genre_share_ewma.entry(genre).or_default();
            *e += DRIFT_SMOOTHING * sum / n;
        }
        for (genre, share) in &self.genre_share_ewma {
            metrics::genre_weight(genre, *share);
        }
    }
}

/// A followed store value: `Some(None)` for a deleted key, `None` (counted
/// as undecodable, never stored) when it is not a value of this kind.
fn decoded<T: serde::de::DeserializeOwned>(
    raw: &Option<Vec<u8>>,
    what: &'static str,
) -> Option<Option<T>> {
    match raw.as_deref().map(postcard::from_bytes::<T>).transpose() {
        Ok(value) => Some(value),
        Err(e) => {
            metrics::global_items_batch("undecodable");
            tracing::warn!(%e, what, "followed changelog value cannot be read; skipped");
            None
        }
    }
}

fn dead_letter(
    source: SourcePos,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    r: Rejection,
) -> DeadLetter {
    metrics::dead_letter(r.reason);
    DeadLetter {
        source,
        key,
        payload,
        reason: r.reason,
        detail: r.detail,
    }
}

/// Pairs a newly engaged movie with the user's previous engaged items, both
/// ways (the user's state already holds the new event).
fn count_cowatch(
    lists: &mut CoWatchLists,
    co: &crate::config::CoWatchConfig,
    partition: u32,
    movie: u32,
    state: &UserState,
) {
    for other in state
        .engaged_recent()
        .filter(|id| *id != movie)
        .take(co.window)
    {
        lists.add(partition, movie, other, 1.0);
        lists.add(partition, other, movie, 1.0);
    }
}

/// The user's state in this batch, loaded from the store on first use.
/// The batch's copy of a user's state, loaded on first touch (its version
/// then noted in `before`).
fn user_entry<'u>(
    store: &Store,
    users: &'u mut BTreeMap<(u32, String), UserState>,
    before: &mut HashMap<(u32, String), u64>,
    partition: u32,
    user: &str,
) -> Result<&'u mut UserState, StoreError> {
    use std::collections::btree_map::Entry;
    match users.entry((partition, user.to_string())) {
        Entry::Occupied(e) => Ok(e.into_mut()),
        Entry::Vacant(e) => {
            let state = store.user(partition, user)?.unwrap_or_default();
            before.insert(e.key().clone(), state.version);
            Ok(e.insert(state))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventType;

    fn catalog() -> Catalog {
        let mut c = Catalog::default();
        for (i, genre) in ["Comedy", "Drama", "Sci-Fi"].iter().enumerate() {
            for j in 0..10u32 {
                c.upsert(CatalogRecord {
                    movie_id: i as u32 * 10 + j + 1,
                    title: format!("{genre} {j}"),
                    genres: vec![genre.to_string()],
                    year: Some(1990 + j as u16),
                    tmdb_id: None,
                    imdb_id: None,
                    tags: vec![],
                })
                .unwrap();
            }
        }
        c
    }

    fn record(offset: i64, user: &str, movie: u32, kind: EventType, ts: i64) -> Record {
        Record {
            source: SourcePos {
                topic: Arc::from("in"),
                partition: 2,
                offset,
            },
            key: Some(user.as_bytes().to_vec()),
            payload: Vec::new(),
            received: Instant::now(),
            body: Body::Event(Interaction {
                event_id: format!("{user}-{offset}"),
                user_id: user.into(),
                movie_id: movie,
                kind,
                value: None,
                ts,
                context: None,
            }),
        }
    }

    fn engine(dir: &std::path::Path) -> Engine {
        Engine::new(
            EngineConfig::default(),
            Store::open(dir, 8).unwrap(),
            catalog(),
        )
        .unwrap()
    }

    #[test]
    fn a_batch_in_chunks_gives_the_outputs_of_a_whole_batch() {
        let batch = || -> Vec<Record> {
            (0..7)
                .map(|i| {
                    record(
                        i,
                        &format!("u{i}"),
                        21 + i as u32,
                        EventType::Like,
                        1000 + i,
                    )
                })
                .chain([record(7, "u0", 30, EventType::Complete, 2000)])
                .collect()
        };
        let (whole_dir, chunked_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut whole_engine = engine(whole_dir.path());
        let whole = whole_engine.process(batch()).unwrap();
        let mut chunked = engine(chunked_dir.path());
        let mut chunks: Vec<Vec<String>> = Vec::new();
        let mut outputs = Vec::new();
        let result = chunked
            .process_in_chunks(batch(), 3, &mut |chunk| {
                chunks.push(chunk.iter().map(|(u, _)| u.clone()).collect());
                outputs.extend(chunk);
                true
            })
            .unwrap();
        assert_eq!(
            chunks.len(),
            2,
            "7 users in chunks of 3: two chunks, the rest in the result"
        );
        assert!(chunks.iter().all(|c| c.len() == 3));
        assert_eq!(result.outputs.len(), 1);
        outputs.extend(result.outputs);
        let encoded = |list: &UserOutputList| -> Vec<_> {
            list.iter().map(|(u, o)| (u.clone(), o.encode())).collect()
        };
        assert_eq!(encoded(&outputs), encoded(&whole.outputs));
        assert_eq!(result.offsets, whole.offsets);
        assert_eq!(chunked.store().offset("in", 2).unwrap(), Some(8));
        assert_eq!(chunked.genre_share_ewma, whole_engine.genre_share_ewma);

        // Nobody to take the outputs: the batch is still applied and committed.
        let gone_dir = tempfile::tempdir().unwrap();
        let mut gone = engine(gone_dir.path());
        let mut calls = 0;
        gone.process_in_chunks(batch(), 3, &mut |_| {
            calls += 1;
            false
        })
        .unwrap();
        assert_eq!(calls, 1, "no more chunks once the receiver is gone");
        assert_eq!(gone.store().offset("in", 2).unwrap(), Some(8));
    }

    #[test]
    fn a_batch_updates_state_outputs_and_offsets_together() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = engine(dir.path());
        let mut batch: Vec<Record> = (0..5)
            .map(|i| record(i, "fan", 21 + i as u32, EventType::Like, 1000 + i))
            .collect();
        batch.push(record(5, "crowd", 1, EventType::Play, 900));
        batch.push(record(6, "fan", 999, EventType::Like, 2000));
        let result = e.process(batch).unwrap();

        assert_eq!(result.dead_letters.len(), 1);
        assert_eq!(result.dead_letters[0].reason, "unknown_movie");
        assert_eq!(result.offsets, vec![(Arc::from("in"), 2, 7)]);
        assert_eq!(e.store().offset("in", 2).unwrap(), Some(7));
        let fan = &result.outputs.iter().find(|(u, _)| u == "fan").unwrap().1;
        assert_eq!(
            fan.recommendations.version, 5,
            "one version per applied event"
        );
        assert_eq!(fan.carousels.rows[1].id, "genre:Sci-Fi");
        for row in &fan.carousels.rows {
            assert!(
                row.movie_ids.iter().all(|i| !(21..=25).contains(i)),
                "{}",
                row.id
            );
        }
        assert_eq!(e.store().user(2, "fan").unwrap().unwrap().version, 5);
    }

    /// Scores by movie id and counts the items it was asked to score.
    #[derive(Default)]
    struct CountingScorer {
        asked: std::sync::atomic::AtomicUsize,
    }

    impl Scorer for CountingScorer {
        fn info(&self) -> crate::output::ModelInfo {
            crate::output::ModelInfo {
                name: "counting".into(),
                version: "1".into(),
            }
        }

        fn score(
            &self,
            _user_id: &str,
            _state: &UserState,
            items: &[u32],
        ) -> Result<Vec<f32>, crate::recommend::ScoreError> {
            self.asked
                .fetch_add(items.len(), std::sync::atomic::Ordering::Relaxed);
            Ok(items
                .iter()
                .map(|id| (id * 37 % 29) as f32 / 29.0)
                .collect())
        }
    }

    #[test]
    fn the_model_rescores_the_head_of_each_ranked_list_and_every_shown_item() {
        let batch = || -> Vec<Record> {
            (0..4)
                .map(|i| record(i, "u", 21 + i as u32, EventType::Like, 1000 + i))
                .chain(
                    (0..12).map(|i| record(4 + i, "crowd", 1 + i as u32, EventType::Play, 900 + i)),
                )
                .collect()
        };
        // Lists of 3: a depth of 1 re-scores 3 candidates per ranked list.
        let peek = |depth: usize, with_pool: bool| {
            let dir = tempfile::tempdir().unwrap();
            let mut config = EngineConfig::default();
            config.lists.top_n = 3;
            config.lists.row_size = 3;
            config.lists.rescore_depth = depth;
            let blend = config.blend.clone();
            let mut e =
                Engine::new(config, Store::open(dir.path(), 8).unwrap(), catalog()).unwrap();
            e.process(batch()).unwrap();
            let scorer = Arc::new(CountingScorer::default());
            e.set_scorer(Some(scorer.clone()));
            let outputs = if with_pool {
                e.peek_with_pool(2, "u").unwrap().0
            } else {
                e.peek(2, "u").unwrap()
            };
            let asked = scorer.asked.load(std::sync::atomic::Ordering::Relaxed);
            (outputs, asked, blend)
        };
        let (all, asked_all, blend) = peek(0, false);
        let (head, asked_head, _) = peek(1, false);
        assert!(
            asked_head < asked_all,
            "the head and the shown items ({asked_head}) are fewer than the pool ({asked_all})"
        );
        // A shortlist as deep as the pool changes nothing.
        assert_eq!(peek(100, false).0.encode(), all.encode());
        // Collecting the pool (for the learned blend) scores all of it, but
        // the outputs are what the engine publishes without it.
        assert_eq!(peek(1, true).0.encode(), head.encode());
        // Every published item carries the model's score, and its score is
        // the blend of the signals it publishes.
        let recs = &head.recommendations.items;
        assert_eq!(recs.len(), 3);
        for item in recs {
            assert!(item.signals.ncf.is_some(), "{item:?}");
            let expected = crate::blend::blend(&item.signals, &blend);
            assert!((item.score - expected).abs() < 1e-5, "{item:?}");
        }
        assert!(recs.windows(2).all(|w| w[0].score >= w[1].score));
        // A carousel item's score includes the model's wherever it is shown:
        // the same as when the model scores every candidate.
        let mut compared = 0;
        for item in &head.carousels.items {
            if let Some(same) = all
                .carousels
                .items
                .iter()
                .find(|a| a.movie_id == item.movie_id)
            {
                assert_eq!(same.score, item.score, "{item:?}");
                compared += 1;
            }
        }
        assert!(compared > 3, "{compared} carousel items in common");
    }

    #[test]
    fn a_learned_blend_ranks_the_pool_and_names_itself() {
        use crate::ranker::{learned_blend, FitReport, FEATURE_COUNT};
        let dir = tempfile::tempdir().unwrap();
        let mut e = engine(dir.path());
        let batch: Vec<Record> = (0..4)
            .map(|i| record(i, "u", 21 + i as u32, EventType::Like, 1000 + i))
            .chain((0..6).map(|i| record(4 + i, "crowd", 1 + i as u32, EventType::Play, 900 + i)))
            .collect();
        e.process(batch).unwrap();
        // Popularity against the grain: the least popular candidates first.
        let mut weights = vec![0.0; FEATURE_COUNT];
        weights[2] = -3.0;
        weights[0] = 0.5;
        let ranker = learned_blend(
            "anti-popular-1".into(),
            "test".into(),
            None,
            weights,
            FitReport::default(),
        );
        e.set_variants(Arc::new(Variants::only(crate::experiment::Variant {
            name: "learned".into(),
            share: 1.0,
            blend: ranker.reason_weights(),
            scorer: None,
            sources: crate::experiment::ALL_SOURCES,
            model_path: None,
            ranker: Some(Arc::new(ranker.clone())),
            ranker_path: None,
        })));
        let (outputs, pool) = e.peek_with_pool(2, "u").unwrap();
        let recs = &outputs.recommendations;
        assert_eq!(recs.blend.as_deref(), Some("anti-popular-1"));
        assert!(!pool.is_empty());
        // Every published score is the ranker's, from the published signals.
        for item in &recs.items {
            let entry = pool.iter().find(|p| p.movie_id == item.movie_id).unwrap();
            let expected = ranker.score(&entry.signals, entry.sources);
            assert!((item.score - expected).abs() < 1e-5, "{item:?}");
        }
        // The pool's best by the ranker leads the list (one genre, no cap at work).
        let best = pool
            .iter()
            .max_by(|a, b| {
                ranker
                    .score(&a.signals, a.sources)
                    .total_cmp(&ranker.score(&b.signals, b.sources))
                    .then(b.movie_id.cmp(&a.movie_id))
            })
            .unwrap();
        assert_eq!(recs.items[0].movie_id, best.movie_id);
        // Peeking with the pool changes nothing: the same outputs without it.
        assert_eq!(e.peek(2, "u").unwrap(), outputs);
    }

    #[test]
    fn state_and_item_counters_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut e = engine(dir.path());
            e.process(vec![record(0, "a", 3, EventType::Complete, 5000)])
                .unwrap();
        }
        let mut e = engine(dir.path());
        assert_eq!(e.watermark(), 5000);
        let again = e
            .process(vec![record(0, "a", 3, EventType::Complete, 5000)])
            .unwrap();
        // Redelivered after the restart: below the stored offset, so recomputed
        // and republished with the same version, not applied twice.
        let state = e.store().user(2, "a").unwrap().unwrap();
        assert_eq!(state.counters.by_type[EventType::Complete.index()], 1);
        assert_eq!(
            again.outputs[0].1.recommendations.version, 1,
            "same version: a duplicate"
        );
        assert_eq!(
            e.store().offset("in", 2).unwrap(),
            Some(1),
            "the offset never moves back"
        );
        // The next new record is applied as usual.
        let next = e
            .process(vec![record(1, "a", 4, EventType::Like, 6000)])
            .unwrap();
        assert_eq!(next.outputs[0].1.recommendations.version, 2);
    }

    #[test]
    fn outputs_carry_the_previous_version_and_exactly_once_skips_repeats() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = engine(dir.path());
        let first = e
            .process(vec![
                record(0, "a", 3, EventType::Play, 5000),
                record(1, "a", 4, EventType::Like, 5001),
            ])
            .unwrap();
        let a = &first.outputs[0].1;
        assert_eq!((a.previous_version, a.recommendations.version), (0, 2));
        // Redelivered: nothing changes; at-least-once republishes, marked as a repeat.
        let again = e
            .process(vec![record(1, "a", 4, EventType::Like, 5001)])
            .unwrap();
        let a = &again.outputs[0].1;
        assert_eq!((a.previous_version, a.recommendations.version), (2, 2));
        e.set_republish_unchanged(false);
        let again = e
            .process(vec![record(1, "a", 4, EventType::Like, 5001)])
            .unwrap();
        assert!(again.outputs.is_empty(), "no version published twice");
        let next = e
            .process(vec![record(2, "a", 5, EventType::Complete, 5002)])
            .unwrap();
        let a = &next.outputs[0].1;
        assert_eq!((a.previous_version, a.recommendations.version), (2, 3));
    }

    #[test]
    fn catalog_wide_rankings_trail_the_newest_event_by_at_most_the_refresh_interval() {
        let popular_head = |e: &mut Engine| {
            let out = e.peek(2, "newcomer").unwrap();
            let row = out
                .carousels
                .rows
                .iter()
                .find(|r| r.id == "popular")
                .unwrap();
            row.movie_ids[0]
        };
        let plays = |first: i64, movie: u32, n: i64, ts: i64| -> Vec<Record> {
            (first..first + n)
                .map(|i| record(i, &format!("v{i}"), movie, EventType::Play, ts))
                .collect()
        };
        for refresh_ms in [1000, 0] {
            let dir = tempfile::tempdir().unwrap();
            let mut config = EngineConfig::default();
            config.lists.ranking_refresh_ms = refresh_ms;
            let mut e =
                Engine::new(config, Store::open(dir.path(), 8).unwrap(), catalog()).unwrap();
            e.process(plays(0, 1, 2, 10_000)).unwrap();
            assert_eq!(popular_head(&mut e), 1);
            // Movie 2 overtakes half a second later.
            e.process(plays(2, 2, 3, 10_500)).unwrap();
            let expected = if refresh_ms == 0 { 2 } else { 1 };
            assert_eq!(popular_head(&mut e), expected, "refresh {refresh_ms} ms");
            // A second after the rankings were built, they are rebuilt.
            e.process(plays(5, 3, 1, 11_000)).unwrap();
            assert_eq!(popular_head(&mut e), 2, "refresh {refresh_ms} ms");
        }
    }

    #[test]
    fn a_new_user_sees_the_genres_trending_now() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = engine(dir.path());
        let batch = (0..6)
            .map(|i| record(i, &format!("c{i}"), 1 + i as u32, EventType::Play, 10))
            .collect();
        e.process(batch).unwrap();
        let newbie = Record {
            body: Body::Refresh(RefreshCommand {
                user_id: Some("newbie".into()),
                all: false,
            }),
            ..record(6, "newbie", 1, EventType::Play, 10)
        };
        let out = e.process(vec![newbie]).unwrap();
        let rows: Vec<&str> = out.outputs[0]
            .1
            .carousels
            .rows
            .iter()
            .map(|r| r.id.as_str())
            .collect();
        assert!(rows.contains(&"trending-genre:Comedy"), "{rows:?}");
        assert_eq!(
            out.outputs[0].1.recommendations.version, 1,
            "a refresh bumps the version"
        );
    }

    #[test]
    fn refresh_all_pages_through_every_stored_user() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = engine(dir.path());
        let batch = (0..7)
            .map(|i| record(i, &format!("u{i}"), 1, EventType::Play, 10))
            .collect();
        e.process(batch).unwrap();
        let mut after = None;
        let mut seen = Vec::new();
        loop {
            let page = e.refresh_page(2, after.as_deref(), 3).unwrap();
            if page.outputs.is_empty() {
                break;
            }
            seen.extend(
                page.outputs
                    .into_iter()
                    .map(|(u, o)| (u, o.recommendations.version)),
            );
            after = page.last;
        }
        assert_eq!(seen.len(), 7);
        assert!(
            seen.iter().all(|(_, v)| *v == 2),
            "a refresh bumps the version"
        );
    }

    fn changelog_engine(dir: &std::path::Path) -> Engine {
        let mut store = Store::open(dir, 8).unwrap();
        store.enable_changelog();
        Engine::new(EngineConfig::default(), store, catalog()).unwrap()
    }

    /// 32 events of 5 users on partition 2, in four batches.
    fn four_batches() -> Vec<Vec<Record>> {
        (0..4i64)
            .map(|round| {
                (0..8)
                    .map(|i| {
                        let o = round * 8 + i;
                        let user = format!("u{}", o % 5);
                        record(
                            o,
                            &user,
                            1 + (o * 7 % 30) as u32,
                            EventType::Complete,
                            1000 + o,
                        )
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_partition_restored_from_the_changelog_equals_the_original() {
        let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut a = changelog_engine(a_dir.path());
        let mut log: Vec<changelog::Batch> = Vec::new();
        for batch in four_batches() {
            log.extend(a.process(batch).unwrap().changelog);
        }
        assert_eq!(
            log.len(),
            4,
            "one changelog batch per commit of the partition"
        );
        assert!(log.windows(2).all(|w| w[1].seq == w[0].seq + 1));
        assert_eq!(
            a.store().outbox(2).unwrap().len(),
            4,
            "unacknowledged batches wait in the outbox"
        );
        a.store()
            .acknowledge(&[(2, 1, 10), (2, 2, 20)], &[])
            .unwrap();
        assert_eq!(a.store().outbox(2).unwrap().len(), 2);

        // A second batch that only half landed: it must not show up.
        let half = a
            .process(vec![
                record(32, "u0", 30, EventType::Like, 5000),
                record(33, "u9", 29, EventType::Like, 5001),
            ])
            .unwrap()
            .changelog;
        let mut restorer = changelog::Restorer::default();
        for b in &log {
            for (k, v) in &b.records {
                restorer.push(k, Some(v)).unwrap();
            }
        }
        for (k, v) in half[0].records.iter().take(2) {
            restorer.push(k, Some(v)).unwrap();
        }
        let restored = restorer.finish().unwrap();
        assert!(!restored.repairs.is_empty());

        let mut b = changelog_engine(b_dir.path());
        let meta = PartitionMeta {
            seq: restored.max_seq + 1,
            changelog_next: 0,
        };
        b.install_partition(2, &restored, meta, &["in"]).unwrap();
        // What A had after its fourth batch, before the half-landed one.
        let c_dir = tempfile::tempdir().unwrap();
        let mut c = changelog_engine(c_dir.path());
        for batch in four_batches() {
            c.process(batch).unwrap();
        }
        assert_eq!(
            b.store().users_page(2, None, 100).unwrap(),
            c.store().users_page(2, None, 100).unwrap()
        );
        assert_eq!(b.store().items().unwrap(), c.store().items().unwrap());
        assert_eq!(b.store().genres().unwrap(), c.store().genres().unwrap());
        assert_eq!(b.store().offset("in", 2).unwrap(), Some(32));
        assert_eq!(b.items, c.items, "the counters candidates see");
        assert!(!c.store().cowatch().unwrap().is_empty());
        assert_eq!(b.store().cowatch().unwrap(), c.store().cowatch().unwrap());
        assert_eq!(b.cowatch, c.cowatch, "the co-watch lists candidates see");

        // B continues where the restored marker says; dropping forgets it all.
        let next = b
            .process(vec![record(32, "u0", 30, EventType::Like, 5000)])
            .unwrap();
        assert_eq!(next.changelog[0].seq, restored.max_seq + 2);
        b.drop_partition(2, &["in"]).unwrap();
        assert!(b.store().users_page(2, None, 10).unwrap().is_empty());
        assert!(b.store().partition_meta(2).unwrap().is_none());
        assert_eq!(b.store().offset("in", 2).unwrap(), None);
        assert!(b.items.is_empty());
        assert!(b.cowatch.is_empty());
        assert!(b.store().cowatch().unwrap().is_empty());
    }

    /// The rollback of a batch cut short relies on each entry's `prev`
    /// being the value the key held.
    #[test]
    fn every_changelog_entry_carries_the_value_it_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = changelog_engine(dir.path());
        let mut stored: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        let mut replaced_slots = 0;
        // A fifth batch watches the first one's movies again: the same pairs
        // count again, in the slots they already hold.
        let again: Vec<Record> = (0..8i64)
            .map(|o| {
                let movie = 1 + (o * 7 % 30) as u32;
                record(
                    32 + o,
                    &format!("u{}", o % 5),
                    movie,
                    EventType::Complete,
                    1032 + o,
                )
            })
            .collect();
        for batch in four_batches().into_iter().chain([again]) {
            for b in e.process(batch).unwrap().changelog {
                for (key, bytes) in &b.records {
                    let name = changelog::Key::decode(key).unwrap();
                    if name == changelog::Key::Applied {
                        continue;
                    }
                    let entry = changelog::Entry::decode(key, bytes).unwrap();
                    assert_eq!(entry.prev.as_ref(), stored.get(key), "{name:?}");
                    if matches!(name, changelog::Key::CoWatchSlot(..)) && entry.prev.is_some() {
                        replaced_slots += 1;
                    }
                    stored.insert(key.clone(), entry.value.unwrap());
                }
            }
        }
        assert!(
            replaced_slots > 0,
            "co-watch slots changed in several batches"
        );
    }

    /// Ten viewers watch 3 then 17 (different genres, far apart in the catalog).
    fn ten_viewers_watch_3_then_17() -> Vec<Record> {
        let mut batch = Vec::new();
        for u in 0..10 {
            let user = format!("v{u}");
            batch.push(record(2 * u, &user, 3, EventType::Complete, 1000 + u));
            batch.push(record(2 * u + 1, &user, 17, EventType::Complete, 2000 + u));
        }
        batch
    }

    #[test]
    fn movies_watched_together_are_recommended_together() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = engine(dir.path());
        e.process(ten_viewers_watch_3_then_17()).unwrap();
        let three = e.cowatch.get(3).unwrap().strongest();
        assert_eq!(three[0], (17, 10.0), "{three:?}");
        // A newcomer who watched 3 gets 17 in "Because you watched" and with a
        // co-watched signal and reason.
        let out = e
            .process(vec![record(100, "new", 3, EventType::Complete, 3000)])
            .unwrap();
        let o = &out.outputs[0].1;
        let row = o
            .carousels
            .rows
            .iter()
            .find(|r| r.kind == "because_you_watched")
            .unwrap();
        assert_eq!(row.id, "because-you-watched:3");
        assert_eq!(row.movie_ids[0], 17);
        let pick = o
            .recommendations
            .items
            .iter()
            .find(|i| i.movie_id == 17)
            .expect("the co-watched movie is recommended");
        // The strongest co-watched candidate, damped by its evidence:
        // 10 co-occurrences against a support of 3.
        let expected = crate::cowatch::confidence(10.0, e.config.co_watch.support);
        assert!(
            (pick.signals.co_watched - expected).abs() < 1e-6,
            "{}",
            pick.signals.co_watched
        );
        assert!(pick.sources.contains(&crate::output::Source::CoWatched));
    }

    #[test]
    fn a_recompute_reuses_nothing_of_the_previous_user_but_the_catalog_texts() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = engine(dir.path());
        let mut batch = ten_viewers_watch_3_then_17();
        batch.push(record(50, "drama", 12, EventType::Like, 3000));
        batch.push(record(51, "new", 3, EventType::Complete, 3001));
        e.process(batch).unwrap();
        // The same users in turn on one engine: its scratch tables and reason
        // texts are carried from user to user.
        let first = e.peek(2, "new").unwrap();
        let drama = e.peek(2, "drama").unwrap();
        let _ = e.peek(2, "v3").unwrap();
        assert_eq!(e.peek(2, "new").unwrap(), first);
        assert_eq!(e.peek(2, "drama").unwrap(), drama);
        let co_watched = first
            .recommendations
            .items
            .iter()
            .find(|i| i.movie_id == 17)
            .expect("the co-watched movie is recommended");
        assert_eq!(&*co_watched.reason, "Viewers of Comedy 2 also watched this");
        // A renamed seed is named afresh.
        e.update_catalog(vec![(
            3,
            Some(CatalogRecord {
                movie_id: 3,
                title: "Renamed".into(),
                genres: vec!["Comedy".into()],
                year: Some(1992),
                tmdb_id: None,
                imdb_id: None,
                tags: vec![],
            }),
        )]);
        let renamed = e.peek(2, "new").unwrap();
        let item = renamed
            .recommendations
            .items
            .iter()
            .find(|i| i.movie_id == 17)
            .unwrap();
        assert_eq!(&*item.reason, "Viewers of Renamed also watched this");
    }

    /// Removing movies moves others to new catalog positions (the last
    /// one fills the gap): every later recompute still names each item by
    /// its own record and never proposes a removed one.
    #[test]
    fn a_catalog_removal_leaves_every_item_its_own_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = engine(dir.path());
        // Movie 30 (the last inserted) is everyone's favourite; "a" likes comedies.
        let mut batch = Vec::new();
        for (k, user) in ["b", "c", "d", "f"].iter().enumerate() {
            batch.push(record(k as i64, user, 30, EventType::Like, 10 + k as i64));
            batch.push(record(
                10 + k as i64,
                user,
                12,
                EventType::Like,
                20 + k as i64,
            ));
        }
        batch.push(record(20, "a", 3, EventType::Like, 30));
        batch.push(record(21, "a", 4, EventType::Like, 31));
        e.process(batch).unwrap();
        let errors = e.update_catalog(vec![(1, None), (12, None)]);
        assert!(errors.is_empty(), "{errors:?}");
        let out = e.peek(2, "a").unwrap();
        let items: Vec<(u32, &str, Option<u16>)> = out
            .recommendations
            .items
            .iter()
            .map(|i| (i.movie_id, &*i.title, i.year))
            .chain(
                out.carousels
                    .items
                    .iter()
                    .map(|i| (i.movie_id, &*i.title, i.year)),
            )
            .collect();
        assert!(!items.is_empty());
        for (id, title, year) in &items {
            assert!(*id != 1 && *id != 12, "removed movie {id} recommended");
            let movie = e
                .catalog
                .get(*id)
                .expect("recommended items are in the catalog");
            assert_eq!((&*movie.title, movie.year), (*title, *year), "movie {id}");
        }
        assert!(
            items
                .iter()
                .any(|(id, title, _)| *id == 30 && *title == "Sci-Fi 9"),
            "the moved favourite keeps its record: {items:?}"
        );
    }

    #[test]
    fn records_of_partitions_held_elsewhere_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = engine(dir.path());
        e.set_owned(Some([1].into_iter().collect()));
        let result = e
            .process(vec![record(0, "a", 3, EventType::Like, 10)])
            .unwrap();
        assert!(result.outputs.is_empty() && result.offsets.is_empty());
        assert!(e.store().user(2, "a").unwrap().is_none());
    }

    /// `record` on another partition.
    fn on(partition: u32, mut r: Record) -> Record {
        r.source.partition = partition as i32;
        r
    }

    /// Every engine's changelog batches, assembled as the follower does.
    fn assembled(
        assembler: &mut crate::global::Assembler,
        results: &[BatchResult],
    ) -> Vec<ItemBatch> {
        let mut out = Vec::new();
        for result in results {
            for batch in &result.changelog {
                for (offset, (key, value)) in batch.records.iter().enumerate() {
                    if let Some(b) = assembler
                        .push(batch.partition, offset as i64, key, Some(value))
                        .unwrap()
                    {
                        out.push(b);
                    }
                }
            }
        }
        out
    }

    fn item_side_equal(a: &Engine, b: &Engine) {
        assert_eq!(a.item_parts, b.item_parts, "item counters per partition");
        assert_eq!(a.genre_parts, b.genre_parts, "genre counters per partition");
        assert_eq!(a.cowatch, b.cowatch, "co-watch lists and their sums");
        // Sums to the bit, and so the same popular order.
        let bits = |e: &Engine| -> BTreeMap<u32, (u64, u64)> {
            e.items
                .iter()
                .map(|(id, m)| (*id, (m.long.value.to_bits(), m.short.value.to_bits())))
                .collect()
        };
        assert_eq!(bits(a), bits(b), "item sums");
        assert_eq!(a.genres, b.genres, "genre sums");
    }

    #[test]
    fn instances_following_each_other_know_what_one_instance_knows() {
        let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
        let mut whole = changelog_engine(dirs[3].path());
        let mut parts: Vec<Engine> = (0..3)
            .map(|k| {
                let mut e = changelog_engine(dirs[k].path());
                e.set_owned(Some([k as u32].into_iter().collect()));
                e
            })
            .collect();
        let mut assembler = crate::global::Assembler::default();
        for (round, batch) in four_batches().into_iter().enumerate() {
            // Users spread over three partitions.
            let batch: Vec<Record> = batch
                .into_iter()
                .map(|r| {
                    let p = r.key.as_ref().unwrap().last().unwrap() % 3;
                    on(p as u32, r)
                })
                .collect();
            whole.process(batch.clone()).unwrap();
            let results: Vec<BatchResult> = parts
                .iter_mut()
                .enumerate()
                .map(|(k, e)| {
                    let mine: Vec<Record> = batch
                        .iter()
                        .filter(|r| r.source.partition == k as i32)
                        .cloned()
                        .collect();
                    e.process(mine).unwrap()
                })
                .collect();
            // Delivered in a different order to each instance.
            let mut followed = assembled(&mut assembler, &results);
            for (k, e) in parts.iter_mut().enumerate() {
                let by = (k + round) % followed.len().max(1);
                followed.rotate_left(by);
                let applied = e.apply_followed(&followed).unwrap();
                assert!(applied > 0, "the others' batches are applied");
                e.settle_item_tables();
            }
        }
        whole.settle_item_tables();
        for e in &parts {
            item_side_equal(e, &whole);
        }
        // The followed item side survives a restart, and the follower resumes
        // after the last batch applied.
        let resumed: Vec<BTreeMap<u32, i64>> = parts
            .iter()
            .map(|e| e.store().follow_positions().unwrap().into_iter().collect())
            .collect();
        drop(parts);
        for (k, dir) in dirs.iter().take(3).enumerate() {
            let mut again = changelog_engine(dir.path());
            again.set_owned(Some([k as u32].into_iter().collect()));
            again.sum_partitions();
            item_side_equal(&again, &whole);
            let others: Vec<u32> = (0..3u32).filter(|p| *p != k as u32).collect();
            for p in others {
                assert!(resumed[k].contains_key(&p), "position of partition {p}");
            }
        }
    }

    #[test]
    fn a_released_partition_keeps_its_item_side_and_follows_the_new_owner() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = changelog_engine(dir.path());
        e.set_owned(Some([2].into_iter().collect()));
        e.process(vec![record(0, "a", 3, EventType::Complete, 10)])
            .unwrap();
        e.release_partition(2, &["in"]).unwrap();
        e.set_owned(Some(BTreeSet::new()));
        assert!(e.store().user(2, "a").unwrap().is_none(), "users go");
        assert_eq!(e.store().items().unwrap()[&2].len(), 1, "counters stay");
        assert_eq!(e.item_side_partitions(), [2].into_iter().collect());
        // The new owner's next batch replaces them.
        let other = tempfile::tempdir().unwrap();
        let mut owner = changelog_engine(other.path());
        owner.set_owned(Some([2].into_iter().collect()));
        owner
            .process(vec![record(0, "a", 3, EventType::Complete, 10)])
            .unwrap();
        let result = owner
            .process(vec![record(1, "b", 3, EventType::Complete, 20)])
            .unwrap();
        let batches = assembled(&mut crate::global::Assembler::default(), &[result]);
        assert_eq!(e.apply_followed(&batches).unwrap(), 1);
        e.settle_item_tables();
        assert_eq!(e.item_parts[&2][&3], owner.item_parts[&2][&3]);
        assert_eq!(e.items[&3], owner.item_parts[&2][&3]);
        // A batch of a partition whose state a store holds is its own business.
        assert_eq!(owner.apply_followed(&batches).unwrap(), 0);
    }
}
