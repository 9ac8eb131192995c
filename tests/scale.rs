//! Scale-out against the real Apache Kafka broker, in both guarantee modes:
//! while the Python client streams events, the consumer group grows from one
//! engine instance to three and shrinks back to one. Partitions move twice; each move hands state over
//! through the changelog topic. Afterwards the remaining instance's state
//! (users and per-partition item counters) equals a clean single-process
//! replay bit for bit, and every user's latest recommendation record carries
//! the replay's final version.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::verifier::{self, INTERACTIONS};
use common::*;

const EVENTS: usize = 12_000;
const USERS: u64 = 400;

const STREAM: verifier::StreamSpec = verifier::StreamSpec {
    seed: 0x51ed_270b,
    prefix: "s",
    users: USERS,
    events: EVENTS,
    kinds: &[
        "play", "complete", "like", "dislike", "rate", "click", "view",
    ],
    redeliver: true,
};

/// One instance's own directory, config and HTTP port; all share the consumer group.
fn instance(
    root: &Path,
    name: &str,
    brokers: &str,
    catalog: &Path,
    guarantee: &str,
) -> (PathBuf, u16) {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let group = format!("scale-{guarantee}");
    let config = write_config(&dir, brokers, catalog, port, &group, false);
    set_guarantee(&config, guarantee);
    (config, port)
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_one_to_three_to_one_instances_keep_state_exact() {
    one_to_three_to_one("at_least_once").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_one_to_three_to_one_instances_keep_outputs_exact() {
    one_to_three_to_one("exactly_once").await;
}

async fn one_to_three_to_one(guarantee: &str) {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let brokers = broker.bootstrap();
    let catalog = synthetic_catalog(dir.path(), &["Comedy", "Drama", "Sci-Fi", "Horror"], 15);
    let instances: Vec<(PathBuf, u16)> = ["i0", "i1", "i2"]
        .iter()
        .map(|n| instance(dir.path(), n, &brokers, &catalog, guarantee))
        .collect();
    recstream(&[
        "topics",
        "apply",
        "--config",
        instances[0].0.to_str().unwrap(),
    ]);
    let log = |i: usize| dir.path().join(format!("i{i}/engine.log"));

    let records = verifier::stream(&STREAM, 60);
    let started = Instant::now();
    let mut producer =
        python_produce_in_background(&brokers, INTERACTIONS, &records, 1_500, dir.path());
    let first = EngineProcess::spawn(&instances[0].0, log(0));
    await_log(&first, "partitions assigned", Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 1 -> 3: both newcomers must get partitions (and restore their state).
    let second = EngineProcess::spawn(&instances[1].0, log(1));
    let third = EngineProcess::spawn(&instances[2].0, log(2));
    for newcomer in [&second, &third] {
        await_log(
            newcomer,
            "restored partition state",
            Duration::from_secs(90),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 3 -> 1: graceful leaves; the first instance takes every partition back.
    for leaving in [second, third] {
        let status = leaving.terminate();
        assert!(status.success(), "instance exit {status:?}");
    }
    assert!(producer.wait().unwrap().success(), "producer failed");
    let streamed = started.elapsed();

    let expected = verifier::expected(&brokers, &catalog, &dir.path().join("verifier"));
    verifier::await_final_versions(&brokers, &expected, || {
        format!("{}\n{}", first.log_text(), engine_progress(instances[0].1))
    })
    .await;
    let status = first.terminate();
    assert!(status.success(), "engine exit {status:?}");
    let applied = verifier::assert_state_equal(&dir.path().join("i0/state"), &expected);
    assert_eq!(applied, EVENTS as u64, "every event applied exactly once");
    let check = verifier::assert_outputs(&brokers, &expected, guarantee);

    let logs: Vec<String> = (0..3)
        .map(|i| std::fs::read_to_string(log(i)).unwrap_or_default())
        .collect();
    let total = |needle: &str| logs.iter().map(|l| count(l, needle)).sum::<usize>();
    let restores = total("restored partition state");
    assert!(
        count(&logs[0], "restored partition state") >= 1,
        "the first instance restored the partitions it got back"
    );
    println!(
        "scale test ({guarantee}): 1 -> 3 -> 1 instances in {:.1} s while {} records streamed; {} assignments, {} partition restores, {} kept, {} dropped; {} users and every partition's item counters identical, {} events applied once; read_committed output: {check:?}",
        streamed.as_secs_f64(),
        expected.records,
        total("partitions assigned"),
        restores,
        total("kept local partition state"),
        total("dropped the state of a partition"),
        expected.users.len(),
        applied
    );
}
