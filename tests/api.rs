//! The HTTP API against the real Apache Kafka broker and the engine binary: the
//! intake validates like the consumer and produces to Kafka, queries answer
//! from local state (cold-start rows marked), refresh commands go through the
//! refresh topic, server-sent events carry the output records, queries for a
//! user another instance owns are sent there, and schemathesis finds no
//! server error or contract violation.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "test-token-0123456789";
const GENRES: [&str; 4] = ["Action", "Comedy", "Drama", "Sci-Fi"];

fn bearer() -> String {
    format!("Authorization: Bearer {TOKEN}")
}

/// An engine config with the API token and the given instance id.
fn api_config(dir: &Path, brokers: &str, catalog: &Path, port: u16, group: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let config = write_config(dir, brokers, catalog, port, group, false);
    enable_api(&config, TOKEN, "announce_interval_ms = 500\n");
    config
}

/// A broker, the topics and one engine with the API token, ready.
fn one_engine(dir: &Path, group: &str) -> (Broker, EngineProcess, u16) {
    let broker = Broker::start();
    let catalog = synthetic_catalog(dir, &GENRES, 10);
    let port = free_port();
    let config = api_config(dir, &broker.bootstrap(), &catalog, port, group);
    recstream(&["topics", "apply", "--config", config.to_str().unwrap()]);
    let engine = EngineProcess::spawn(&config, dir.join("engine.log"));
    await_ready(port, || {
        format!("{}\n{}", engine.log_text(), engine_progress(port))
    });
    (broker, engine, port)
}

