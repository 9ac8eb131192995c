//! Candidate generation, scoring and the three outputs for one user: pure
//! functions of the user's state, the item counters and the event time `now`.

use std::collections::HashMap;
use std::sync::Arc;

use crate::blend::{self, Dominant, Scored, Signals};
use crate::catalog::{Catalog, ContentKey, GenreSet, IdHasher, IdMap, Movie};
use crate::config::EngineConfig;
use crate::cowatch::{self, CoWatchLists};
use crate::decay::{HalfLives, Momentum};
use crate::event::EventType;
use crate::experiment::{source_bit, Variant};
use crate::output::*;
use crate::ranker::PoolEntry;
use crate::state::{GenreWeight, UserState};

/// The model seam: re-scores a user's candidates (the NCF scorer plugs in here).
/// Scores are in `[0, 1]`; implementations run on the engine's processing
/// thread, never on the async runtime.
pub trait Scorer: Send + Sync {
    fn info(&self) -> ModelInfo;
    fn score(
        &self,
        user_id: &str,
        state: &UserState,
        items: &[u32],
    ) -> Result<Vec<f32>, ScoreError>;
    /// Updates the user's model state after new events (NCF fold-in). Must be
    /// deterministic: replays after a crash recompute it.
    fn observe(&self, _user_id: &str, _state: &mut UserState) {}
    /// Scores every item the model knows for the user, as `(movie id, score)`
    /// sorted by movie id: the model's own candidate source. `None` when the
    /// scorer cannot rank a whole catalogue.
    fn score_catalogue(
        &self,
        _user_id: &str,
        _state: &UserState,
    ) -> Result<Option<Vec<(u32, f32)>>, ScoreError> {
        Ok(None)
    }
    /// How many recent interactions a history-based model reads (`None`:
    /// the scorer reads no history); the engine warns when it keeps fewer.
    fn history_len(&self) -> Option<usize> {
        None
    }
    /// Whether a call costs the same however few items it asks for (a
    /// history model scores the whole catalogue in every call): the engine
    /// then scores every candidate, not only the head of its ranked lists.
    fn scores_catalogue_per_call(&self) -> bool {
        false
    }
}

#[derive(Debug, thiserror::Error)]
#[error("scorer failed: {0}")]
pub struct ScoreError(pub String);

/// Global rankings at one event time, rebuilt once per micro-batch. Per-item
/// signals are read from the engine's counters when a candidate needs them
/// (the index is dropped whenever the counters change).
#[derive(Debug, Clone, Default)]
pub struct ItemIndex {
    pub now: i64,
    pub hl: HalfLives,
    /// Every catalog item with its genres, most popular first: a source takes
    /// the first items the user has not seen, so heavy users still get full
    /// candidate lists.
    pub popular: Vec<RankedItem>,
    /// `popular` split by genre (each item under each of its genres, same
    /// order): a genre source reads its genre's items, not the catalog.
    pub popular_by_genre: Vec<Vec<RankedItem>>,
    /// The [`TRENDING_RANKED`] most trending catalog items, most trending first.
    pub trending: Vec<RankedItem>,
    /// [`ItemIndex::signal`] of every catalog item by its
    /// [`Catalog::position`] ((0, 0) without events), computed with the
    /// index: a candidate reads its signals instead of deriving them.
    signals: Vec<Signal>,
    pub popularity_max: f64,
    /// Normalizes popularity against `popularity_max`.
    pub popularity_scale: blend::LogScale,
    pub trending_max: f64,
    /// Genres by their own trending score, hottest first (cold-start rows).
    pub trending_genres: Vec<u8>,
}

/// An item's normalized (popularity, trending) at the index's `now`.
pub type Signal = (f64, f64);

/// One entry of a ranking, with what every candidate source needs of it.
#[derive(Debug, Clone, Copy)]
pub struct RankedItem {
    pub id: u32,
    /// The item's [`Catalog::position`].
    pub position: u32,
    pub genres: GenreSet,
    pub signal: Signal,
}

/// Trending is counted over items with an event in the last 16 short
/// half-lives: an item quiet for longer has lost all but 2^-16 of its short
/// window, so its trending score counts as 0 (and it need not be scanned).
pub fn trending_horizon(hl: HalfLives) -> i64 {
    (16.0 * hl.short_ms).min(i64::MAX as f64 / 2.0) as i64
}

/// An item's trending score at `now`, 0 beyond the horizon.
pub fn trending_now(m: &Momentum, now: i64, hl: HalfLives) -> f64 {
    trending_now_with_long(m, now, hl, || m.long.value_at(now, hl.long_ms))
}

/// [`trending_now`] for callers that may already have the long-window value
/// (computed only when needed).
fn trending_now_with_long(
    m: &Momentum,
    now: i64,
    hl: HalfLives,
    long: impl FnOnce() -> f64,
) -> f64 {
    if m.short.as_of < now.saturating_sub(trending_horizon(hl)) {
        0.0
    } else {
        m.trending_at_with_long(now, hl, long())
    }
}

/// How many items the trending ranking keeps: trending moves with time for
/// every item, so it is re-ranked per batch, and only its head is used.
pub const TRENDING_RANKED: usize = 1000;

/// Catalog items ranked by popularity, kept up to date item by item. Decay
/// scales every item's popularity by the same factor, so the order changes
/// only when an item gets events: no per-batch sort of the whole catalog.
#[derive(Debug, Clone, Default)]
pub struct PopularOrder {
    /// `(key, id, genres)`, highest key first, ties to the lower id.
    order: Vec<(f64, u32, GenreSet)>,
    keys: IdMap<f64>,
}

/// A time-free popularity key: `ln(value at t) = ln(value) + (as_of - t)·ln2/hl`,
/// so comparing `ln(value) + as_of·ln2/hl` compares values at any common `t`.
fn popularity_key(m: Option<&Momentum>, hl: HalfLives) -> f64 {
    match m {
        Some(m) if m.long.value > 0.0 => {
            let anchor = if hl.long_ms.is_finite() {
                m.long.as_of as f64 * std::f64::consts::LN_2 / hl.long_ms
            } else {
                0.0
            };
            m.long.value.ln() + anchor
        }
        _ => f64::NEG_INFINITY,
    }
}

