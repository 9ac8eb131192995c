//! Zombie fencing under `exactly_once`, against the real Apache Kafka broker:
//! an instance is frozen (SIGSTOP) mid-stream, a copy of it (its state
//! directory, so the same transactional id and `kafka.instance_id`) takes
//! over, and the frozen one is woken up. The old one must stop writing and
//! say so; the new one ends with the clean replay's state, and a
//! `read_committed` reader sees every user's versions once, in order, with
//! no gap.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::verifier::{self, INTERACTIONS};
use common::*;

const EVENTS: usize = 8_000;
const USERS: u64 = 200;

const STREAM: verifier::StreamSpec = verifier::StreamSpec {
    seed: 0xfe1c_ed00,
    prefix: "f",
    users: USERS,
    events: EVENTS,
    kinds: &["play", "complete", "like", "dislike", "rate", "click"],
    redeliver: false,
};

fn signal(engine: &EngineProcess, sig: &str) {
    let pid = engine.child.id().to_string();
    assert!(Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap()
        .success());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else if entry.file_name() != "LOCK" {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_is_fenced_and_stops_writing() {
    let root = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let brokers = broker.bootstrap();
    let catalog = synthetic_catalog(root.path(), &["Comedy", "Drama", "Sci-Fi", "Horror"], 15);
    let (old_dir, new_dir) = (root.path().join("old"), root.path().join("new"));
    std::fs::create_dir_all(&old_dir).unwrap();
    std::fs::create_dir_all(&new_dir).unwrap();
    let old_port = free_port();
    let old_config = write_config(&old_dir, &brokers, &catalog, old_port, "fence", true);
    set_guarantee(&old_config, "exactly_once");
    recstream(&["topics", "apply", "--config", old_config.to_str().unwrap()]);

    let records = verifier::stream(&STREAM, 60);
    let mut producer =
        python_produce_in_background(&brokers, INTERACTIONS, &records, 1_000, root.path());
    let mut old = EngineProcess::spawn(&old_config, old_dir.join("engine.log"));
    await_ready(old_port, || old.log_text());
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Frozen mid-stream: it may hold an open transaction.
    signal(&old, "-STOP");
    copy_dir(&old_dir.join("state"), &new_dir.join("state"));
    let new_port = free_port();
    let new_config = write_config(&new_dir, &brokers, &catalog, new_port, "fence", true);
    set_guarantee(&new_config, "exactly_once");
    let new = EngineProcess::spawn(&new_config, new_dir.join("engine.log"));
    await_ready(new_port, || new.log_text());
    tokio::time::sleep(Duration::from_secs(2)).await;

    signal(&old, "-CONT");
    let deadline = Instant::now() + Duration::from_secs(90);
    let old_status = loop {
        if let Some(status) = old.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the fenced instance kept running\n{}",
            old.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let old_log = old.log_text();
    assert!(
        !old_status.success(),
        "a fenced instance exits with an error"
    );
    assert!(
        old_log.contains("fenced"),
        "the fenced instance says so:\n{old_log}"
    );

    assert!(producer.wait().unwrap().success(), "producer failed");
    let expected = verifier::expected(&brokers, &catalog, &root.path().join("verifier"));
    verifier::await_final_versions(&brokers, &expected, || {
        format!("{}\n{}", new.log_text(), engine_progress(new_port))
    })
    .await;
    let status = new.terminate();
    assert!(status.success(), "engine exit {status:?}");
    let applied = verifier::assert_state_equal(&new_dir.join("state"), &expected);
    assert_eq!(applied, EVENTS as u64, "every event applied exactly once");
    let check = verifier::assert_outputs(&brokers, &expected, "exactly_once");
    let reason = old_log
        .lines()
        .find(|l| l.contains("fenced"))
        .unwrap_or_default()
        .to_string();
    println!(
        "fencing test: the frozen instance stopped ({old_status}) with {reason:?}; its copy applied {applied} events once; read_committed output {check:?}"
    );
    drop(old);
}
