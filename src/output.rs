//! Output records (`schemas/*.v1.schema.json`). Each is keyed by user id on a
//! compacted topic and carries the user's `version`: a consumer keeps the
//! record with the highest version and drops any older one it sees later.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::blend::Signals;

pub const RECOMMENDATIONS_SCHEMA: &str = "recstream.recommendations.v1";
pub const CAROUSELS_SCHEMA: &str = "recstream.carousels.v1";
pub const INSIGHTS_SCHEMA: &str = "recstream.insights.v1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// Cheap to clone: an item appears in the list and in several rows.
pub struct RecommendedItem {
    pub movie_id: u32,
    pub title: Arc<str>,
    pub genres: Arc<[Arc<str>]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub year: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tmdb_id: Option<u32>,
    pub score: f64,
    pub signals: Signals,
    /// Candidate sources that proposed the item.
    pub sources: Vec<Source>,
    pub reason: Arc<str>,
}

/// Where a candidate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Popular,
    Trending,
    Genre,
    Similar,
    CoWatched,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recommendations {
    pub schema: String,
    pub user_id: String,
    pub version: u64,
    /// Event time (ms) of the latest event reflected.
    pub as_of: i64,
    /// The A/B variant that produced the record.
    pub variant: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelInfo>,
    pub items: Vec<RecommendedItem>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CarouselRow {
    pub id: String,
    pub title: String,
    pub kind: String,
    pub items: Vec<RecommendedItem>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Carousels {
    pub schema: String,
    pub user_id: String,
    pub version: u64,
    pub as_of: i64,
    pub variant: String,
    pub rows: Vec<CarouselRow>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenreShare {
    pub genre: String,
    pub weight: f64,
    /// Share of the user's positive preference mass (0 for disliked genres).
    pub share: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Activity {
    pub events_total: u64,
    pub by_type: BTreeMap<String, u64>,
    pub first_ts: i64,
    pub last_ts: i64,
    pub items_seen: usize,
    pub ratings: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_rating: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Engagement {
    /// Views of items in a carousel (events with `context.carousel_id`).
    pub carousel_impressions: u64,
    /// Clicks and plays started from a carousel.
    pub carousel_clicks: u64,
    /// `carousel_clicks / carousel_impressions` (0 without impressions).
    pub ctr: f64,
    pub plays: u64,
    pub completions: u64,
    /// `completions / plays` (0 without plays).
    pub completion_rate: f64,
    pub dwell_seconds: f64,
    /// `dwell_seconds / plays` (0 without plays).
    pub mean_dwell_seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Insights {
    pub schema: String,
    pub user_id: String,
    pub version: u64,
    pub as_of: i64,
    pub variant: String,
    pub genres: Vec<GenreShare>,
    pub activity: Activity,
    pub engagement: Engagement,
}

/// Everything published for one user after a change.
#[derive(Debug, Clone, PartialEq)]
pub struct UserOutputs {
    pub recommendations: Recommendations,
    pub carousels: Carousels,
    pub insights: Insights,
}

/// The three output kinds, for topic routing and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    Recommendations,
    Carousels,
    Insights,
}

impl OutputKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputKind::Recommendations => "recommendations",
            OutputKind::Carousels => "carousels",
            OutputKind::Insights => "insights",
        }
    }
}

impl UserOutputs {
    /// The encoded JSON payload of each record.
    pub fn encode(&self) -> [(OutputKind, Vec<u8>); 3] {
        [
            (OutputKind::Recommendations, to_json(&self.recommendations)),
            (OutputKind::Carousels, to_json(&self.carousels)),
            (OutputKind::Insights, to_json(&self.insights)),
        ]
    }
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain structs with string keys: serialization cannot fail.
    serde_json::to_vec(value).expect("output records always serialize")
}
