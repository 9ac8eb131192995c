//! Per-stage costs of the pipeline on synthetic data:
//! `cargo bench --bench stages`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use recstream::catalog::{Catalog, CatalogRecord};
use recstream::config::EngineConfig;
use recstream::engine::{Body, Engine, Record, SourcePos};
use recstream::event::{decode_interaction, EventType, Interaction};
use recstream::store::Store;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

fn catalog(n: u32) -> Catalog {
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
fn events(n: usize, users: u32, items: u32) -> Vec<Interaction> {
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

fn records(events: &[Interaction]) -> Vec<Record> {
    let topic: Arc<str> = Arc::from("in");
    events
        .iter()
        .enumerate()
        .map(|(i, e)| Record {
            source: SourcePos {
                topic: topic.clone(),
                partition: 0,
                offset: i as i64,
            },
            key: None,
            payload: Vec::new(),
            received: Instant::now(),
            body: Body::Event(e.clone()),
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let payload = br#"{"event_id":"e-1","user_id":"u1","movie_id":2,"type":"rate","value":4.5,"ts":1700000001000,"context":{"device":"tv","surface":"home","position":3}}"#;
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("interaction", |b| {
        b.iter(|| decode_interaction(Some(b"u1"), black_box(payload), 16384).unwrap())
    });
    g.finish();

    let items = 10_000;
    let stream = events(20_000, 2_000, items);
    let dir = tempfile::tempdir().unwrap();
    let mut engine = Engine::new(
        EngineConfig::default(),
        Store::open(dir.path(), 64).unwrap(),
        catalog(items),
    )
    .unwrap();
    // Warm state: every user has history.
    for chunk in stream.chunks(1000) {
        engine.process(records(chunk)).unwrap();
    }

    // State size: what one user costs in RocksDB (before compression).
    let users = engine.store().users_page(0, None, usize::MAX).unwrap();
    let bytes: usize = users
        .iter()
        .map(|(_, s)| recstream::store::encoded_len(s))
        .sum();
    let recent: usize = users.iter().map(|(_, s)| s.recent.len()).sum();
    let seen: usize = users.iter().map(|(_, s)| s.seen.len()).sum();
    eprintln!(
        "state: {} users, {:.0} bytes/user encoded (mean {:.1} recent items, {:.1} seen items)",
        users.len(),
        bytes as f64 / users.len() as f64,
        recent as f64 / users.len() as f64,
        seen as f64 / users.len() as f64
    );

    let mut g = c.benchmark_group("engine");
    let batch = events(500, 2_000, items);
    g.throughput(Throughput::Elements(batch.len() as u64));
    g.sample_size(10);
    g.bench_function("process_batch_500_events", |b| {
        b.iter_batched(
            || records(&batch),
            |r| engine.process(r).unwrap(),
            BatchSize::LargeInput,
        )
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("recompute_one_user", |b| {
        b.iter(|| engine.peek(0, black_box("u7")).unwrap())
    });
    let outputs = engine.peek(0, "u7").unwrap();
    g.bench_function("encode_outputs", |b| {
        b.iter(|| black_box(&outputs).encode())
    });
    g.finish();

    // NCF at the default implicit architecture (GMF 16, MLP 32, tower 64-32-16),
    // trained briefly on synthetic users over the same catalog.
    let model_dir = tempfile::tempdir().unwrap();
    let ncf_catalog = catalog(items);
    let data = recstream::ncf::synthetic::interactions(&ncf_catalog, 2_000, 20, 1);
    let mut config =
        recstream::ncf::train::TrainConfig::defaults(recstream::ncf::model::Objective::Implicit);
    config.epochs = 1;
    let run = recstream::ncf::eval::run(recstream::ncf::eval::RunInput {
        config,
        train: &data,
        test: None,
        data_name: "bench".into(),
        out: model_dir.path().join("bench"),
        progress: false,
    })
    .unwrap();
    let model = Arc::new(
        recstream::ncf::serve::NcfModel::load(&run.files.onnx, Default::default()).unwrap(),
    );
    let mut g = c.benchmark_group("ncf");
    let prior = model.prior("x").to_vec();
    for n in [1usize, 100, 500] {
        let vectors: Vec<f32> = (0..n).flat_map(|_| prior.iter().copied()).collect();
        let idx: Vec<i64> = (0..n as i64)
            .map(|i| (i * 7919) % model.card.item_ids.len() as i64)
            .collect();
        g.throughput(Throughput::Elements(n as u64));
        // The model's own graph, one user vector per pair.
        g.bench_function(format!("tract_score_pairs/{n}"), |b| {
            b.iter(|| {
                model
                    .score_pairs(black_box(&vectors), black_box(&idx))
                    .unwrap()
            })
        });
        // What the engine runs: one user against its candidates, the item
        // half of the first layer precomputed.
        g.bench_function(format!("tract_serving_one_user/{n}"), |b| {
            b.iter(|| {
                model
                    .score_user(black_box(&prior), black_box(&idx))
                    .unwrap()
            })
        });
    }
    let mut state = engine.store().user(0, "u7").unwrap().unwrap_or_default();
    g.throughput(Throughput::Elements(1));
    g.bench_function("fold_in_one_user", |b| {
        b.iter(|| model.fold_in_user(black_box("u7"), &mut state))
    });
    g.finish();

    let mut g = c.benchmark_group("engine");
    g.sample_size(10);
    g.throughput(Throughput::Elements(batch.len() as u64));
    engine.set_scorer(Some(Arc::new(recstream::ncf::serve::NcfScorer { model })));
    g.bench_function("process_batch_500_events_with_ncf", |b| {
        b.iter_batched(
            || records(&batch),
            |r| engine.process(r).unwrap(),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