fn by_key(a: &(f64, u32), b: &(f64, u32)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

fn by_key3(a: &(f64, u32, GenreSet), b: &(f64, u32, GenreSet)) -> std::cmp::Ordering {
    by_key(&(a.0, a.1), &(b.0, b.1))
}

impl PopularOrder {
    /// Ranks every catalog item from scratch.
    pub fn build(catalog: &Catalog, items: &IdMap<Momentum>, hl: HalfLives) -> PopularOrder {
        let mut order: Vec<(f64, u32, GenreSet)> = catalog
            .movies()
            .map(|m| (popularity_key(items.get(&m.id), hl), m.id, m.genres))
            .collect();
        order.sort_unstable_by(by_key3);
        let keys = order.iter().map(|(k, id, _)| (*id, *k)).collect();
        PopularOrder { order, keys }
    }

    /// Moves one catalog item to its place after its counters changed.
    pub fn update(&mut self, id: u32, m: Option<&Momentum>, hl: HalfLives) {
        let Some(old) = self.keys.get(&id).copied() else {
            return; // not in the catalog
        };
        let new = popularity_key(m, hl);
        if new.to_bits() == old.to_bits() {
            return;
        }
        let Ok(i) = self
            .order
            .binary_search_by(|e| by_key(&(e.0, e.1), &(old, id)))
        else {
            return;
        };
        // Shift only the items between the old and the new place (an item
        // usually moves a few places): not the whole tail twice, as a
        // remove and an insert would.
        let genres = self.order[i].2;
        let place = |e: &(f64, u32, GenreSet)| by_key(&(e.0, e.1), &(new, id));
        if by_key(&(new, id), &(old, id)).is_lt() {
            let at = self.order[..i]
                .binary_search_by(place)
                .unwrap_or_else(|j| j);
            self.order[i] = (new, id, genres);
            self.order[at..=i].rotate_right(1);
        } else {
            let at = i
                + 1
                + self.order[i + 1..]
                    .binary_search_by(place)
                    .unwrap_or_else(|j| j);
            self.order[i] = (new, id, genres);
            self.order[i..at].rotate_left(1);
        }
        self.keys.insert(id, new);
    }
}

impl ItemIndex {
    /// Ranks the catalog at event time `now`: `popular` is the catalog's
    /// current popularity order, `active` the items with a recent event (see
    /// [`trending_horizon`]); items without events score 0, ties go to the
    /// lower id, so a cold catalog still yields lists.
    pub fn build(
        catalog: &Catalog,
        items: &IdMap<Momentum>,
        genres: &HashMap<String, Momentum>,
        now: i64,
        hl: HalfLives,
        popular: &PopularOrder,
        active: &[u32],
    ) -> ItemIndex {
        let mut hot: Vec<(u8, f64)> = genres
            .iter()
            .filter_map(|(name, m)| Some((catalog.genre_id(name)?, m.trending_at(now, hl))))
            .filter(|(_, t)| *t > 0.0)
            .collect();
        hot.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let trending_genres = hot.into_iter().map(|(g, _)| g).collect();
        // The trending head: a selection, then a sort of the head only (total
        // order, ties to the lower id, so the unstable sort is deterministic).
        let mut hottest: Vec<(f64, u32)> = active
            .iter()
            .filter(|id| catalog.contains(**id))
            .filter_map(|id| Some((trending_now(items.get(id)?, now, hl), *id)))
            .filter(|(t, _)| *t > 0.0)
            .collect();
        let k = TRENDING_RANKED.min(hottest.len());
        if k > 0 && k < hottest.len() {
            hottest.select_nth_unstable_by(k - 1, by_key);
            hottest.truncate(k);
        }
        hottest.sort_unstable_by(by_key);
        let trending_max = hottest.first().map_or(0.0, |e| e.0);
        let popularity_max = popular
            .order
            .first()
            .and_then(|e| items.get(&e.1))
            .map_or(0.0, |m| m.popularity_at(now, hl));
        let mut index = ItemIndex {
            now,
            hl,
            popular: Vec::new(),
            popular_by_genre: Vec::new(),
            trending: Vec::new(),
            signals: vec![(0.0, 0.0); catalog.len()],
            popularity_max,
            popularity_scale: blend::LogScale::new(popularity_max),
            trending_max,
            trending_genres,
        };
        // Once per index, not once per candidate of every user: the
        // signals are a function of the counters at `now` alone.
        for (id, m) in items {
            if let Some(p) = catalog.position(*id) {
                index.signals[p as usize] = index.signal(m);
            }
        }
        let ranked = |id: u32, genres: GenreSet| {
            let position = catalog.position(id)?;
            Some(RankedItem {
                id,
                position,
                genres,
                signal: index.signal_at(position),
            })
        };
        let popular: Vec<RankedItem> = popular
            .order
            .iter()
            .filter_map(|e| ranked(e.1, e.2))
            .collect();
        // Sized first: at 100k items the lists hold 200k entries, and growing
        // them by doubling touched fresh pages at every rebuild.
        let mut per_genre = vec![0usize; catalog.genre_count()];
        for e in &popular {
            for g in e.genres.iter() {
                if let Some(n) = per_genre.get_mut(g as usize) {
                    *n += 1;
                }
            }
        }
        let mut by_genre: Vec<Vec<RankedItem>> =
            per_genre.into_iter().map(Vec::with_capacity).collect();
        for e in &popular {
            for g in e.genres.iter() {
                if let Some(list) = by_genre.get_mut(g as usize) {
                    list.push(*e);
                }
            }
        }
        let trending = hottest
            .iter()
            .filter_map(|e| ranked(e.1, catalog.get(e.1)?.genres))
            .collect();
        index.popular = popular;
        index.popular_by_genre = by_genre;
        index.trending = trending;
        index
    }

    /// The signals of the item at a [`Catalog::position`]: (0, 0) for an
    /// item without events.
    pub fn signal_at(&self, position: u32) -> Signal {
        self.signals
            .get(position as usize)
            .copied()
            .unwrap_or((0.0, 0.0))
    }
}

impl ItemIndex {
    /// An item's normalized (popularity, trending) at `now`, from its counters.
    ///
    /// Once per item with events and index: the long-window value serves
    /// both signals and the popularity scale's denominator is computed once
    /// per index: three transcendental calls instead of six.
    fn signal(&self, m: &Momentum) -> Signal {
        let long = m.popularity_at(self.now, self.hl);
        let popularity = self.popularity_scale.normalize(long);
        let trending = if self.trending_max > 0.0 {
            let now = trending_now_with_long(m, self.now, self.hl, || long);
            (now / self.trending_max).clamp(0.0, 1.0)
        } else {
            0.0
        };
        (popularity, trending)
    }
}

/// Content similarity in `[0, 1]`: shared genres, release years and tags.
pub fn content_similarity(a: &Movie, b: &Movie) -> f64 {
    keyed_similarity((a, a.content_key()), (b, b.content_key()))
}

/// [`content_similarity`] of two movies whose content keys are at hand (the
/// catalog keeps them densely): the movies' records are read only when both
/// have tags.
#[inline]
fn keyed_similarity(a: (&Movie, ContentKey), b: (&Movie, ContentKey)) -> f64 {
    let (genres, years) = genre_and_year_terms(a.1, b.1);
    if a.1.tagged && b.1.tagged {
        0.6 * genres + 0.2 * years + tag_term(a.0, b.0)
    } else {
        0.75 * genres + 0.25 * years
    }
}

/// Kept out of line: the candidate × seed loop inlines the untagged path.
#[inline(never)]
fn tag_term(a: &Movie, b: &Movie) -> f64 {
    let shared = a
        .tags
        .iter()
        .filter(|t| b.tags.binary_search(t).is_ok())
        .count();
    let union = a.tags.len() + b.tags.len() - shared;
    0.2 * shared as f64 / union as f64
}

fn genre_and_year_terms(a: ContentKey, b: ContentKey) -> (f64, f64) {
    let shared = (a.genres.0 & b.genres.0).count_ones();
    let union = u32::from(a.genre_count) + u32::from(b.genre_count) - shared;
    let genres = crate::catalog::jaccard_of_counts(shared, union);
    let years = match (a.year, b.year) {
        (Some(x), Some(y)) => year_term(x.abs_diff(y)),
        _ => 0.0,
    };
    (genres, years)
}

/// A seed's most similar items with their similarity, best first.
pub type SimilarItems = Arc<Vec<SimilarItem>>;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimilarItem {
    pub id: u32,
    pub similarity: f32,
    /// Where the item is in the catalog the list was computed from (the
    /// cache is cleared whenever the catalog changes): proposing it as a
    /// candidate needs no lookup by id.
    pub position: u32,
}

/// Most similar items per seed, computed on first use. Cleared when the catalog changes.
#[derive(Debug, Default)]
pub struct SimilarityCache {
    map: IdMap<SimilarItems>,
    /// The catalog's movies grouped by genre set, built on the first miss:
    /// genres bound a group's similarity, so a search visits few groups.
    groups: Option<Vec<GenreGroup>>,
}

/// Movies sharing one exact genre set: those with a release year by
/// (year, id), the others by id. A search walks outward from the seed's year,
/// since the year term is the part of the similarity that varies most within
/// a group.
#[derive(Debug)]
struct GenreGroup {
    genres: GenreSet,
    by_year: Vec<(u16, u32)>,
    without_year: Vec<u32>,
}

/// What recomputing users reuses between them: similar items per seed (until
/// the catalog changes; item signals live in the [`ItemIndex`]).
#[derive(Debug, Default)]
pub struct RecomputeCache {
    pub similar: SimilarityCache,
    /// When set, each computation leaves its candidate pool here (the
    /// learned blend's training cases are read from it).
    pub pool: Option<Vec<PoolEntry>>,
    reasons: Reasons,
    /// A recompute's working tables, kept for the next one (cleared, not
    /// freed): they stay warm in the caches instead of being allocated and
    /// touched afresh for every user.
    slots: CandidateSlots,
    /// The pool of a few hundred candidates, ≈ 100 bytes each: growing it
    /// afresh for every user copied it twice.
    candidates: Vec<Candidate>,
    co_watch_scores: IdMap<CoWatchScore>,
    co_watch_ranking: Vec<(u32, f64)>,
    /// Candidate indices, for choosing which of them the model re-scores.
    order: Vec<u32>,
}

/// Which candidate of the current recompute each catalog position holds: a
/// dense table instead of a hash per proposal, stamped per recompute so
/// that it never needs clearing (a recompute that fails half-way leaves
/// nothing behind).
#[derive(Debug, Default)]
struct CandidateSlots {
    stamp: u32,
    /// `(stamp, candidate index)` by [`Catalog::position`].
    entries: Vec<(u32, u32)>,
}

impl CandidateSlots {
    /// Forgets the previous recompute's candidates.
    fn begin(&mut self, positions: usize) {
        self.stamp = self.stamp.wrapping_add(1);
        if self.stamp == 0 {
            self.entries.clear();
            self.stamp = 1;
        }
        if self.entries.len() < positions {
            self.entries.resize(positions, (0, 0));
        }
    }

    fn get(&self, position: u32) -> Option<usize> {
        match self.entries.get(position as usize) {
            Some(&(stamp, i)) if stamp == self.stamp => Some(i as usize),
            _ => None,
        }
    }

    /// The candidate `id` is in this recompute, if it is one.
    fn of(&self, catalog: &Catalog, id: u32) -> Option<usize> {
        self.get(catalog.position(id)?)
    }

    fn set(&mut self, position: u32, candidate: usize) {
        self.entries[position as usize] = (self.stamp, candidate as u32);
    }
}

impl RecomputeCache {
    pub fn catalog_changed(&mut self) {
        self.similar.clear();
        self.reasons = Reasons::default();
    }
}

const SIMILAR_PER_SEED: usize = 30;
const SIMILARITY_CACHE_MAX: usize = 100_000;

/// The highest [`content_similarity`] any movie with genres of Jaccard `j`
/// to the seed's and a year term of `years` can reach, with the tag term at
/// its most. Written as [`content_similarity`] computes, so that a movie's
/// similarity never exceeds its bound through rounding.
fn similarity_bound(j: f64, years: f64, seed_has_tags: bool) -> f64 {
    let untagged = 0.75 * j + 0.25 * years;
    if seed_has_tags {
        untagged.max(0.6 * j + 0.2 * years + 0.2)
    } else {
        untagged
    }
}

/// The year term of [`content_similarity`] for release years `gap` apart:
/// 1 for the same year, falling linearly to 0 at 20 years.
fn year_term(gap: u16) -> f64 {
    YEAR_TERMS[usize::from(gap.min(YEARS_TO_ZERO))]
}

/// The year term's zero: release years this far apart share nothing.
const YEARS_TO_ZERO: u16 = 20;

/// [`year_term`] by gap, divided once at compile time (the division's latency
/// showed in the recompute's profile).
static YEAR_TERMS: [f64; YEARS_TO_ZERO as usize + 1] = year_terms();

const fn year_terms() -> [f64; YEARS_TO_ZERO as usize + 1] {
    let mut terms = [0.0; YEARS_TO_ZERO as usize + 1];
    let mut gap = 0;
    while gap <= YEARS_TO_ZERO as usize {
        terms[gap] = 1.0 - gap as f64 / YEARS_TO_ZERO as f64;
        gap += 1;
    }
    terms
}

/// Most similar first, ties to the lower id.
fn by_similarity(a: &SimilarItem, b: &SimilarItem) -> std::cmp::Ordering {
    b.similarity.total_cmp(&a.similarity).then(a.id.cmp(&b.id))
}

impl SimilarityCache {
    pub fn clear(&mut self) {
        self.map.clear();
        self.groups = None;
    }

    pub fn similar(&mut self, catalog: &Catalog, seed: u32) -> SimilarItems {
        if let Some(hit) = self.map.get(&seed) {
            return hit.clone();
        }
        let Some(seed_movie) = catalog.get(seed) else {
            return Arc::default();
        };
        let groups = self.groups.get_or_insert_with(|| group_by_genres(catalog));
        let list = Arc::new(most_similar(catalog, groups, seed_movie));
        if self.map.len() >= SIMILARITY_CACHE_MAX {
            self.map.clear();
        }
        self.map.insert(seed, list.clone());
        list
    }
}

fn group_by_genres(catalog: &Catalog) -> Vec<GenreGroup> {
    let mut by_set: HashMap<GenreSet, GenreGroup> = HashMap::new();
    for m in catalog.movies() {
        let group = by_set.entry(m.genres).or_insert_with(|| GenreGroup {
            genres: m.genres,
            by_year: Vec::new(),
            without_year: Vec::new(),
        });
        match m.year {
            Some(year) => group.by_year.push((year, m.id)),
            None => group.without_year.push(m.id),
        }
    }
    let mut groups: Vec<GenreGroup> = by_set.into_values().collect();
    for g in &mut groups {
        g.by_year.sort_unstable();
        g.without_year.sort_unstable();
    }
    groups
}

/// A group's movies with a year, nearest to `year` first (at equal distance
/// the earlier year first), each with its distance in years.
fn nearest_years(by_year: &[(u16, u32)], year: u16) -> impl Iterator<Item = (u16, u32)> + '_ {
    let split = by_year.partition_point(|&(y, _)| y < year);
    let mut below = by_year[..split].iter().rev().peekable();
    let mut above = by_year[split..].iter().peekable();
    std::iter::from_fn(move || {
        let take_below = match (below.peek(), above.peek()) {
            (Some(&&(b, _)), Some(&&(a, _))) => year - b <= a - year,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return None,
        };
        let &(y, id) = if take_below {
            below.next()
        } else {
            above.next()
        }?;
        Some((y.abs_diff(year), id))
    })
}

