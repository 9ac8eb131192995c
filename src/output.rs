//! Output records (`schemas/*.v1.schema.json`). Each is keyed by user id on a
//! compacted topic and carries the user's `version`: a consumer keeps the
//! record with the highest version and drops any older one it sees later.

use std::collections::BTreeMap;
use std::io::Write;
use std::ops::Range;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::blend::Signals;

pub const RECOMMENDATIONS_SCHEMA: &str = "recstream.recommendations.v1";
pub const CAROUSELS_SCHEMA: &str = "recstream.carousels.v2";
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
    /// The model's own top items over the whole catalogue.
    Model,
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
    /// The learned blend's version when the variant ranks with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blend: Option<String>,
    pub items: Vec<RecommendedItem>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CarouselRow {
    pub id: String,
    pub title: String,
    pub kind: String,
    /// The row's items in order, each described once in [`Carousels::items`].
    pub movie_ids: Vec<u32>,
}

/// What an app shows on a card. The signals and sources that explain a score
/// are in the recommendations record (v1 repeated them for every row: 18 of
/// the 21 KB a recompute published).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CarouselItem {
    pub movie_id: u32,
    pub title: Arc<str>,
    pub genres: Arc<[Arc<str>]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub year: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tmdb_id: Option<u32>,
    pub score: f64,
    pub reason: Arc<str>,
}

impl From<&RecommendedItem> for CarouselItem {
    fn from(item: &RecommendedItem) -> CarouselItem {
        CarouselItem {
            movie_id: item.movie_id,
            title: item.title.clone(),
            genres: item.genres.clone(),
            year: item.year,
            tmdb_id: item.tmdb_id,
            score: item.score,
            reason: item.reason.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Carousels {
    pub schema: String,
    pub user_id: String,
    pub version: u64,
    pub as_of: i64,
    pub variant: String,
    /// Every item any row shows, once, in order of first appearance.
    pub items: Vec<CarouselItem>,
    pub rows: Vec<CarouselRow>,
}

impl Carousels {
    /// A row's items, looked up in [`Carousels::items`].
    pub fn row_items<'a>(&'a self, row: &'a CarouselRow) -> impl Iterator<Item = &'a CarouselItem> {
        row.movie_ids
            .iter()
            .filter_map(|id| self.items.iter().find(|i| i.movie_id == *id))
    }
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
    /// The user's version before the change (equal to `version` for a
    /// re-publication): published as the records' [`PREVIOUS_VERSION_HEADER`],
    /// so a consumer can tell a gap from a coalesced batch.
    pub previous_version: u64,
}

/// Kafka header of every output record: the version of the user's previous
/// record. Under `exactly_once` each committed record's header equals the
/// version of the record before it for the same user (a consumer can check
/// that nothing is missing); under `at_least_once` a re-publication repeats
/// its version.
pub const PREVIOUS_VERSION_HEADER: &str = "recstream.previous_version";

/// The three output kinds, for topic routing and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    Recommendations,
    Carousels,
    Insights,
}

impl OutputKind {
    /// The order of [`UserOutputs::encode`]'s records.
    pub const ALL: [OutputKind; 3] = [
        OutputKind::Recommendations,
        OutputKind::Carousels,
        OutputKind::Insights,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OutputKind::Recommendations => "recommendations",
            OutputKind::Carousels => "carousels",
            OutputKind::Insights => "insights",
        }
    }
}

impl UserOutputs {
    /// The encoded JSON payload of each record: exactly `serde_json::to_vec`
    /// of each.
    pub fn encode(&self) -> [(OutputKind, Vec<u8>); 3] {
        let mut bytes = Vec::new();
        let ranges = self.encode_append(&mut bytes);
        let [recommendations, carousels, insights] = ranges.map(|range| bytes[range].to_vec());
        [
            (OutputKind::Recommendations, recommendations),
            (OutputKind::Carousels, carousels),
            (OutputKind::Insights, insights),
        ]
    }

