//! Helpers for tests against real processes: the Apache Kafka broker, the engine
//! binary and the Python client.

#![allow(dead_code)]

pub mod verifier;

use std::collections::HashMap;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use recstream::ncf::card::ModelFiles;
use serde_json::Value;

/// A free loopback port below the kernel's ephemeral range, never handed out
/// twice by this process.
///
/// `bind(0)` picks from the ephemeral range, where every outgoing connection's
/// local port comes from too. A broker binds its ports seconds after they were
/// picked, and in that time a client connection of a test running beside it can
/// take one (CI saw a broker exit on such a clash). Below the range only a
/// listener that asks for a port by number can take it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const SPAN: u32 = 12_000;
    // A prime that does not divide SPAN, so the walk visits every port once.
    const STRIDE: u32 = 7_919;
    static STEP: AtomicU32 = AtomicU32::new(0);
    let low = ephemeral_range_start();
    if low < SPAN + 1_024 {
        return bind_any_port();
    }
    let seed = std::process::id().wrapping_mul(2_654_435_761)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    loop {
        let step = STEP.fetch_add(1, Ordering::Relaxed);
        assert!(step < SPAN, "no free port below {low}");
        let port = (low - SPAN + (seed % SPAN + step * STRIDE) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn ephemeral_range_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

fn bind_any_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A single-node Apache Kafka broker (KRaft) on free loopback ports, started
/// by `ops/kafka/broker.sh run` in its own directory; killed on drop. The
/// broker's jars come from `.ci/install.sh` (`ops/kafka/broker.sh install`).
pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    controller_port: u16,
    dir: PathBuf,
    /// Keeps a temporary directory alive for the broker's lifetime.
    _temp: Option<tempfile::TempDir>,
}

impl Broker {
    /// A broker whose data lives in a temporary directory.
    pub fn start() -> Broker {
        let temp = tempfile::tempdir().expect("broker directory");
        let mut broker = Broker::launch_on_free_ports(temp.path().to_path_buf());
        broker._temp = Some(temp);
        broker
    }

    /// A broker whose data lives in `dir` (survives [`Broker::restart`]).
    pub fn start_in(dir: &Path) -> Broker {
        Broker::launch_on_free_ports(dir.join("kafka"))
    }

    /// Launches on fresh ports, and again on others if one was taken before the
    /// broker bound it (another process may listen on a port we saw free).
    fn launch_on_free_ports(dir: PathBuf) -> Broker {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match Broker::launch(dir.clone(), free_port(), free_port()) {
                Ok(broker) => return broker,
                Err(failure) if attempts < 3 && failure.contains("Address already in use") => {
                    eprintln!("a broker port was taken, retrying on others:\n{failure}");
                }
                Err(failure) => panic!("{failure}"),
            }
        }
    }

    fn launch(dir: PathBuf, port: u16, controller_port: u16) -> Result<Broker, String> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("ops/kafka/broker.sh");
        std::fs::create_dir_all(&dir).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("broker.log"))
            .unwrap();
        let child = Command::new("bash")
            .arg(script)
            .arg("run")
            .arg(&dir)
            .arg(port.to_string())
            .env("KAFKA_CONTROLLER_PORT", controller_port.to_string())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn ops/kafka/broker.sh (run .ci/install.sh)");
        let mut broker = Broker {
            child: Some(child),
            port,
            controller_port,
            dir,
            _temp: None,
        };
        broker.await_ready()?;
        Ok(broker)
    }

    /// Waits until the broker answers a metadata request (it listens a little
    /// before it serves).
    fn await_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!(
                    "the Kafka broker exited ({status}):\n{}",
                    self.broker_failure()
                ));
            }
            if wait_for_port(self.port, Duration::from_millis(200)) {
                let admin: Result<rdkafka::consumer::BaseConsumer, _> = ClientConfig::new()
                    .set("bootstrap.servers", self.bootstrap())
                    .create();
                if admin.is_ok_and(|c| c.fetch_metadata(None, Duration::from_secs(2)).is_ok()) {
                    return Ok(());
                }
            }
            assert!(
                Instant::now() < deadline,
                "the Kafka broker did not answer within 120 s:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The end of the broker's log, for a failing test's message.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Why a broker stopped: the log's errors (a broker logs the cause early and
    /// then many lines of shutdown), then its last lines.
    fn broker_failure(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default();
        let errors: Vec<&str> = text
            .lines()
            .filter(|line| line.contains("ERROR") || line.contains("Exception:"))
            .take(20)
            .collect();
        format!("{}\n...\n{}", errors.join("\n"), self.log_tail())
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the broker cleanly and starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.stop();
        let (dir, port, controller_port) = (self.dir.clone(), self.port, self.controller_port);
        let temp = self._temp.take();
        *self = Broker::launch(dir, port, controller_port)
            .unwrap_or_else(|failure| panic!("{failure}"));
        self._temp = temp;
    }

    /// SIGTERM (a controlled shutdown), SIGKILL after 30 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // No clean shutdown needed for a broker whose data goes away.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn engine_bin() -> &'static str {
    env!("CARGO_BIN_EXE_recstream")
}

