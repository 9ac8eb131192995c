//! NCF end to end on synthetic data: training → ONNX export → tract parity →
//! serving inside the engine with fold-in. No MovieLens files.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use recstream::catalog::{self, Catalog};
use recstream::config::EngineConfig;
use recstream::engine::{Body, Engine, Record, SourcePos};
use recstream::event::{EventType, Interaction};
use recstream::ncf::card::ModelCard;
use recstream::ncf::data::RawInteraction;
use recstream::ncf::eval::{self, RunInput};
use recstream::ncf::foldin::FoldInConfig;
use recstream::ncf::model::Objective;
use recstream::ncf::serve::{NcfModel, NcfScorer};
use recstream::ncf::train::TrainConfig;
use recstream::ncf::{onnx, synthetic};
use recstream::rng::Rng;
use recstream::store::Store;

fn demo_catalog() -> Catalog {
    catalog::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src/demo/catalog.csv")).unwrap()
}

fn small_config(objective: Objective) -> TrainConfig {
    let mut c = TrainConfig::defaults(objective);
    c.gmf_dim = 6;
    c.mlp_dim = 8;
    c.hidden = vec![16, 16, 8];
    c.epochs = 3;
    c.patience = 10;
    c.ensemble = 1;
    c.snapshots = 1;
    c
}

fn train(
    objective: Objective,
    config: TrainConfig,
    dir: &Path,
    data: &[RawInteraction],
) -> eval::Run {
    eval::run(RunInput {
        config,
        train: data,
        test: None,
        data_name: format!("synthetic {}", objective.as_str()),
        out: dir.join("model"),
        progress: false,
    })
    .unwrap()
}

/// tract's output equals the trainer's own forward pass (candle, inference
/// mode) and the plain-Rust forward within 1e-4, with every architecture
/// extra switched on (BatchNorm folded on export, user and item histories
/// baked into the exported vectors).
#[test]
fn tract_matches_the_trainer_within_1e_4() {
    let catalog = demo_catalog();
    let data = synthetic::interactions(&catalog, 150, 20, 9);
    for objective in [Objective::Implicit, Objective::Explicit] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = small_config(objective);
        config.residual = true;
        config.batch_norm = true;
        config.dropout = 0.1;
        config.history = true;
        config.item_history = true;
        let mut run = train(objective, config, dir.path(), &data);
        // Export the model exactly as training left it, and serve that.
        let (weights, users) = run.trainer.export().unwrap();
        std::fs::write(&run.files.onnx, onnx::export(&weights, "parity")).unwrap();
        let bytes: Vec<u8> = users.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&run.files.users, bytes).unwrap();
        // The card's reference scores must describe these weights, not the
        // best epoch's that the run exported.
        let mut card: ModelCard =
            serde_json::from_slice(&std::fs::read(&run.files.card).unwrap()).unwrap();
        let d = weights.user_dim();
        for c in &mut card.checks {
            c.score = weights.score(
                &users[c.user_row * d..(c.user_row + 1) * d],
                c.item as usize,
            );
        }
        std::fs::write(&run.files.card, serde_json::to_vec(&card).unwrap()).unwrap();
        let served = NcfModel::load(&run.files.onnx, FoldInConfig::default()).unwrap();

        let mut rng = Rng::new(3);
        let n_users = run.dataset.n_users() as u64;
        let n_items = run.dataset.n_items() as u64;
        let pairs: Vec<(u32, u32)> = (0..500)
            .map(|_| {
                (
                    (rng.next_u64() % n_users) as u32,
                    (rng.next_u64() % n_items) as u32,
                )
            })
            .collect();
        let (u, i): (Vec<u32>, Vec<u32>) = pairs.iter().copied().unzip();
        let trainer = run.trainer.predict(&u, &i).unwrap();
        let tract = eval::tract_scores(&served, &u, &i);
        let d = weights.user_dim();
        for (k, (user, item)) in pairs.iter().enumerate() {
            let rust = weights.score(
                &users[*user as usize * d..(*user as usize + 1) * d],
                *item as usize,
            );
            assert!(
                (trainer[k] - tract[k]).abs() < 1e-4 && (rust - tract[k]).abs() < 1e-4,
                "{objective:?} pair {k}: trainer {} tract {} rust {rust}",
                trainer[k],
                tract[k]
            );
        }
    }
}