/// The [`SIMILAR_PER_SEED`] movies most similar to `seed` (positive
/// similarity, sharing a genre or tagged), best first, ties to the lower id.
/// Groups are visited by their similarity bound, highest first, and a
/// group's movies nearest the seed's year first; the search stops once no
/// later movie can reach (or tie) the current last place, so the result
/// equals a scan of the whole catalog.
fn most_similar(catalog: &Catalog, groups: &[GenreGroup], seed: &Movie) -> Vec<SimilarItem> {
    let k = SIMILAR_PER_SEED;
    let tagged = !seed.tags.is_empty();
    let seed_key = (seed, seed.content_key());
    let mut order: Vec<(f32, f64, &GenreGroup)> = groups
        .iter()
        .map(|g| {
            let j = seed.genres.jaccard(g.genres);
            (similarity_bound(j, 1.0, tagged) as f32, j, g)
        })
        .collect();
    order.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
    let mut search = TopSimilar {
        best: Vec::with_capacity(2 * k),
        last_place: None,
    };
    for (bound, j, group) in order {
        if search.beyond_reach(bound) {
            break;
        }
        // The most a movie of this group without a (shared) year can reach.
        let floor = similarity_bound(j, 0.0, tagged) as f32;
        let shares_genre = group.genres.0 & seed.genres.0 != 0;
        let visit = |search: &mut TopSimilar, id: u32| {
            let Some(position) = catalog.position(id) else {
                return;
            };
            let key = catalog.key_at(position);
            if id == seed.id || (!shares_genre && !key.tagged) {
                return;
            }
            let movie = (catalog.at(position), key);
            search.offer(SimilarItem {
                id,
                similarity: keyed_similarity(seed_key, movie) as f32,
                position,
            });
        };
        match seed.year {
            Some(year) => {
                for (gap, id) in nearest_years(&group.by_year, year) {
                    if search.beyond_reach(similarity_bound(j, year_term(gap), tagged) as f32) {
                        break;
                    }
                    visit(&mut search, id);
                }
            }
            // Without the seed's year every year term is 0: no order helps.
            None if search.beyond_reach(floor) => {}
            None => group
                .by_year
                .iter()
                .for_each(|&(_, id)| visit(&mut search, id)),
        }
        if !search.beyond_reach(floor) {
            for &id in &group.without_year {
                visit(&mut search, id);
            }
        }
        // Know the last place before the next group's bound is tested.
        search.cut();
    }
    search.best.sort_unstable_by(by_similarity);
    search.best.truncate(k);
    search.best
}

/// The best [`SIMILAR_PER_SEED`] offers so far, kept loosely: between 0 and
/// 2k entries, cut back to the best k whenever full and after each group.
struct TopSimilar {
    best: Vec<SimilarItem>,
    /// The k-th best similarity at the last cut: no later offer below it
    /// can enter the result (the true k-th place only rises).
    last_place: Option<f32>,
}

impl TopSimilar {
    fn offer(&mut self, item: SimilarItem) {
        let similarity = item.similarity;
        if similarity <= 0.0 || self.last_place.is_some_and(|p| similarity < p) {
            return;
        }
        self.best.push(item);
        if self.best.len() == 2 * SIMILAR_PER_SEED {
            self.cut();
        }
    }

    /// Keeps the best k offers and remembers the k-th (once there are k).
    fn cut(&mut self) {
        let k = SIMILAR_PER_SEED;
        if self.best.len() >= k {
            self.best.select_nth_unstable_by(k - 1, by_similarity);
            self.best.truncate(k);
            self.last_place = Some(self.best[k - 1].similarity);
        }
    }

    /// Whether no movie whose similarity is at most `bound` can reach or
    /// tie the last place any more.
    fn beyond_reach(&self, bound: f32) -> bool {
        self.last_place.is_some_and(|p| bound < p)
    }
}

