//! Candidate generation, scoring and the three outputs for one user: pure
//! functions of the user's state, the item counters and the event time `now`.

use std::collections::HashMap;
use std::sync::Arc;

use crate::blend::{self, Dominant, Scored, Signals};
use crate::catalog::{Catalog, GenreSet, IdMap, Movie};
use crate::config::EngineConfig;
use crate::decay::{HalfLives, Momentum};
use crate::event::EventType;
use crate::experiment::{source_bit, Variant};
use crate::output::*;
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
}

#[derive(Debug, thiserror::Error)]
#[error("scorer failed: {0}")]
pub struct ScoreError(pub String);

/// Global rankings at one event time, rebuilt once per micro-batch.
#[derive(Debug, Clone, Default)]
pub struct ItemIndex {
    pub now: i64,
    pub popular: Vec<u32>,
    pub trending: Vec<u32>,
    /// Most popular items per genre index.
    pub by_genre: Vec<Vec<u32>>,
    pub popularity_max: f64,
    pub trending_max: f64,
    /// Normalized (popularity, trending) of every catalog item at `now`.
    pub signals: IdMap<(f64, f64)>,
    /// Genres by their own trending score, hottest first (cold-start rows).
    pub trending_genres: Vec<u8>,
}

impl ItemIndex {
    /// Ranks every catalog item at event time `now` (items without events score 0,
    /// ties go to the lower id, so a cold catalog still yields lists).
    pub fn build(
        catalog: &Catalog,
        items: &IdMap<Momentum>,
        genres: &HashMap<String, Momentum>,
        now: i64,
        hl: HalfLives,
        per_source: usize,
    ) -> ItemIndex {
        let mut hot: Vec<(u8, f64)> = genres
            .iter()
            .filter_map(|(name, m)| Some((catalog.genre_id(name)?, m.trending_at(now, hl))))
            .filter(|(_, t)| *t > 0.0)
            .collect();
        hot.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let trending_genres = hot.into_iter().map(|(g, _)| g).collect();
        let mut rows: Vec<(u32, f64, f64, GenreSet)> = catalog
            .movies()
            .map(|m| {
                let (p, t) = items
                    .get(&m.id)
                    .map(|s| (s.popularity_at(now, hl), s.trending_at(now, hl)))
                    .unwrap_or((0.0, 0.0));
                (m.id, p, t, m.genres)
            })
            .collect();
        let top = |rows: &mut Vec<(u32, f64, f64, GenreSet)>,
                   key: fn(&(u32, f64, f64, GenreSet)) -> f64| {
            rows.sort_by(|a, b| key(b).total_cmp(&key(a)).then(a.0.cmp(&b.0)));
        };
        top(&mut rows, |r| r.2);
        let trending: Vec<u32> = rows.iter().take(per_source).map(|r| r.0).collect();
        let trending_max = rows.first().map(|r| r.2).unwrap_or(0.0);
        top(&mut rows, |r| r.1);
        let popular: Vec<u32> = rows.iter().take(per_source).map(|r| r.0).collect();
        let popularity_max = rows.first().map(|r| r.1).unwrap_or(0.0);
        let signals = rows
            .iter()
            .map(|r| {
                let trending = if trending_max > 0.0 {
                    (r.2 / trending_max).clamp(0.0, 1.0)
                } else {
                    0.0
                };
                (r.0, (blend::log_normalize(r.1, popularity_max), trending))
            })
            .collect();
        let mut by_genre = vec![Vec::new(); catalog.genre_count()];
        for r in &rows {
            for g in r.3.iter() {
                if let Some(list) = by_genre.get_mut(g as usize) {
                    if list.len() < per_source {
                        list.push(r.0);
                    }
                }
            }
        }
        ItemIndex {
            now,
            popular,
            trending,
            by_genre,
            popularity_max,
            trending_max,
            signals,
            trending_genres,
        }
    }
}