#[test]
fn training_is_reproducible_and_learns() {
    let catalog = demo_catalog();
    let data = synthetic::interactions(&catalog, 150, 20, 4);
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let mut config = small_config(Objective::Implicit);
    config.epochs = 10;
    config.learning_rate = 0.005;
    let run_a = train(Objective::Implicit, config.clone(), a.path(), &data);
    let run_b = train(Objective::Implicit, config, b.path(), &data);
    assert_eq!(
        std::fs::read(&run_a.files.onnx).unwrap(),
        std::fs::read(&run_b.files.onnx).unwrap(),
        "same seed, same model"
    );
    let hr = run_a.report.test["hr@10"].as_f64().unwrap();
    assert!(
        hr > 0.5,
        "synthetic tastes are easy to learn, HR@10 was {hr}"
    );
    // The run leaves its report, card and curve beside the model.
    for f in &run_a.report.files {
        assert!(Path::new(f).exists(), "{f} missing");
    }
    let card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&run_a.files.card).unwrap()).unwrap();
    assert_eq!(card["inputs"][0]["name"], "user");
    assert_eq!(card["outputs"][0]["shape"][0], "N");
}

fn event(user: &str, movie_id: u32, n: usize, kind: EventType) -> Record {
    let e = Interaction {
        event_id: format!("{user}-{n}"),
        user_id: user.into(),
        movie_id,
        kind,
        value: None,
        ts: 1_800_000_000_000 + n as i64 * 60_000,
        context: None,
    };
    Record {
        source: SourcePos {
            topic: Arc::from("interactions"),
            partition: 0,
            offset: n as i64,
        },
        key: Some(user.as_bytes().to_vec()),
        payload: serde_json::to_vec(&e).unwrap(),
        received: Instant::now(),
        body: Body::Event(e),
    }
}

/// A user the model never saw is scored from their first event on: the engine
/// folds their events into a vector kept in RocksDB, the NCF signal enters the
/// blend, and the vector moves towards what they watch.
#[test]
fn the_engine_folds_new_users_in_from_their_first_event() {
    let catalog = demo_catalog();
    let data = synthetic::interactions(&catalog, 300, 30, 5);
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(Objective::Implicit);
    config.epochs = 8;
    let run = train(Objective::Implicit, config, dir.path(), &data);
    let model = Arc::new(NcfModel::load(&run.files.onnx, FoldInConfig::default()).unwrap());
    let (_state_dir, mut engine) = engine_serving(&model, &catalog);

    // A horror fan, new to the model.
    let horror = catalog.genre_id("Horror").unwrap();
    let horror_movies: Vec<u32> = catalog
        .movies()
        .filter(|m| m.genres.contains(horror))
        .map(|m| m.id)
        .collect();
    assert!(horror_movies.len() >= 4);
    let user = "new-viewer";
    let prior = model.prior(user).to_vec();
    let result = engine
        .process(vec![event(user, horror_movies[0], 0, EventType::Complete)])
        .unwrap();
    let recs = &result.outputs[0].1.recommendations;
    assert_eq!(recs.model.as_ref().unwrap().name, "ncf");
    assert!(
        recs.items.iter().any(|i| i.signals.ncf.is_some()),
        "NCF scored from the first event"
    );
    let after_one = engine.peek(0, user).unwrap();
    assert_eq!(after_one.recommendations.version, 1);

    let records: Vec<Record> = horror_movies[1..4]
        .iter()
        .enumerate()
        .map(|(k, m)| event(user, *m, k + 1, EventType::Complete))
        .collect();
    engine.process(records).unwrap();
    let stored = engine.store_handle().user(0, user).unwrap().unwrap();
    assert_eq!(stored.latent.len(), model.user_dim());
    assert_eq!(stored.latent_model, model.model_id);
    assert_ne!(stored.latent, prior, "never the prior once events arrive");
    // Unseen horror now stands out more for this user than for the average
    // viewer: the margin over the rest of the catalogue grows. (Levels alone
    // say little: fold-in also refits the user's bias.)
    let index = |movies: &mut dyn Iterator<Item = u32>| -> Vec<i64> {
        movies
            .filter_map(|m| model.item_index(m).map(|i| i as i64))
            .collect()
    };
    let unseen = index(&mut horror_movies[4..].iter().copied());
    let others = index(
        &mut catalog
            .movies()
            .filter(|m| !m.genres.contains(horror))
            .map(|m| m.id),
    );
    let mean_score = |v: &[f32], items: &[i64]| -> f32 {
        let users: Vec<f32> = items.iter().flat_map(|_| v.iter().copied()).collect();
        model
            .score_pairs(&users, items)
            .unwrap()
            .iter()
            .sum::<f32>()
            / items.len() as f32
    };
    let margin = |v: &[f32]| mean_score(v, &unseen) - mean_score(v, &others);
    assert!(
        margin(&stored.latent) > margin(&prior),
        "fold-in follows the user's taste"
    );

    // Later updates start from the stored vector and take `warm_steps`.
    let resting = NcfModel::load(
        &run.files.onnx,
        FoldInConfig {
            warm_steps: 0,
            ..FoldInConfig::default()
        },
    )
    .unwrap();
    let mut kept = stored.clone();
    resting.fold_in_user(user, &mut kept);
    assert_eq!(kept.latent, stored.latent, "0 warm steps keep the vector");
    let mut moved = stored.clone();
    model.fold_in_user(user, &mut moved);
    assert_ne!(moved.latent, stored.latent, "warm steps refine it");
}

