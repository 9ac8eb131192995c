//! Crash recovery against the real Apache Kafka broker, in both guarantee
//! modes: while the Python client streams events, the engine process is
//! killed with SIGKILL several times and restarted. Afterwards every user's
//! state in RocksDB must equal, bit for bit, the state a clean single-process
//! replay of the same input computes, and every user's latest published
//! recommendation must carry the final version. Under `exactly_once` a
//! `read_committed` reader of the output topic sees each user's versions
//! exactly once, in order, with no gap.

mod common;

use std::time::Duration;

use common::verifier::{self, INTERACTIONS};
use common::*;
const EVENTS: usize = 12_000;
const USERS: u64 = 300;

const STREAM: verifier::StreamSpec = verifier::StreamSpec {
    seed: 0x2545_f491,
    prefix: "u",
    users: USERS,
    events: EVENTS,
    kinds: &[
        "play", "complete", "like", "dislike", "rate", "click", "view", "skip", "progress",
    ],
    redeliver: true,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_state_survives_repeated_kill_9() {
    survives_repeated_kill_9("at_least_once").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_outputs_survive_repeated_kill_9() {
    survives_repeated_kill_9("exactly_once").await;
}

async fn survives_repeated_kill_9(guarantee: &str) {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let brokers = broker.bootstrap();
    let catalog = synthetic_catalog(dir.path(), &["Comedy", "Drama", "Sci-Fi", "Horror"], 15);
    let http_port = free_port();
    let group = format!("crash-{guarantee}");
    let config = write_config(dir.path(), &brokers, &catalog, http_port, &group, true);
    set_guarantee(&config, guarantee);
    recstream(&["topics", "apply", "--config", config.to_str().unwrap()]);
    let log = dir.path().join("engine.log");

    let records = verifier::stream(&STREAM, 60);
    let mut producer =
        python_produce_in_background(&brokers, INTERACTIONS, &records, 2_000, dir.path());
    let mut engine = EngineProcess::spawn(&config, log.clone());
    let mut crashes = 0;
    let mut rng = recstream::rng::Rng::new(0x9e37_79b9);
    // Kill at pseudo-random points while the producer streams.
    while producer.try_wait().unwrap().is_none() || crashes < 3 {
        tokio::time::sleep(Duration::from_millis(700 + rng.next_u64() % 1500)).await;
        engine.kill9();
        crashes += 1;
        engine = EngineProcess::spawn(&config, log.clone());
        if crashes >= 8 {
            break;
        }
    }
    assert!(producer.wait().unwrap().success(), "producer failed");

    let expected = verifier::expected(&brokers, &catalog, &dir.path().join("verifier"));
    verifier::await_final_versions(&brokers, &expected, || {
        format!("{}\n{}", engine.log_text(), engine_progress(http_port))
    })
    .await;
    let status = engine.terminate();
    assert!(status.success(), "engine exit {status:?}");
    let applied = verifier::assert_state_equal(&dir.path().join("state"), &expected);
    let (produced, users) = (expected.records, expected.users.len());
    assert_eq!(produced, records.len());
    assert_eq!(applied, EVENTS as u64, "every event applied exactly once");
    let check = verifier::assert_outputs(&brokers, &expected, guarantee);
    println!(
        "crash test ({guarantee}): {crashes} SIGKILLs, {produced} records ({} duplicates), {applied} events applied once, {users} users identical; read_committed output: {} records, {} repeated versions, {} gaps, {} out of order",
        produced - EVENTS,
        check.records,
        check.repeated,
        check.gaps,
        check.reordered
    );
}