/// Runs the engine binary to completion and returns stdout; panics on failure.
pub fn recstream(args: &[&str]) -> String {
    let out = Command::new(engine_bin())
        .args(args)
        .output()
        .expect("run recstream");
    assert!(
        out.status.success(),
        "recstream {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The engine as a separate process, SIGKILLed on drop unless stopped.
pub struct EngineProcess {
    pub child: Child,
    pub log: PathBuf,
}

impl EngineProcess {
    pub fn spawn(config: &Path, log: PathBuf) -> EngineProcess {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(engine_bin())
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "recstream=debug,warn")
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("spawn engine");
        EngineProcess { child, log }
    }

    /// SIGKILL: no chance to flush or commit anything.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "engine did not stop after SIGTERM\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Waits until a line appears in an engine's log (panics with the log after `timeout`).
pub async fn await_log(engine: &EngineProcess, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !engine.log_text().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "{needle:?} not logged in {timeout:?}\n{}",
            engine.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Drop for EngineProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn python_producer(
    brokers: &str,
    topic: &str,
    records: &[serde_json::Value],
    dir: &Path,
) -> Command {
    let file = dir.join(format!("{topic}-{}.jsonl", records.len()));
    let mut f = std::fs::File::create(&file).unwrap();
    for r in records {
        writeln!(f, "{r}").unwrap();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/produce.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script)
        .args(["--brokers", brokers, "--topic", topic, "--file"])
        .arg(&file);
    cmd
}

/// Streams records at `rate` per second through the Python client, in the background.
pub fn python_produce_in_background(
    brokers: &str,
    topic: &str,
    records: &[serde_json::Value],
    rate: u32,
    dir: &Path,
) -> Child {
    python_producer(brokers, topic, records, dir)
        .args(["--rate", &rate.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .expect("python3 with confluent-kafka (run .ci/install.sh)")
}

/// Produces JSON-lines records through the Python confluent-kafka client.
pub fn python_produce(brokers: &str, topic: &str, records: &[serde_json::Value], dir: &Path) {
    let out = python_producer(brokers, topic, records, dir)
        .output()
        .expect("python3 with confluent-kafka (run .ci/install.sh)");
    assert!(
        out.status.success(),
        "python producer failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A small synthetic catalog in the canonical CSV layout: `per_genre` movies
/// in each genre, ids grouped by genre.
pub fn synthetic_catalog(dir: &Path, genres: &[&str], per_genre: u32) -> PathBuf {
    let path = dir.join("catalog.csv");
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(f, "movie_id,title,genres,year,tmdb_id,imdb_id").unwrap();
    let mut id = 1;
    for (gi, g) in genres.iter().enumerate() {
        for i in 0..per_genre {
            // Every third movie also carries the next genre, as real catalogs do.
            let extra = if i % 3 == 0 {
                format!("|{}", genres[(gi + 1) % genres.len()])
            } else {
                String::new()
            };
            writeln!(f, "{id},{g} Movie {i},{g}{extra},{},,", 1980 + (i % 30)).unwrap();
            id += 1;
        }
    }
    path
}

pub fn write_config(
    dir: &Path,
    brokers: &str,
    catalog: &Path,
    http_port: u16,
    group: &str,
    static_membership: bool,
) -> PathBuf {
    let path = dir.join("recstream.toml");
    // Static membership lets a SIGKILLed instance take its partitions back as
    // soon as it restarts (no rebalance); a dynamic member's partitions wait
    // for its session to expire.
    let instance = if static_membership {
        format!("instance_id = \"{group}-0\"")
    } else {
        String::new()
    };
    // A dynamic member's crash rebalances sooner with a short session; a
    // static member's long session (Kafka's advice) covers a slow restart.
    let session_ms = if static_membership { 30_000 } else { 6_000 };
    std::fs::write(
        &path,
        format!(
            r#"
[kafka]
brokers = "{brokers}"
group_id = "{group}"
{instance}

[kafka.client]
"session.timeout.ms" = "{session_ms}"
"heartbeat.interval.ms" = "1000"

[state]
dir = "{state}"

[catalog]
path = "{catalog}"

[http]
listen = "127.0.0.1:{http_port}"

[processing]
batch_max_wait_ms = 20
"#,
            state = dir.join("state").display(),
            catalog = catalog.display(),
        ),
    )
    .unwrap();
    path
}

/// Sets `processing.guarantee` (`at_least_once` or `exactly_once`) in a
/// config written by [`write_config`].
pub fn set_guarantee(config: &Path, guarantee: &str) {
    let text = std::fs::read_to_string(config).unwrap().replace(
        "[processing]\n",
        &format!("[processing]\nguarantee = \"{guarantee}\"\n"),
    );
    std::fs::write(config, text).unwrap();
}

/// Gives the engine config beside it an API token (a file in the config's
/// directory) and `http_extra` lines in its `[http]` table.
pub fn enable_api(config: &Path, token: &str, http_extra: &str) {
    let token_file = config.with_file_name("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let text = std::fs::read_to_string(config).unwrap().replace(
        "[http]\n",
        &format!(
            "[http]\napi_token_file = \"{}\"\n{http_extra}",
            token_file.display()
        ),
    );
    std::fs::write(config, text).unwrap();
}

/// A plain HTTP/1.1 GET against a local port; the whole response, headers included.
pub fn http_get(port: u16, path: &str) -> String {
    try_http_get(port, path).unwrap()
}

pub fn try_http_get(port: u16, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// The sum of the samples of every Prometheus series whose name starts with
/// `series` (all its labels), or None while the engine's HTTP endpoint is not up.
pub fn try_metric(http_port: u16, series: &str) -> Option<f64> {
    let text = try_http_get(http_port, "/metrics").ok()?;
    Some(
        text.lines()
            .filter(|l| l.starts_with(series))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

/// The engine's own progress counters, for a failing test's message: events,
/// assignments, handovers, lag and errors.
pub fn engine_progress(http_port: u16) -> String {
    match try_http_get(http_port, "/metrics") {
        Ok(text) => text
            .lines()
            .filter(|l| {
                !l.starts_with('#')
                    && [
                        "recstream_events_total",
                        "recstream_assigned_partitions",
                        "recstream_partition_handovers_total",
                        "recstream_consumer_lag",
                        "recstream_kafka_errors_total",
                        "recstream_records_not_owned_total",
                        "recstream_outputs_published_total",
                        "recstream_broker_up",
                    ]
                    .iter()
                    .any(|m| l.starts_with(m))
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Err(e) => format!("metrics unavailable: {e}"),
    }
}

/// An HTTP response read off the wire.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: not JSON: {}", self.body))
    }
}

/// A plain HTTP/1.1 request against a local port (`headers` as `Name: value`).
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &[u8],
) -> HttpResponse {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // A server may answer (413) before reading a large body; the rest is moot.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    HttpResponse {
        status,
        headers,
        body: body.to_string(),
    }
}

/// Polls `/readyz` until the engine has its catalog and partitions.
pub fn await_ready(port: u16, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if try_http_get(port, "/readyz").is_ok_and(|r| r.starts_with("HTTP/1.1 200")) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "engine not ready after 90 s\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Copies a model's three files to `stem` by write-and-rename, card last, so
/// the engine never reads a half-written file.
pub fn install_model(from: &Path, stem: &Path) {
    let (src, dst) = (ModelFiles::new(from), ModelFiles::new(stem));
    for (s, d) in [
        (&src.onnx, &dst.onnx),
        (&src.users, &dst.users),
        (&src.card, &dst.card),
    ] {
        let tmp = d.with_extension("tmp");
        std::fs::copy(s, &tmp).unwrap();
        std::fs::rename(&tmp, d).unwrap();
    }
}

pub fn model_version(stem: &Path) -> String {
    let card: Value =
        serde_json::from_slice(&std::fs::read(ModelFiles::new(stem).card).unwrap()).unwrap();
    card["model_version"].as_str().unwrap().to_string()
}

/// Each user's latest recommendations record, read by assignment.
pub fn follow_recommendations(brokers: &str) -> Arc<Mutex<HashMap<String, Value>>> {
    let latest = Arc::new(Mutex::new(HashMap::<String, Value>::new()));
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "experiments-reader")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some("reco.recommendations.v1"), Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        tpl.add_partition_offset("reco.recommendations.v1", p.id(), Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let sink = latest.clone();
    tokio::spawn(async move {
        loop {
            let Ok(m) = consumer.recv().await else {
                continue;
            };
            let v: Value = serde_json::from_slice(m.payload().unwrap_or_default()).unwrap();
            let user = v["user_id"].as_str().unwrap().to_string();
            let mut map = sink.lock().unwrap();
            let newer = map
                .get(&user)
                .is_none_or(|old| old["version"].as_u64() < v["version"].as_u64());
            if newer {
                map.insert(user, v);
            }
        }
    });
    latest
}
