//! Per-stage costs of the pipeline on synthetic data:
//! `cargo bench --bench stages`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use recstream::event::decode_interaction;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;
use common::{catalog, events, records, smoke_mode, warm_engine};

fn bench(c: &mut Criterion) {
    let payload = br#"{"event_id":"e-1","user_id":"u1","movie_id":2,"type":"rate","value":4.5,"ts":1700000001000,"context":{"device":"tv","surface":"home","position":3}}"#;
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("interaction", |b| {
        b.iter(|| decode_interaction(Some(b"u1"), black_box(payload), 16384).unwrap())
    });
    g.finish();

    let items = 10_000;
    // Warm state: every user has history.
    let warm_events = if smoke_mode() { 2_000 } else { 20_000 };
    let dir = tempfile::tempdir().unwrap();
    let mut engine = warm_engine(dir.path(), warm_events, 2_000, items);

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
    // Light load: a batch of one event, so every per-batch cost (the item
    // index, the RocksDB commit) falls on that event.
    let single = events(200, 2_000, items);
    let mut next = 0;
    g.throughput(Throughput::Elements(1));
    g.bench_function("process_batch_1_event", |b| {
        b.iter_batched(
            || {
                next = (next + 1) % single.len();
                records(&single[next..next + 1])
            },
            |r| engine.process(r).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("recompute_one_user", |b| {
        b.iter(|| engine.peek(0, black_box("u7")).unwrap())
    });
    // One user again and again keeps its state, its candidates' catalog
    // entries and its co-watch lists in the CPU's caches; in the pipeline
    // nearly every event is another user's. The same recompute over 16 users
    // in turn (still cache-warm) and over all 2,000 (cold) tells what the
    // caches are worth.
    let every_user: Vec<String> = (0..2_000).map(|i| format!("u{i}")).collect();
    let sixteen: Vec<String> = every_user.iter().step_by(125).cloned().collect();
    for (name, users, stride) in [
        ("recompute_16_users_in_turn", &sixteen, 1),
        ("recompute_2000_users_in_turn", &every_user, 7_919),
    ] {
        let mut turn = 0usize;
        g.bench_function(name, |b| {
            b.iter(|| {
                turn = (turn + stride) % users.len();
                engine.peek(0, black_box(&users[turn])).unwrap()
            })
        });
    }
    // In the pipeline at a few thousand events a second the engine thread
    // sleeps between small batches while the broker's JVM runs on the same
    // cores and caches: each recompute then starts from caches another
    // process filled. Reading 32 MiB (four times this host's L3) before
    // each one, untimed, gives that cold start.
    let evictor = common::CacheEvictor::new(32);
    let mut turn = 0usize;
    g.bench_function("recompute_after_cache_eviction", |b| {
        b.iter_batched(
            || {
                turn = (turn + 7_919) % every_user.len();
                evictor.evict();
                &every_user[turn]
            },
            |user| engine.peek(0, black_box(user)).unwrap(),
            BatchSize::PerIteration,
        )
    });
    let outputs = engine.peek(0, "u7").unwrap();
    // Into a reused buffer, as the pipeline's batch encoder does.
    let mut bytes = Vec::new();
    g.bench_function("encode_outputs", |b| {
        b.iter(|| {
            bytes.clear();
            black_box(&outputs).encode_append(&mut bytes)
        })
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
    // 350: about a user's candidate pool with the default lists.
    for n in [1usize, 100, 350, 500] {
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