/// The serving form (one user, the item half of the first layer precomputed)
/// scores exactly what the model does.
#[test]
fn the_serving_form_scores_what_the_model_scores() {
    let catalog = demo_catalog();
    let data = synthetic::interactions(&catalog, 150, 20, 9);
    for objective in [Objective::Implicit, Objective::Explicit] {
        let dir = tempfile::tempdir().unwrap();
        let run = train(objective, small_config(objective), dir.path(), &data);
        let model = NcfModel::load(&run.files.onnx, FoldInConfig::default()).unwrap();
        let mut rng = Rng::new(5);
        let n_items = model.weights.n_items as u64;
        // Sizes below, at and between the planned batch sizes (16, 32, then
        // every 64 rows to 1,024), and beyond them.
        let sizes = [1, 16, 17, 33, 65, 129, 200, 350, 512, 700, 1000, 1024, 1500];
        for (user, size) in sizes.into_iter().enumerate() {
            let v = model.prior(&format!("u{user}")).to_vec();
            let items: Vec<i64> = (0..size)
                .map(|_| (rng.next_u64() % n_items) as i64)
                .collect();
            let replicated: Vec<f32> = items.iter().flat_map(|_| v.iter().copied()).collect();
            let contract = model.score_pairs(&replicated, &items).unwrap();
            let served = model.score_user(&v, &items).unwrap();
            assert_eq!(served.len(), size);
            for (a, b) in contract.iter().zip(&served) {
                assert!((a - b).abs() < 1e-5, "{objective:?}: {a} vs {b}");
            }
        }
    }
}

/// The committed demo model follows the contract and loads.
#[test]
fn the_committed_demo_model_loads_and_scores() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo/ncf-demo.onnx");
    let model = NcfModel::load(&path, FoldInConfig::default()).unwrap();
    let catalog = demo_catalog();
    for id in catalog.ids() {
        assert!(
            model.item_index(*id).is_some(),
            "movie {id} unknown to the demo model"
        );
    }
    let v = model.prior("nobody").to_vec();
    let scores = model
        .score_pairs(&[v.clone(), v].concat(), &[0, 1])
        .unwrap();
    assert!(scores.iter().all(|s| (0.0..=1.0).contains(s)));
}

