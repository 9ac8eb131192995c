//! The interaction event contract (`schemas/interaction.v1.schema.json`) and its decoder.
//!
//! Decoding is strict: anything the schema does not allow is rejected with a
//! [`DecodeError`] whose [`DecodeError::reason`] is a bounded label for metrics and
//! the dead-letter `dlq.reason` header.

use serde::{Deserialize, Serialize};

/// Payloads above this size are dead-lettered without being parsed.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 16 * 1024;
const MAX_ID_LEN: usize = 128;
const MAX_CONTEXT_STRING: usize = 128;
/// 2200-01-01 in ms: later timestamps are certainly producer bugs.
const MAX_TS_MS: i64 = 7_258_118_400_000;
/// A single dwell longer than a day is a producer bug, not a binge.
const MAX_DWELL_SECONDS: f64 = 86_400.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    View,
    Click,
    Play,
    Progress,
    Complete,
    Rate,
    Like,
    Dislike,
    WatchlistAdd,
    WatchlistRemove,
    Skip,
}

impl EventType {
    pub const ALL: [EventType; 11] = [
        EventType::View,
        EventType::Click,
        EventType::Play,
        EventType::Progress,
        EventType::Complete,
        EventType::Rate,
        EventType::Like,
        EventType::Dislike,
        EventType::WatchlistAdd,
        EventType::WatchlistRemove,
        EventType::Skip,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::View => "view",
            EventType::Click => "click",
            EventType::Play => "play",
            EventType::Progress => "progress",
            EventType::Complete => "complete",
            EventType::Rate => "rate",
            EventType::Like => "like",
            EventType::Dislike => "dislike",
            EventType::WatchlistAdd => "watchlist_add",
            EventType::WatchlistRemove => "watchlist_remove",
            EventType::Skip => "skip",
        }
    }

    pub fn parse(s: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Position in [`EventType::ALL`], used for compact per-type counters.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether the item counts as "seen" and must not be recommended again.
    /// Views, clicks and watchlist removals are browsing, not consumption.
    /// Whether the event shows the user took the movie up (watched, rated,
    /// liked or saved it): what popularity and co-watch counts count.
    pub fn engages(self) -> bool {
        matches!(
            self,
            EventType::Play
                | EventType::Progress
                | EventType::Complete
                | EventType::Rate
                | EventType::Like
                | EventType::WatchlistAdd
        )
    }

    pub fn marks_seen(self) -> bool {
        !matches!(
            self,
            EventType::View | EventType::Click | EventType::WatchlistRemove
        )
    }
}

/// Optional context of where the interaction happened.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventContext {
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub device: Option<String>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub surface: Option<String>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub carousel_id: Option<String>,
    #[serde(
        default,
        deserialize_with = "present_integral",
        skip_serializing_if = "Option::is_none"
    )]
    pub position: Option<u32>,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub variant: Option<String>,
}

/// An optional field may be absent but never `null`: the schema says so, and
/// the decoder must accept exactly what the schema accepts.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// JSON has numbers, not integers: as in JSON Schema, `52.0` is the integer 52.
fn integral<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<i128>,
{
    use serde::de::{Error, Unexpected, Visitor};
    struct Integral;
    impl Visitor<'_> for Integral {
        type Value = i128;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an integer")
        }
        fn visit_i64<E: Error>(self, v: i64) -> Result<i128, E> {
            Ok(v.into())
        }
        fn visit_u64<E: Error>(self, v: u64) -> Result<i128, E> {
            Ok(v.into())
        }
        fn visit_f64<E: Error>(self, v: f64) -> Result<i128, E> {
            if v.fract() == 0.0 && v.abs() < 1.8e19 {
                Ok(v as i128)
            } else {
                Err(E::invalid_type(Unexpected::Float(v), &self))
            }
        }
    }
    let v = d.deserialize_any(Integral)?;
    T::try_from(v).map_err(|_| D::Error::custom(format!("integer {v} out of range")))
}

fn present_integral<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<i128>,
{
    integral(d).map(Some)
}

