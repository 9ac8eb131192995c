//! End to end against the real Apache Kafka broker process: topics applied by the CLI,
//! the engine as a separate process, events produced by the Python
//! confluent-kafka client, outputs and dead letters read back.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::time::{Duration, Instant};

use common::*;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::ClientConfig;
use serde_json::{json, Value};

const GENRES: [&str; 5] = ["Comedy", "Drama", "Sci-Fi", "Horror", "Romance"];
const PER_GENRE: u32 = 12;

fn genre_ids(genre: usize) -> std::ops::RangeInclusive<u32> {
    let first = genre as u32 * PER_GENRE + 1;
    first..=first + PER_GENRE - 1
}

fn event(id: &str, user: &str, movie: u32, kind: &str, value: Option<f64>, ts: i64) -> Value {
    let mut e = json!({"event_id": id, "user_id": user, "movie_id": movie, "type": kind, "ts": ts});
    if let Some(v) = value {
        e["value"] = json!(v);
    }
    json!({"key": user, "value": e})
}

#[derive(Default)]
struct Seen {
    /// Latest record per (topic, user), by version.
    latest: HashMap<(String, String), Value>,
    /// Versions per (topic, user) in consumption order.
    versions: HashMap<(String, String), Vec<u64>>,
    dead_letters: Vec<(Option<String>, BTreeMap<String, String>)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fans_genre_rises_and_bad_input_is_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let brokers = broker.bootstrap();
    let catalog = synthetic_catalog(dir.path(), &GENRES, PER_GENRE);
    let http_port = free_port();
    let config = write_config(
        dir.path(),
        &brokers,
        &catalog,
        http_port,
        "e2e-engine",
        false,
    );
    let config_arg = config.to_str().unwrap();

    let first = recstream(&["topics", "apply", "--config", config_arg]);
    assert!(first.contains("Created"), "{first}");
    let second = recstream(&["topics", "apply", "--config", config_arg]);
    assert!(
        !second.contains("Created") && second.contains("AlreadyExists"),
        "{second}"
    );

    // A movie that exists only on the catalog topic: read at the engine's start.
    let topic_only_movie = 500u32;
    python_produce(
        &brokers,
        "reco.catalog.v1",
        &[json!({"key": topic_only_movie.to_string(), "value": {
            "movie_id": topic_only_movie, "title": "Sci-Fi From The Topic", "genres": ["Sci-Fi"], "year": 2001}})],
        dir.path(),
    );

    let engine = EngineProcess::spawn(&config, dir.path().join("engine.log"));

