//! Crash recovery against the real Apache Kafka broker, in both guarantee
//! modes: while the Python client streams events, the engine process is
//! killed with SIGKILL several times and restarted. Afterwards every user's
//! state in RocksDB must equal, bit for bit, the state a clean single-process
//! replay of the same input computes, and every user's latest published
//! recommendation must carry the final version. Under `exactly_once` a
//! `read_committed` reader of the output topic sees each user's versions
//! exactly once, in order, with no gap. A third run starts the engine on a
//! backlog of thousands of users, so that its batches are big enough to send
//! their outputs in chunks before they end, and kills it while it catches up.

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

/// Thousands of users: a batch of the backlog recomputes more users than a
/// chunk holds (1,000), so its outputs leave in several sends.
const BACKLOG: verifier::StreamSpec = verifier::StreamSpec {
    seed: 0x51f1_5eed,
    prefix: "b",
    users: 4_000,
    events: 16_000,
    ..STREAM
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_state_survives_repeated_kill_9() {
    survives_repeated_kill_9("at_least_once", &STREAM, Input::Streamed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_outputs_survive_repeated_kill_9() {
    survives_repeated_kill_9("exactly_once", &STREAM, Input::Streamed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_chunked_outputs_survive_kill_9_while_catching_up() {
    let chunks = survives_repeated_kill_9("exactly_once", &BACKLOG, Input::Backlog).await;
    assert!(
        chunks > 0,
        "no batch sent its outputs in chunks: the test no longer covers them"
    );
}

#[derive(PartialEq)]
enum Input {
    /// Produced while the engine runs and is killed.
    Streamed,
    /// Produced whole before the engine first starts.
    Backlog,
}

/// Returns how many output chunks the engine's incarnations reported.
async fn survives_repeated_kill_9(
    guarantee: &str,
    spec: &verifier::StreamSpec,
    input: Input,
) -> u64 {
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

    let records = verifier::stream(spec, 60);
    let rate = if input == Input::Backlog { 0 } else { 2_000 };
    let mut producer =
        python_produce_in_background(&brokers, INTERACTIONS, &records, rate, dir.path());
    if input == Input::Backlog {
        assert!(producer.wait().unwrap().success(), "producer failed");
    }
    let mut engine = EngineProcess::spawn(&config, log.clone());
    let mut crashes = 0;
    let mut chunks = 0;
    let mut rng = recstream::rng::Rng::new(0x9e37_79b9);
    // Kill at pseudo-random points while the producer streams.
    while producer.try_wait().unwrap().is_none() || crashes < 3 {
        tokio::time::sleep(Duration::from_millis(700 + rng.next_u64() % 1500)).await;
        chunks += output_chunks(http_port);
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
    chunks += output_chunks(http_port);
    let status = engine.terminate();
    assert!(status.success(), "engine exit {status:?}");
    let applied = verifier::assert_state_equal(&dir.path().join("state"), &expected);
    let (produced, users) = (expected.records, expected.users.len());
    assert_eq!(produced, records.len());
    assert_eq!(
        applied, spec.events as u64,
        "every event applied exactly once"
    );
    let check = verifier::assert_outputs(&brokers, &expected, guarantee);
    println!(
        "crash test ({guarantee}): {crashes} SIGKILLs, {produced} records ({} duplicates), {applied} events applied once, {users} users identical, {chunks} output chunks; read_committed output: {} records, {} repeated versions, {} gaps, {} out of order",
        produced - spec.events,
        check.records,
        check.repeated,
        check.gaps,
        check.reordered
    );
    chunks
}

/// `recstream_output_chunks_total` of the running engine (0 while it starts).
fn output_chunks(http_port: u16) -> u64 {
    try_metric(http_port, "recstream_output_chunks_total").map_or(0, |v| v as u64)
}