/// A validated interaction.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Interaction {
    pub event_id: String,
    pub user_id: String,
    pub movie_id: u32,
    #[serde(rename = "type")]
    pub kind: EventType,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// Event time in milliseconds since the Unix epoch.
    pub ts: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<EventContext>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawUserId {
    Text(String),
    Number(#[serde(deserialize_with = "integral")] u64),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInteraction {
    event_id: String,
    user_id: RawUserId,
    #[serde(deserialize_with = "integral")]
    movie_id: u32,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, deserialize_with = "present")]
    value: Option<f64>,
    #[serde(deserialize_with = "integral")]
    ts: i64,
    #[serde(default, deserialize_with = "present")]
    context: Option<EventContext>,
}

/// Why an input record was rejected. Every variant maps to a bounded reason label.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    Oversized { size: usize, limit: usize },
    #[error("record has no key; interactions must be keyed by user_id")]
    MissingKey,
    #[error("record key {key:?} does not match user_id {user_id:?}")]
    KeyMismatch { key: String, user_id: String },
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("schema violation: {0}")]
    SchemaViolation(String),
    #[error("unknown event type {0:?}")]
    UnknownEventType(String),
    #[error("field `{field}` out of range: {detail}")]
    OutOfRange { field: &'static str, detail: String },
}

impl DecodeError {
    /// Bounded label for metrics and the `dlq.reason` header.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Oversized { .. } => "oversized",
            DecodeError::MissingKey => "missing_key",
            DecodeError::KeyMismatch { .. } => "key_mismatch",
            DecodeError::MalformedJson(_) => "malformed_json",
            DecodeError::SchemaViolation(_) => "schema_violation",
            DecodeError::UnknownEventType(_) => "unknown_event_type",
            DecodeError::OutOfRange { .. } => "out_of_range",
        }
    }
}

/// Decodes and validates one Kafka record of the interactions topic.
///
/// `key` is the record key; it must be present and equal the event's `user_id`
/// because the topic is partitioned by user.
pub fn decode_interaction(
    key: Option<&[u8]>,
    payload: &[u8],
    max_bytes: usize,
) -> Result<Interaction, DecodeError> {
    if payload.len() > max_bytes {
        return Err(DecodeError::Oversized {
            size: payload.len(),
            limit: max_bytes,
        });
    }
    let key = match key {
        Some(k) if !k.is_empty() => k,
        _ => return Err(DecodeError::MissingKey),
    };
    let event = parse_interaction(payload)?;
    if key != event.user_id.as_bytes() {
        return Err(DecodeError::KeyMismatch {
            key: String::from_utf8_lossy(key).into_owned(),
            user_id: event.user_id,
        });
    }
    Ok(event)
}

/// Parses and validates an interaction payload (no key check).
pub fn parse_interaction(payload: &[u8]) -> Result<Interaction, DecodeError> {
    let raw: RawInteraction = serde_json::from_slice(payload).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => DecodeError::SchemaViolation(e.to_string()),
            Category::Io | Category::Syntax | Category::Eof => {
                DecodeError::MalformedJson(e.to_string())
            }
        }
    })?;
    let kind = EventType::parse(&raw.kind)
        .ok_or_else(|| DecodeError::UnknownEventType(raw.kind.clone()))?;
    let user_id = match raw.user_id {
        RawUserId::Text(s) => s,
        RawUserId::Number(n) => n.to_string(),
    };
    check_id("event_id", &raw.event_id)?;
    check_id("user_id", &user_id)?;
    if raw.movie_id == 0 {
        return Err(out_of_range("movie_id", "must be >= 1".into()));
    }
    if raw.ts <= 0 || raw.ts > MAX_TS_MS {
        return Err(out_of_range(
            "ts",
            format!("{} is not a plausible epoch-millisecond time", raw.ts),
        ));
    }
    check_value(kind, raw.value)?;
    if let Some(ctx) = &raw.context {
        check_context(ctx)?;
    }
    Ok(Interaction {
        event_id: raw.event_id,
        user_id,
        movie_id: raw.movie_id,
        kind,
        value: raw.value,
        ts: raw.ts,
        context: raw.context,
    })
}

