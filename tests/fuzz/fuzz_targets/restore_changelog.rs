//! Any sequence of changelog records (a corrupted or foreign topic): restoring
//! returns a state or an error, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../../src/changelog.rs"]
#[allow(dead_code)]
mod changelog;

// What the changelog's co-watch records decode into.
#[path = "../../../src/cowatch.rs"]
#[allow(dead_code)]
mod cowatch;

mod catalog {
    pub type IdMap<V> = std::collections::HashMap<u32, V>;
}

fuzz_target!(|data: &[u8]| {
    let mut restorer = changelog::Restorer::default();
    // Records as (key length, value length, key, value) frames.
    let mut rest = data;
    while rest.len() >= 2 {
        let (k, v) = (rest[0] as usize, rest[1] as usize);
        rest = &rest[2..];
        if rest.len() < k + v {
            break;
        }
        let value = (v > 0).then(|| &rest[k..k + v]);
        if restorer.push(&rest[..k], value).is_err() {
            return;
        }
        rest = &rest[k + v..];
    }
    if let Ok(restored) = restorer.finish() {
        assert!(restored.committed_seq <= restored.max_seq);
    }
});
