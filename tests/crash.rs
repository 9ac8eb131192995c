//! Crash recovery against the real tansu broker: while the Python client streams
//! events, the engine process is killed with SIGKILL several times and
//! restarted. Afterwards every user's state in RocksDB must equal, bit for bit,
//! the state a clean single-process replay of the same input computes, and
//! every user's latest published recommendation must carry the final version.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use recstream::config::EngineConfig;
use recstream::engine::{Engine, SourcePos};
use recstream::state::UserState;
use recstream::store::Store;
use serde_json::{json, Value};

const INTERACTIONS: &str = "reco.interactions.v1";
const EVENTS: usize = 12_000;
const USERS: u64 = 300;

/// A deterministic stream with a realistic mix and some redelivered duplicates.
fn stream(movies: u64) -> Vec<Value> {
    let mut rng = recstream::rng::Rng::new(0x2545_f491);
    let mut next = move || rng.next_u64();
    let kinds = [
        "play", "complete", "like", "dislike", "rate", "click", "view", "skip", "progress",
    ];
    let mut out = Vec::with_capacity(EVENTS);
    let t0 = 1_767_225_600_000i64;
    for i in 0..EVENTS {
        let user = format!("u{}", next() % USERS);
        let kind = kinds[(next() % kinds.len() as u64) as usize];
        let mut e = json!({
            "event_id": format!("e{i}"), "user_id": user, "movie_id": 1 + next() % movies,
            "type": kind, "ts": t0 + i as i64 * 1000
        });
        match kind {
            "rate" => e["value"] = json!(1 + next() % 5),
            "progress" => e["value"] = json!(0.5),
            _ => {}
        }
        // Every 50th event is produced twice (a producer retry).
        let record = json!({"key": user, "value": e});
        if i % 50 == 0 {
            out.push(record.clone());
        }
        out.push(record);
    }
    out
}

/// Input records per partition: (offset, key, payload).
type Input = BTreeMap<i32, Vec<(i64, Option<Vec<u8>>, Vec<u8>)>>;

/// Reads every record of the input topic back, partition by partition. tansu's
/// high watermarks can trail a just-finished producer, so read until they stop moving.
fn read_input(brokers: &str) -> Input {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "crash-verifier")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(INTERACTIONS), Duration::from_secs(10))
        .unwrap();
    let partitions: Vec<i32> = metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| p.id())
        .collect();
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition_offset(INTERACTIONS, *p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out: Input = BTreeMap::new();
    let next = |out: &Input, p: i32| out.get(&p).and_then(|r| r.last()).map_or(0, |r| r.0 + 1);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let highs: Vec<(i32, i64)> = partitions
            .iter()
            .map(|p| {
                (
                    *p,
                    consumer
                        .fetch_watermarks(INTERACTIONS, *p, Duration::from_secs(10))
                        .unwrap()
                        .1,
                )
            })
            .collect();
        if highs.iter().all(|(p, high)| next(&out, *p) >= *high) {
            std::thread::sleep(Duration::from_millis(500));
            let again: Vec<i64> = partitions
                .iter()
                .map(|p| {
                    consumer
                        .fetch_watermarks(INTERACTIONS, *p, Duration::from_secs(10))
                        .unwrap()
                        .1
                })
                .collect();
            if highs.iter().zip(&again).all(|((_, a), b)| a == b) {
                return out;
            }
            continue;
        }
        assert!(
            Instant::now() < deadline,
            "could not read the input back: {:?}",
            highs
                .iter()
                .map(|(p, h)| (*p, next(&out, *p), *h, out.get(p).map_or(0, Vec::len)))
                .collect::<Vec<_>>()
        );
        // Drain whatever is available before asking for watermarks again.
        while let Some(Ok(m)) = consumer.poll(Duration::from_millis(300)) {
            out.entry(m.partition()).or_default().push((
                m.offset(),
                m.key().map(<[u8]>::to_vec),
                m.payload().unwrap_or_default().to_vec(),
            ));
        }
    }
}