fn event(id: &str, user: &str, movie: u32, kind: &str) -> Value {
    json!({"event_id": id, "user_id": user, "movie_id": movie, "type": kind,
           "ts": now_ms() - 60_000, "context": {"device": "test"}})
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn track(port: u16, body: &Value) -> HttpResponse {
    http_request(
        port,
        "POST",
        "/api/track",
        &[&bearer(), "Content-Type: application/json"],
        body.to_string().as_bytes(),
    )
}

/// Server-sent events of one user: (event name, data) pairs, read by a thread.
fn open_stream(port: u16, user: &str) -> mpsc::Receiver<(String, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET /api/users/{user}/stream HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut name = String::new();
        for line in BufReader::new(s).lines() {
            let Ok(line) = line else { return };
            if let Some(n) = line.strip_prefix("event: ") {
                name = n.to_string();
            } else if let Some(d) = line.strip_prefix("data: ") {
                if tx.send((name.clone(), d.to_string())).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// The next streamed record of `kind` satisfying `ok`.
fn next_streamed(
    rx: &mpsc::Receiver<(String, String)>,
    kind: &str,
    ok: impl Fn(&Value) -> bool,
    log: impl Fn() -> String,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((name, data)) if name == kind => {
                let v: Value = serde_json::from_str(&data).unwrap();
                if ok(&v) {
                    return v;
                }
            }
            Ok(_) => {}
            Err(e) => panic!("no streamed {kind} record: {e}\n{}", log()),
        }
    }
}

#[test]
fn intake_queries_refresh_and_live_stream() {
    let dir = tempfile::tempdir().unwrap();
    let (_broker, engine, port) = one_engine(dir.path(), "api");
    let log = || format!("{}\n{}", engine.log_text(), engine_progress(port));

    // A user without state: cold-start rows, clearly marked.
    let cold = http_request(port, "GET", "/api/users/nobody/recommendations", &[], b"");
    assert_eq!(cold.status, 200, "{cold:?}");
    let cold = cold.json();
    assert_eq!(cold["cold_start"], true);
    assert_eq!(cold["version"], 0);

    // Writes need the token; bad events get the decoder's reason; big bodies 413.
    let valid = event("e-1", "u-api", 1, "like");
    let no_auth = http_request(
        port,
        "POST",
        "/api/track",
        &[],
        valid.to_string().as_bytes(),
    );
    assert_eq!(no_auth.status, 401, "{no_auth:?}");
    assert_eq!(no_auth.header("www-authenticate"), Some("Bearer"));
    let wrong = http_request(
        port,
        "POST",
        "/api/track",
        &["Authorization: Bearer wrong-token-0000000000"],
        valid.to_string().as_bytes(),
    );
    assert_eq!(wrong.status, 401);
    for (body, reason) in [
        (b"{not json".to_vec(), "malformed_json"),
        (
            event("e-x", "u-api", 1, "teleport").to_string().into_bytes(),
            "unknown_event_type",
        ),
        (
            json!({"event_id": "e-y", "user_id": "u-api", "movie_id": 1, "type": "rate", "value": 9, "ts": now_ms()})
                .to_string()
                .into_bytes(),
            "out_of_range",
        ),
        (
            json!({"event_id": "e-z", "user_id": "u-api", "movie_id": 1, "type": "like", "ts": now_ms() + 3 * 86_400_000})
                .to_string()
                .into_bytes(),
            "out_of_range",
        ),
    ] {
        let r = http_request(port, "POST", "/api/track", &[&bearer()], &body);
        assert_eq!(r.status, 400, "{r:?}");
        assert_eq!(r.json()["error"], reason, "{r:?}");
    }
    let huge = vec![b'x'; 70 * 1024];
    assert_eq!(
        http_request(port, "POST", "/api/track", &[&bearer()], &huge).status,
        413
    );

    // A streamed user: `ready`, then every record the engine publishes.
    let stream = open_stream(port, "u-api");
    next_streamed(&stream, "ready", |_| true, log);
    let accepted = track(port, &valid);
    assert_eq!(accepted.status, 202, "{accepted:?}");
    assert_eq!(accepted.json()["event_id"], "e-1");
    let first = next_streamed(&stream, "carousels", |v| v["user_id"] == "u-api", log);
    next_streamed(&stream, "insights", |v| v["user_id"] == "u-api", log);
    assert!(first["version"].as_u64().unwrap() >= 1);

    // The query answers from local state: the like is in the insights.
    let insights = http_request(port, "GET", "/api/users/u-api/insights", &[], b"");
    assert_eq!(insights.status, 200);
    assert!(insights.header("x-recstream-instance").is_some());
    let insights = insights.json();
    assert_eq!(insights["cold_start"], false);
    assert_eq!(insights["activity"]["by_type"]["like"], 1, "{insights}");
    let recs = http_request(port, "GET", "/api/users/u-api/recommendations", &[], b"").json();
    assert!(
        recs["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["movie_id"] != 1),
        "a liked title is not recommended again: {recs}"
    );

    // Refresh one user (a new version is streamed), then everyone.
    let refresh = http_request(
        port,
        "POST",
        "/api/refresh",
        &[&bearer()],
        br#"{"user_id":"u-api"}"#,
    );
    assert_eq!(refresh.status, 202, "{refresh:?}");
    assert_eq!(refresh.json()["commands"], 1);
    let v1 = first["version"].as_u64().unwrap();
    next_streamed(
        &stream,
        "carousels",
        |v| v["version"].as_u64() > Some(v1),
        log,
    );
    let all = http_request(
        port,
        "POST",
        "/api/refresh",
        &[&bearer()],
        br#"{"all":true}"#,
    );
    assert_eq!(all.json()["commands"], 6, "{all:?}");
    let both = http_request(
        port,
        "POST",
        "/api/refresh",
        &[&bearer()],
        br#"{"all":true,"user_id":"u"}"#,
    );
    assert_eq!(both.status, 400);

    // Every request is counted by route pattern, never by raw path.
    let metrics = http_get(port, "/metrics");
    assert!(metrics.contains(r#"recstream_api_events_total{outcome="accepted"} 1"#));
    assert!(metrics.contains(r#"route="/api/users/{user_id}/{kind}""#));
    assert!(!metrics.contains("u-api"), "user ids never become labels");
    assert!(metrics.contains("recstream_live_watchers 1"), "{metrics}");
}

#[test]
fn schemathesis_finds_no_server_error_or_contract_violation() {
    let dir = tempfile::tempdir().unwrap();
    let (_broker, engine, port) = one_engine(dir.path(), "contract");
    let log = || format!("{}\n{}", engine.log_text(), engine_progress(port));

    let out = std::process::Command::new("python3")
        .args(["-m", "schemathesis.cli", "run"])
        .arg(format!("http://127.0.0.1:{port}/api/openapi.json"))
        .args(["--checks", "all"])
        // An event stream never ends; tests/api.rs reads it instead.
        .args(["--exclude-operation-id", "stream"])
        .args(["--header", &format!("Authorization: Bearer {TOKEN}")])
        .args(["--max-examples", "60", "--seed", "7", "--workers", "1"])
        .args(["--request-timeout", "30", "--max-redirects", "0"])
        .env(
            "SCHEMATHESIS_HOOKS",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/schemathesis_hooks.py"),
        )
        // Its cache directory stays out of the repository.
        .current_dir(dir.path())
        .output()
        .expect("run schemathesis (installed by .ci/install.sh)");
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{report}");
    assert!(
        out.status.success(),
        "schemathesis failed:\n{report}\n{}",
        log()
    );
    let metrics = http_get(port, "/metrics");
    assert!(
        !metrics.contains(r#"status="500""#),
        "no request ended in a server error"
    );
}

/// Each user's answer, following at most one redirect: (instance, partition, record).
fn ask(port_of: &HashMap<String, u16>, port: u16, user: &str) -> (u16, String, Value) {
    let r = http_request(
        port,
        "GET",
        &format!("/api/users/{user}/insights"),
        &[],
        b"",
    );
    match r.status {
        200 => (
            port,
            r.header("x-recstream-partition").unwrap().to_string(),
            r.json(),
        ),
        307 => {
            let location = r.header("location").unwrap().to_string();
            let base = location.split("/api/").next().unwrap();
            let other = port_of[base];
            let again = http_request(
                other,
                "GET",
                &format!("/api/users/{user}/insights"),
                &[],
                b"",
            );
            assert_eq!(again.status, 200, "the owner answers itself: {again:?}");
            (
                other,
                again.header("x-recstream-partition").unwrap().to_string(),
                again.json(),
            )
        }
        other => panic!("{user}: unexpected {other}: {r:?}"),
    }
}

#[test]
fn queries_are_sent_to_the_instance_that_owns_the_user() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let catalog = synthetic_catalog(dir.path(), &GENRES, 10);
    let ports = [free_port(), free_port()];
    let configs: Vec<PathBuf> = ports
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            api_config(
                &dir.path().join(format!("i{i}")),
                &broker.bootstrap(),
                &catalog,
                p,
                "routing",
            )
        })
        .collect();
    recstream(&["topics", "apply", "--config", configs[0].to_str().unwrap()]);
    let engines: Vec<EngineProcess> = configs
        .iter()
        .enumerate()
        .map(|(i, c)| EngineProcess::spawn(c, dir.path().join(format!("engine{i}.log"))))
        .collect();
    let log = || {
        engines
            .iter()
            .zip(ports)
            .map(|(e, p)| format!("{}\n{}", e.log_text(), engine_progress(p)))
            .collect::<Vec<_>>()
            .join("\n----\n")
    };
    for p in ports {
        await_ready(p, log);
    }
    let port_of: HashMap<String, u16> = ports
        .iter()
        .map(|&p| (format!("http://127.0.0.1:{p}"), p))
        .collect();

    // Both instances announce disjoint halves of the 6 partitions.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let views: Vec<Value> = ports
            .iter()
            .map(|&p| http_request(p, "GET", "/api/instances", &[], b"").json())
            .collect();
        let settled = views.iter().all(|v| {
            let live = v["instances"].as_array().unwrap();
            let mut owned = BTreeSet::new();
            let total: usize = live
                .iter()
                .map(|a| {
                    let parts = a["partitions"].as_array().unwrap();
                    owned.extend(parts.iter().map(|p| p.as_u64().unwrap()));
                    parts.len()
                })
                .sum();
            live.len() == 2
                && live
                    .iter()
                    .all(|a| !a["partitions"].as_array().unwrap().is_empty())
                && owned.len() == 6
                && total == 6
        });
        if settled {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "instances did not settle: {views:?}\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    // Events for 24 users, all through instance 0's intake.
    let users: Vec<String> = (0..24).map(|u| format!("r{u}")).collect();
    for (i, u) in users.iter().enumerate() {
        let r = track(ports[0], &event(&format!("r-{i}"), u, 1 + i as u32, "play"));
        assert_eq!(r.status, 202, "{r:?}");
    }

    // Asked at either instance, every user is answered by its owner, from state.
    let mut answered_by: HashMap<u16, usize> = HashMap::new();
    for u in &users {
        let deadline = Instant::now() + Duration::from_secs(30);
        let (owner, partition) = loop {
            let (a, pa, va) = ask(&port_of, ports[0], u);
            let (b, pb, vb) = ask(&port_of, ports[1], u);
            assert_eq!((a, &pa), (b, &pb), "{u}: both routes end at one owner");
            if va["cold_start"] == false && vb["activity"]["events_total"] == 1 {
                break (a, pa);
            }
            assert!(Instant::now() < deadline, "{u}: not applied\n{}", log());
            std::thread::sleep(Duration::from_millis(100));
        };
        let owned = http_request(owner, "GET", "/api/instances", &[], b"").json();
        assert!(
            owned["partitions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p.as_u64() == partition.parse::<u64>().ok()),
            "{u}: answered by the owner of partition {partition}"
        );
        *answered_by.entry(owner).or_default() += 1;
    }
    assert_eq!(
        answered_by.len(),
        2,
        "both instances own users: {answered_by:?}"
    );
}