/// Content similarity in `[0, 1]`: shared genres, release years and tags.
pub fn content_similarity(a: &Movie, b: &Movie) -> f64 {
    let genres = a.genres.jaccard(b.genres);
    let years = match (a.year, b.year) {
        (Some(x), Some(y)) => (1.0 - (x as f64 - y as f64).abs() / 20.0).max(0.0),
        _ => 0.0,
    };
    if a.tags.is_empty() || b.tags.is_empty() {
        0.75 * genres + 0.25 * years
    } else {
        let shared = a
            .tags
            .iter()
            .filter(|t| b.tags.binary_search(t).is_ok())
            .count();
        let union = a.tags.len() + b.tags.len() - shared;
        0.6 * genres + 0.2 * years + 0.2 * shared as f64 / union as f64
    }
}

/// A seed's most similar items with their similarity, best first.
pub type SimilarItems = Arc<Vec<(u32, f32)>>;

/// Most similar items per seed, computed on first use. Cleared when the catalog changes.
#[derive(Debug, Default)]
pub struct SimilarityCache {
    map: IdMap<SimilarItems>,
}

const SIMILAR_PER_SEED: usize = 30;
const SIMILARITY_CACHE_MAX: usize = 100_000;

impl SimilarityCache {
    pub fn clear(&mut self) {
        self.map.clear();
    }

    pub fn similar(&mut self, catalog: &Catalog, seed: u32) -> SimilarItems {
        if let Some(hit) = self.map.get(&seed) {
            return hit.clone();
        }
        let Some(seed_movie) = catalog.get(seed) else {
            return Arc::default();
        };
        let mut all: Vec<(u32, f32)> = catalog
            .movies()
            .filter(|m| {
                m.id != seed && !(m.genres.0 & seed_movie.genres.0 == 0 && m.tags.is_empty())
            })
            .map(|m| (m.id, content_similarity(seed_movie, m) as f32))
            .filter(|(_, s)| *s > 0.0)
            .collect();
        let k = SIMILAR_PER_SEED.min(all.len());
        if k < all.len() {
            all.select_nth_unstable_by(k, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            all.truncate(k);
        }
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        // The scan allocated for the whole catalog; keep only the list.
        all.shrink_to_fit();
        if self.map.len() >= SIMILARITY_CACHE_MAX {
            self.map.clear();
        }
        let list = Arc::new(all);
        self.map.insert(seed, list.clone());
        list
    }
}

/// Everything the recommender reads besides the user.
pub struct Context<'a> {
    pub catalog: &'a Catalog,
    pub items: &'a IdMap<Momentum>,
    pub index: &'a ItemIndex,
    pub config: &'a EngineConfig,
    /// The user's A/B variant: its name, blend, model and candidate sources.
    pub variant: &'a Variant,
}

/// Candidate sources in publishing order; [`Candidate::sources`] holds them as bits.
const SOURCES: [Source; 4] = [
    Source::Popular,
    Source::Trending,
    Source::Genre,
    Source::Similar,
];

/// Whether the variant draws candidates from `source`.
fn enabled(variant: &Variant, source: Source) -> bool {
    variant.sources & source_bit(source) != 0
}

struct Candidate {
    movie_id: u32,
    /// Bit set of the sources that proposed it.
    sources: u8,
    signals: Signals,
    /// The seed most similar to this candidate.
    because_of: Option<u32>,
    /// The candidate's genre the user likes most (names the reason).
    reason_genre: Option<u8>,
    score: f64,
}

