//! A real Prometheus server (Debian's `prometheus`) scrapes the running engine
//! while events flow through the real Apache Kafka broker; the test asks Prometheus'
//! HTTP API that the key series exist and move, and that the committed alert
//! rules (`ops/prometheus/rules`) load and evaluate.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

struct Prometheus {
    child: Child,
    port: u16,
}

impl Prometheus {
    fn start(dir: &Path, target_port: u16) -> Prometheus {
        let port = free_port();
        let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("ops/prometheus/rules/*.yml");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files: [\"{}\"]\n\
                 scrape_configs:\n  - job_name: recstream\n    static_configs:\n      - targets: [\"127.0.0.1:{target_port}\"]\n",
                rules.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect(
                "the prometheus server (Debian package `prometheus`; .ci/install.sh installs it)",
            );
        Prometheus { child, port }
    }

    /// `GET path` over HTTP/1.0 (no chunked encoding); the JSON body.
    fn get(&self, path: &str) -> Option<Value> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
        let mut response = String::new();
        s.read_to_string(&mut response).ok()?;
        let body = response.split_once("\r\n\r\n")?.1;
        serde_json::from_str(body).ok()
    }

    /// The value of each series an instant query returns, by its labels.
    fn query(&self, promql: &str) -> Vec<(Value, f64)> {
        let Some(v) = self.get(&format!("/api/v1/query?query={}", encode(promql))) else {
            return Vec::new();
        };
        v["data"]["result"]
            .as_array()
            .map(|series| {
                series
                    .iter()
                    .filter_map(|s| {
                        let value = s["value"][1].as_str()?.parse().ok()?;
                        Some((s["metric"].clone(), value))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn sum(&self, promql: &str) -> f64 {
        self.query(promql).iter().map(|(_, v)| v).sum()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn events(tag: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let user = format!("p{}", i % 25);
            let kind = ["play", "like", "complete", "click"][i % 4];
            json!({"key": user, "value": {
                "event_id": format!("{tag}-{i}"), "user_id": user,
                "movie_id": 1 + (i as u64 * 7) % 40,
                "type": kind,
                "ts": 1_767_225_600_000i64 + i as i64 * 1000
            }})
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_engine_and_loads_the_alert_rules() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let brokers = broker.bootstrap();
    let catalog = synthetic_catalog(dir.path(), &["Comedy", "Drama", "Sci-Fi", "Horror"], 10);
    let http_port = free_port();
    let config = write_config(
        dir.path(),
        &brokers,
        &catalog,
        http_port,
        "prometheus-test",
        false,
    );
    recstream(&["topics", "apply", "--config", config.to_str().unwrap()]);
    let engine = EngineProcess::spawn(&config, dir.path().join("engine.log"));
    let prometheus = Prometheus::start(dir.path(), http_port);
    let log = || {
        format!(
            "{}\n{}\n{}",
            engine.log_text(),
            engine_progress(http_port),
            std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
        )
    };
    let wait_for = |what: &str, ok: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(90);
        while !ok() {
            assert!(Instant::now() < deadline, "{what}\n{}\n{what}", log());
            std::thread::sleep(Duration::from_millis(250));
        }
    };

    // The target is up and the engine is ready (partitions assigned).
    wait_for("the engine is not scraped", &|| {
        prometheus.sum("up{job=\"recstream\"}") == 1.0
            && prometheus.sum("recstream_assigned_partitions") > 0.0
    });

    let applied = "sum(recstream_events_total{outcome=\"applied\"})";
    python_produce(
        &brokers,
        "reco.interactions.v1",
        &events("a", 200),
        dir.path(),
    );
    wait_for("the first 200 events are not in Prometheus", &|| {
        prometheus.sum(applied) == 200.0
    });
    python_produce(
        &brokers,
        "reco.interactions.v1",
        &events("b", 300),
        dir.path(),
    );
    wait_for("applied events did not move to 500", &|| {
        prometheus.sum(applied) == 500.0
    });

    // Key series exist, with their labels.
    for series in [
        "recstream_events_total{type=\"like\"}",
        "recstream_outputs_published_total{kind=\"recommendations\"}",
        "recstream_processing_seconds_count",
        "recstream_event_to_publish_lag_seconds_count",
        "recstream_feedback_impressions_total{variant=\"default\",list=\"recommendations\"}",
        "recstream_feedback_plays_total{variant=\"default\"}",
        "recstream_variant_lists_total{variant=\"default\"}",
        "recstream_experiment_share{variant=\"default\"}",
        "recstream_rocksdb_bytes{measure=\"live\"}",
        "recstream_consumer_lag_records",
        "recstream_broker_up",
    ] {
        wait_for(&format!("no series {series}"), &|| {
            !prometheus.query(series).is_empty()
        });
    }
    let p99 = prometheus.query(
        "histogram_quantile(0.99, sum by (le) (rate(recstream_processing_seconds_bucket[1m])))",
    );
    assert_eq!(p99.len(), 1, "freshness p99 is computable: {p99:?}");

    // The committed rules loaded and evaluate without errors.
    let rules = prometheus.get("/api/v1/rules").expect("rules API");
    let groups = rules["data"]["groups"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let all: Vec<&Value> = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    let alerts = all.iter().filter(|r| r["type"] == "alerting").count();
    assert!(alerts >= 5, "alert rules loaded: {rules}");
    wait_for("a rule reports an evaluation error", &|| {
        let rules = prometheus.get("/api/v1/rules").unwrap_or_default();
        let rules: Vec<Value> = rules["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        !rules.is_empty()
            && rules
                .iter()
                .all(|r| r["health"] == "ok" && r["lastError"].as_str().unwrap_or("").is_empty())
    });
    let firing = prometheus.query("ALERTS{alertstate=\"firing\"}");
    assert!(
        firing.is_empty(),
        "no alert fires on a healthy engine: {firing:?}"
    );

    let status = engine.terminate();
    assert!(status.success(), "engine exit {status:?}");
    println!(
        "prometheus: a real server scraped the engine every second; applied events 200 -> 500 seen through its API; {alerts} alert rules loaded and healthy, none firing"
    );
}