    /// [`UserOutputs::encode`]'s three records appended to `out` in
    /// [`OutputKind::ALL`] order; returns where each lies in `out`.
    pub fn encode_append(&self, out: &mut Vec<u8>) -> [Range<usize>; 3] {
        let start = out.len();
        encode_recommendations(out, &self.recommendations);
        let recommendations = start..out.len();
        encode_carousels(out, &self.carousels);
        let carousels = recommendations.end..out.len();
        write_json(out, &self.insights);
        let insights = carousels.end..out.len();
        [recommendations, carousels, insights]
    }
}

/// A batch's records encoded back to back into one buffer that is reused from
/// batch to batch: no allocation per record once it has grown, and the whole
/// batch is encoded before the first record is enqueued. Beyond
/// [`BatchEncoder::RETAINED_BYTES`] the buffer is given back between batches
/// (an exactly-once transaction can hold thousands of users' records).
#[derive(Default)]
pub struct BatchEncoder {
    bytes: Vec<u8>,
    users: Vec<EncodedUser>,
}

/// Where one user's records and previous version (header text) lie in
/// [`BatchEncoder`]'s buffer.
struct EncodedUser {
    previous_version: Range<usize>,
    records: [Range<usize>; 3],
}

/// One encoded record of a [`BatchEncoder`] batch.
pub struct EncodedRecord<'a> {
    pub kind: OutputKind,
    pub user: &'a str,
    pub previous_version: &'a str,
    pub payload: &'a [u8],
}

impl BatchEncoder {
    /// What the buffer keeps between batches: an at-least-once chunk of
    /// [`crate::pipeline`]'s up to 1,000 users at ≈ 20 KB of records each
    /// (below that, the buffer regrew, page by page, for every chunk).
    pub const RETAINED_BYTES: usize = 32 << 20;

    /// Encodes every user's records (replacing the previous batch) and returns
    /// them in order: each user's three records in [`OutputKind::ALL`] order.
    pub fn encode<'a>(
        &'a mut self,
        outputs: &'a [(String, UserOutputs)],
    ) -> impl Iterator<Item = EncodedRecord<'a>> + 'a {
        self.bytes.clear();
        self.bytes.shrink_to(Self::RETAINED_BYTES);
        self.users.clear();
        for (_, out) in outputs {
            let start = self.bytes.len();
            write!(self.bytes, "{}", out.previous_version).expect("writing to a Vec cannot fail");
            let previous_version = start..self.bytes.len();
            let records = out.encode_append(&mut self.bytes);
            self.users.push(EncodedUser {
                previous_version,
                records,
            });
        }
        let (bytes, users) = (&self.bytes, &self.users);
        outputs.iter().zip(users).flat_map(move |((user, _), at)| {
            let previous_version = std::str::from_utf8(&bytes[at.previous_version.clone()])
                .expect("a number's digits are UTF-8");
            OutputKind::ALL
                .into_iter()
                .zip(at.records.clone())
                .map(move |(kind, range)| EncodedRecord {
                    kind,
                    user,
                    previous_version,
                    payload: &bytes[range],
                })
        })
    }
}

fn write_json<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    // Plain structs with string keys: serialization cannot fail.
    serde_json::to_writer(out, value).expect("output records always serialize")
}

/// `serde_json::to_writer(out, item)` with the keys written as literals
/// (serde_json escapes every key; items are most of the bytes published).
/// Field order and skipping follow the struct; the encode test compares the
/// bytes with serde_json's, so a field added to the struct fails it.
fn write_item(out: &mut Vec<u8>, item: &RecommendedItem) {
    write_card(
        out,
        item.movie_id,
        &item.title,
        &item.genres,
        item.year,
        item.tmdb_id,
    );
    out.extend_from_slice(b",\"score\":");
    write_json(out, &item.score);
    let s = &item.signals;
    for (i, (key, value)) in [
        ("affinity", s.affinity),
        ("similarity", s.similarity),
        ("popularity", s.popularity),
        ("trending", s.trending),
        ("co_watched", s.co_watched),
    ]
    .into_iter()
    .chain(s.ncf.map(|n| ("ncf", n)))
    .enumerate()
    {
        out.extend_from_slice(if i == 0 { b",\"signals\":{\"" } else { b",\"" });
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"\":");
        write_json(out, &value);
    }
    out.extend_from_slice(b"},\"sources\":");
    write_json(out, &item.sources);
    out.extend_from_slice(b",\"reason\":");
    write_json(out, &*item.reason);
    out.push(b'}');
}

