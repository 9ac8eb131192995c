//! Feedback metrics from the event stream: how users respond to what the
//! engine published, per A/B variant.
//!
//! - impressions: every item of every list published for a user, by variant,
//!   list (the recommendations or a carousel row kind) and position;
//! - clicks: a click or play on an item that was in the user's last published
//!   lists, credited to each list and position it appeared at, under the
//!   variant that published it. CTR = clicks / impressions;
//! - plays, completions and dwell seconds by the user's variant.
//!
//! The last published lists are kept in memory for a bounded number of users
//! (two generations: the older one is dropped when the newer fills up), so
//! these are operational metrics, not exact state: after a restart or a
//! partition move, a user's first interaction is not matched to a list.

use std::collections::HashMap;
use std::sync::Arc;

use prometheus::IntCounter;

use crate::event::{EventType, Interaction};
use crate::metrics;
use crate::output::UserOutputs;

/// The lists that count as one metric label each (row kinds of `recommend`).
pub const LISTS: [&str; 7] = [
    "recommendations",
    "top_picks",
    "genre",
    "trending_genre",
    "because_you_watched",
    "trending",
    "popular",
];
/// Positions above this share one label.
pub const MAX_POSITION: usize = 20;
/// Position labels: 1 ..= MAX_POSITION and one for the rest (index 0 unused).
const POSITIONS: usize = MAX_POSITION + 2;

struct Shown {
    variant: Arc<str>,
    /// (movie, list index in [`LISTS`], 1-based position).
    items: Vec<(u32, u8, u8)>,
}

pub struct Feedback {
    /// Impression counters per variant, by `list * POSITIONS + position`,
    /// looked up on first use.
    impressions: HashMap<Arc<str>, Vec<Option<IntCounter>>>,
    current: HashMap<Arc<str>, Shown>,
    previous: HashMap<Arc<str>, Shown>,
    /// Users per generation.
    generation: usize,
}

impl Feedback {
    /// Remembers the last lists of up to about `users` users.
    pub fn new(users: usize) -> Feedback {
        Feedback {
            impressions: HashMap::new(),
            current: HashMap::new(),
            previous: HashMap::new(),
            generation: (users / 2).max(1),
        }
    }

    /// Counts the impressions of a user's new lists and remembers them.
    pub fn published(&mut self, user_id: &str, outputs: &UserOutputs) {
        let variant: Arc<str> = outputs.recommendations.variant.as_str().into();
        let counters = self
            .impressions
            .entry(variant.clone())
            .or_insert_with(|| vec![None; LISTS.len() * POSITIONS]);
        let mut items = Vec::new();
        let list_ids: Vec<u32> = outputs
            .recommendations
            .items
            .iter()
            .map(|i| i.movie_id)
            .collect();
        let lists = std::iter::once(("recommendations", &list_ids)).chain(
            outputs
                .carousels
                .rows
                .iter()
                .map(|r| (r.kind.as_str(), &r.movie_ids)),
        );
        for (kind, list) in lists {
            let Some(l) = LISTS.iter().position(|k| *k == kind) else {
                continue;
            };
            for (p, movie_id) in list.iter().enumerate() {
                let position = (p + 1).min(MAX_POSITION + 1);
                counters[l * POSITIONS + position]
                    .get_or_insert_with(|| {
                        metrics::feedback_impression_counter(&variant, LISTS[l], position)
                    })
                    .inc();
                items.push((*movie_id, l as u8, position as u8));
            }
        }
        metrics::variant_list(&variant);
        if self.current.len() >= self.generation && !self.current.contains_key(user_id) {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current
            .insert(user_id.into(), Shown { variant, items });
    }

    /// Counts an applied event of a user in `variant` (their variant now).
    pub fn interaction(&mut self, variant: &str, event: &Interaction) {
        match event.kind {
            EventType::Click | EventType::Play => {
                let shown = self
                    .current
                    .get(event.user_id.as_str())
                    .or_else(|| self.previous.get(event.user_id.as_str()));
                if let Some(shown) = shown {
                    for &(movie, list, position) in &shown.items {
                        if movie == event.movie_id {
                            metrics::feedback_click(
                                &shown.variant,
                                LISTS[list as usize],
                                position as usize,
                            );
                        }
                    }
                }
                if event.kind == EventType::Play {
                    metrics::feedback_play(variant);
                }
            }
            EventType::Complete => metrics::feedback_completion(variant),
            _ => {}
        }
        // As in the user's own counters: every value but a rating or a
        // progress fraction is dwell seconds.
        if !matches!(event.kind, EventType::Rate | EventType::Progress) {
            if let Some(seconds) = event.value.filter(|v| v.is_finite() && *v > 0.0) {
                metrics::feedback_dwell(variant, seconds);
            }
        }
    }
}