/// Everything the recommender reads besides the user.
pub struct Context<'a> {
    pub catalog: &'a Catalog,
    pub items: &'a IdMap<Momentum>,
    /// Co-watch neighbours per item, summed over the partitions held.
    pub cowatch: &'a CoWatchLists,
    pub index: &'a ItemIndex,
    pub config: &'a EngineConfig,
    /// The user's A/B variant: its name, blend, model and candidate sources.
    pub variant: &'a Variant,
}

/// Candidate sources in publishing order; [`Candidate::sources`] holds them as bits.
const SOURCES: [Source; 6] = [
    Source::Popular,
    Source::Trending,
    Source::Genre,
    Source::Similar,
    Source::CoWatched,
    Source::Model,
];

/// Whether the variant draws candidates from `source`.
fn enabled(variant: &Variant, source: Source) -> bool {
    variant.sources & source_bit(source) != 0
}

#[derive(Debug)]
struct Candidate {
    movie_id: u32,
    /// Where the movie is in the catalog, looked up once when it is first
    /// proposed.
    position: u32,
    /// The movie's genres, read by every row's filter.
    genres: GenreSet,
    /// Bit set of the sources that proposed it.
    sources: u8,
    signals: Signals,
    /// The seed most similar to this candidate.
    because_of: Option<u32>,
    /// The seed most co-watched with this candidate.
    co_watched_with: Option<u32>,
    score: f64,
    /// Whether the model has scored it (its `ncf` is then final).
    rescored: bool,
}

/// Adds to `head` the indices of the first `k` candidates that `include`
/// admits, in the order of their current scores (`order` is scratch space).
fn first_by_score(
    candidates: &[Candidate],
    order: &mut Vec<u32>,
    k: usize,
    include: impl Fn(&Candidate) -> bool,
    head: &mut Vec<usize>,
) {
    order.clear();
    order.extend((0..candidates.len() as u32).filter(|&i| include(&candidates[i as usize])));
    if order.len() > k {
        if k > 0 {
            // Score descending, ties by movie id: the order the lists use.
            order.select_nth_unstable_by(k - 1, |&a, &b| {
                let (a, b) = (&candidates[a as usize], &candidates[b as usize]);
                b.score
                    .total_cmp(&a.score)
                    .then(a.movie_id.cmp(&b.movie_id))
            });
        }
        order.truncate(k);
    }
    head.extend(order.iter().map(|&i| i as usize));
}

/// How far the candidates the model did not score are moved down, so that
/// every one of them ranks below every candidate it scored (0 when none is
/// on either side, or they already do).
fn ranking_shift(candidates: &[Candidate]) -> f64 {
    let mut head_min = f64::INFINITY;
    let mut rest_max = f64::NEG_INFINITY;
    for c in candidates {
        if c.rescored {
            head_min = head_min.min(c.score);
        } else {
            rest_max = rest_max.max(c.score);
        }
    }
    if head_min.is_finite() && rest_max.is_finite() && rest_max >= head_min {
        rest_max - head_min + 1.0
    } else {
        0.0
    }
}

/// Whether only the model's signal counts in the blend: the other signals
/// cannot rank a first stage then, so the model scores every candidate.
fn ranks_by_model_only(w: &crate::config::BlendWeights) -> bool {
    [
        w.affinity,
        w.similarity,
        w.popularity,
        w.trending,
        w.co_watched,
    ]
    .iter()
    .all(|&x| x == 0.0)
}

