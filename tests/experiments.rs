//! A/B variants and model hot-reload against the real Apache Kafka broker: users are
//! split between two variants by hash and every output record says which; the
//! shares change without a restart; a new model file is loaded, checked
//! against its card and swapped in while events flow; a broken one is
//! rejected (log line and metric) and the old model keeps serving; clicks on
//! published items show up in the feedback metrics.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use recstream::config::BlendWeights;
use recstream::experiment::{ExperimentSource, ModelCache};
use recstream::ncf::card::ModelFiles;
use recstream::ncf::foldin::FoldInConfig;
use recstream::ncf::synthetic;
use serde_json::{json, Value};

const USERS: usize = 40;

fn demo_catalog_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/demo/catalog.csv")
}

fn write_experiment(path: &Path, control: f64) {
    write_experiment_ranked(path, control, None);
}

/// With `ranker`, the `ncf` variant ranks with that learned blend file.
fn write_experiment_ranked(path: &Path, control: f64, ranker: Option<&str>) {
    let ranker = ranker.map_or(String::new(), |r| format!("ranker = \"{r}\"\n"));
    let text = format!(
        "salt = \"exp-test\"\n\
         [[variants]]\nname = \"control\"\nshare = {control}\nmodel = \"none\"\n\
         [[variants]]\nname = \"ncf\"\nshare = {}\nmodel = \"served/model.onnx\"\n{ranker}\
         [variants.blend]\nncf = 0.6\n",
        1.0 - control
    );
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Waits until every user's latest record satisfies `ok`.
async fn await_users(
    latest: &Mutex<HashMap<String, Value>>,
    what: &str,
    ok: impl Fn(&str, &Value) -> bool,
    log: impl Fn() -> String,
) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let bad: Vec<String> = {
            let map = latest.lock().unwrap();
            (0..USERS)
                .map(|u| format!("x{u}"))
                .filter(|u| !map.get(u).is_some_and(|v| ok(u, v)))
                .collect()
        };
        if bad.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {} users not there yet, e.g. {:?}\n{}\n{what}",
            bad.len(),
            latest.lock().unwrap().get(&bad[0]),
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One event per user on the movie `movie(u)`.
fn round(tag: &str, movie: impl Fn(usize) -> u64) -> Vec<Value> {
    (0..USERS)
        .map(|u| {
            json!({"key": format!("x{u}"), "value": {
                "event_id": format!("{tag}-{u}"), "user_id": format!("x{u}"),
                "movie_id": movie(u), "type": "play", "value": 120.0,
                "ts": 1_767_225_600_000i64 + u as i64 * 1000
            }})
        })
        .collect()
}

/// Waits until the engine's metrics show `series` at `value` or more.
async fn await_metric(port: u16, series: &str, value: f64, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(port, series) < value {
        assert!(Instant::now() < deadline, "{series} < {value}\n{}", log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn metric(port: u16, series: &str) -> f64 {
    try_metric(port, series).expect("the engine's /metrics answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn variants_split_users_switch_live_and_models_reload_safely() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let brokers = broker.bootstrap();
    let demo_model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo/ncf-demo.onnx");
    std::fs::create_dir_all(dir.path().join("served")).unwrap();
    let served = dir.path().join("served/model.onnx");
    install_model(&demo_model, &served);
    let experiment = dir.path().join("experiment.toml");
    write_experiment(&experiment, 0.5);

    let http_port = free_port();
    let config = write_config(
        dir.path(),
        &brokers,
        &demo_catalog_path(),
        http_port,
        "experiments",
        false,
    );
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[experiment]\nfile = \"{}\"\nreload_interval_ms = 200\n",
        experiment.display()
    ));
    std::fs::write(&config, text).unwrap();
    recstream(&["topics", "apply", "--config", config.to_str().unwrap()]);
    let engine = EngineProcess::spawn(&config, dir.path().join("engine.log"));
    let latest = follow_recommendations(&brokers);
    let log = || format!("{}\n{}", engine.log_text(), engine_progress(http_port));

    // 1. Users split 50/50 by hash; each record names its variant, and only
    //    the NCF variant's records carry the model.
    let expected = ExperimentSource {
        file: Some(experiment.clone()),
        blend: BlendWeights::default(),
        default_model: None,
        default_ranker: None,
        fold_in: FoldInConfig::default(),
    }
    .build(&mut ModelCache::default())
    .unwrap()
    .variants;
    let demo_version = model_version(&demo_model);
    python_produce(
        &brokers,
        "reco.interactions.v1",
        &round("a", |u| 1 + (u as u64 % 60)),
        dir.path(),
    );
    let variant_ok = |u: &str, v: &Value| {
        let want = &*expected.assign(u).name;
        let model = v["model"]["version"].as_str();
        v["variant"] == want
            && match want {
                "ncf" => model == Some(demo_version.as_str()),
                _ => model.is_none(),
            }
    };
    await_users(&latest, "hash-assigned variants", variant_ok, log).await;
    let in_ncf = (0..USERS)
        .filter(|u| &*expected.assign(&format!("x{u}")).name == "ncf")
        .count();
    assert!(
        (8..=32).contains(&in_ncf),
        "a 50/50 split put {in_ncf} of {USERS} users in ncf"
    );

    // 2. Clicks on published items are credited to their list and position.
    let clicks: Vec<Value> = {
        let map = latest.lock().unwrap();
        (0..USERS)
            .map(|u| {
                let user = format!("x{u}");
                let first = map[&user]["items"][0]["movie_id"].as_u64().unwrap();
                json!({"key": user, "value": {
                    "event_id": format!("click-{u}"), "user_id": user, "movie_id": first,
                    "type": "click", "ts": 1_767_225_700_000i64 + u as i64
                }})
            })
            .collect()
    };
    python_produce(&brokers, "reco.interactions.v1", &clicks, dir.path());
    await_metric(
        http_port,
        "recstream_feedback_clicks_total{list=\"recommendations\",position=\"1\"",
        USERS as f64,
        log,
    )
    .await;
    assert!(metric(http_port, "recstream_feedback_impressions_total") >= 10.0 * USERS as f64);
    assert!(metric(http_port, "recstream_feedback_plays_total{variant=\"ncf\"}") >= 1.0);

    // 3. Shares change without a restart: everyone moves to `ncf`.
    write_experiment(&experiment, 0.0);
    await_metric(
        http_port,
        "recstream_experiment_share{variant=\"ncf\"}",
        1.0,
        log,
    )
    .await;
    python_produce(
        &brokers,
        "reco.interactions.v1",
        &round("b", |u| 2 + (u as u64 % 60)),
        dir.path(),
    );
    await_users(
        &latest,
        "everyone in ncf after the share change",
        |_, v| v["variant"] == "ncf" && v["model"]["version"] == demo_version.as_str(),
        log,
    )
    .await;

    // 4. A new model file is loaded, parity-checked and served: a
    // history-based NeuMF replaces the per-user one, and brings its own
    // candidate source.
    let trained = dir.path().join("trained/model");
    std::fs::create_dir_all(trained.parent().unwrap()).unwrap();
    let catalog = recstream::catalog::load(&demo_catalog_path()).unwrap();
    let sequence_config = recstream::ncf::sequence::SequenceConfig {
        gmf_dim: 4,
        mlp_dim: 4,
        hidden: vec![8],
        epochs: 2,
        seed: 7,
        ..Default::default()
    };
    recstream::ncf::sequence::train_and_export(
        &sequence_config,
        &synthetic::interactions(&catalog, 80, 10, 5),
        "synthetic",
        &trained,
        false,
    )
    .unwrap();
    let new_version = model_version(&trained.with_extension("onnx"));
    assert_ne!(new_version, demo_version);
    let loads_before = metric(http_port, "recstream_model_loads_total{outcome=\"loaded\"}");
    install_model(&trained.with_extension("onnx"), &served);
    let info = format!("recstream_model_info{{model_version=\"{new_version}\",variant=\"ncf\"}}");
    await_metric(http_port, &info, 1.0, log).await;
    python_produce(
        &brokers,
        "reco.interactions.v1",
        &round("c", |u| 3 + (u as u64 % 60)),
        dir.path(),
    );
    await_users(
        &latest,
        "the new model version",
        |_, v| v["model"]["version"] == new_version.as_str(),
        log,
    )
    .await;
    let model_sourced = latest.lock().unwrap().values().any(|v| {
        v["items"].as_array().is_some_and(|items| {
            items.iter().any(|i| {
                i["sources"]
                    .as_array()
                    .is_some_and(|s| s.contains(&"model".into()))
            })
        })
    });
    assert!(
        model_sourced,
        "the history model proposes candidates of its own"
    );
    assert!(metric(http_port, "recstream_model_loads_total{outcome=\"loaded\"}") > loads_before);

    // 4b. A learned blend is rolled out like a model: named in the
    // experiment file, loaded, and every list of the variant ranked by it
    // says so.
    let mut blend_weights = vec![0.0; recstream::ranker::FEATURE_COUNT];
    blend_weights[4] = 6.0; // co_watched
    blend_weights[5] = 2.0; // ncf
    blend_weights[2] = 0.5; // popularity
    let blend = recstream::ranker::learned_blend(
        "blend-test-1".into(),
        "hand-set for the test".into(),
        Some(new_version.clone()),
        blend_weights,
        recstream::ranker::FitReport::default(),
    );
    blend
        .save(&experiment.with_file_name("served/test.blend.json"))
        .unwrap();
    write_experiment_ranked(&experiment, 0.0, Some("served/test.blend.json"));
    python_produce(
        &brokers,
        "reco.interactions.v1",
        &round("c2", |u| 5 + (u as u64 % 60)),
        dir.path(),
    );
    await_users(
        &latest,
        "lists ranked by the learned blend",
        |_, v| v["blend"] == "blend-test-1" && v["model"]["version"] == new_version.as_str(),
        log,
    )
    .await;
    let ranked = latest.lock().unwrap().values().all(|v| {
        let scores: Vec<f64> = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["score"].as_f64().unwrap())
            .collect();
        // Each published score is the blend's (rounded), from its signals.
        v["items"].as_array().unwrap().iter().all(|i| {
            let sig = &i["signals"];
            let expected = 6.0 * sig["co_watched"].as_f64().unwrap()
                + 2.0 * sig["ncf"].as_f64().unwrap_or(0.0)
                + 0.5 * sig["popularity"].as_f64().unwrap();
            (i["score"].as_f64().unwrap() - expected).abs() < 1e-4
        }) && !scores.is_empty()
    });
    assert!(ranked, "scores follow the learned blend: {}", log());

    // 5. A broken model is rejected; the last good one keeps serving.
    let card = ModelFiles::new(&served).card;
    let mut tampered: Value = serde_json::from_slice(&std::fs::read(&card).unwrap()).unwrap();
    let score = tampered["checks"][0]["score"].as_f64().unwrap();
    tampered["checks"][0]["score"] = json!(score + 0.5);
    let tmp = card.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&tampered).unwrap()).unwrap();
    std::fs::rename(&tmp, &card).unwrap();
    await_metric(
        http_port,
        "recstream_model_loads_total{outcome=\"rejected\"}",
        1.0,
        log,
    )
    .await;
    assert!(
        engine.log_text().contains("parity check failed"),
        "{}",
        log()
    );
    // Every user's latest record is their round-c one by now (the wait above
    // needed the new model, which only round c saw); taken before round d is
    // produced, or a fast engine's round-d records would already be in it.
    let versions: HashMap<String, u64> = latest
        .lock()
        .unwrap()
        .iter()
        .map(|(u, v)| (u.clone(), v["version"].as_u64().unwrap()))
        .collect();
    python_produce(
        &brokers,
        "reco.interactions.v1",
        &round("d", |u| 4 + (u as u64 % 60)),
        dir.path(),
    );
    await_users(
        &latest,
        "the last good model after a rejected one",
        |u, v| {
            v["version"].as_u64() > versions.get(u).copied()
                && v["model"]["version"] == new_version.as_str()
        },
        log,
    )
    .await;
    let status = engine.terminate();
    assert!(status.success(), "engine exit {status:?}");
    println!(
        "experiments: {in_ncf} of {USERS} users hashed into ncf at 50/50; all moved after the share change; model {demo_version} -> {new_version} hot-reloaded; a learned blend rolled out and ranking every list; a tampered card rejected while the old model kept serving; {USERS} clicks credited to recommendations position 1"
    );
}
