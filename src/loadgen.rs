//! `recstream loadgen`: produces synthetic interactions to the broker (Zipf item
//! popularity, a realistic event mix, event time = wall clock at production) and
//! watches the recommendations topic to measure what a consumer of the engine
//! sees: input rate, output rate, and event → published-list latency.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::Args;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use serde::Serialize;

use crate::cli::KafkaArgs;
use crate::pipeline::{self, wall_clock_ms};
use crate::rng::Rng;

#[derive(Debug, Args)]
pub struct LoadgenArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Catalog whose movie ids the events use (any format `catalog::load` reads).
    #[arg(long)]
    pub catalog: PathBuf,
    /// Events to produce.
    #[arg(long, default_value_t = 100_000)]
    pub events: usize,
    /// Distinct users.
    #[arg(long, default_value_t = 10_000)]
    pub users: u32,
    /// Target events per second; 0 produces as fast as the broker takes them.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Zipf exponent of item popularity.
    #[arg(long, default_value_t = 1.0)]
    pub zipf: f64,
    /// Give up waiting for outputs after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
    /// Seed of the event stream.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Only produce (e.g. to build a backlog for a flood test); do not wait
    /// for outputs.
    #[arg(long)]
    pub produce_only: bool,
    /// Measure the broker's ceiling instead: a plain consumer in a fresh group
    /// (the engine's consumer settings, records discarded) reads the
    /// interactions topic from the beginning until it has seen --events records.
    #[arg(long, conflicts_with = "produce_only")]
    pub bare_consume: bool,
    /// Replay real ratings instead of synthetic events: a MovieLens file
    /// (`u.data`, `ratings.dat`, `ratings.csv`), in event-time order, as
    /// `rate` events of users `ml-<id>` (the first --events of them; the
    /// catalog must hold their movies). Event time on the wire stays the wall
    /// clock at production, so latency reads off the outputs as before.
    #[arg(long)]
    pub ratings: Option<PathBuf>,
    /// With --ratings: pace the replay at this many times the original
    /// speed (instead of --rate).
    #[arg(long, requires = "ratings")]
    pub speedup: Option<f64>,
    /// Write one CSV line per timed output to this file, for finding where
    /// latency goes: `seen_ms` (since the first produce), `latency_ms`
    /// (event -> seen) and `engine_ms` (event -> the output's record
    /// timestamp, which the engine's producer sets when it enqueues it; the
    /// rest is the broker round trip to this consumer).
    #[arg(long)]
    pub latency_log: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct LoadReport {
    pub events: usize,
    pub users_touched: usize,
    pub target_rate: u64,
    pub produce_seconds: f64,
    pub input_rate: f64,
    /// First produce to the output reflecting every user's last event.
    pub pipeline_seconds: f64,
    pub pipeline_rate: f64,
    pub output_records: usize,
    pub output_rate: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p95: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_max: f64,
}

const EVENT_MIX: [(&str, f64); 9] = [
    ("play", 0.28),
    ("complete", 0.14),
    ("progress", 0.08),
    ("rate", 0.14),
    ("click", 0.14),
    ("view", 0.10),
    ("like", 0.06),
    ("skip", 0.04),
    ("dislike", 0.02),
];

/// The `i`-th synthetic event: `(user, event time, JSON payload)`. Event time is the wall
/// clock (so latency can be read off the outputs' `as_of`).
fn next_event(
    rng: &mut Rng,
    args: &LoadgenArgs,
    synth: &Synth,
    started_ms: i64,
    i: usize,
) -> (String, i64, String) {
    let Synth { ids, cdf, total } = synth;
    let user = format!("load-{}", rng.next_u64() % args.users as u64);
    let r = rng.unit() * total;
    let movie = ids[cdf.partition_point(|c| *c < r).min(ids.len() - 1)];
    let mut p = rng.unit();
    let kind = EVENT_MIX
        .iter()
        .find(|(_, share)| {
            p -= share;
            p < 0.0
        })
        .map(|(k, _)| *k)
        .unwrap_or("play");
    let ts = wall_clock_ms();
    let value = match kind {
        "rate" => format!(",\"value\":{}", 1 + rng.next_u64() % 5),
        "progress" => format!(",\"value\":{:.2}", rng.unit()),
        "play" | "complete" => format!(",\"value\":{}", 60 + rng.next_u64() % 7200),
        _ => String::new(),
    };
    let payload = format!(
        // Unique per run: a repeated id would (rightly) be applied once.
        r#"{{"event_id":"lg-{}-{started_ms}-{i}","user_id":"{user}","movie_id":{movie},"type":"{kind}","ts":{ts}{value}}}"#,
        args.seed
    );
    (user, ts, payload)
}

