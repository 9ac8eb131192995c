//! Per-user state and how an interaction changes it: pure functions of the
//! event and its event time. Persisted by `store` in a compact binary encoding.

use serde::{Deserialize, Serialize};

use crate::catalog::Movie;
use crate::config::EngineConfig;
use crate::decay::decay_factor;
use crate::event::{EventType, Interaction};

/// How many event ids a user remembers to recognise redelivered events.
pub const DEDUP_WINDOW: usize = 64;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserState {
    /// Bumped by every applied event and every refresh: a function of the
    /// user's input alone, so outputs re-published after a crash carry the same
    /// version as before and are recognisably duplicates.
    pub version: u64,
    pub first_ts: i64,
    pub last_ts: i64,
    /// Decayed genre preference weights, all anchored at `genres_as_of`.
    pub genres: Vec<GenreWeight>,
    pub genres_as_of: i64,
    /// Most recent first, at most `lists.recent_items`.
    pub recent: Vec<RecentItem>,
    /// Every item the user consumed or judged, sorted by movie id.
    pub seen: Vec<SeenItem>,
    pub counters: Counters,
    /// Hashes of the most recent event ids, newest last.
    pub recent_event_ids: Vec<u64>,
    /// The user's NCF vector folded in from their interactions (empty without
    /// a model), and the id of the model whose space it lives in.
    pub latent: Vec<f32>,
    pub latent_model: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GenreWeight {
    pub genre: u8,
    pub weight: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RecentItem {
    pub movie_id: u32,
    pub ts: i64,
    /// Signed preference weight of the latest event on this item.
    pub weight: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SeenItem {
    pub movie_id: u32,
    /// Rating × 2 (1..=10), 0 when not rated.
    pub rating_x2: u8,
    pub flags: u8,
}

pub const FLAG_LIKED: u8 = 1;
pub const FLAG_DISLIKED: u8 = 2;
pub const FLAG_COMPLETED: u8 = 4;
pub const FLAG_WATCHLISTED: u8 = 8;
pub const FLAG_SKIPPED: u8 = 16;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub by_type: [u32; 11],
    /// Views of items shown in a carousel (`context.carousel_id` set): impressions.
    pub carousel_views: u32,
    /// Clicks and plays started from a carousel.
    pub carousel_clicks: u32,
    pub dwell_seconds: f64,
    pub ratings_sum: f64,
}

/// What applying one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Applied,
    Duplicate,
}

impl UserState {
    pub fn is_seen(&self, movie_id: u32) -> bool {
        self.seen
            .binary_search_by_key(&movie_id, |s| s.movie_id)
            .is_ok()
    }

    pub fn events_total(&self) -> u64 {
        self.counters.by_type.iter().map(|&c| c as u64).sum()
    }

    /// Genre weights decayed to event time `t`.
    pub fn genre_weights_at(&self, t: i64, config: &EngineConfig) -> Vec<GenreWeight> {
        let f = decay_factor(t - self.genres_as_of, config.decay.user_half_life_ms()) as f32;
        self.genres
            .iter()
            .map(|g| GenreWeight {
                genre: g.genre,
                weight: g.weight * f,
            })
            .collect()
    }

    /// Applies one interaction on a known movie. Pure: depends only on the
    /// state, the event and the configuration.
    pub fn apply(&mut self, event: &Interaction, movie: &Movie, config: &EngineConfig) -> Applied {
        let id_hash = event_id_hash(&event.event_id);
        if self.recent_event_ids.contains(&id_hash) {
            return Applied::Duplicate;
        }
        if self.recent_event_ids.len() >= DEDUP_WINDOW {
            self.recent_event_ids.remove(0);
        }
        self.recent_event_ids.push(id_hash);
        self.version += 1;

        let t = event.ts;
        if self.events_total() == 0 || t < self.first_ts {
            self.first_ts = t;
        }
        self.last_ts = self.last_ts.max(t);
        let weight = config.event_weights.weight(event.kind, event.value);
        self.update_genres(movie, weight, t, config);
        self.remember_recent(movie.id, t, weight as f32, config.lists.recent_items);
        if event.kind.marks_seen() {
            self.mark_seen(event, movie.id);
        }
        self.count(event);
        Applied::Applied
    }

    /// Adds `weight` spread over the movie's genres, decayed in event time.
    /// Late events are decayed back to the current anchor, so arrival order
    /// does not change the result (see `decay`).
    fn update_genres(&mut self, movie: &Movie, weight: f64, t: i64, config: &EngineConfig) {
        if movie.genres.is_empty() || weight == 0.0 {
            return;
        }
        let hl = config.decay.user_half_life_ms();
        let share = weight / movie.genres.len() as f64;
        let (scale_old, amount) = if t >= self.genres_as_of {
            let f = decay_factor(t - self.genres_as_of, hl);
            self.genres_as_of = t;
            (f, share)
        } else {
            (1.0, share * decay_factor(self.genres_as_of - t, hl))
        };
        for g in &mut self.genres {
            g.weight = (g.weight as f64 * scale_old) as f32;
        }
        for genre in movie.genres.iter() {
            match self.genres.iter_mut().find(|g| g.genre == genre) {
                Some(g) => g.weight += amount as f32,
                None => self.genres.push(GenreWeight {
                    genre,
                    weight: amount as f32,
                }),
            }
        }
        self.genres.sort_by_key(|g| g.genre);
    }

    /// Keeps the latest event (by event time) per item, newest first.
    fn remember_recent(&mut self, movie_id: u32, ts: i64, weight: f32, cap: usize) {
        if self
            .recent
            .iter()
            .any(|r| r.movie_id == movie_id && r.ts > ts)
        {
            return;
        }
        self.recent.retain(|r| r.movie_id != movie_id);
        let pos = self.recent.partition_point(|r| r.ts > ts);
        self.recent.insert(
            pos,
            RecentItem {
                movie_id,
                ts,
                weight,
            },
        );
        self.recent.truncate(cap);
    }

    fn mark_seen(&mut self, event: &Interaction, movie_id: u32) {
        let idx = match self.seen.binary_search_by_key(&movie_id, |s| s.movie_id) {
            Ok(i) => i,
            Err(i) => {
                self.seen.insert(
                    i,
                    SeenItem {
                        movie_id,
                        rating_x2: 0,
                        flags: 0,
                    },
                );
                i
            }
        };
        let item = &mut self.seen[idx];
        match event.kind {
            EventType::Rate => {
                item.rating_x2 = (event.value.unwrap_or(0.0) * 2.0).round().clamp(1.0, 10.0) as u8
            }
            EventType::Like => item.flags = (item.flags | FLAG_LIKED) & !FLAG_DISLIKED,
            EventType::Dislike => item.flags = (item.flags | FLAG_DISLIKED) & !FLAG_LIKED,
            EventType::Complete => item.flags |= FLAG_COMPLETED,
            EventType::WatchlistAdd => item.flags |= FLAG_WATCHLISTED,
            EventType::Skip => item.flags |= FLAG_SKIPPED,
            _ => {}
        }
    }

    fn count(&mut self, event: &Interaction) {
        let c = &mut self.counters;
        c.by_type[event.kind.index()] += 1;
        match event.kind {
            EventType::Rate => c.ratings_sum += event.value.unwrap_or(0.0),
            EventType::Progress => {}
            _ => c.dwell_seconds += event.value.unwrap_or(0.0),
        }
        // The app says where an interaction happened; that makes CTR a function
        // of the events alone, independent of when lists were published.
        if event
            .context
            .as_ref()
            .is_some_and(|x| x.carousel_id.is_some())
        {
            match event.kind {
                EventType::View => c.carousel_views += 1,
                EventType::Click | EventType::Play => c.carousel_clicks += 1,
                _ => {}
            }
        }
    }

    /// A refresh changes no state but the version.
    pub fn refresh(&mut self) {
        self.version += 1;
    }

    /// Recent items the user engaged with (see [`EventType::engages`]) and has
    /// not disliked or skipped since, newest first: the co-watch seeds.
    pub fn engaged_recent(&self) -> impl Iterator<Item = u32> + '_ {
        self.recent.iter().filter_map(move |r| {
            let i = self
                .seen
                .binary_search_by_key(&r.movie_id, |s| s.movie_id)
                .ok()?;
            let s = &self.seen[i];
            let engaged = s.rating_x2 > 0
                || s.flags & (FLAG_LIKED | FLAG_COMPLETED | FLAG_WATCHLISTED) != 0
                || r.weight > 0.0;
            let rejected = s.flags & (FLAG_DISLIKED | FLAG_SKIPPED) != 0;
            (engaged && !rejected).then_some(r.movie_id)
        })
    }

    /// Recent items with a positive last interaction, newest first.
    pub fn positive_recent(&self) -> impl Iterator<Item = &RecentItem> {
        self.recent.iter().filter(|r| r.weight > 0.0)
    }
}

