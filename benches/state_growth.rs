//! How the engine's cost and RocksDB's size grow with the number of users:
//! `cargo bench --bench state_growth` (env `USERS=10000,100000,1000000`).
//!
//! For each user count N, a fresh store is filled with N user states (copies
//! of 2,000 real states built by the engine from a synthetic stream, so each
//! has history), then the engine processes the same 20,000-event workload
//! spread over all N users in micro-batches of 500. Reported per N: events/s
//! of that workload, and RocksDB bytes per user after a flush (compressed SST,
//! the whole store divided by N) next to the encoded (uncompressed) size.

use std::time::Instant;

use recstream::config::EngineConfig;
use recstream::engine::Engine;
use recstream::state::UserState;
use recstream::store::{Changes, Store};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;
use common::{catalog, events, records, smoke_mode, warm_engine};

const ITEMS: u32 = 10_000;
const WORKLOAD_EVENTS: usize = 20_000;
const BATCH: usize = 500;

fn main() {
    let smoke = smoke_mode();
    let default_users = if smoke {
        "1000"
    } else {
        "10000,100000,1000000"
    };
    let user_counts: Vec<usize> = std::env::var("USERS")
        .unwrap_or_else(|_| default_users.into())
        .split(',')
        .map(|n| {
            n.trim()
                .parse()
                .expect("USERS: comma-separated user counts")
        })
        .collect();
    let workload_events = if smoke { 1_000 } else { WORKLOAD_EVENTS };

    // Template states: what 2,000 users look like after 20,000 events.
    let warm_dir = tempfile::tempdir().unwrap();
    let warm_events = if smoke { 2_000 } else { 20_000 };
    let warm = warm_engine(warm_dir.path(), warm_events, 2_000, ITEMS);
    let templates: Vec<UserState> = warm
        .store()
        .users_page(0, None, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    let vocabulary = warm.store().genre_vocabulary().unwrap().unwrap();
    let encoded = templates
        .iter()
        .map(|s| recstream::store::encoded_len(s) as f64)
        .sum::<f64>()
        / templates.len() as f64;
    let recent =
        templates.iter().map(|s| s.recent.len() as f64).sum::<f64>() / templates.len() as f64;
    // The same states without their bounded recent-items list.
    let without_recent = templates
        .iter()
        .map(|s| {
            let mut s = s.clone();
            s.recent.clear();
            recstream::store::encoded_len(&s) as f64
        })
        .sum::<f64>()
        / templates.len() as f64;

    println!(
        "| users | fill s | workload events/s | RocksDB SST bytes/user | encoded bytes/user (mean {recent:.1} recent items) | without the recent items |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for n in user_counts {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 64).unwrap();
        store.set_genre_vocabulary(&vocabulary).unwrap();
        let filled = Instant::now();
        for start in (0..n).step_by(10_000) {
            let mut changes = Changes::default();
            for u in start..(start + 10_000).min(n) {
                let state = templates[u % templates.len()].clone();
                changes.users.push((0, format!("u{u}"), state));
            }
            store.commit(&changes).unwrap();
        }
        let fill_seconds = filled.elapsed().as_secs_f64();
        store.flush().unwrap();
        let mut engine = Engine::new(EngineConfig::default(), store, catalog(ITEMS)).unwrap();

        // Later than the templates' history.
        let mut workload = events(workload_events, n as u32, ITEMS);
        for e in &mut workload {
            e.ts += 30 * 86_400_000;
        }
        let started = Instant::now();
        for chunk in workload.chunks(BATCH) {
            engine.process(records(chunk)).unwrap();
        }
        let rate = workload_events as f64 / started.elapsed().as_secs_f64();
        engine.store().flush().unwrap();
        let sst = engine.store().stats().sst_bytes as f64;
        println!(
            "| {n} | {fill_seconds:.1} | {rate:.0} | {:.0} | {encoded:.0} | {without_recent:.0} |",
            sst / n as f64
        );
    }
}