/// Catalog ids with their Zipf cumulative weights.
struct Synth {
    ids: Vec<u32>,
    cdf: Vec<f64>,
    total: f64,
}

/// Where events come from.
enum Source {
    Synthetic(Synth),
    /// Real ratings in event-time order, with the speed-up that paces them.
    Ratings {
        rows: Vec<crate::ncf::data::RawInteraction>,
        speedup: Option<f64>,
    },
}

impl Source {
    fn len(&self, args: &LoadgenArgs) -> usize {
        match self {
            Source::Synthetic(_) => args.events,
            Source::Ratings { rows, .. } => rows.len(),
        }
    }

    /// When event `i` is due, from the start of production.
    fn due(&self, args: &LoadgenArgs, i: usize) -> Option<Duration> {
        match self {
            Source::Ratings {
                rows,
                speedup: Some(f),
            } => {
                // Interaction times are in milliseconds.
                let since_ms = (rows[i].ts - rows[0].ts).max(0) as f64;
                Some(Duration::from_secs_f64(since_ms / 1000.0 / f))
            }
            _ => (args.rate > 0).then(|| Duration::from_secs_f64(i as f64 / args.rate as f64)),
        }
    }

    fn event(
        &self,
        rng: &mut Rng,
        args: &LoadgenArgs,
        started_ms: i64,
        i: usize,
    ) -> (String, i64, String) {
        match self {
            Source::Synthetic(synth) => next_event(rng, args, synth, started_ms, i),
            Source::Ratings { rows, .. } => {
                let r = &rows[i];
                let user = format!("ml-{}", r.user);
                let ts = wall_clock_ms();
                // Ids from Parquet or Arrow dumps may hold anything: escape.
                let payload = serde_json::json!({
                    "event_id": format!("lg-ml-{started_ms}-{i}"),
                    "user_id": user,
                    "movie_id": r.movie_id,
                    "type": "rate",
                    "ts": ts,
                    "value": r.rating,
                })
                .to_string();
                (user, ts, payload)
            }
        }
    }
}

struct Produced {
    /// Each user's last event time.
    last_ts: HashMap<String, i64>,
    started: Instant,
    started_ms: i64,
    seconds: f64,
}

/// Produces `args.events` events at `args.rate` (0: as fast as the broker
/// takes them) and waits until the broker acknowledged all.
async fn produce(
    args: &LoadgenArgs,
    config: &crate::config::Config,
    rng: &mut Rng,
    source: &Source,
) -> Result<Produced> {
    let producer = pipeline::producer(config)?;
    let mut last_ts: HashMap<String, i64> = HashMap::new();
    let started = Instant::now();
    let started_ms = wall_clock_ms();
    let mut pending = Vec::new();
    for i in 0..source.len(args) {
        if let Some(due) = source.due(args, i) {
            if let Some(wait) = (started + due).checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
        }
        let (user, ts, payload) = source.event(rng, args, started_ms, i);
        last_ts.insert(user.clone(), ts);
        let record = FutureRecord::to(&config.topics.interactions)
            .key(&user)
            .payload(&payload);
        pending.push(pipeline::enqueue(&producer, record).await?);
        if pending.len() >= 10_000 {
            pipeline::await_deliveries(std::mem::take(&mut pending)).await?;
        }
    }
    pipeline::await_deliveries(pending).await?;
    Ok(Produced {
        last_ts,
        started,
        started_ms,
        seconds: started.elapsed().as_secs_f64(),
    })
}