/// [`write_item`] for a [`CarouselItem`].
fn write_carousel_item(out: &mut Vec<u8>, item: &CarouselItem) {
    write_card(
        out,
        item.movie_id,
        &item.title,
        &item.genres,
        item.year,
        item.tmdb_id,
    );
    out.extend_from_slice(b",\"score\":");
    write_json(out, &item.score);
    out.extend_from_slice(b",\"reason\":");
    write_json(out, &*item.reason);
    out.push(b'}');
}

/// A movie's rendered catalog fields, kept for the next record that shows it.
struct Card {
    /// Held, so that their addresses cannot be reused while the card is
    /// kept: pointer equality then means the very same catalog entry.
    title: Arc<str>,
    genres: Arc<[Arc<str>]>,
    year: Option<u16>,
    tmdb_id: Option<u32>,
    bytes: Vec<u8>,
}

/// Cards kept per encoding thread; emptied when full (a catalog far larger
/// than what is being shown).
const CARDS_MAX: usize = 65_536;

thread_local! {
    static CARDS: std::cell::RefCell<crate::catalog::IdMap<Card>> =
        std::cell::RefCell::new(crate::catalog::IdMap::default());
}

/// The opening brace and the catalog fields both item kinds start with.
/// A movie's fields are the same in every record that shows it, and the
/// catalog shares their text (`Arc`s), so they are rendered (escaped) once
/// per catalog entry and copied afterwards.
fn write_card(
    out: &mut Vec<u8>,
    movie_id: u32,
    title: &Arc<str>,
    genres: &Arc<[Arc<str>]>,
    year: Option<u16>,
    tmdb_id: Option<u32>,
) {
    CARDS.with(|cards| {
        let mut cards = cards.borrow_mut();
        if let Some(card) = cards.get(&movie_id) {
            if Arc::ptr_eq(&card.title, title)
                && Arc::ptr_eq(&card.genres, genres)
                && card.year == year
                && card.tmdb_id == tmdb_id
            {
                out.extend_from_slice(&card.bytes);
                return;
            }
        }
        let mut bytes = Vec::with_capacity(64 + title.len());
        render_card(&mut bytes, movie_id, title, genres, year, tmdb_id);
        out.extend_from_slice(&bytes);
        if cards.len() >= CARDS_MAX {
            cards.clear();
        }
        cards.insert(
            movie_id,
            Card {
                title: title.clone(),
                genres: genres.clone(),
                year,
                tmdb_id,
                bytes,
            },
        );
    })
}

fn render_card(
    out: &mut Vec<u8>,
    movie_id: u32,
    title: &str,
    genres: &[Arc<str>],
    year: Option<u16>,
    tmdb_id: Option<u32>,
) {
    out.extend_from_slice(b"{\"movie_id\":");
    write_json(out, &movie_id);
    out.extend_from_slice(b",\"title\":");
    write_json(out, title);
    out.extend_from_slice(b",\"genres\":");
    write_json(out, genres);
    if let Some(year) = year {
        out.extend_from_slice(b",\"year\":");
        write_json(out, &year);
    }
    if let Some(tmdb_id) = tmdb_id {
        out.extend_from_slice(b",\"tmdb_id\":");
        write_json(out, &tmdb_id);
    }
}

/// `[a,b,...]` with `write` for each element.
fn write_list<T>(out: &mut Vec<u8>, items: &[T], write: fn(&mut Vec<u8>, &T)) {
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write(out, item);
    }
    out.push(b']');
}

/// Writes `"key":` then the value, after a comma unless it is the first field.
fn field<T: Serialize + ?Sized>(out: &mut Vec<u8>, first: bool, key: &str, value: &T) {
    field_key(out, first, key);
    write_json(out, value);
}

fn field_key(out: &mut Vec<u8>, first: bool, key: &str) {
    if !first {
        out.push(b',');
    }
    out.push(b'"');
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
}

/// The opening brace and the fields every record starts with.
fn write_head(
    out: &mut Vec<u8>,
    schema: &str,
    user_id: &str,
    version: u64,
    as_of: i64,
    variant: &str,
) {
    out.push(b'{');
    field(out, true, "schema", schema);
    field(out, false, "user_id", user_id);
    field(out, false, "version", &version);
    field(out, false, "as_of", &as_of);
    field(out, false, "variant", variant);
}

