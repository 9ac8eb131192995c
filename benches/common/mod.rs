//! Synthetic catalog and event streams shared by the benches.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use recstream::catalog::{Catalog, CatalogRecord};
use recstream::config::EngineConfig;
use recstream::engine::{Body, Engine, Record, SourcePos};
use recstream::event::{EventType, Interaction};
use recstream::store::Store;

/// `cargo bench` passes --bench; `cargo test --benches` runs the benches once
/// in a debug build (criterion's smoke mode), so they use smaller inputs.
pub fn smoke_mode() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

/// A buffer whose reading pushes a recompute's code and data out of the
/// caches, as the broker's JVM does on the shared cores between two small
/// batches of the pipeline.
#[allow(dead_code)] // state_growth.rs never starts cold
pub struct CacheEvictor(Vec<u8>);

#[allow(dead_code)]
impl CacheEvictor {
    /// `mib` MiB, non-zero so that its pages are real.
    pub fn new(mib: usize) -> CacheEvictor {
        CacheEvictor(vec![1u8; mib << 20])
    }

    /// Reads one byte of every 64-byte line.
    pub fn evict(&self) {
        let lines: u64 = self.0.iter().step_by(64).map(|&b| u64::from(b)).sum();
        std::hint::black_box(lines);
    }
}

/// An engine over `items` catalog movies whose state in `dir` is warmed by
/// `events` events of `users` users, so every user has history.
pub fn warm_engine(dir: &std::path::Path, events_n: usize, users: u32, items: u32) -> Engine {
    let mut engine = Engine::new(
        EngineConfig::default(),
        Store::open(dir, 64).unwrap(),
        catalog(items),
    )
    .unwrap();
    for chunk in events(events_n, users, items).chunks(1000) {
        engine.process(records(chunk)).unwrap();
    }
    engine
}

const GENRES: [&str; 18] = [
    "Action",
    "Adventure",
    "Animation",
    "Children",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
];

pub fn catalog(n: u32) -> Catalog {
    let mut c = Catalog::default();
    for id in 1..=n {
        let g = id as usize;
        c.upsert(CatalogRecord {
            movie_id: id,
            title: format!("Movie {id}"),
            genres: vec![GENRES[g % 18].into(), GENRES[(g * 7) % 18].into()],
            year: Some(1950 + (id % 70) as u16),
            tmdb_id: None,
            imdb_id: None,
            tags: vec![],
        })
        .unwrap();
    }
    c
}

/// A deterministic stream: Zipf-like item popularity, a realistic event mix.
pub fn events(n: usize, users: u32, items: u32) -> Vec<Interaction> {
    let mut rng = recstream::rng::Rng::new(42);
    let mut next = move || rng.next_u64();
    let kinds = [
        EventType::View,
        EventType::Click,
        EventType::Play,
        EventType::Play,
        EventType::Complete,
        EventType::Rate,
        EventType::Like,
        EventType::Skip,
    ];
    (0..n)
        .map(|i| {
            let r = (next() % 1_000_000) as f64 / 1_000_000.0;
            let kind = kinds[(next() % kinds.len() as u64) as usize];
            Interaction {
                event_id: format!("e{i}"),
                user_id: format!("u{}", next() % users as u64),
                movie_id: 1 + ((r * r * r) * items as f64) as u32 % items,
                kind,
                value: match kind {
                    EventType::Rate => Some(1.0 + (next() % 9) as f64 / 2.0),
                    _ => None,
                },
                ts: 1_700_000_000_000 + i as i64 * 1000,
                context: None,
            }
        })
        .collect()
}

/// Offsets of the records handed out so far: they must keep growing, or the
/// engine would take later batches for replays of applied records.
static NEXT_OFFSET: AtomicI64 = AtomicI64::new(0);

/// The events as records of partition 0 of topic `in`, at fresh offsets and
/// with fresh event ids: a bench that hands out the same events twice
/// measures new events, not duplicates the engine skips.
pub fn records(events: &[Interaction]) -> Vec<Record> {
    let topic: Arc<str> = Arc::from("in");
    let first = NEXT_OFFSET.fetch_add(events.len() as i64, Ordering::Relaxed);
    events
        .iter()
        .zip(first..)
        .map(|(e, offset)| Record {
            source: SourcePos {
                topic: topic.clone(),
                partition: 0,
                offset,
            },
            key: None,
            payload: Vec::new(),
            received: Instant::now(),
            body: Body::Event(Interaction {
                event_id: format!("{}#{offset}", e.event_id),
                ..e.clone()
            }),
        })
        .collect()
}
