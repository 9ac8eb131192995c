//! How the engine's cost and RocksDB's size grow with the number of users and
//! with the size of the catalogue: `cargo bench --bench state_growth`
//! (env `USERS=10000,30000,100000,300000,1000000`, `ITEMS=10000,30000,100000`).
//!
//! Users: for each user count N, a fresh store is filled with N user states
//! (copies of 2,000 real states built by the engine from a synthetic stream,
//! so each has history), then the engine processes the same 20,000-event
//! workload spread over all N users in micro-batches of 500. Reported per N:
//! events/s of that workload, and RocksDB bytes per user after a flush
//! (compressed SST, the whole store divided by N) next to the encoded
//! (uncompressed) size.
//!
//! Items: for each catalogue size M, a fresh engine over M synthetic movies
//! is warmed by 100,000 events of 10,000 users (so popularity, trending and
//! co-watch lists cover the catalogue as a real deployment's would), then the
//! next 20,000 events of the same stream are timed in micro-batches of 500.
//! Reported per M: engine time per event, the items that have events, and
//! RocksDB bytes after a flush.
//!
//! Both are the engine stage alone (apply, recompute, commit), single
//! threaded, without the broker or the output encoding, whose cost per
//! recompute depends on neither axis.

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
        "10000,30000,100000,300000,1000000"
    };
    let user_counts: Vec<usize> = counts("USERS", default_users);
    let workload_events = if smoke { 1_000 } else { WORKLOAD_EVENTS };
    users_axis(smoke, &user_counts, workload_events);
    let default_items = if smoke { "2000" } else { "10000,30000,100000" };
    let item_counts: Vec<u32> = counts("ITEMS", default_items);
    println!();
    items_axis(smoke, &item_counts, workload_events);
}

/// The comma-separated numbers in the environment variable `name`, or in
/// `default` when it is not set.
fn counts<T: std::str::FromStr>(name: &str, default: &str) -> Vec<T> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|n| {
            n.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name}: comma-separated numbers, got {n:?}"))
        })
        .collect()
}

/// The users table: cost and state size per user count.
fn users_axis(smoke: bool, user_counts: &[usize], workload_events: usize) {
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
    for &n in user_counts {
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

/// The catalogue table: cost per event and state size per catalogue size,
/// with popularity and co-watch state warmed over the whole catalogue.
fn items_axis(smoke: bool, item_counts: &[u32], workload_events: usize) {
    let warm_events = if smoke { 4_000 } else { 100_000 };
    let users = if smoke { 1_000 } else { 10_000 };
    println!(
        "| items | warm-up events | items with events | workload events/s | µs per event | RocksDB SST MB |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for &m in item_counts {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = warm_engine(dir.path(), warm_events, users, m);
        // The same deterministic stream, continued past the warm-up.
        let stream = events(warm_events + workload_events, users, m);
        let (warm, workload) = stream.split_at(warm_events);
        let with_events = warm
            .iter()
            .map(|e| e.movie_id)
            .collect::<std::collections::HashSet<_>>()
            .len();
        let started = Instant::now();
        for chunk in workload.chunks(BATCH) {
            engine.process(records(chunk)).unwrap();
        }
        let seconds = started.elapsed().as_secs_f64();
        engine.store().flush().unwrap();
        let sst = engine.store().stats().sst_bytes as f64;
        println!(
            "| {m} | {warm_events} | {with_events} | {:.0} | {:.1} | {:.1} |",
            workload.len() as f64 / seconds,
            1e6 * seconds / workload.len() as f64,
            sst / 1e6
        );
    }
}