/// Computes the recommendations, carousels and insights of one user at
/// `ctx.index.now`, carrying the state's version.
pub fn build_outputs(
    ctx: &Context,
    cache: &mut RecomputeCache,
    user_id: &str,
    state: &UserState,
) -> Result<UserOutputs, ScoreError> {
    let version = state.version;
    let now = ctx.index.now.max(state.last_ts);
    // The records say which of the user's events they reflect; a user without
    // events (a refresh) gets the engine's current event time.
    let as_of = if state.last_ts > 0 {
        state.last_ts
    } else {
        now
    };
    let lists = &ctx.config.lists;
    let weights = state.genre_weights_at(now, ctx.config);
    let max_abs = weights
        .iter()
        .map(|g| g.weight.abs())
        .fold(0.0f32, f32::max) as f64;
    let mut top_genres: Vec<GenreWeight> =
        weights.iter().copied().filter(|g| g.weight > 0.0).collect();
    top_genres.sort_by(|a, b| b.weight.total_cmp(&a.weight).then(a.genre.cmp(&b.genre)));
    top_genres.truncate(lists.genre_rows);
    // A user without positive tastes yet gets the genres trending right now.
    let cold_genres: Vec<u8> = if top_genres.is_empty() {
        ctx.index
            .trending_genres
            .iter()
            .take(lists.genre_rows)
            .copied()
            .collect()
    } else {
        Vec::new()
    };

    let seeds: Vec<u32> = state
        .positive_recent()
        .take(lists.similar_seeds)
        .map(|r| r.movie_id)
        .collect();

    // Candidate pool from every source, excluding what the user already consumed.
    let mut candidates = std::mem::take(&mut cache.candidates);
    candidates.clear();
    let mut slot = std::mem::take(&mut cache.slots);
    slot.begin(ctx.catalog.len());
    // Whether `id` may be recommended at all (and is now a candidate of
    // `source`). Every source but co-watch ranks catalog items only (the
    // index and the similarity cache are rebuilt when the catalog changes);
    // a co-watch neighbour outside the catalog is not proposed.
    // A ranking's or a similar list's entry brings the item's position and
    // signals along (no lookup); co-watch neighbours are looked up once.
    let mut propose = |id: u32, known: Option<(u32, Signal)>, source: Source| -> bool {
        if state.is_seen(id) || seeds.contains(&id) {
            return false;
        }
        let Some(position) = known.map(|k| k.0).or_else(|| ctx.catalog.position(id)) else {
            return false;
        };
        // A position is only valid for the catalog it was found in (the
        // engine drops its index and similar lists whenever it changes).
        debug_assert_eq!(ctx.catalog.at(position).id, id, "a stale catalog position");
        let i = match slot.get(position) {
            Some(i) => i,
            None => {
                let (popularity, trending) =
                    known.map_or_else(|| ctx.index.signal_at(position), |k| k.1);
                candidates.push(Candidate {
                    movie_id: id,
                    position,
                    genres: ctx.catalog.key_at(position).genres,
                    sources: 0,
                    signals: Signals {
                        popularity,
                        trending,
                        ..Signals::default()
                    },
                    because_of: None,
                    co_watched_with: None,
                    score: 0.0,
                    rescored: false,
                });
                slot.set(position, candidates.len() - 1);
                candidates.len() - 1
            }
        };
        candidates[i].sources |= source_bit(source);
        true
    };
    // Each source proposes its best `per_source` items the user may get.
    let per_source = lists.candidates_per_source;
    let mut take = |ranked: &mut dyn Iterator<Item = (u32, Option<(u32, Signal)>)>,
                    source: Source| {
        if !enabled(ctx.variant, source) {
            return;
        }
        let mut taken = 0;
        for (id, known) in ranked {
            if taken == per_source {
                break;
            }
            if propose(id, known, source) {
                taken += 1;
            }
        }
    };
    let with_signal = |e: &RankedItem| (e.id, Some((e.position, e.signal)));
    take(
        &mut ctx.index.popular.iter().map(with_signal),
        Source::Popular,
    );
    take(
        &mut ctx.index.trending.iter().map(with_signal),
        Source::Trending,
    );
    for g in top_genres
        .iter()
        .map(|g| g.genre)
        .chain(cold_genres.iter().copied())
    {
        let genre_items = ctx.index.popular_by_genre.get(g as usize);
        take(
            &mut genre_items.into_iter().flatten().map(with_signal),
            Source::Genre,
        );
    }
    let seed_lists: Vec<(u32, SimilarItems)> = seeds
        .iter()
        .map(|&s| (s, cache.similar.similar(ctx.catalog, s)))
        .collect();
    for (_, similar) in &seed_lists {
        take(
            &mut similar
                .iter()
                .map(|s| (s.id, Some((s.position, ctx.index.signal_at(s.position))))),
            Source::Similar,
        );
    }
    let mut co_watched = co_watched(
        ctx,
        state,
        std::mem::take(&mut cache.co_watch_scores),
        std::mem::take(&mut cache.co_watch_ranking),
    );
    take(
        &mut (&mut co_watched.ranked).map(|(id, _)| (id, None)),
        Source::CoWatched,
    );
    // The model ranks the whole catalogue once; its scores then also serve
    // as the other candidates' model signal (no second scoring run).
    let catalogue_scores = match ctx.variant.scorer.as_deref() {
        Some(scorer) if enabled(ctx.variant, Source::Model) => {
            scorer.score_catalogue(user_id, state)?
        }
        _ => None,
    };
    if let Some(scores) = &catalogue_scores {
        take(
            &mut model_ranking(scores).map(|id| (id, None)),
            Source::Model,
        );
    }

    // Signals.
    // The seeds' content keys are read once; a candidate's whole record
    // only when both it and a seed have tags.
    let seed_keys: Vec<(&Movie, ContentKey)> = seeds
        .iter()
        .filter_map(|s| ctx.catalog.position(*s))
        .map(|p| (ctx.catalog.at(p), ctx.catalog.key_at(p)))
        .collect();
    let tastes = GenreTable::new(&weights);
    for c in &mut candidates {
        let key = ctx.catalog.key_at(c.position);
        c.signals.affinity = tastes.affinity(c.genres, max_abs);
        let candidate = (ctx.catalog.at(c.position), key);
        let similarity = |&(seed, seed_key): &(&Movie, ContentKey)| {
            (seed.id, keyed_similarity(candidate, (seed, seed_key)))
        };
        if let Some((seed, sim)) = seed_keys
            .iter()
            .map(similarity)
            .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)))
        {
            c.signals.similarity = sim;
            c.because_of = Some(seed);
        }
        if let Some(s) = co_watched.by_item.get(&c.movie_id) {
            c.signals.co_watched = s.association / co_watched.max
                * cowatch::confidence(s.support, ctx.config.co_watch.support);
            c.co_watched_with = Some(s.seed);
        }
    }
    // The other signals rank every candidate first (a candidate's ncf is
    // None until the model scores it); the model then re-scores the head of
    // each list that is ranked by score, and later the items other rows show.
    let score_of_candidate = |c: &Candidate| match &ctx.variant.ranker {
        Some(ranker) => ranker.score(&c.signals, c.sources),
        None => blend::blend(&c.signals, &ctx.variant.blend),
    };
    for c in &mut candidates {
        c.score = score_of_candidate(c);
    }
    let scorer = ctx.variant.scorer.as_deref();
    let model = scorer.map(|s| s.info());
    // Scores the candidates at these indices that the model has not scored
    // yet (each once, in index order).
    let rescore = |candidates: &mut [Candidate], indices: &[usize]| {
        let Some(scorer) = scorer else {
            return Ok::<(), ScoreError>(());
        };
        let mut picked: Vec<usize> = indices
            .iter()
            .copied()
            .filter(|&i| !candidates[i].rescored)
            .collect();
        picked.sort_unstable();
        picked.dedup();
        if picked.is_empty() {
            return Ok(());
        }
        let ids: Vec<u32> = picked.iter().map(|&i| candidates[i].movie_id).collect();
        let scores = match &catalogue_scores {
            Some(all) => ids.iter().map(|id| score_of(all, *id)).collect(),
            None => scorer.score(user_id, state, &ids)?,
        };
        for (&i, s) in picked.iter().zip(scores) {
            let c = &mut candidates[i];
            c.signals.ncf = model_signal(s);
            c.rescored = true;
            c.score = score_of_candidate(c);
        }
        Ok(())
    };
    let depth = lists.rescore_depth;
    // Everything is scored when scores cost nothing more (the catalogue is
    // scored already, or a call costs the same however few items it asks
    // for) or when only the model ranks (its variant's other weights are 0).
    let whole_pool = depth == 0
        || catalogue_scores.is_some()
        || scorer.is_some_and(|s| s.scores_catalogue_per_call())
        || (ctx.variant.ranker.is_none() && ranks_by_model_only(&ctx.variant.blend));
    if scorer.is_some() && whole_pool {
        let every: Vec<usize> = (0..candidates.len()).collect();
        rescore(&mut candidates, &every)?;
    } else if scorer.is_some() {
        let mut order = std::mem::take(&mut cache.order);
        let mut head = Vec::new();
        let any = |_: &Candidate| true;
        first_by_score(&candidates, &mut order, depth * lists.top_n, any, &mut head);
        for g in &top_genres {
            let of_genre = |c: &Candidate| c.genres.contains(g.genre);
            let k = depth * lists.row_size;
            first_by_score(&candidates, &mut order, k, of_genre, &mut head);
        }
        cache.order = order;
        rescore(&mut candidates, &head)?;
    }
    // The rows ranked by score read the re-scored head first, then the rest
    // in the first stage's order (its scores shifted below the head's).
    let rest_shift = ranking_shift(&candidates);
    let rank_key = |c: &Candidate| {
        if c.rescored {
            c.score
        } else {
            c.score - rest_shift
        }
    };
    if let Some(pool) = &mut cache.pool {
        // The learned blend is fitted on every candidate's signals, the
        // model's included; the outputs still see only what it re-scored.
        let unscored: Vec<u32> = match scorer {
            Some(_) => candidates
                .iter()
                .filter(|c| !c.rescored)
                .map(|c| c.movie_id)
                .collect(),
            None => Vec::new(),
        };
        let mut more = match scorer {
            Some(scorer) if !unscored.is_empty() => scorer.score(user_id, state, &unscored)?,
            _ => Vec::new(),
        }
        .into_iter();
        pool.clear();
        pool.extend(candidates.iter().map(|c| {
            let mut signals = c.signals;
            if scorer.is_some() && !c.rescored {
                signals.ncf = more.next().and_then(model_signal);
            }
            PoolEntry {
                movie_id: c.movie_id,
                signals,
                sources: c.sources,
            }
        }));
    }

    // The top picks read the ranking as far as the genre cap makes them;
    // every row selects its own few best.
    let scored = |c: &Candidate, score: f64| Scored {
        movie_id: c.movie_id,
        score,
        genres: c.genres,
    };
    let ranked =
        blend::LazyOrder::ranked(candidates.iter().map(|c| scored(c, rank_key(c))).collect());
    // The items every row shows, once each, in order of first appearance;
    // rendered once all rows are chosen (the model scores those it has not).
    let mut shown: Vec<u32> = Vec::new();
    let mut shown_set: IdMap<()> = IdMap::default();
    let mut item = |id: u32| {
        if shown_set.insert(id, ()).is_none() {
            shown.push(id);
        }
        id
    };
    let top = blend::diversify(ranked, lists.top_n, lists.max_genre_share);
    let top_ids: Vec<u32> = top.iter().map(|s| item(s.movie_id)).collect();

    // Every other row's best items, chosen in one pass over the pool: the
    // genre rows by score, the cold start's genre rows and "Trending now" by
    // trending, "Popular" by popularity.
    let best = || blend::BestK::new(lists.row_size);
    let mut genre_best: Vec<blend::BestK> = top_genres.iter().map(|_| best()).collect();
    let mut cold_best: Vec<blend::BestK> = cold_genres.iter().map(|_| best()).collect();
    let (mut trending_best, mut popular_best) = (best(), best());
    for c in &candidates {
        for (g, row) in top_genres.iter().zip(&mut genre_best) {
            if c.genres.contains(g.genre) {
                row.offer(scored(c, rank_key(c)));
            }
        }
        for (&genre, row) in cold_genres.iter().zip(&mut cold_best) {
            if c.genres.contains(genre) {
                row.offer(scored(c, c.signals.trending));
            }
        }
        trending_best.offer(scored(c, c.signals.trending));
        popular_best.offer(scored(c, c.signals.popularity));
    }

    let mut rows = vec![CarouselRow {
        id: "top-picks".into(),
        title: "Top picks for you".into(),
        kind: "top_picks".into(),
        movie_ids: top_ids.clone(),
    }];
    for (g, best) in top_genres.iter().zip(genre_best) {
        let name = ctx.catalog.genre_name(g.genre);
        // The ranking's first items of the genre (a rare genre's items may
        // rank deep).
        let row: Vec<u32> = best.into_best().iter().map(|s| item(s.movie_id)).collect();
        rows.push(CarouselRow {
            id: format!("genre:{name}"),
            title: format!("Because you like {name}"),
            kind: "genre".into(),
            movie_ids: row,
        });
    }
    for (&genre, best) in cold_genres.iter().zip(cold_best) {
        let name = ctx.catalog.genre_name(genre);
        let row = best.into_best();
        rows.push(CarouselRow {
            id: format!("trending-genre:{name}"),
            title: format!("Trending in {name}"),
            kind: "trending_genre".into(),
            movie_ids: row.iter().map(|s| item(s.movie_id)).collect(),
        });
    }
    // Because you watched the latest engaged item: what others watched with it,
    // then what resembles it.
    let row_seed = co_watched
        .seeds
        .first()
        .copied()
        .filter(|s| ctx.cowatch.get(*s).is_some_and(|n| !n.entries.is_empty()));
    let content_seed = seed_lists.first().map(|(s, list)| (*s, list.clone()));
    let because = match row_seed {
        Some(seed) => {
            // The seed's neighbours strongest first (as `Neighbors::strongest`
            // orders them), put in order only as far as the row reads them.
            let neighbours = ctx.cowatch.get(seed).map(|n| {
                strongest_lazily(
                    n.entries
                        .iter()
                        .map(|e| (e.item, e.guaranteed() as f64))
                        .filter(|(_, count)| *count > 0.0)
                        .collect(),
                )
            });
            Some((seed, neighbours, cache.similar.similar(ctx.catalog, seed)))
        }
        None => content_seed.map(|(seed, list)| (seed, None, list)),
    };
    if let Some((seed, neighbours, similar)) = because {
        let ids = neighbours
            .into_iter()
            .flatten()
            .map(|(id, _)| id)
            .chain(similar.iter().map(|s| s.id));
        let mut row: Vec<u32> = Vec::with_capacity(lists.row_size);
        for id in ids.filter(|id| slot.of(ctx.catalog, *id).is_some()) {
            if row.len() == lists.row_size {
                break;
            }
            if !row.contains(&id) {
                row.push(item(id));
            }
        }
        let title = ctx.catalog.get(seed).map(|m| &*m.title).unwrap_or("");
        rows.push(CarouselRow {
            id: format!("because-you-watched:{seed}"),
            title: format!("Because you watched {title}"),
            kind: "because_you_watched".into(),
            movie_ids: row,
        });
    }
    for (id, title, best) in [
        ("trending", "Trending now", trending_best),
        ("popular", "Popular", popular_best),
    ] {
        let by_key = best.into_best();
        rows.push(CarouselRow {
            id: id.into(),
            title: title.into(),
            kind: id.into(),
            movie_ids: by_key.iter().map(|s| item(s.movie_id)).collect(),
        });
    }
    rows.retain(|r| !r.movie_ids.is_empty());
    let shown_candidates: Vec<usize> = shown
        .iter()
        .map(|&id| {
            slot.of(ctx.catalog, id)
                .expect("shown items are candidates")
        })
        .collect();
    rescore(&mut candidates, &shown_candidates)?;
    let mut rendered: IdMap<RecommendedItem> = shown
        .iter()
        .zip(&shown_candidates)
        .map(|(&id, &i)| (id, render(ctx, &mut cache.reasons, &candidates[i])))
        .collect();
    let carousel_items: Vec<CarouselItem> = shown.iter().map(|id| (&rendered[id]).into()).collect();
    // The top picks are distinct candidates: each is moved out once.
    let top_items: Vec<RecommendedItem> = top_ids
        .iter()
        .filter_map(|id| rendered.remove(id))
        .collect();
    cache.slots = slot;
    cache.candidates = candidates;
    cache.co_watch_scores = co_watched.by_item;
    cache.co_watch_ranking = co_watched.ranked.into_items();

    Ok(UserOutputs {
        // Nothing new unless the caller says what the user held before.
        previous_version: version,
        recommendations: Recommendations {
            schema: RECOMMENDATIONS_SCHEMA.into(),
            user_id: user_id.into(),
            version,
            as_of,
            variant: ctx.variant.name.to_string(),
            model,
            blend: ctx.variant.ranker.as_ref().map(|r| r.version.clone()),
            items: top_items,
        },
        carousels: Carousels {
            schema: CAROUSELS_SCHEMA.into(),
            user_id: user_id.into(),
            version,
            as_of,
            variant: ctx.variant.name.to_string(),
            items: carousel_items,
            rows,
        },
        insights: Insights {
            variant: ctx.variant.name.to_string(),
            ..insights(ctx.catalog, user_id, state, &weights, version, as_of)
        },
    })
}