/// Computes the recommendations, carousels and insights of one user at
/// `ctx.index.now`, carrying the state's version.
pub fn build_outputs(
    ctx: &Context,
    sims: &mut SimilarityCache,
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
    let mut candidates: Vec<Candidate> = Vec::with_capacity(4 * lists.candidates_per_source);
    let mut slot: IdMap<usize> = IdMap::default();
    let mut propose = |id: u32, source: Source| {
        if !enabled(ctx.variant, source)
            || state.is_seen(id)
            || seeds.contains(&id)
            || !ctx.catalog.contains(id)
        {
            return;
        }
        let i = *slot.entry(id).or_insert_with(|| {
            candidates.push(Candidate {
                movie_id: id,
                sources: 0,
                signals: Signals::default(),
                because_of: None,
                reason_genre: None,
                score: 0.0,
            });
            candidates.len() - 1
        });
        candidates[i].sources |= source_bit(source);
    };
    for &id in &ctx.index.popular {
        propose(id, Source::Popular);
    }
    for &id in &ctx.index.trending {
        propose(id, Source::Trending);
    }
    for g in top_genres
        .iter()
        .map(|g| g.genre)
        .chain(cold_genres.iter().copied())
    {
        for &id in ctx.index.by_genre.get(g as usize).into_iter().flatten() {
            propose(id, Source::Genre);
        }
    }
    let seed_lists: Vec<(u32, SimilarItems)> = seeds
        .iter()
        .map(|&s| (s, sims.similar(ctx.catalog, s)))
        .collect();
    for (_, similar) in &seed_lists {
        for &(id, _) in similar.iter() {
            propose(id, Source::Similar);
        }
    }

    // Signals.
    let seed_movies: Vec<&Movie> = seeds.iter().filter_map(|s| ctx.catalog.get(*s)).collect();
    let genre_weight = |g: u8| {
        weights
            .iter()
            .find(|w| w.genre == g)
            .map_or(0.0, |w| w.weight)
    };
    for c in &mut candidates {
        let movie = ctx
            .catalog
            .get(c.movie_id)
            .expect("candidates are catalog items");
        c.signals.affinity = affinity(movie.genres, &weights, max_abs);
        c.reason_genre = movie
            .genres
            .iter()
            .max_by(|a, b| genre_weight(*a).total_cmp(&genre_weight(*b)).then(b.cmp(a)));
        if let Some((seed, sim)) = seed_movies
            .iter()
            .map(|s| (s.id, content_similarity(movie, s)))
            .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)))
        {
            c.signals.similarity = sim;
            c.because_of = Some(seed);
        }
        let (popularity, trending) = ctx
            .index
            .signals
            .get(&c.movie_id)
            .copied()
            .unwrap_or_default();
        c.signals.popularity = popularity;
        c.signals.trending = trending;
    }
    let model = match ctx.variant.scorer.as_deref() {
        Some(scorer) => {
            let ids: Vec<u32> = candidates.iter().map(|c| c.movie_id).collect();
            let scores = scorer.score(user_id, state, &ids)?;
            // NaN: the model does not know the item.
            for (c, s) in candidates.iter_mut().zip(scores) {
                c.signals.ncf = (!s.is_nan()).then_some(s as f64);
            }
            Some(scorer.info())
        }
        None => None,
    };
    for c in &mut candidates {
        c.score = blend::blend(&c.signals, &ctx.variant.blend);
    }

    // Rank once; rows filter the ranked list or select their own top few.
    let scored = |c: &Candidate, score: f64| Scored {
        movie_id: c.movie_id,
        score,
        genres: ctx
            .catalog
            .get(c.movie_id)
            .map(|m| m.genres)
            .unwrap_or_default(),
    };
    let mut ranked: Vec<Scored> = candidates.iter().map(|c| scored(c, c.score)).collect();
    blend::rank(&mut ranked);
    let mut rendered: IdMap<RecommendedItem> = IdMap::default();
    let mut item = |id: u32| {
        rendered
            .entry(id)
            .or_insert_with(|| render(ctx, &candidates[slot[&id]]))
            .clone()
    };
    let top = blend::diversify(&ranked, lists.top_n, lists.max_genre_share);
    let top_items: Vec<RecommendedItem> = top.iter().map(|s| item(s.movie_id)).collect();

    let mut rows = vec![CarouselRow {
        id: "top-picks".into(),
        title: "Top picks for you".into(),
        kind: "top_picks".into(),
        items: top_items.clone(),
    }];
    for g in &top_genres {
        let name = ctx.catalog.genre_name(g.genre);
        let row: Vec<RecommendedItem> = ranked
            .iter()
            .filter(|s| s.genres.contains(g.genre))
            .take(lists.row_size)
            .map(|s| item(s.movie_id))
            .collect();
        rows.push(CarouselRow {
            id: format!("genre:{name}"),
            title: format!("Because you like {name}"),
            kind: "genre".into(),
            items: row,
        });
    }
    for &genre in &cold_genres {
        let name = ctx.catalog.genre_name(genre);
        let mut row: Vec<Scored> = candidates
            .iter()
            .filter(|c| {
                ctx.catalog
                    .get(c.movie_id)
                    .is_some_and(|m| m.genres.contains(genre))
            })
            .map(|c| scored(c, c.signals.trending))
            .collect();
        blend::top_k(&mut row, lists.row_size);
        rows.push(CarouselRow {
            id: format!("trending-genre:{name}"),
            title: format!("Trending in {name}"),
            kind: "trending_genre".into(),
            items: row.iter().map(|s| item(s.movie_id)).collect(),
        });
    }
    if let Some((seed, similar)) = seed_lists.first() {
        let row: Vec<RecommendedItem> = similar
            .iter()
            .filter(|(id, _)| slot.contains_key(id))
            .take(lists.row_size)
            .map(|(id, _)| item(*id))
            .collect();
        let title = ctx.catalog.get(*seed).map(|m| &*m.title).unwrap_or("");
        rows.push(CarouselRow {
            id: format!("because-you-watched:{seed}"),
            title: format!("Because you watched {title}"),
            kind: "because_you_watched".into(),
            items: row,
        });
    }
    for (id, title, key) in [
        (
            "trending",
            "Trending now",
            (|c: &Candidate| c.signals.trending) as fn(&Candidate) -> f64,
        ),
        ("popular", "Popular", |c: &Candidate| c.signals.popularity),
    ] {
        let mut by_key: Vec<Scored> = candidates.iter().map(|c| scored(c, key(c))).collect();
        blend::top_k(&mut by_key, lists.row_size);
        rows.push(CarouselRow {
            id: id.into(),
            title: title.into(),
            kind: id.into(),
            items: by_key.iter().map(|s| item(s.movie_id)).collect(),
        });
    }
    rows.retain(|r| !r.items.is_empty());

    Ok(UserOutputs {
        recommendations: Recommendations {
            schema: RECOMMENDATIONS_SCHEMA.into(),
            user_id: user_id.into(),
            version,
            as_of,
            variant: ctx.variant.name.to_string(),
            model,
            items: top_items,
        },
        carousels: Carousels {
            schema: CAROUSELS_SCHEMA.into(),
            user_id: user_id.into(),
            version,
            as_of,
            variant: ctx.variant.name.to_string(),
            rows,
        },
        insights: Insights {
            variant: ctx.variant.name.to_string(),
            ..insights(ctx.catalog, user_id, state, &weights, version, as_of)
        },
    })
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

