//! Any bytes as an input record's key and value: the decoder returns an event
//! or a rejection with a reason, never panics, and an accepted event matches
//! its key.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../../src/event.rs"]
#[allow(dead_code)]
mod event;

const MAX_BYTES: usize = 16 * 1024;

fuzz_target!(|data: &[u8]| {
    // First byte: key length (255: no key); then the key; the rest is the value.
    let Some((&key_len, rest)) = data.split_first() else {
        return;
    };
    let (key, payload) = if key_len == 255 || key_len as usize > rest.len() {
        (None, rest)
    } else {
        let (k, p) = rest.split_at(key_len as usize);
        (Some(k), p)
    };
    match event::decode_interaction(key, payload, MAX_BYTES) {
        Ok(e) => {
            assert_eq!(key, Some(e.user_id.as_bytes()), "accepted events match their key");
            assert!(payload.len() <= MAX_BYTES);
        }
        Err(e) => assert!(!e.reason().is_empty()),
    }
    if let Err(e) = event::parse_refresh(payload, MAX_BYTES) {
        assert!(!e.reason().is_empty());
    }
});
