//! The committed sample payloads go through the engine's decoder: valid ones
//! decode, invalid ones are rejected with a reason. (`tests/clients/check_schemas.py
//! samples` checks the same files against the JSON Schema.)

use std::path::Path;

use recstream::event::{decode_interaction, DEFAULT_MAX_EVENT_BYTES};

fn samples(kind: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("schemas/samples/interaction")
        .join(kind);
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
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
    let valid = samples("valid");
    assert!(valid.len() >= 5);
    for (name, payload) in valid {
        decode_interaction(Some(b"u1"), &payload, DEFAULT_MAX_EVENT_BYTES)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn invalid_samples_are_rejected_with_a_reason() {
    let invalid = samples("invalid");
    assert!(invalid.len() >= 10);
    for (name, payload) in invalid {
        let err =
            decode_interaction(Some(b"u1"), &payload, DEFAULT_MAX_EVENT_BYTES).expect_err(&name);
        assert_eq!(err.reason(), expected_reason(&name), "{name}: {err}");
    }
}

/// The reason each invalid sample must be dead-lettered with.
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