pub async fn run(args: LoadgenArgs) -> Result<()> {
    if args.events == 0 || args.users == 0 {
        bail!("--events and --users must be at least 1");
    }
    let config = args.kafka.load()?;
    if args.bare_consume {
        return bare_consume(&args, &config).await;
    }
    let catalog = crate::catalog::load(&args.catalog).context("--catalog")?;
    let ids = catalog.ids().to_vec();
    // Zipf over catalog order: cumulative weights, sampled by binary search.
    let mut cdf = Vec::with_capacity(ids.len());
    let mut total = 0.0;
    for rank in 1..=ids.len() {
        total += 1.0 / (rank as f64).powf(args.zipf);
        cdf.push(total);
    }
    let mut rng = Rng::new(args.seed);

    let source = match &args.ratings {
        None => Source::Synthetic(Synth { ids, cdf, total }),
        Some(path) => {
            if args.speedup.is_some_and(|f| !(f.is_finite() && f > 0.0)) {
                bail!("--speedup must be a positive number");
            }
            let mut rows = crate::ncf::data::load_interactions(path)
                .with_context(|| format!("--ratings {}", path.display()))?;
            rows.retain(|r| catalog.get(r.movie_id).is_some() && r.rating.is_finite());
            rows.sort_by_key(|r| r.ts);
            rows.truncate(args.events);
            if rows.is_empty() {
                bail!("--ratings: no rating of a movie in --catalog");
            }
            Source::Ratings {
                rows,
                speedup: args.speedup,
            }
        }
    };
    let events = source.len(&args);
    if args.produce_only {
        let produced = produce(&args, &config, &mut rng, &source).await?;
        println!(
            "{}",
            serde_json::json!({"events": events, "produce_seconds": produced.seconds, "input_rate": events as f64 / produced.seconds})
        );
        return Ok(());
    }

    // Watch outputs from the current end of every partition, resolved before
    // anything is produced (a lazily resolved "latest" could skip early outputs).
    let client = pipeline::consumer_config(&config)
        .set("group.id", "recstream-loadgen")
        .set("enable.auto.commit", "false")
        .clone();
    let consumer = assign_whole_topic(client, config.topics.recommendations.clone(), |c, t, p| {
        let (_, high) = c.fetch_watermarks(t, p, Duration::from_secs(15))?;
        Ok(rdkafka::Offset::Offset(high))
    })
    .await?;

    // Outputs are timestamped as they arrive, concurrently with producing.
    let (seen_tx, mut seen_rx) =
        tokio::sync::mpsc::unbounded_channel::<(String, i64, i64, Instant, Option<i64>)>();
    let watcher = tokio::spawn(async move {
        loop {
            let Ok(m) = consumer.recv().await else {
                continue;
            };
            let seen_ms = wall_clock_ms();
            let seen_at = Instant::now();
            let Some(user) = m.key().map(|k| String::from_utf8_lossy(k).into_owned()) else {
                continue;
            };
            let as_of = m
                .payload()
                .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
                .and_then(|v| v["as_of"].as_i64());
            let enqueued_ms = m.timestamp().to_millis();
            if let Some(as_of) = as_of {
                if seen_tx
                    .send((user, as_of, seen_ms, seen_at, enqueued_ms))
                    .is_err()
                {
                    break;
                }
            }
        }
    });

    let Produced {
        last_ts,
        started,
        started_ms,
        seconds: produce_seconds,
    } = produce(&args, &config, &mut rng, &source).await?;

    // Until every user's output reflects their last event.
    let mut waiting = last_ts.clone();
    let mut newest_seen: HashMap<String, i64> = HashMap::new();
    let mut latencies: Vec<f64> = Vec::new();
    let mut latency_log = String::from("seen_ms,latency_ms,engine_ms\n");
    let mut outputs = 0usize;
    let mut last_output = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    while !waiting.is_empty() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let Ok(Some((user, as_of, seen_ms, seen_at, enqueued_ms))) =
            tokio::time::timeout(remaining, seen_rx.recv()).await
        else {
            watcher.abort();
            bail!(
                "{} users still without a final output after {} s",
                waiting.len(),
                args.timeout_secs
            );
        };
        let newest = newest_seen.entry(user.clone()).or_insert(as_of);
        *newest = (*newest).max(as_of);
        if as_of >= started_ms {
            outputs += 1;
            latencies.push((seen_ms - as_of) as f64);
            last_output = seen_at;
            if args.latency_log.is_some() {
                let engine_ms = enqueued_ms.map_or(String::new(), |t| (t - as_of).to_string());
                latency_log.push_str(&format!(
                    "{},{},{engine_ms}\n",
                    seen_ms - started_ms,
                    seen_ms - as_of
                ));
            }
        }
        if waiting.get(&user).is_some_and(|t| as_of >= *t) {
            waiting.remove(&user);
        }
    }
    watcher.abort();
    if let Some(path) = &args.latency_log {
        std::fs::write(path, latency_log)
            .with_context(|| format!("--latency-log {}", path.display()))?;
    }
    let pipeline_seconds = (last_output - started).as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let pct = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    let report = LoadReport {
        events,
        users_touched: last_ts.len(),
        target_rate: args.rate,
        produce_seconds,
        input_rate: events as f64 / produce_seconds,
        pipeline_seconds,
        pipeline_rate: events as f64 / pipeline_seconds,
        output_records: outputs,
        output_rate: outputs as f64 / pipeline_seconds,
        latency_ms_p50: pct(0.50),
        latency_ms_p95: pct(0.95),
        latency_ms_p99: pct(0.99),
        latency_ms_max: pct(1.0),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// A consumer assigned every partition of `topic` (no group join), each from
/// the offset `start(consumer, topic, partition)` picks. Blocking client
/// calls, so off the runtime.
async fn assign_whole_topic(
    client: rdkafka::ClientConfig,
    topic: String,
    start: impl Fn(&StreamConsumer, &str, i32) -> Result<rdkafka::Offset> + Send + 'static,
) -> Result<StreamConsumer> {
    tokio::task::spawn_blocking(move || {
        let consumer: StreamConsumer = client.create()?;
        // A topic created a moment ago may not have its partition leaders yet
        // (NotLeaderForPartition): ask again for a while before giving up.
        let deadline = Instant::now() + Duration::from_secs(30);
        let tpl = loop {
            match whole_topic_offsets(&consumer, &topic, &start) {
                Ok(tpl) => break tpl,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, topic, "topic not ready; asking again");
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(e) => return Err(e),
            }
        };
        consumer.assign(&tpl)?;
        Ok(consumer)
    })
    .await?
}