/// A model whose tract output disagrees with its card's reference scores (a
/// broken export, or the files of two different models) is never served.
#[test]
fn a_model_that_fails_its_cards_parity_checks_is_refused() {
    let catalog = demo_catalog();
    let data = synthetic::interactions(&catalog, 60, 10, 4);
    let dir = tempfile::tempdir().unwrap();
    let run = train(
        Objective::Implicit,
        small_config(Objective::Implicit),
        dir.path(),
        &data,
    );
    NcfModel::load(&run.files.onnx, FoldInConfig::default()).expect("the exported model loads");
    let pristine = std::fs::read(&run.files.card).unwrap();
    let mut card: ModelCard = serde_json::from_slice(&pristine).unwrap();
    card.checks[3].score += 0.01;
    std::fs::write(&run.files.card, serde_json::to_vec(&card).unwrap()).unwrap();
    let err = NcfModel::load(&run.files.onnx, FoldInConfig::default())
        .err()
        .expect("a tampered card is refused")
        .to_string();
    assert!(err.contains("parity check failed"), "{err}");

    card.checks.clear();
    std::fs::write(&run.files.card, serde_json::to_vec(&card).unwrap()).unwrap();
    let err = NcfModel::load(&run.files.onnx, FoldInConfig::default())
        .err()
        .expect("a card without reference scores is refused")
        .to_string();
    assert!(err.contains("no parity checks"), "{err}");
}

/// A merged ensemble with both histories exports, passes its card's parity
/// checks through tract (the loader refuses it otherwise) and scores users
/// the model never saw from the card's new-user prior, which ranks the
/// crowd's favourites above rarely watched items.
#[test]
fn an_ensemble_with_histories_serves_and_new_users_start_from_the_population_prior() {
    let catalog = demo_catalog();
    let data = synthetic::interactions(&catalog, 150, 20, 9);
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(Objective::Implicit);
    config.history = true;
    config.item_history = true;
    config.ensemble = 3;
    config.snapshots = 2;
    let run = train(Objective::Implicit, config, dir.path(), &data);
    let model = NcfModel::load(&run.files.onnx, FoldInConfig::default()).unwrap();
    assert_eq!(
        model.weights.gmf_dim,
        3 * 2 * 6,
        "three members of two snapshots each, side by side"
    );
    let prior = model
        .card
        .new_user_prior
        .clone()
        .expect("the exporter writes the prior");
    assert_eq!(model.prior("nobody"), prior.as_slice());

    // Popularity in the training data against the prior's scores.
    let mut count = vec![0usize; model.weights.n_items];
    for r in &run.train_rows {
        count[r.item as usize] += 1;
    }
    let mut by_count: Vec<usize> = (0..count.len()).collect();
    by_count.sort_by_key(|&i| std::cmp::Reverse(count[i]));
    let tenth = by_count.len() / 10;
    let mean_score = |items: &[usize]| {
        let idx: Vec<i64> = items.iter().map(|&i| i as i64).collect();
        let s = model.score_user(&prior, &idx).unwrap();
        s.iter().sum::<f32>() / s.len() as f32
    };
    assert!(
        mean_score(&by_count[..tenth]) > mean_score(&by_count[by_count.len() - tenth..]),
        "the prior prefers popular items"
    );
}

