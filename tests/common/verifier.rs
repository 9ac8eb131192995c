//! The verifier for the reliability tests: the expected final state is a clean
//! single-process replay of the input topic through the engine's own code;
//! engines under test must match it bit for bit.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use recstream::catalog::IdMap;
use recstream::config::EngineConfig;
use recstream::decay::Momentum;
use recstream::engine::{Engine, SourcePos};
use recstream::state::UserState;
use recstream::store::Store;
use serde_json::Value;

pub const INTERACTIONS: &str = "reco.interactions.v1";

/// Input records per partition: (offset, key, payload).
pub type Input = BTreeMap<i32, Vec<(i64, Option<Vec<u8>>, Vec<u8>)>>;

/// Reads every record of the input topic back, partition by partition. Some brokers
/// (tansu 0.6) let high watermarks trail a just-finished producer, so read until they stop moving.
pub fn read_input(brokers: &str) -> Input {
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
pub fn replay(input: &Input, catalog: &std::path::Path, dir: &std::path::Path) -> Engine {
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
    engine
}

pub fn users(store: &Store) -> BTreeMap<(u32, String), UserState> {
    let mut out = BTreeMap::new();
    for p in store.user_partitions().unwrap() {
        for (user, state) in store.users_page(p, None, usize::MAX).unwrap() {
            out.insert((p, user), state);
        }
    }
    out
}

/// What a clean replay of the input topic computes.
pub struct Expected {
    pub records: usize,
    pub users: BTreeMap<(u32, String), UserState>,
    pub items: HashMap<u32, IdMap<Momentum>>,
    pub genres: HashMap<u32, HashMap<String, Momentum>>,
    pub cowatch: HashMap<u32, IdMap<recstream::cowatch::Neighbors>>,
}

pub fn expected(brokers: &str, catalog: &Path, dir: &Path) -> Expected {
    let input = read_input(brokers);
    let records = input.values().map(Vec::len).sum();
    let engine = replay(&input, catalog, dir);
    Expected {
        records,
        users: users(engine.store()),
        items: engine.store().items().unwrap(),
        genres: engine.store().genres().unwrap(),
        cowatch: engine.store().cowatch().unwrap(),
    }
}

/// Waits until every user's latest recommendation record carries the version
/// the replay computes (panics with `diagnose()` after three minutes). Reads
/// every partition by assignment, not through a consumer group, so the check
/// does not depend on the broker's group coordinator.
pub async fn await_final_versions(
    brokers: &str,
    expected: &Expected,
    diagnose: impl Fn() -> String,
) {
    const OUTPUTS: &str = "reco.recommendations.v1";
    let consumer: rdkafka::consumer::StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("verifier-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(OUTPUTS), Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        tpl.add_partition_offset(OUTPUTS, p.id(), Offset::Beginning)
            .unwrap();
    }
    assert!(tpl.count() > 0, "{OUTPUTS} has no partitions");
    consumer.assign(&tpl).unwrap();
    let want: HashMap<String, u64> = expected
        .users
        .iter()
        .map(|((_, u), s)| (u.clone(), s.version))
        .collect();
    let mut latest: HashMap<String, u64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while want.iter().any(|(u, v)| latest.get(u) != Some(v)) {
        if Instant::now() >= deadline {
            let missing: Vec<_> = want
                .iter()
                .filter(|(u, v)| latest.get(*u) != Some(v))
                .collect();
            let examples: Vec<_> = missing
                .iter()
                .take(5)
                .map(|(u, v)| format!("{u}: want {v}, saw {:?}", latest.get(*u)))
                .collect();
            // The summary goes last too: long logs get cut from the top.
            let summary = format!(
                "final versions missing for {} of {} users ({} users seen at all), e.g. {examples:?}",
                missing.len(),
                want.len(),
                latest.len()
            );
            panic!("{summary}\n{}\n{summary}", diagnose());
        }
        let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(2), consumer.recv()).await else {
            continue;
        };
        let v: Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        let user = v["user_id"].as_str().unwrap().to_string();
        let version = v["version"].as_u64().unwrap();
        let entry = latest.entry(user).or_insert(0);
        *entry = (*entry).max(version);
    }
}

/// Compares a stopped engine's state directory with the replay: every user's
/// state and every partition's item counters, bit for bit. Returns the events applied.
pub fn assert_state_equal(state_dir: &Path, expected: &Expected) -> u64 {
    let store = Store::open(state_dir, 8).unwrap();
    let actual = users(&store);
    assert_eq!(actual.len(), expected.users.len(), "same users");
    for (key, want) in &expected.users {
        let got = actual.get(key).unwrap_or_else(|| panic!("{key:?} missing"));
        assert_eq!(got, want, "state of {key:?} differs from the clean replay");
    }
    assert_eq!(
        store.items().unwrap(),
        expected.items,
        "item counters per partition"
    );
    actual.values().map(|s| s.events_total()).sum()
}