/// The co-watch source's view of one user.
struct CoWatched {
    /// The user's seeds, most recent first.
    seeds: Vec<u32>,
    /// Candidates by summed association, strongest first (ties: lower id).
    ranked: LazyRanking,
    by_item: IdMap<CoWatchScore>,
    /// The strongest association (1 when there is none), for normalizing.
    max: f64,
}

/// One candidate of the co-watch source.
#[derive(Debug)]
struct CoWatchScore {
    /// Summed over the seeds.
    association: f64,
    /// The seed it is most associated with, and that association.
    seed: u32,
    seed_association: f64,
    /// How often it was co-watched with the seeds.
    support: f64,
    /// Its [`cowatch::candidate_factor`], computed once.
    candidate_factor: f64,
}

/// `(id, score)` pairs strongest first (ties: lower id), sorted only as far
/// as they are read: the co-watch source reads a few dozen of up to
/// `seeds × neighbors` (1,000 by default).
type LazyRanking = blend::LazyOrder<(u32, f64)>;

fn strongest_first(a: &(u32, f64), b: &(u32, f64)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// `(id, strength)` pairs rank [`strongest_first`].
impl blend::Ranked for (u32, f64) {
    fn rank_order(&self, other: &Self) -> std::cmp::Ordering {
        strongest_first(self, other)
    }
}

/// `items` (unique ids) as a [`LazyRanking`].
fn strongest_lazily(items: Vec<(u32, f64)>) -> LazyRanking {
    blend::LazyOrder::new(items, 64)
}

/// Items co-watched with the user's most recent engaged ones: each seed's
/// neighbours scored by [`cowatch::association`], summed over the seeds.
/// `by_item` and `ranking` are emptied and reused.
fn co_watched(
    ctx: &Context,
    state: &UserState,
    mut by_item: IdMap<CoWatchScore>,
    mut ranking: Vec<(u32, f64)>,
) -> CoWatched {
    let co = &ctx.config.co_watch;
    let seeds: Vec<u32> = state.engaged_recent().take(co.seeds).collect();
    let count = |id: u32| ctx.items.get(&id).map_or(0.0, |m| m.count as f64);
    // With alpha 0 (the default) the candidate's factor is 1: no count lookup.
    let candidate_factor = |id: u32| {
        if co.alpha == 0.0 {
            1.0
        } else {
            cowatch::candidate_factor(count(id), co.alpha)
        }
    };
    by_item.clear();
    by_item.reserve(seeds.len() * co.neighbors);
    for &seed in &seeds {
        let Some(neighbours) = ctx.cowatch.get(seed) else {
            continue;
        };
        let seed_factor = cowatch::seed_factor(count(seed), co.alpha);
        for n in &neighbours.entries {
            // The factors are positive: only a positive count associates.
            if n.guaranteed() <= 0.0 {
                continue;
            }
            let e = by_item.entry(n.item).or_insert_with(|| CoWatchScore {
                association: 0.0,
                seed,
                seed_association: 0.0,
                support: 0.0,
                candidate_factor: candidate_factor(n.item),
            });
            let a =
                cowatch::association_of_factors(n.guaranteed(), seed_factor, e.candidate_factor);
            e.association += a;
            e.support += n.guaranteed() as f64;
            if a > e.seed_association {
                e.seed = seed;
                e.seed_association = a;
            }
        }
    }
    // Ids are unique: a total order, so unstable sorting is deterministic.
    ranking.clear();
    ranking.extend(by_item.iter().map(|(id, e)| (*id, e.association)));
    let max = ranking
        .iter()
        .map(|e| e.1)
        .max_by(|a, b| a.total_cmp(b))
        .unwrap_or(1.0);
    let ranked = strongest_lazily(ranking);
    CoWatched {
        seeds,
        ranked,
        by_item,
        max,
    }
}

/// A user's genre weights indexed by genre, for the per-candidate signals.
struct GenreTable {
    weight: [f32; crate::catalog::MAX_GENRES],
    /// Genres with a weight.
    present: u64,
}

impl GenreTable {
    /// `weights` as kept in the state: sorted by genre, one entry each.
    fn new(weights: &[GenreWeight]) -> GenreTable {
        let mut table = GenreTable {
            weight: [0.0; crate::catalog::MAX_GENRES],
            present: 0,
        };
        for w in weights.iter().rev() {
            table.weight[w.genre as usize] = w.weight;
            table.present |= 1u64 << w.genre;
        }
        table
    }

    fn weight(&self, genre: u8) -> f32 {
        self.weight[genre as usize]
    }

    /// [`affinity`], summing the same weights in the same (genre) order.
    fn affinity(&self, genres: GenreSet, max_abs: f64) -> f64 {
        if genres.is_empty() || max_abs <= 0.0 {
            return 0.0;
        }
        let sum: f64 = GenreSet(genres.0 & self.present)
            .iter()
            .map(|g| self.weight(g) as f64)
            .sum();
        (sum / max_abs / genres.len() as f64).clamp(-1.0, 1.0)
    }
}

/// Mean of the user's (max-normalized) weights over the item's genres, in `[-1, 1]`.
pub fn affinity(genres: GenreSet, weights: &[GenreWeight], max_abs: f64) -> f64 {
    if genres.is_empty() || max_abs <= 0.0 {
        return 0.0;
    }
    let sum: f64 = weights
        .iter()
        .filter(|w| genres.contains(w.genre))
        .map(|w| w.weight as f64)
        .sum();
    (sum / max_abs / genres.len() as f64).clamp(-1.0, 1.0)
}

/// Movie ids by descending model score (ties by id), lazily: the source
/// stops after its few candidates, so a full sort of the catalogue is rare.
fn model_ranking(scores: &[(u32, f32)]) -> impl Iterator<Item = u32> + '_ {
    let mut order: Vec<usize> = (0..scores.len())
        .filter(|&i| !scores[i].1.is_nan())
        .collect();
    let by_score = move |a: &usize, b: &usize| {
        scores[*b]
            .1
            .total_cmp(&scores[*a].1)
            .then(scores[*a].0.cmp(&scores[*b].0))
    };
    // The head is selected, then sorted; the rest only if the head runs out.
    let head = order.len().min(256);
    if head < order.len() {
        order.select_nth_unstable_by(head, by_score);
    }
    order[..head].sort_unstable_by(by_score);
    let mut rest_sorted = head == order.len();
    let mut at = 0;
    std::iter::from_fn(move || {
        if at == head && !rest_sorted {
            order[head..].sort_unstable_by(by_score);
            rest_sorted = true;
        }
        let id = scores[*order.get(at)?].0;
        at += 1;
        Some(id)
    })
}

