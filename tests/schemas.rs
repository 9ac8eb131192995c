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
        assert!(!err.reason().is_empty(), "{name}");
    }
}