fn out_of_range(field: &'static str, detail: String) -> DecodeError {
    DecodeError::OutOfRange { field, detail }
}

/// The rules every id (event, user) follows.
pub fn check_id(field: &'static str, id: &str) -> Result<(), DecodeError> {
    if id.is_empty() || id.chars().count() > MAX_ID_LEN {
        return Err(out_of_range(
            field,
            format!("length must be 1..={MAX_ID_LEN}"),
        ));
    }
    // U+FEFF is whitespace to some regex engines (the schema's `\s`), not to Unicode.
    if id
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || c == '\u{feff}')
    {
        return Err(out_of_range(
            field,
            "must not contain whitespace or control characters".into(),
        ));
    }
    Ok(())
}

fn check_value(kind: EventType, value: Option<f64>) -> Result<(), DecodeError> {
    if let Some(v) = value {
        if !v.is_finite() {
            return Err(out_of_range("value", "must be finite".into()));
        }
    }
    match kind {
        EventType::Rate => match value {
            Some(v) if (0.5..=5.0).contains(&v) => Ok(()),
            Some(v) => Err(out_of_range("value", format!("rating {v} not in 0.5..=5"))),
            None => Err(DecodeError::SchemaViolation(
                "a `rate` event requires `value` (0.5..=5)".into(),
            )),
        },
        EventType::Progress => match value {
            Some(v) if (0.0..=1.0).contains(&v) => Ok(()),
            Some(v) => Err(out_of_range("value", format!("progress {v} not in 0..=1"))),
            None => Err(DecodeError::SchemaViolation(
                "a `progress` event requires `value` (0..=1)".into(),
            )),
        },
        // Other types may carry a dwell time in seconds.
        _ => match value {
            Some(v) if !(0.0..=MAX_DWELL_SECONDS).contains(&v) => Err(out_of_range(
                "value",
                format!("dwell seconds {v} not in 0..={MAX_DWELL_SECONDS}"),
            )),
            _ => Ok(()),
        },
    }
}

fn check_context(ctx: &EventContext) -> Result<(), DecodeError> {
    for (field, text) in [
        ("context.device", &ctx.device),
        ("context.surface", &ctx.surface),
        ("context.carousel_id", &ctx.carousel_id),
        ("context.variant", &ctx.variant),
    ] {
        if let Some(t) = text {
            // Characters, as the schema's maxLength counts them.
            if t.chars().count() > MAX_CONTEXT_STRING {
                return Err(out_of_range(
                    field,
                    format!("longer than {MAX_CONTEXT_STRING} characters"),
                ));
            }
        }
    }
    Ok(())
}

/// A command on the refresh topic: recompute one user, or every user this instance owns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshCommand {
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub user_id: Option<String>,
    #[serde(default)]
    pub all: bool,
}

