//! Broker outage against the real Apache Kafka broker with its log on
//! storage: while the Python client streams events, the broker is stopped for a
//! few seconds and started again with its data. The engine must ride out the
//! outage, report it, resume where it stopped, and end with exactly the state
//! a clean replay computes.

mod common;

use std::time::{Duration, Instant};

use common::verifier::{self, INTERACTIONS};
use common::*;

const EVENTS: usize = 8_000;
const USERS: u64 = 250;

const STREAM: verifier::StreamSpec = verifier::StreamSpec {
    seed: 0x0b5e_55ed,
    prefix: "b",
    users: USERS,
    events: EVENTS,
    kinds: &["play", "complete", "like", "dislike", "rate", "click"],
    redeliver: false,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_rides_out_a_broker_restart() {
    rides_out_a_broker_restart("at_least_once").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_rides_out_a_broker_restart() {
    rides_out_a_broker_restart("exactly_once").await;
}

async fn rides_out_a_broker_restart(guarantee: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start_in(dir.path());
    let brokers = broker.bootstrap();
    let catalog = synthetic_catalog(dir.path(), &["Comedy", "Drama", "Sci-Fi", "Horror"], 15);
    let http_port = free_port();
    let group = format!("restart-{guarantee}");
    let config = write_config(dir.path(), &brokers, &catalog, http_port, &group, false);
    set_guarantee(&config, guarantee);
    recstream(&["topics", "apply", "--config", config.to_str().unwrap()]);
    let log = dir.path().join("engine.log");

    let records = verifier::stream(&STREAM, 60);
    let mut producer =
        python_produce_in_background(&brokers, INTERACTIONS, &records, 1_000, dir.path());
    let engine = EngineProcess::spawn(&config, log.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;

    broker.stop();
    let outage = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    broker.restart();
    let down_for = outage.elapsed();

    assert!(producer.wait().unwrap().success(), "producer failed");
    let expected = verifier::expected(&brokers, &catalog, &dir.path().join("verifier"));
    // Retries across the outage may store a record twice (the producer is
    // at-least-once); the engine applies each event id once.
    assert!(
        expected.records >= EVENTS,
        "the broker lost records: {} of {EVENTS}",
        expected.records
    );
    verifier::await_final_versions(&brokers, &expected, || {
        format!("{}\n{}", engine.log_text(), engine_progress(http_port))
    })
    .await;
    let text = engine.log_text();
    let status = engine.terminate();
    assert!(status.success(), "engine exit {status:?}");
    let applied = verifier::assert_state_equal(&dir.path().join("state"), &expected);
    assert_eq!(applied, EVENTS as u64, "every event applied exactly once");
    let check = verifier::assert_outputs(&brokers, &expected, guarantee);
    // The engine's own line, or librdkafka's from a client created while the
    // job restarted during the outage.
    assert!(
        text.contains("all brokers are down") || text.contains("AllBrokersDown"),
        "the outage is reported in the log:\n{}",
        text.lines()
            .filter(|l| l.contains("rokers") || l.contains("WARN"))
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
    println!(
        "broker restart test ({guarantee}), read_committed output {check:?}: broker down {:.1} s mid-stream; {} records in the topic, {} events applied once, {} users identical; {} assignments",
        down_for.as_secs_f64(),
        expected.records,
        applied,
        expected.users.len(),
        text.matches("partitions assigned").count()
    );
}