/// A model score as the `ncf` signal: NaN means the model does not know the item.
fn model_signal(score: f32) -> Option<f64> {
    (!score.is_nan()).then_some(f64::from(score))
}

/// A movie's score in a catalogue scoring sorted by movie id (NaN: unknown).
pub fn score_of(scores: &[(u32, f32)], movie_id: u32) -> f32 {
    scores
        .binary_search_by_key(&movie_id, |s| s.0)
        .map_or(f32::NAN, |i| scores[i].1)
}

fn render(ctx: &Context, reasons: &mut Reasons, c: &Candidate) -> RecommendedItem {
    let movie = ctx.catalog.at(c.position);
    let dominant = blend::dominant(&c.signals, &ctx.variant.blend);
    let seed = |s: Option<u32>| match s.filter(|s| ctx.catalog.contains(*s)) {
        Some(s) => Subject::Seed(s),
        None => Subject::Nothing,
    };
    let subject = match dominant {
        Dominant::CoWatched => seed(c.co_watched_with),
        Dominant::Similarity => seed(c.because_of),
        Dominant::Affinity | Dominant::Trending | Dominant::Popularity => {
            match movie.genres.iter().next() {
                Some(g) => Subject::Genre(g),
                None => Subject::Nothing,
            }
        }
        Dominant::Ncf if c.sources == source_bit(Source::Model) => Subject::ModelOnly,
        Dominant::Ncf => Subject::Nothing,
    };
    RecommendedItem {
        movie_id: movie.id,
        title: movie.title.clone(),
        genres: movie.genre_names.clone(),
        year: movie.year,
        tmdb_id: movie.tmdb_id,
        score: round6(c.score),
        signals: Signals {
            affinity: round6(c.signals.affinity),
            similarity: round6(c.signals.similarity),
            popularity: round6(c.signals.popularity),
            trending: round6(c.signals.trending),
            co_watched: round6(c.signals.co_watched),
            ncf: c.signals.ncf.map(round6),
        },
        sources: SOURCES
            .into_iter()
            .filter(|s| c.sources & source_bit(*s) != 0)
            .collect(),
        reason: reasons.get(ctx.catalog, dominant, subject),
    }
}

/// What a reason names besides its signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Subject {
    /// The seed in the catalog that the item is co-watched with or resembles.
    Seed(u32),
    /// The item's first genre.
    Genre(u8),
    /// An item only the model proposed.
    ModelOnly,
    Nothing,
}

/// Reason texts by (dominant signal, subject): the same few hundred texts
/// recur in every user's lists, so each is formatted once and shared.
/// Cleared with the catalog (they quote titles and genre names).
#[derive(Debug, Default)]
pub struct Reasons {
    texts: HashMap<(Dominant, Subject), Arc<str>, std::hash::BuildHasherDefault<IdHasher>>,
}

/// Reasons kept before the cache starts over (a catalog far larger than
/// what is being recommended).
const REASONS_MAX: usize = 100_000;

impl Reasons {
    fn get(&mut self, catalog: &Catalog, dominant: Dominant, subject: Subject) -> Arc<str> {
        if let Some(text) = self.texts.get(&(dominant, subject)) {
            return text.clone();
        }
        let text: Arc<str> = Arc::from(reason_text(catalog, dominant, subject));
        if self.texts.len() >= REASONS_MAX {
            self.texts.clear();
        }
        self.texts.insert((dominant, subject), text.clone());
        text
    }
}

/// Why an item is recommended, in words.
fn reason_text(catalog: &Catalog, dominant: Dominant, subject: Subject) -> String {
    let title = match subject {
        Subject::Seed(s) => catalog.get(s).map(|m| &*m.title),
        _ => None,
    };
    let genre = match subject {
        Subject::Genre(g) => Some(catalog.genre_name(g)),
        _ => None,
    };
    match (dominant, title, genre) {
        (Dominant::CoWatched, Some(title), _) => format!("Viewers of {title} also watched this"),
        (Dominant::CoWatched, None, _) => "Often watched together with your recent picks".into(),
        (Dominant::Similarity, Some(title), _) => format!("Because you liked {title}"),
        (Dominant::Similarity, None, _) => "Similar to what you watched".into(),
        (Dominant::Affinity, _, Some(g)) => format!("Matches your taste for {g}"),
        (Dominant::Affinity, _, None) => "Matches your taste".into(),
        (Dominant::Trending, _, Some(g)) => format!("Trending in {g}"),
        (Dominant::Trending, _, None) => "Trending now".into(),
        (Dominant::Popularity, _, Some(g)) => format!("Popular in {g}"),
        (Dominant::Popularity, _, None) => "Popular right now".into(),
        (Dominant::Ncf, _, _) if subject == Subject::ModelOnly => {
            "Picked for you from what you watched recently".into()
        }
        (Dominant::Ncf, _, _) => "Viewers with similar taste enjoyed this".into(),
    }
}

/// Six decimals are plenty for consumers and keep the records small.
fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