    // Background crowd: everyone watches Comedy and Drama, nobody Sci-Fi.
    let t0 = 1_767_225_600_000i64;
    let mut records = Vec::new();
    for u in 0..20 {
        for (i, movie) in [1, 2, 3, 13, 14, 5 + u % 5].iter().enumerate() {
            let user = format!("crowd-{u}");
            records.push(event(
                &format!("{user}-{i}"),
                &user,
                *movie,
                "play",
                Some(1200.0),
                t0 + (u * 10 + i as u32) as i64 * 1000,
            ));
        }
    }
    // The fan: likes five Sci-Fi movies, completes a sixth, dislikes a Romance.
    let scifi: Vec<u32> = genre_ids(2).collect();
    let mut t = t0 + 3_600_000;
    let mut fan_events = 0;
    for (i, m) in scifi.iter().take(5).enumerate() {
        t += 60_000;
        records.push(event(&format!("fan-like-{i}"), "fan", *m, "like", None, t));
        fan_events += 1;
    }
    records.push(event(
        "fan-complete",
        "fan",
        scifi[5],
        "complete",
        Some(5400.0),
        t + 1000,
    ));
    records.push(event(
        "fan-topic-movie",
        "fan",
        topic_only_movie,
        "play",
        Some(60.0),
        t + 1500,
    ));
    records.push(event(
        "fan-dislike",
        "fan",
        *genre_ids(4).start(),
        "dislike",
        None,
        t + 2000,
    ));
    // A redelivered event (same id) must be applied once.
    records.push(event("fan-like-0", "fan", scifi[0], "like", None, t + 3000));
    fan_events += 3;
    // Bad input, each kind with its expected reason.
    records.push(json!({"key": "fan", "raw": true, "value": "{\"event_id\": \"broken\", \"user_id\": \"fan\""}));
    records.push(event("unknown-movie", "fan", 9999, "like", None, t + 4000));
    records.push(json!({"key": null, "value": {"event_id": "nokey", "user_id": "fan", "movie_id": 1, "type": "like", "ts": t}}));
    records.push(json!({"key": "fan", "value": {"event_id": "poke", "user_id": "fan", "movie_id": 1, "type": "poke", "ts": t}}));
    records.push(json!({"key": "fan", "value": {"event_id": "r9", "user_id": "fan", "movie_id": 1, "type": "rate", "value": 9, "ts": t}}));
    python_produce(&brokers, "reco.interactions.v1", &records, dir.path());

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "e2e-reader")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer
        .subscribe(&[
            "reco.recommendations.v1",
            "reco.carousels.v2",
            "reco.insights.v1",
            "reco.dead-letters.v1",
        ])
        .unwrap();
    let mut seen = Seen::default();
    let deadline = Instant::now() + Duration::from_secs(120);
    let done = |seen: &Seen| {
        let fan = |topic: &str| seen.latest.get(&(topic.to_string(), "fan".to_string()));
        let final_version = fan("reco.insights.v1")
            .filter(|i| i["activity"]["events_total"] == json!(fan_events))
            .map(|i| i["version"].clone());
        let fan_done = final_version.is_some_and(|v| {
            ["reco.recommendations.v1", "reco.carousels.v2"]
                .iter()
                .all(|t| fan(t).is_some_and(|r| r["version"] == v))
        });
        let crowd_done = (0..20).all(|u| {
            seen.latest
                .contains_key(&("reco.carousels.v2".into(), format!("crowd-{u}")))
        });
        fan_done && crowd_done && seen.dead_letters.len() >= 5
    };
    while !done(&seen) {
        assert!(
            Instant::now() < deadline,
            "outputs incomplete after 120 s: {} records, fan: {:?}, {} dead letters\n{}\n{}",
            seen.latest.len(),
            seen.latest
                .get(&("reco.insights.v1".to_string(), "fan".to_string())),
            seen.dead_letters.len(),
            engine.log_text(),
            http_get(http_port, "/metrics")
        );
        let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await else {
            continue;
        };
        let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
        if m.topic() == "reco.dead-letters.v1" {
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|x| {
                            (
                                x.key.to_string(),
                                String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            seen.dead_letters.push((key, headers));
            continue;
        }
        let value: Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        let k = (m.topic().to_string(), key.clone().unwrap());
        assert_eq!(
            value["user_id"].as_str(),
            key.as_deref(),
            "records are keyed by user"
        );
        let version = value["version"].as_u64().unwrap();
        seen.versions.entry(k.clone()).or_default().push(version);
        if seen
            .latest
            .get(&k)
            .is_none_or(|old| old["version"].as_u64().unwrap() < version)
        {
            seen.latest.insert(k, value);
        }
    }

    // Versions never go back per user and topic (a re-published duplicate repeats one).
    for (k, versions) in &seen.versions {
        assert!(
            versions.windows(2).all(|w| w[0] <= w[1]),
            "{k:?}: {versions:?}"
        );
    }

    let carousels = &seen.latest[&("reco.carousels.v2".to_string(), "fan".to_string())];
    let rows = carousels["rows"].as_array().unwrap();
    let row_ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(row_ids[0], "top-picks", "{row_ids:?}");
    assert_eq!(
        row_ids[1], "genre:Sci-Fi",
        "the fan's genre is the first genre row: {row_ids:?}"
    );
    assert!(
        !row_ids.contains(&"genre:Romance"),
        "a disliked genre gets no row: {row_ids:?}"
    );

    // Nothing the fan consumed or judged comes back, in any row or list.
    let consumed: Vec<u32> = scifi
        .iter()
        .take(6)
        .copied()
        .chain([*genre_ids(4).start(), topic_only_movie])
        .collect();
    let recs = &seen.latest[&("reco.recommendations.v1".to_string(), "fan".to_string())];
    let described: Vec<u64> = carousels["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["movie_id"].as_u64().unwrap())
        .collect();
    let listed: Vec<u32> = rows
        .iter()
        .flat_map(|r| r["movie_ids"].as_array().unwrap().iter())
        .map(|id| id.as_u64().unwrap())
        .inspect(|id| assert!(described.contains(id), "row item {id} is described"))
        .chain(
            recs["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["movie_id"].as_u64().unwrap()),
        )
        .map(|id| id as u32)
        .collect();
    for id in &consumed {
        assert!(!listed.contains(id), "consumed movie {id} came back");
    }
    // Sci-Fi leads the fan's list.
    let items = recs["items"].as_array().unwrap();
    let is_scifi = |item: &Value| {
        item["genres"]
            .as_array()
            .unwrap()
            .contains(&json!("Sci-Fi"))
    };
    assert!(is_scifi(&items[0]), "top pick is Sci-Fi: {}", items[0]);
    let scifi_in_top = items.iter().filter(|i| is_scifi(i)).count();
    assert!(scifi_in_top >= 3, "{recs}");
    for item in recs["items"].as_array().unwrap() {
        assert!(!item["reason"].as_str().unwrap().is_empty());
        assert!(item["signals"]["popularity"].is_number());
    }

    let insights = &seen.latest[&("reco.insights.v1".to_string(), "fan".to_string())];
    assert_eq!(insights["genres"][0]["genre"], "Sci-Fi", "{insights}");
    assert_eq!(
        insights["activity"]["by_type"]["like"], 5,
        "the redelivered like counted once"
    );

    // Dead letters carry the original key and a reason.
    let reasons: Vec<&str> = seen
        .dead_letters
        .iter()
        .map(|(_, h)| h["dlq.reason"].as_str())
        .collect();
    for expected in [
        "malformed_json",
        "unknown_movie",
        "missing_key",
        "unknown_event_type",
        "out_of_range",
    ] {
        assert!(
            reasons.contains(&expected),
            "{expected} missing from {reasons:?}"
        );
    }
    for (_, h) in &seen.dead_letters {
        assert_eq!(h["dlq.topic"], "reco.interactions.v1");
        assert!(h["dlq.offset"].parse::<i64>().is_ok());
        assert!(!h["dlq.detail"].is_empty());
    }

    // Every output record matches its JSON Schema (checked by python-jsonschema).
    let dump = dir.path().join("outputs.jsonl");
    let mut f = std::fs::File::create(&dump).unwrap();
    for v in seen.latest.values() {
        writeln!(f, "{v}").unwrap();
    }
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/check_schemas.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg("records")
        .arg(&dump)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Metrics are served and count what happened.
    let metrics = http_get(http_port, "/metrics");
    assert!(
        metrics.contains("recstream_events_total{outcome=\"applied\",type=\"like\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("recstream_events_total{outcome=\"duplicate\",type=\"like\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("recstream_dead_letters_total{reason=\"malformed_json\"} 1"));
    assert!(metrics.contains("recstream_processing_seconds_bucket"));
    let ready_deadline = Instant::now() + Duration::from_secs(30);
    while !http_get(http_port, "/readyz").contains("200 OK") {
        assert!(Instant::now() < ready_deadline, "engine never ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A refresh command republishes the fan with a new version and no new events.
    let before = recs["version"].as_u64().unwrap();
    recstream(&["refresh", "--config", config_arg, "--user", "fan"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < deadline,
            "refresh produced nothing\n{}",
            engine.log_text()
        );
        let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await else {
            continue;
        };
        if m.topic() == "reco.recommendations.v1" && m.key() == Some(b"fan") {
            let v: Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            assert!(v["version"].as_u64().unwrap() > before);
            break;
        }
    }

    let status = engine.terminate();
    assert!(status.success(), "engine exit {status:?}");
}
