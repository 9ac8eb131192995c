//! Global item tables against the real Apache Kafka broker, in both guarantee
//! modes: three instances in one group split the users, one of them is
//! SIGKILLed and restarted mid-stream (a crash and two rebalances). After the
//! input stops, every instance holds the item side of every partition
//! (popularity and trending counters, genre counters, co-watch lists), and
//! each is bit-equal to what a single clean in-process replay of the same
//! input computes; a newcomer's list and rows, computed from each
//! instance's state, are the replay's.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::verifier::{self, INTERACTIONS};
use common::*;
use recstream::config::EngineConfig;
use recstream::engine::Engine;
use recstream::store::Store;

const EVENTS: usize = 9_000;
const USERS: u64 = 300;

const STREAM: verifier::StreamSpec = verifier::StreamSpec {
    seed: 0x9106_a1e5,
    prefix: "g",
    users: USERS,
    events: EVENTS,
    kinds: &["play", "complete", "like", "rate", "click", "view"],
    redeliver: true,
};

fn instance(root: &Path, name: &str, brokers: &str, catalog: &Path, guarantee: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let group = format!("global-{guarantee}");
    let config = write_config(&dir, brokers, catalog, free_port(), &group, false);
    set_guarantee(&config, guarantee);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[global_items]\nflush_interval_ms = 200\n");
    std::fs::write(&config, text).unwrap();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_instances_share_item_knowledge_through_a_crash() {
    three_instances("at_least_once").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_instances_share_item_knowledge_through_a_crash() {
    three_instances("exactly_once").await;
}

async fn three_instances(guarantee: &str) {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let brokers = broker.bootstrap();
    let catalog = synthetic_catalog(dir.path(), &["Comedy", "Drama", "Sci-Fi", "Horror"], 15);
    let configs: Vec<PathBuf> = ["i0", "i1", "i2"]
        .iter()
        .map(|n| instance(dir.path(), n, &brokers, &catalog, guarantee))
        .collect();
    recstream(&["topics", "apply", "--config", configs[0].to_str().unwrap()]);
    let log = |i: usize| dir.path().join(format!("i{i}/engine.log"));

    let records = verifier::stream(&STREAM, 60);
    let mut producer =
        python_produce_in_background(&brokers, INTERACTIONS, &records, 1_500, dir.path());
    let mut engines: Vec<EngineProcess> = (0..3)
        .map(|i| EngineProcess::spawn(&configs[i], log(i)))
        .collect();
    for engine in &engines {
        await_log(
            engine,
            "following every partition's item side",
            Duration::from_secs(60),
        )
        .await;
        await_log(engine, "partitions assigned", Duration::from_secs(90)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Crash mid-stream: the group moves the victim's partitions to the
    // others when its session expires, and back when it rejoins.
    engines.pop().unwrap().kill9();
    tokio::time::sleep(Duration::from_secs(1)).await;
    engines.push(EngineProcess::spawn(&configs[2], log(2)));
    assert!(producer.wait().unwrap().success(), "producer failed");

    let expected = verifier::expected(&brokers, &catalog, &dir.path().join("verifier"));
    verifier::await_final_versions(&brokers, &expected, || {
        engines
            .iter()
            .map(EngineProcess::log_text)
            .collect::<Vec<_>>()
            .join("\n")
    })
    .await;
    // Every instance's follower has read the last batches (flush every 200 ms).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let logs: Vec<String> = engines.iter().map(EngineProcess::log_text).collect();
    for engine in engines {
        let status = engine.terminate();
        assert!(status.success(), "engine exit {status:?}");
    }

    let partitions: usize = expected.items.len();
    for i in 0..3 {
        let store = Store::open(&dir.path().join(format!("i{i}/state")), 8).unwrap();
        let items = store.items().unwrap();
        if items != expected.items {
            let differing: Vec<String> = expected
                .items
                .iter()
                .filter(|(p, want)| items.get(p) != Some(want))
                .map(|(p, want)| {
                    let got = items.get(p);
                    let example = want
                        .iter()
                        .find(|(id, m)| got.and_then(|g| g.get(id)) != Some(m))
                        .map(|(id, m)| {
                            format!(
                                "item {id}: want {m:?}, got {:?}",
                                got.and_then(|g| g.get(id))
                            )
                        });
                    format!("partition {p}: {example:?}")
                })
                .collect();
            for (k, l) in logs.iter().enumerate() {
                let _ = std::fs::write(format!("/tmp/global-items-{guarantee}-i{k}.log"), l);
            }
            panic!(
                "instance {i}: item counters differ from the clean replay in {differing:?}\n{}",
                logs[i]
            );
        }
        assert_eq!(
            store.genres().unwrap(),
            expected.genres,
            "instance {i}: genre counters of every partition"
        );
        assert_eq!(
            store.cowatch().unwrap(),
            expected.cowatch,
            "instance {i}: co-watch lists of every partition"
        );
    }
    // What a newcomer is shown (popular and trending rows, genre rows) is
    // the same on every instance and on the replay's engine.
    let newcomer = |state: PathBuf| {
        let mut engine = Engine::new(
            EngineConfig::default(),
            Store::open(&state, 8).unwrap(),
            recstream::catalog::load(&catalog).unwrap(),
        )
        .unwrap();
        let outputs = engine.peek(0, "a-newcomer").unwrap();
        (
            serde_json::to_value(&outputs.recommendations.items).unwrap(),
            serde_json::to_value(&outputs.carousels.rows).unwrap(),
        )
    };
    let replayed = newcomer(dir.path().join("verifier"));
    assert!(
        replayed.0.as_array().is_some_and(|items| !items.is_empty()),
        "a newcomer gets a list"
    );
    for i in 0..3 {
        assert_eq!(
            newcomer(dir.path().join(format!("i{i}/state"))),
            replayed,
            "instance {i}: a newcomer's list and rows"
        );
    }
    let applied: usize = logs
        .iter()
        .map(|l| l.matches("dropped the user state of a partition").count())
        .sum();
    println!(
        "global item tables ({guarantee}): 3 instances, one SIGKILLed and restarted, {} records; every instance holds the item side of all {partitions} partitions, equal to a clean replay ({} partition releases kept their item side)",
        expected.records, applied
    );
}