/// The history-based NeuMF end to end: trained for next-item prediction,
/// exported (the card's reference histories checked through the graph and
/// the serving form at load), then served by the engine. A user's vector is
/// their recent interactions encoded: no fold-in and nothing per user is
/// stored, every event changes the next list, and the model proposes its own
/// candidates from the whole catalogue.
#[test]
fn the_engine_serves_a_history_model_from_the_first_event() {
    use recstream::ncf::sequence::{self, SequenceConfig};
    use recstream::output::Source;
    let catalog = demo_catalog();
    let data = synthetic::interactions(&catalog, 200, 30, 11);
    let dir = tempfile::tempdir().unwrap();
    let config = SequenceConfig {
        gmf_dim: 6,
        mlp_dim: 6,
        hidden: vec![8],
        max_len: 10,
        epochs: 4,
        ..SequenceConfig::default()
    };
    let (loaded, report) = sequence::train_and_export(
        &config,
        &data,
        "synthetic",
        &dir.path().join("history"),
        false,
    )
    .unwrap();
    assert!(
        loaded.history.is_some(),
        "loaded and parity-checked as a history model"
    );
    assert_eq!(report.epochs.len(), 4);
    let card: ModelCard =
        serde_json::from_slice(&std::fs::read(dir.path().join("history.card.json")).unwrap())
            .unwrap();
    assert_eq!(card.history.as_ref().unwrap().max_len, 10);
    assert!(card.checks.iter().all(|c| c.history.is_some()));
    let model = Arc::new(loaded);
    let (_state_dir, mut engine) = engine_serving(&model, &catalog);
    let user = "history-viewer";
    let movies: Vec<u32> = catalog.movies().map(|m| m.id).take(6).collect();
    let result = engine
        .process(vec![event(user, movies[0], 0, EventType::Complete)])
        .unwrap();
    let first = result.outputs[0].1.recommendations.clone();
    assert_eq!(first.model.as_ref().unwrap().name, "ncf");
    assert!(first.items.iter().any(|i| i.signals.ncf.is_some()));
    assert!(
        first
            .items
            .iter()
            .any(|i| i.sources.contains(&Source::Model)),
        "the model proposes candidates of its own"
    );
    let stored = engine.store_handle().user(0, user).unwrap().unwrap();
    assert!(stored.latent.is_empty(), "no per-user vector is stored");
    // The vector is the encoded history: the graph with the history as its
    // inputs scores what the engine's serving form scores.
    let history = model.history_of(&stored);
    assert_eq!(history.len(), 1);
    let encoder = model.history.as_ref().unwrap();
    let items: Vec<i64> = (0..model.weights.n_items as i64).collect();
    let served = model
        .score_user(&model.user_vector(user, &stored), &items)
        .unwrap();
    let graph = recstream::ncf::serve::run_history_plan(
        &model_plan(&dir.path().join("history.onnx")),
        encoder,
        &vec![0.0; model.user_dim()],
        &history,
        &items,
    )
    .unwrap();
    for (a, b) in served.iter().zip(&graph) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }

    // More events: the next list reflects them with no gradient step.
    let records: Vec<Record> = movies[1..4]
        .iter()
        .enumerate()
        .map(|(k, m)| event(user, *m, k + 1, EventType::Complete))
        .collect();
    engine.process(records).unwrap();
    let stored = engine.store_handle().user(0, user).unwrap().unwrap();
    assert_eq!(model.history_of(&stored).len(), 4);
    let after = engine.peek(0, user).unwrap().recommendations;
    let signals = |r: &recstream::output::Recommendations| -> Vec<(u32, Option<f64>)> {
        r.items
            .iter()
            .map(|i| (i.movie_id, i.signals.ncf))
            .collect()
    };
    assert_ne!(
        signals(&first),
        signals(&after),
        "every event moves the model's scores"
    );
    assert!(stored.latent.is_empty());
}

/// An engine over a fresh RocksDB directory (kept alive by the returned
/// guard) serving `model` as its one variant.
fn engine_serving(model: &Arc<NcfModel>, catalog: &Catalog) -> (tempfile::TempDir, Engine) {
    let state_dir = tempfile::tempdir().unwrap();
    let mut engine = Engine::new(
        EngineConfig::default(),
        Store::open(state_dir.path(), 8).unwrap(),
        catalog.clone(),
    )
    .unwrap();
    engine.set_scorer(Some(Arc::new(NcfScorer {
        model: model.clone(),
    })));
    (state_dir, engine)
}

fn model_plan(onnx_path: &Path) -> recstream::ncf::serve::Plan {
    recstream::ncf::serve::compile(&std::fs::read(onnx_path).unwrap()).unwrap()
}
