//! The committed sample payloads go through the engine's decoders: valid ones
//! decode, invalid ones are rejected (interactions with the reason the file
//! name implies). `tests/clients/check_schemas.py samples` checks the same files
//! against the JSON Schemas.

use std::path::Path;

use recstream::catalog::parse_record;
use recstream::event::{decode_interaction, parse_refresh, DEFAULT_MAX_EVENT_BYTES};

fn samples(kind: &str, validity: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("schemas/samples")
        .join(kind)
        .join(validity);
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no {kind}/{validity} samples");
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let first = text.lines().next().unwrap_or_default().as_bytes().to_vec();
            (p.file_name().unwrap().to_string_lossy().into_owned(), first)
        })
        .collect()
}

#[test]
fn valid_samples_decode() {
    for (name, payload) in samples("interaction", "valid") {
        decode_interaction(Some(b"u1"), &payload, DEFAULT_MAX_EVENT_BYTES)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for (name, payload) in samples("refresh", "valid") {
        parse_refresh(&payload, DEFAULT_MAX_EVENT_BYTES).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for (name, payload) in samples("catalog", "valid") {
        parse_record(&payload).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn invalid_samples_are_rejected_with_a_reason() {
    for (name, payload) in samples("interaction", "invalid") {
        let err =
            decode_interaction(Some(b"u1"), &payload, DEFAULT_MAX_EVENT_BYTES).expect_err(&name);
        assert_eq!(err.reason(), expected_reason(&name), "{name}: {err}");
    }
    for (name, payload) in samples("refresh", "invalid") {
        assert!(
            parse_refresh(&payload, DEFAULT_MAX_EVENT_BYTES).is_err(),
            "{name}"
        );
    }
    for (name, payload) in samples("catalog", "invalid") {
        assert!(parse_record(&payload).is_err(), "{name}");
    }
}

/// The reason each invalid interaction sample must be dead-lettered with.
fn expected_reason(file: &str) -> &'static str {
    match file.trim_end_matches(".json") {
        "malformed_json" => "malformed_json",
        "unknown_event_type" => "unknown_event_type",
        "rating_out_of_range" | "negative_ts" | "progress_out_of_range" => "out_of_range",
        "wrong_type"
        | "rate_without_value"
        | "unknown_field"
        | "missing_event_id"
        | "unknown_context_field"
        | "not_an_object" => "schema_violation",
        other => panic!("add {other} to expected_reason"),
    }
}