pub fn parse_refresh(payload: &[u8], max_bytes: usize) -> Result<RefreshCommand, DecodeError> {
    if payload.len() > max_bytes {
        return Err(DecodeError::Oversized {
            size: payload.len(),
            limit: max_bytes,
        });
    }
    let cmd: RefreshCommand = serde_json::from_slice(payload).map_err(|e| {
        if e.classify() == serde_json::error::Category::Data {
            DecodeError::SchemaViolation(e.to_string())
        } else {
            DecodeError::MalformedJson(e.to_string())
        }
    })?;
    match (&cmd.user_id, cmd.all) {
        (Some(u), false) => check_id("user_id", u).map(|_| cmd),
        (None, true) => Ok(cmd),
        _ => Err(DecodeError::SchemaViolation(
            "a refresh command names exactly one of `user_id` or `all: true`".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(json: &str) -> Interaction {
        decode_interaction(Some(b"u1"), json.as_bytes(), DEFAULT_MAX_EVENT_BYTES).unwrap()
    }

    fn reason(key: Option<&[u8]>, json: &str) -> &'static str {
        decode_interaction(key, json.as_bytes(), DEFAULT_MAX_EVENT_BYTES)
            .unwrap_err()
            .reason()
    }

    #[test]
    fn integral_floats_are_integers_and_nulls_are_not_absent_fields() {
        let e = ok(
            r#"{"event_id":"e1","user_id":"u1","movie_id":7.0,"type":"view","ts":1700000000000.0,"context":{"position":3.0}}"#,
        );
        assert_eq!((e.movie_id, e.ts), (7, 1_700_000_000_000));
        assert_eq!(e.context.unwrap().position, Some(3));
        for bad in [
            r#"{"event_id":"e1","user_id":"u1","movie_id":7.5,"type":"view","ts":1}"#,
            r#"{"event_id":"e1","user_id":"u1","movie_id":7,"type":"view","ts":1,"value":null}"#,
            r#"{"event_id":"e1","user_id":"u1","movie_id":7,"type":"view","ts":1,"context":null}"#,
            r#"{"event_id":"e1","user_id":"u1","movie_id":7,"type":"view","ts":1,"context":{"device":null}}"#,
        ] {
            assert_eq!(reason(Some(b"u1"), bad), "schema_violation", "{bad}");
        }
        let numeric = parse_interaction(
            br#"{"event_id":"e1","user_id":52.0,"movie_id":7,"type":"view","ts":1}"#,
        )
        .unwrap();
        assert_eq!(numeric.user_id, "52");
    }

    #[test]
    fn decodes_a_rating() {
        let e = ok(
            r#"{"event_id":"e1","user_id":"u1","movie_id":7,"type":"rate","value":4.5,"ts":1700000000000}"#,
        );
        assert_eq!(e.kind, EventType::Rate);
        assert_eq!(e.value, Some(4.5));
    }

    #[test]
    fn numeric_user_ids_are_normalised_to_text() {
        let e = decode_interaction(
            Some(b"42"),
            br#"{"event_id":"e","user_id":42,"movie_id":1,"type":"like","ts":1}"#,
            1024,
        )
        .unwrap();
        assert_eq!(e.user_id, "42");
    }

    #[test]
    fn rejections_carry_bounded_reasons() {
        let good = r#"{"event_id":"e","user_id":"u1","movie_id":1,"type":"like","ts":1}"#;
        assert_eq!(reason(None, good), "missing_key");
        assert_eq!(reason(Some(b""), good), "missing_key");
        assert_eq!(reason(Some(b"u2"), good), "key_mismatch");
        assert_eq!(reason(Some(b"u1"), "{not json"), "malformed_json");
        assert_eq!(
            reason(
                Some(b"u1"),
                r#"{"event_id":"e","user_id":"u1","movie_id":"x","type":"like","ts":1}"#
            ),
            "schema_violation"
        );
        assert_eq!(
            reason(
                Some(b"u1"),
                r#"{"event_id":"e","user_id":"u1","movie_id":1,"type":"like","ts":1,"extra":1}"#
            ),
            "schema_violation"
        );
        assert_eq!(
            reason(
                Some(b"u1"),
                r#"{"event_id":"e","user_id":"u1","movie_id":1,"type":"poke","ts":1}"#
            ),
            "unknown_event_type"
        );
        assert_eq!(
            reason(
                Some(b"u1"),
                r#"{"event_id":"e","user_id":"u1","movie_id":1,"type":"rate","value":9,"ts":1}"#
            ),
            "out_of_range"
        );
        let big = format!(
            r#"{{"event_id":"{}"}}"#,
            "x".repeat(DEFAULT_MAX_EVENT_BYTES)
        );
        assert_eq!(reason(Some(b"u1"), &big), "oversized");
    }

    #[test]
    fn refresh_commands_name_one_target() {
        assert!(parse_refresh(br#"{"user_id":"u1"}"#, 1024).is_ok());
        assert!(parse_refresh(br#"{"all":true}"#, 1024).is_ok());
        assert!(parse_refresh(br#"{}"#, 1024).is_err());
        assert!(parse_refresh(br#"{"user_id":"u1","all":true}"#, 1024).is_err());
    }
}