/// Every partition of `topic` with the offset `start` picks for it.
fn whole_topic_offsets(
    consumer: &StreamConsumer,
    topic: &str,
    start: &impl Fn(&StreamConsumer, &str, i32) -> Result<rdkafka::Offset>,
) -> Result<rdkafka::TopicPartitionList> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(15))?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for t in metadata.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), start(consumer, topic, p.id())?)?;
        }
    }
    if tpl.count() == 0 {
        bail!("topic {topic} not found");
    }
    Ok(tpl)
}

/// What `--bare-consume` prints.
#[derive(Debug, Serialize)]
pub struct BareConsumeReport {
    pub records: usize,
    /// From the assignment to the last record.
    pub seconds: f64,
    pub rate: f64,
}

/// The broker's consume ceiling for the engine's own client settings: every
/// partition of the interactions topic assigned from the beginning (no group
/// join to wait for), records counted and dropped.
async fn bare_consume(args: &LoadgenArgs, config: &crate::config::Config) -> Result<()> {
    let client = pipeline::consumer_config(config)
        .set("group.id", "recstream-bare-consume")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .clone();
    let consumer = assign_whole_topic(client, config.topics.interactions.clone(), |_, _, _| {
        Ok(rdkafka::Offset::Beginning)
    })
    .await?;
    let started = Instant::now();
    let deadline = Duration::from_secs(args.timeout_secs);
    let mut records = 0usize;
    while records < args.events {
        let message = tokio::time::timeout(deadline, consumer.recv())
            .await
            .with_context(|| {
                format!(
                    "only {records} of {} records after {} s",
                    args.events, args.timeout_secs
                )
            })?;
        if message.is_ok() {
            records += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let report = BareConsumeReport {
        records,
        seconds,
        rate: records as f64 / seconds,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ncf::data::RawInteraction;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: LoadgenArgs,
    }

    fn args() -> LoadgenArgs {
        Cli::parse_from(["loadgen", "--catalog", "c.csv"]).args
    }

    #[test]
    fn a_ratings_replay_is_paced_by_event_time_and_decodes_as_rate_events() {
        let row = |user: &str, movie_id, ts| RawInteraction {
            user: user.into(),
            movie_id,
            rating: 3.5,
            ts,
        };
        let source = Source::Ratings {
            rows: vec![
                row("1", 10, 50_000),
                row("2", 20, 51_000),
                row("1", 30, 60_000),
            ],
            speedup: Some(1000.0),
        };
        let args = args();
        assert_eq!(source.len(&args), 3);
        let due: Vec<Duration> = (0..3).map(|i| source.due(&args, i).unwrap()).collect();
        // 10 s of event time at 1000× take 10 ms.
        assert_eq!(due[2], Duration::from_millis(10));
        assert!(due[0] < due[1] && due[1] < due[2]);
        let (user, _, payload) = source.event(&mut Rng::new(1), &args, 0, 2);
        assert_eq!(user, "ml-1");
        let event = crate::event::parse_interaction(payload.as_bytes()).unwrap();
        assert_eq!((event.movie_id, event.value), (30, Some(3.5)));
        assert_eq!(event.kind, crate::event::EventType::Rate);
    }
}
