//! The retraining loop against the real Apache Kafka broker, every step a separate
//! process: interactions produced to the topic are archived as Parquet by
//! event day (a second archive run adds nothing: no duplicates across
//! restarts), a tiny model is trained from the archive and exported, and the
//! running engine hot-reloads it; its outputs then carry the new model version.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const USERS: usize = 30;

fn events(tag: &str, per_user: usize, ts0: i64) -> Vec<Value> {
    let mut out = Vec::new();
    for u in 0..USERS {
        for k in 0..per_user {
            // Two taste groups over the demo catalog's ids; days apart.
            let movie = 1 + ((u % 2) * 20 + (u + 3 * k) % 20) as u64;
            let (kind, value) = match k % 3 {
                0 => ("rate", Some(4.5)),
                1 => ("play", Some(300.0)),
                _ => ("like", None),
            };
            let mut v = json!({
                "event_id": format!("{tag}-{u}-{k}"), "user_id": format!("x{u}"),
                "movie_id": movie, "type": kind,
                "ts": ts0 + (k as i64) * 86_400_000 + u as i64 * 1000
            });
            if let Some(x) = value {
                v["value"] = json!(x);
            }
            out.push(json!({"key": format!("x{u}"), "value": v}));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactions_are_archived_trained_on_and_served() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let brokers = broker.bootstrap();
    let catalog = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/demo/catalog.csv");
    let demo_model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo/ncf-demo.onnx");
    std::fs::create_dir_all(dir.path().join("served")).unwrap();
    let served = dir.path().join("served/model.onnx");
    install_model(&demo_model, &served);

    let http_port = free_port();
    let config = write_config(dir.path(), &brokers, &catalog, http_port, "loop", false);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[model]\npath = \"{}\"\n\n[experiment]\nreload_interval_ms = 200\n",
        served.display()
    ));
    std::fs::write(&config, text).unwrap();
    let config_arg = config.to_str().unwrap();
    recstream(&["topics", "apply", "--config", config_arg]);
    let engine = EngineProcess::spawn(&config, dir.path().join("engine.log"));
    let latest = follow_recommendations(&brokers);
    let log = || format!("{}\n{}", engine.log_text(), engine_progress(http_port));

    // 1. Interactions over three event days, plus one invalid record.
    let produced = events("a", 3, 1_767_225_600_000);
    python_produce(&brokers, "reco.interactions.v1", &produced, dir.path());
    python_produce(
        &brokers,
        "reco.interactions.v1",
        &[json!({"key": "x0", "value": {"user_id": "x0"}})],
        dir.path(),
    );

    // 2. Archive them: one folder per event day, every valid event once.
    let archive = dir.path().join("archive");
    let archive_arg = archive.to_str().unwrap();
    let run_archive = |group: &str| -> Value {
        let out = recstream(&[
            "archive",
            "--config",
            config_arg,
            "--out",
            archive_arg,
            "--group",
            group,
            "--flush-ms",
            "300",
            "--exit-when-idle-ms",
            "3000",
        ]);
        serde_json::from_str(out.lines().last().unwrap()).unwrap()
    };
    let first = run_archive("recstream-archive");
    assert_eq!(first["archived"], produced.len(), "{first}");
    assert_eq!(first["skipped_invalid"], 1, "{first}");
    let days: Vec<String> = std::fs::read_dir(&archive)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(days.len(), 3, "one folder per event day: {days:?}");
    assert!(
        days.iter().all(|d| d.starts_with("day=2026-01-0")),
        "{days:?}"
    );
    let rows = recstream::archive::load(&archive).unwrap();
    assert_eq!(rows.len(), produced.len());

    // A restarted archiver (a new group member from the committed offsets,
    // then from scratch under another group) archives nothing twice.
    let again = run_archive("recstream-archive");
    assert_eq!(again["archived"], 0, "{again}");
    let fresh = run_archive("fresh");
    assert_eq!(fresh["archived"], 0, "{fresh}");
    assert_eq!(fresh["skipped_already_archived"], produced.len(), "{fresh}");
    assert_eq!(
        recstream::archive::load(&archive).unwrap().len(),
        produced.len()
    );

    // 3. Train a tiny model from the archive and export it.
    let trained = dir.path().join("trained/model");
    recstream(&[
        "train",
        "--data",
        archive_arg,
        "--objective",
        "implicit",
        "--epochs",
        "2",
        "--gmf-dim",
        "4",
        "--mlp-dim",
        "4",
        "--hidden",
        "8,4",
        "--quiet",
        "--out",
        trained.to_str().unwrap(),
    ]);
    let new_version = model_version(&trained.with_extension("onnx"));
    assert_ne!(new_version, model_version(&demo_model));

    // 4. The engine reloads it (checked against its card) and serves it.
    install_model(&trained.with_extension("onnx"), &served);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !engine.log_text().contains(&new_version) {
        assert!(Instant::now() < deadline, "model not reloaded\n{}", log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    python_produce(
        &brokers,
        "reco.interactions.v1",
        &events("b", 1, 1_767_225_600_000 + 5 * 86_400_000),
        dir.path(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let served_new = {
            let map = latest.lock().unwrap();
            (0..USERS)
                .filter(|u| {
                    map.get(&format!("x{u}"))
                        .is_some_and(|v| v["model"]["version"] == new_version.as_str())
                })
                .count()
        };
        if served_new == USERS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{served_new}/{USERS} users served by {new_version}\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    engine.terminate();
}