fn render(ctx: &Context, c: &Candidate) -> RecommendedItem {
    let movie = ctx
        .catalog
        .get(c.movie_id)
        .expect("candidates are catalog items");
    let first_genre = movie
        .genres
        .iter()
        .next()
        .map(|g| ctx.catalog.genre_name(g));
    let reason = match blend::dominant(&c.signals, &ctx.variant.blend) {
        Dominant::Similarity => match c.because_of.and_then(|s| ctx.catalog.get(s)) {
            Some(seed) => format!("Because you liked {}", seed.title),
            None => "Similar to what you watched".into(),
        },
        Dominant::Affinity => match first_genre {
            Some(g) => format!("Matches your taste for {g}"),
            None => "Matches your taste".into(),
        },
        Dominant::Trending => match first_genre {
            Some(g) => format!("Trending in {g}"),
            None => "Trending now".into(),
        },
        Dominant::Popularity => match first_genre {
            Some(g) => format!("Popular in {g}"),
            None => "Popular right now".into(),
        },
        Dominant::Ncf => "Viewers with similar taste enjoyed this".into(),
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
            ncf: c.signals.ncf.map(round6),
        },
        sources: SOURCES
            .into_iter()
            .filter(|s| c.sources & source_bit(*s) != 0)
            .collect(),
        reason: Arc::from(reason),
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