/// Every record of the recommendations topic as a `read_committed` consumer
/// sees it: per user, `(previous_version header, version)` in offset order.
/// Reads each partition to its end (`enable.partition.eof`, which accounts
/// for transaction markers).
pub fn read_versions(brokers: &str) -> HashMap<String, Vec<(u64, u64)>> {
    const OUTPUTS: &str = "reco.recommendations.v1";
    use rdkafka::message::Headers;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "version-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(OUTPUTS), Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    let partitions = metadata.topics()[0].partitions().len();
    for p in metadata.topics()[0].partitions() {
        tpl.add_partition_offset(OUTPUTS, p.id(), Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    let mut at_end = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while at_end.len() < partitions {
        assert!(
            Instant::now() < deadline,
            "could not read {OUTPUTS} to its end"
        );
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                at_end.remove(&m.partition());
                let v: Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
                let previous = m
                    .headers()
                    .and_then(|h| {
                        h.iter()
                            .find(|h| h.key == recstream::output::PREVIOUS_VERSION_HEADER)
                    })
                    .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok())
                    .expect("every output record carries its previous version");
                out.entry(v["user_id"].as_str().unwrap().to_string())
                    .or_default()
                    .push((previous, v["version"].as_u64().unwrap()));
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => panic!("reading {OUTPUTS}: {e}"),
            None => {}
        }
    }
    out
}

/// What the output topic shows of the delivery guarantee.
#[derive(Debug, Default)]
pub struct VersionCheck {
    pub records: usize,
    /// Records that repeat a version the user already had on the topic.
    pub repeated: usize,
    /// Records whose previous version is not the version of the user's record
    /// before it (an output of the chain never reached the topic).
    pub gaps: usize,
    /// Records with a lower version than one before them.
    pub reordered: usize,
}

/// Checks every user's records against the final versions: the highest is
/// the final version. `exactly_once` also
/// requires an unbroken chain: each record's previous version is the
/// version before it, starting from 0; no version twice.
pub fn check_versions(
    seen: &HashMap<String, Vec<(u64, u64)>>,
    expected: &Expected,
    exactly_once: bool,
) -> VersionCheck {
    let mut check = VersionCheck::default();
    for ((_, user), state) in &expected.users {
        let records = seen
            .get(user)
            .unwrap_or_else(|| panic!("no output record of {user}"));
        let mut last = 0;
        for (i, (previous, version)) in records.iter().enumerate() {
            check.records += 1;
            // at_least_once keeps no order across producer retries (consumers
            // keep the highest version); exactly_once does.
            if *version < last {
                assert!(
                    !exactly_once,
                    "{user}: version {version} after {last} (record {i} of {records:?})"
                );
                check.reordered += 1;
                continue;
            }
            if i > 0 && *version == last {
                check.repeated += 1;
            }
            if *previous != last {
                check.gaps += 1;
            }
            if exactly_once {
                assert_eq!(
                    (*previous, i == 0 || *version > last),
                    (last, true),
                    "{user}: record {i} breaks the chain of versions: {records:?}"
                );
            }
            last = *version;
        }
        assert_eq!(
            last, state.version,
            "{user}: the highest version is the final one"
        );
    }
    check
}

/// Reads the output topic back and checks it against the replay for the
/// guarantee mode: under `exactly_once` no repeated version and no gap.
pub fn assert_outputs(brokers: &str, expected: &Expected, guarantee: &str) -> VersionCheck {
    let exactly_once = guarantee == "exactly_once";
    let check = check_versions(&read_versions(brokers), expected, exactly_once);
    if exactly_once {
        assert_eq!((check.repeated, check.gaps), (0, 0), "{check:?}");
    }
    check
}

/// A deterministic interaction stream for the reliability tests.
pub struct StreamSpec {
    pub seed: u64,
    /// Users are `{prefix}{n}`, `n < users`.
    pub prefix: &'static str,
    pub users: u64,
    pub events: usize,
    pub kinds: &'static [&'static str],
    /// Every 50th record is produced twice (a producer retry).
    pub redeliver: bool,
}

/// `spec.events` records `{"key", "value"}` over movies `1..=movies`, one
/// second apart in event time; rates get 1–5 stars, progress 0.5.
pub fn stream(spec: &StreamSpec, movies: u64) -> Vec<Value> {
    let mut rng = recstream::rng::Rng::new(spec.seed);
    let mut next = move || rng.next_u64();
    let t0 = 1_767_225_600_000i64;
    let mut out = Vec::with_capacity(spec.events + spec.events / 50);
    for i in 0..spec.events {
        let user = format!("{}{}", spec.prefix, next() % spec.users);
        let kind = spec.kinds[(next() % spec.kinds.len() as u64) as usize];
        let mut e = serde_json::json!({
            "event_id": format!("e{i}"), "user_id": user, "movie_id": 1 + next() % movies,
            "type": kind, "ts": t0 + i as i64 * 1000
        });
        match kind {
            "rate" => e["value"] = serde_json::json!(1 + next() % 5),
            "progress" => e["value"] = serde_json::json!(0.5),
            _ => {}
        }
        let record = serde_json::json!({"key": user, "value": e});
        if spec.redeliver && i % 50 == 0 {
            out.push(record.clone());
        }
        out.push(record);
    }
    out
}