/// The verifier: a clean in-process replay through the engine's own code.
fn replay(
    input: &Input,
    catalog: &std::path::Path,
    dir: &std::path::Path,
) -> BTreeMap<(u32, String), UserState> {
    let store = Store::open(dir, 8).unwrap();
    let mut engine = Engine::new(
        EngineConfig::default(),
        store,
        recstream::catalog::load(catalog).unwrap(),
    )
    .unwrap();
    let topic: Arc<str> = Arc::from(INTERACTIONS);
    for (partition, records) in input {
        for chunk in records.chunks(97) {
            let batch = chunk
                .iter()
                .map(|(offset, key, payload)| {
                    let source = SourcePos {
                        topic: topic.clone(),
                        partition: *partition,
                        offset: *offset,
                    };
                    recstream::pipeline::decode(source, key.as_deref(), payload, false, 16 * 1024)
                })
                .collect();
            engine.process(batch).unwrap();
        }
    }
    users(engine.store())
}

fn users(store: &Store) -> BTreeMap<(u32, String), UserState> {
    let mut out = BTreeMap::new();
    for p in store.user_partitions().unwrap() {
        for (user, state) in store.users_page(p, None, usize::MAX).unwrap() {
            out.insert((p, user), state);
        }
    }
    out
}

/// Waits until every user's latest recommendation carries the version a clean
/// replay computes, stops the engine, and compares every user's state with the
/// replay's bit for bit. Returns (records read back, events applied, users).
async fn verify_against_replay(
    brokers: &str,
    catalog: &std::path::Path,
    dir: &std::path::Path,
    engine: EngineProcess,
) -> (usize, u64, usize) {
    let input = read_input(brokers);
    let produced: usize = input.values().map(Vec::len).sum();
    let expected = replay(&input, catalog, &dir.join("verifier"));

    let consumer: rdkafka::consumer::StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "crash-reader")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    consumer.subscribe(&["reco.recommendations.v1"]).unwrap();
    let want: HashMap<String, u64> = expected
        .iter()
        .map(|((_, u), s)| (u.clone(), s.version))
        .collect();
    let mut latest: HashMap<String, u64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while want.iter().any(|(u, v)| latest.get(u) != Some(v)) {
        let missing: Vec<_> = want
            .iter()
            .filter(|(u, v)| latest.get(*u) != Some(v))
            .collect();
        assert!(
            Instant::now() < deadline,
            "final versions missing for {} users, e.g. {:?}\n{}",
            missing.len(),
            missing
                .iter()
                .take(3)
                .map(|(u, v)| (u, v, latest.get(*u)))
                .collect::<Vec<_>>(),
            engine.log_text()
        );
        let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(2), consumer.recv()).await else {
            continue;
        };
        let v: Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        let user = v["user_id"].as_str().unwrap().to_string();
        let version = v["version"].as_u64().unwrap();
        let entry = latest.entry(user).or_insert(0);
        *entry = (*entry).max(version);
    }
    let status = engine.terminate();
    assert!(status.success(), "engine exit {status:?}");

    let actual = users(&Store::open(&dir.join("state"), 8).unwrap());
    assert_eq!(actual.len(), expected.len(), "same users");
    for (key, want) in &expected {
        let got = actual.get(key).unwrap_or_else(|| panic!("{key:?} missing"));
        assert_eq!(got, want, "state of {key:?} differs from the clean replay");
    }
    let applied: u64 = actual.values().map(|s| s.events_total()).sum();
    (produced, applied, actual.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_repeated_kill_9_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start_memory();
    let brokers = broker.bootstrap();
    let catalog = synthetic_catalog(dir.path(), &["Comedy", "Drama", "Sci-Fi", "Horror"], 15);
    let http_port = free_port();
    let config = write_config(
        dir.path(),
        &brokers,
        &catalog,
        http_port,
        "crash-engine",
        true,
    );
    recstream(&["topics", "apply", "--config", config.to_str().unwrap()]);
    let log = dir.path().join("engine.log");

    let records = stream(60);
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

    let (produced, applied, users) =
        verify_against_replay(&brokers, &catalog, dir.path(), engine).await;
    assert_eq!(produced, records.len());
    println!(
        "crash test: {crashes} SIGKILLs, {produced} records ({} duplicates), {applied} events applied once, {users} users identical",
        produced - EVENTS
    );
    assert_eq!(applied, EVENTS as u64, "every event applied exactly once");
}