/// `serde_json::to_vec(r)`, field by field in declaration order.
fn encode_recommendations(out: &mut Vec<u8>, r: &Recommendations) {
    write_head(out, &r.schema, &r.user_id, r.version, r.as_of, &r.variant);
    if let Some(model) = &r.model {
        field(out, false, "model", model);
    }
    if let Some(blend) = &r.blend {
        field(out, false, "blend", blend);
    }
    field_key(out, false, "items");
    write_list(out, &r.items, write_item);
    out.push(b'}');
}

/// `serde_json::to_vec(c)`, field by field in declaration order.
fn encode_carousels(out: &mut Vec<u8>, c: &Carousels) {
    write_head(out, &c.schema, &c.user_id, c.version, c.as_of, &c.variant);
    field_key(out, false, "items");
    write_list(out, &c.items, write_carousel_item);
    field_key(out, false, "rows");
    write_list(out, &c.rows, |out, row| {
        out.push(b'{');
        field(out, true, "id", &row.id);
        field(out, false, "title", &row.title);
        field(out, false, "kind", &row.kind);
        field(out, false, "movie_ids", &row.movie_ids);
        out.push(b'}');
    });
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(movie_id: u32, title: &str, reason: &str, ncf: Option<f64>) -> RecommendedItem {
        RecommendedItem {
            movie_id,
            title: Arc::from(title),
            genres: Arc::from(vec![Arc::from("Sci-Fi"), Arc::from("Film \"Noir\"")]),
            year: (movie_id % 2 == 0).then_some(1999),
            tmdb_id: (movie_id % 3 == 0).then_some(603),
            score: 0.123456 * movie_id as f64,
            signals: Signals {
                affinity: -0.5,
                similarity: 1e-7,
                popularity: 0.999999,
                trending: 0.0,
                co_watched: 12345.678901,
                ncf,
            },
            sources: vec![Source::Popular, Source::CoWatched],
            reason: Arc::from(reason),
        }
    }

    fn outputs(model: Option<ModelInfo>) -> UserOutputs {
        let a = item(
            1,
            "Matrix, \"The\" \\ \u{1}é",
            "Because you liked Alien",
            Some(0.25),
        );
        let b = item(2, "Alien", "Popular in Sci-Fi", None);
        let row = |id: &str, movie_ids: Vec<u32>| CarouselRow {
            id: id.into(),
            title: format!("Because you like {id}"),
            kind: "genre".into(),
            movie_ids,
        };
        UserOutputs {
            previous_version: 6,
            recommendations: Recommendations {
                schema: RECOMMENDATIONS_SCHEMA.into(),
                user_id: "u\"1".into(),
                version: 7,
                as_of: -3,
                variant: "control".into(),
                model,
                blend: None,
                // Year and TMDb id present; a non-finite score writes null.
                items: vec![
                    a.clone(),
                    b.clone(),
                    item(6, "Heat", "Popular", Some(f64::NAN)),
                ],
            },
            carousels: Carousels {
                schema: CAROUSELS_SCHEMA.into(),
                user_id: "u\"1".into(),
                version: 7,
                as_of: -3,
                variant: "control".into(),
                items: vec![
                    (&a).into(),
                    (&b).into(),
                    (&item(3, "Heat", "", None)).into(),
                ],
                rows: vec![
                    row("top-picks", vec![1, 2]),
                    row("genre:Sci-Fi", vec![2, 1, 3]),
                    row("empty", vec![]),
                ],
            },
            insights: Insights {
                schema: INSIGHTS_SCHEMA.into(),
                user_id: "u\"1".into(),
                version: 7,
                as_of: -3,
                variant: "control".into(),
                genres: vec![],
                activity: Activity {
                    events_total: 1,
                    by_type: BTreeMap::new(),
                    first_ts: 0,
                    last_ts: 0,
                    items_seen: 0,
                    ratings: 0,
                    mean_rating: None,
                },
                engagement: Engagement {
                    carousel_impressions: 0,
                    carousel_clicks: 0,
                    ctr: 0.0,
                    plays: 0,
                    completions: 0,
                    completion_rate: 0.0,
                    dwell_seconds: 0.0,
                    mean_dwell_seconds: 0.0,
                },
            },
        }
    }

    #[test]
    fn encode_writes_exactly_what_serde_json_writes() {
        for model in [
            None,
            Some(ModelInfo {
                name: "ncf".into(),
                version: "v1".into(),
            }),
        ] {
            let mut o = outputs(model.clone());
            // A list ranked by a learned blend names it (with the model or without).
            if model.is_some() {
                o.recommendations.blend = Some("ml-100k-learned-blend-1".into());
            }
            let [(_, recs), (_, carousels), (_, insights)] = o.encode();
            assert_eq!(
                String::from_utf8(recs).unwrap(),
                serde_json::to_string(&o.recommendations).unwrap()
            );
            assert_eq!(
                String::from_utf8(carousels).unwrap(),
                serde_json::to_string(&o.carousels).unwrap()
            );
            assert_eq!(insights, serde_json::to_vec(&o.insights).unwrap());
        }
    }

    /// A reused batch encoder yields exactly what serde_json writes for each
    /// user's records, in order, and holds nothing of a longer previous batch.
    #[test]
    fn batch_encoder_yields_each_users_records_in_order() {
        let mut encoder = BatchEncoder::default();
        let mut long = outputs(None);
        long.recommendations.user_id = "a-user-with-a-much-longer-id".repeat(20);
        long.carousels.user_id = long.recommendations.user_id.clone();
        long.insights.user_id = long.recommendations.user_id.clone();
        long.previous_version = 123_456_789;
        let first = vec![
            ("long".to_string(), long.clone()),
            ("long2".to_string(), long),
        ];
        assert_eq!(encoder.encode(&first).count(), 6);
        let mut short = outputs(None);
        short.previous_version = 7;
        let mut other = outputs(None);
        other.previous_version = 0;
        other.recommendations.items.clear();
        let batch = vec![("a".to_string(), short), ("b".to_string(), other)];
        let expected: Vec<_> = batch
            .iter()
            .flat_map(|(user, out)| {
                let version = out.previous_version.to_string();
                [
                    serde_json::to_vec(&out.recommendations).unwrap(),
                    serde_json::to_vec(&out.carousels).unwrap(),
                    serde_json::to_vec(&out.insights).unwrap(),
                ]
                .into_iter()
                .zip(OutputKind::ALL)
                .map(move |(bytes, kind)| (kind, user.as_str(), version.clone(), bytes))
            })
            .collect();
        let encoded: Vec<_> = encoder.encode(&batch).collect();
        assert_eq!(encoded.len(), expected.len());
        for (got, (kind, user, version, bytes)) in encoded.iter().zip(&expected) {
            assert_eq!(got.kind, *kind);
            assert_eq!(got.user, *user);
            assert_eq!(got.previous_version, version);
            assert_eq!(got.payload, bytes.as_slice(), "{}", kind.as_str());
        }
        // Only this batch's records and versions are in the buffer.
        let versions: usize = batch
            .iter()
            .map(|(_, out)| out.previous_version.to_string().len())
            .sum();
        let records: usize = expected.iter().map(|(_, _, _, bytes)| bytes.len()).sum();
        assert_eq!(encoder.bytes.len(), versions + records);
    }

    /// A kept card is reused only for the very same catalog entry: a movie
    /// whose title, genres, year or TMDb id changed is rendered anew.
    #[test]
    fn kept_cards_follow_catalog_changes() {
        let encode = |item: &RecommendedItem| {
            let mut out = Vec::new();
            write_item(&mut out, item);
            assert_eq!(out, serde_json::to_vec(item).unwrap());
            String::from_utf8(out).unwrap()
        };
        let first = item(424_242, "Old \"title\"", "r", None);
        assert!(encode(&first).contains("Old \\\"title\\\""));
        assert_eq!(encode(&first), encode(&first.clone()));
        let renamed = RecommendedItem {
            title: Arc::from("New title"),
            ..first.clone()
        };
        assert!(encode(&renamed).contains("New title"));
        let regenred = RecommendedItem {
            genres: Arc::from(vec![Arc::from("Drama")]),
            ..renamed.clone()
        };
        assert!(encode(&regenred).contains("[\"Drama\"]"));
        let dated = RecommendedItem {
            year: Some(2001),
            tmdb_id: None,
            ..regenred.clone()
        };
        let text = encode(&dated);
        assert!(text.contains("\"year\":2001") && !text.contains("tmdb_id"));
    }
}