/// FNV-1a: stable across processes and versions, unlike `DefaultHasher`.
pub fn event_id_hash(id: &str) -> u64 {
    let mut h = crate::fnv::Fnv::default();
    h.write(id.as_bytes());
    h.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::GenreSet;
    use proptest::prelude::*;

    fn movie(id: u32, genres: u64) -> Movie {
        Movie {
            id,
            title: format!("M{id}").into(),
            genre_names: Default::default(),
            year: None,
            genres: GenreSet(genres),
            tmdb_id: None,
            imdb_id: None,
            tags: vec![],
        }
    }

    fn event(id: &str, movie_id: u32, kind: EventType, value: Option<f64>, ts: i64) -> Interaction {
        Interaction {
            event_id: id.into(),
            user_id: "u".into(),
            movie_id,
            kind,
            value,
            ts,
            context: None,
        }
    }

    #[test]
    fn likes_raise_and_dislikes_lower_genre_weights() {
        let cfg = EngineConfig::default();
        let mut s = UserState::default();
        s.apply(
            &event("a", 1, EventType::Like, None, 1000),
            &movie(1, 0b01),
            &cfg,
        );
        s.apply(
            &event("b", 2, EventType::Dislike, None, 2000),
            &movie(2, 0b10),
            &cfg,
        );
        let w = s.genre_weights_at(2000, &cfg);
        assert!(w.iter().find(|g| g.genre == 0).unwrap().weight > 0.0);
        assert!(w.iter().find(|g| g.genre == 1).unwrap().weight < 0.0);
        assert!(s.is_seen(1) && s.is_seen(2));
    }

    #[test]
    fn redelivered_events_apply_once() {
        let cfg = EngineConfig::default();
        let mut s = UserState::default();
        let e = event("same", 1, EventType::Like, None, 1000);
        assert_eq!(s.apply(&e, &movie(1, 1), &cfg), Applied::Applied);
        let once = s.clone();
        assert_eq!(s.apply(&e, &movie(1, 1), &cfg), Applied::Duplicate);
        assert_eq!(s, once);
    }

    #[test]
    fn views_do_not_hide_items() {
        let cfg = EngineConfig::default();
        let mut s = UserState::default();
        s.apply(&event("a", 1, EventType::View, None, 1), &movie(1, 1), &cfg);
        assert!(!s.is_seen(1));
    }

    #[test]
    fn carousel_context_counts_impressions_and_clicks() {
        let cfg = EngineConfig::default();
        let mut s = UserState::default();
        let from_row = |mut e: Interaction| {
            e.context = Some(crate::event::EventContext {
                carousel_id: Some("top-picks".into()),
                ..Default::default()
            });
            e
        };
        s.apply(
            &from_row(event("a", 5, EventType::View, None, 1)),
            &movie(5, 1),
            &cfg,
        );
        s.apply(
            &from_row(event("b", 5, EventType::Click, None, 2)),
            &movie(5, 1),
            &cfg,
        );
        s.apply(
            &event("c", 9, EventType::Click, None, 3),
            &movie(9, 1),
            &cfg,
        );
        assert_eq!(
            (s.counters.carousel_views, s.counters.carousel_clicks),
            (1, 1)
        );
        assert_eq!(s.version, 3, "one version per applied event");
    }

    proptest! {
        #[test]
        fn genre_weights_ignore_arrival_order(events in prop::collection::vec((1u32..6, 0usize..11, 0i64..10_000_000_000), 1..30)) {
            let cfg = EngineConfig::default();
            let evs: Vec<Interaction> = events.iter().enumerate().map(|(i, &(m, k, ts))| {
                let kind = EventType::ALL[k];
                let value = match kind { EventType::Rate => Some(4.0), EventType::Progress => Some(0.5), _ => None };
                event(&format!("e{i}"), m, kind, value, ts)
            }).collect();
            let apply_all = |evs: &[Interaction]| {
                let mut s = UserState::default();
                for e in evs { s.apply(e, &movie(e.movie_id, (e.movie_id as u64) | 1), &cfg); }
                s
            };
            let mut sorted = evs.clone();
            sorted.sort_by_key(|e| e.ts);
            let (a, b) = (apply_all(&evs), apply_all(&sorted));
            let now = 20_000_000_000;
            let (wa, wb) = (a.genre_weights_at(now, &cfg), b.genre_weights_at(now, &cfg));
            prop_assert_eq!(wa.len(), wb.len());
            for (x, y) in wa.iter().zip(&wb) {
                prop_assert_eq!(x.genre, y.genre);
                prop_assert!((x.weight - y.weight).abs() <= 1e-3 * (1.0 + x.weight.abs()), "{:?} vs {:?}", x, y);
            }
            prop_assert_eq!(a.recent.iter().map(|r| r.ts).collect::<Vec<_>>(), b.recent.iter().map(|r| r.ts).collect::<Vec<_>>());
            prop_assert_eq!(a.seen.len(), b.seen.len());
            prop_assert!(a.recent.len() <= cfg.lists.recent_items);
        }
    }
}