fn insights(
    catalog: &Catalog,
    user_id: &str,
    state: &UserState,
    weights: &[GenreWeight],
    version: u64,
    now: i64,
) -> Insights {
    let positive: f64 = weights.iter().map(|g| g.weight.max(0.0) as f64).sum();
    let mut genres: Vec<GenreShare> = weights
        .iter()
        .map(|g| GenreShare {
            genre: catalog.genre_name(g.genre).to_string(),
            weight: round6(g.weight as f64),
            share: if positive > 0.0 {
                round6(g.weight.max(0.0) as f64 / positive)
            } else {
                0.0
            },
        })
        .collect();
    genres.sort_by(|a, b| b.weight.total_cmp(&a.weight).then(a.genre.cmp(&b.genre)));
    let c = &state.counters;
    let count = |k: EventType| c.by_type[k.index()] as u64;
    let plays = count(EventType::Play);
    let ratings = count(EventType::Rate);
    let ratio = |a: f64, b: u64| if b == 0 { 0.0 } else { round6(a / b as f64) };
    Insights {
        schema: INSIGHTS_SCHEMA.into(),
        user_id: user_id.into(),
        version,
        as_of: now,
        variant: String::new(),
        genres,
        activity: Activity {
            events_total: state.events_total(),
            by_type: EventType::ALL
                .iter()
                .filter(|k| count(**k) > 0)
                .map(|k| (k.as_str().to_string(), count(*k)))
                .collect(),
            first_ts: state.first_ts,
            last_ts: state.last_ts,
            items_seen: state.seen.len(),
            ratings,
            mean_rating: (ratings > 0).then(|| round6(c.ratings_sum / ratings as f64)),
        },
        engagement: Engagement {
            carousel_impressions: c.carousel_views as u64,
            carousel_clicks: c.carousel_clicks as u64,
            ctr: ratio(c.carousel_clicks as f64, c.carousel_views as u64),
            plays,
            completions: count(EventType::Complete),
            completion_rate: ratio(count(EventType::Complete) as f64, plays),
            dwell_seconds: round6(c.dwell_seconds),
            mean_dwell_seconds: ratio(c.dwell_seconds, plays),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::CatalogRecord;
    use proptest::prelude::*;

    fn catalog(n: u32) -> Catalog {
        let mut c = Catalog::default();
        for id in 1..=n {
            c.upsert(CatalogRecord {
                movie_id: id,
                title: format!("m{id}"),
                genres: vec![["A", "B", "C"][id as usize % 3].to_string()],
                year: None,
                tmdb_id: None,
                imdb_id: None,
                tags: vec![],
            })
            .unwrap();
        }
        c
    }

    /// A catalog with random genres (of 6), years and tags (of 5).
    fn varied_catalog(movies: &[(u8, Option<u16>, u8)]) -> Catalog {
        const GENRES: [&str; 6] = ["A", "B", "C", "D", "E", "F"];
        let mut c = Catalog::default();
        for (i, (genres, year, tags)) in movies.iter().enumerate() {
            c.upsert(CatalogRecord {
                movie_id: i as u32 + 1,
                title: format!("m{i}"),
                genres: (0..6)
                    .filter(|g| genres & (1 << g) != 0)
                    .map(|g| GENRES[g].to_string())
                    .collect(),
                year: *year,
                tmdb_id: None,
                imdb_id: None,
                tags: (0..5)
                    .filter(|t| tags & (1 << t) != 0)
                    .map(|t| format!("t{t}"))
                    .collect(),
            })
            .unwrap();
        }
        c
    }

    #[test]
    fn year_terms_read_like_the_division() {
        for gap in 0..=u16::MAX {
            let want = (1.0 - gap as f64 / 20.0).max(0.0);
            assert_eq!(year_term(gap).to_bits(), want.to_bits(), "gap {gap}");
        }
    }

    proptest! {
        /// The model source reads the catalogue scores by descending score
        /// (ties by id), to any depth, with unscored (NaN) items left out.
        #[test]
        fn model_ranking_reads_like_a_full_sort(
            scores in proptest::collection::vec(proptest::option::of(0u8..20), 0..700),
            depth in 0usize..750,
        ) {
            let all: Vec<(u32, f32)> = scores
                .iter()
                .enumerate()
                .map(|(i, s)| (i as u32, s.map_or(f32::NAN, |v| v as f32)))
                .collect();
            let mut want: Vec<(u32, f32)> = all.iter().copied().filter(|s| !s.1.is_nan()).collect();
            want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let got: Vec<u32> = model_ranking(&all).take(depth).collect();
            let want: Vec<u32> = want.iter().take(depth).map(|s| s.0).collect();
            prop_assert_eq!(got, want);
            for (id, s) in &all {
                let found = score_of(&all, *id);
                prop_assert!(found == *s || (found.is_nan() && s.is_nan()));
            }
        }

        /// Reading the lazy ranking to any depth gives the fully sorted prefix.
        #[test]
        fn lazy_ranking_reads_like_a_full_sort(
            scores in proptest::collection::vec(0u8..20, 0..400),
            depth in 0usize..450,
        ) {
            let items: Vec<(u32, f64)> =
                scores.iter().enumerate().map(|(i, s)| (i as u32 * 7 % 401, *s as f64)).collect();
            let mut unique = items.clone();
            unique.sort_by_key(|e| e.0);
            unique.dedup_by_key(|e| e.0);
            let mut full = unique.clone();
            full.sort_by(strongest_first);
            let lazy: Vec<(u32, f64)> = strongest_lazily(unique).take(depth).collect();
            prop_assert_eq!(&lazy[..], &full[..depth.min(full.len())]);
        }

        /// Similarity from the catalog's dense content keys gives exactly
        /// what the formula gives, divisions and all, tagged or not.
        #[test]
        fn keyed_similarity_equals_the_formula(
            movies in proptest::collection::vec(
                (0u8..64, proptest::option::of(1940u16..2020), prop_oneof![1 => Just(0u8), 1 => 0u8..32]),
                1..40,
            ),
        ) {
            let catalog = varied_catalog(&movies);
            for p in 0..catalog.len() as u32 {
                let a = catalog.at(p);
                prop_assert_eq!(catalog.key_at(p), a.content_key());
                for q in 0..catalog.len() as u32 {
                    let b = catalog.at(q);
                    let keyed = keyed_similarity((a, catalog.key_at(p)), (b, catalog.key_at(q)));
                    prop_assert_eq!(keyed.to_bits(), content_similarity(a, b).to_bits());
                    let union = (a.genres.0 | b.genres.0).count_ones();
                    let genres = if union == 0 {
                        0.0
                    } else {
                        (a.genres.0 & b.genres.0).count_ones() as f64 / union as f64
                    };
                    let years = match (a.year, b.year) {
                        (Some(x), Some(y)) => (1.0 - (x as f64 - y as f64).abs() / 20.0).max(0.0),
                        _ => 0.0,
                    };
                    let formula = if a.tags.is_empty() || b.tags.is_empty() {
                        0.75 * genres + 0.25 * years
                    } else {
                        let shared = a.tags.iter().filter(|t| b.tags.contains(t)).count();
                        let union = a.tags.len() + b.tags.len() - shared;
                        0.6 * genres + 0.2 * years + 0.2 * shared as f64 / union as f64
                    };
                    prop_assert_eq!(keyed.to_bits(), formula.to_bits());
                }
            }
        }

        /// The pruned search by genre group returns exactly what a scan of
        /// the whole catalog does.
        #[test]
        fn most_similar_equals_a_full_scan(
            movies in proptest::collection::vec(
                (0u8..64, proptest::option::of(1970u16..2020), prop_oneof![3 => Just(0u8), 1 => 0u8..32]),
                1..400,
            ),
            seed_pick in any::<proptest::sample::Index>(),
        ) {
            let c = varied_catalog(&movies);
            let seed = c.get(seed_pick.index(movies.len()) as u32 + 1).unwrap();
            let mut full: Vec<SimilarItem> = c
                .movies()
                .filter(|m| m.id != seed.id && !(m.genres.0 & seed.genres.0 == 0 && m.tags.is_empty()))
                .map(|m| SimilarItem {
                    id: m.id,
                    similarity: content_similarity(seed, m) as f32,
                    position: c.position(m.id).unwrap(),
                })
                .filter(|s| s.similarity > 0.0)
                .collect();
            full.sort_by(by_similarity);
            full.truncate(SIMILAR_PER_SEED);
            let groups = group_by_genres(&c);
            prop_assert_eq!(most_similar(&c, &groups, seed), full);
        }

        /// The incrementally kept order equals a full sort by popularity at any
        /// later time (ties to the lower id), decayed or not.
        #[test]
        fn popular_order_matches_a_full_sort(
            events in proptest::collection::vec((1u32..=12, 0i64..50_000_000), 1..80),
            finite in any::<bool>(),
        ) {
            let c = catalog(12);
            let hl = HalfLives {
                long_ms: if finite { 3_600_000.0 } else { f64::INFINITY },
                short_ms: 600_000.0,
            };
            let mut items: IdMap<Momentum> = IdMap::default();
            let mut order = PopularOrder::build(&c, &items, hl);
            let mut now = 0;
            for (id, t) in events {
                let m = items.entry(id).or_default();
                *m = m.add(1.0, t, hl);
                order.update(id, items.get(&id), hl);
                now = now.max(t);
            }
            let mut expected: Vec<(f64, u32)> = c
                .ids()
                .iter()
                .map(|id| (items.get(id).map_or(0.0, |m| m.popularity_at(now, hl)), *id))
                .collect();
            expected.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let got: Vec<u32> = order.order.iter().map(|e| e.1).collect();
            // Equal up to float near-ties: compare the values in the got order.
            let value = |id: u32| items.get(&id).map_or(0.0, |m| m.popularity_at(now, hl));
            for w in got.windows(2) {
                let (a, b) = (value(w[0]), value(w[1]));
                prop_assert!(a > b * (1.0 + 1e-9) || (a - b).abs() <= 1e-9 * a.max(b).max(1e-300),
                    "{} ({a}) before {} ({b})", w[0], w[1]);
            }
            prop_assert_eq!(got.len(), expected.len());
            // The moves in place give exactly the order a rebuild gives.
            let rebuilt = PopularOrder::build(&c, &items, hl);
            let bits = |o: &PopularOrder| -> Vec<(u64, u32)> {
                o.order.iter().map(|e| (e.0.to_bits(), e.1)).collect()
            };
            prop_assert_eq!(bits(&order), bits(&rebuilt));
        }
    }
}
