//! Every metric the engine exports, defined in one place with bounded labels:
//! event types and reasons are closed enums, partitions are bounded by the topic,
//! genres by the catalog (at most 64).

use std::sync::LazyLock;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::store::StoreStats;

pub struct Metrics {
    pub registry: Registry,
    /// Every registered family's full name, gathered or not.
    names: Vec<String>,
    events: IntCounterVec,
    dead_letters: IntCounterVec,
    processing_seconds: Histogram,
    event_lag_seconds: Histogram,
    batch_size: Histogram,
    consumer_lag: IntGaugeVec,
    outputs: IntCounterVec,
    users_recomputed: IntCounter,
    output_chunks: IntCounter,
    refreshes: IntCounterVec,
    stage_seconds: HistogramVec,
    genre_weight: GaugeVec,
    rocksdb_bytes: IntGaugeVec,
    rocksdb_cache_hit_ratio: Gauge,
    catalog_movies: IntGauge,
    kafka_errors: IntCounterVec,
    assigned_partitions: IntGauge,
    scorer_seconds: Histogram,
    inference_seconds: Histogram,
    inference_batch: Histogram,
    fold_in_seconds: Histogram,
    not_owned: IntCounter,
    partition_handovers: IntCounterVec,
    restore_records: IntCounter,
    restore_remaining: IntGauge,
    global_items_batches: IntCounterVec,
    global_items_lag: Gauge,
    restore_seconds: Histogram,
    changelog_records: IntCounter,
    transactions: IntCounterVec,
    transaction_seconds: Histogram,
    broker_up: IntGauge,
    feedback_impressions: IntCounterVec,
    feedback_clicks: IntCounterVec,
    feedback_plays: IntCounterVec,
    feedback_completions: IntCounterVec,
    feedback_dwell: prometheus::CounterVec,
    variant_lists: IntCounterVec,
    experiment_share: GaugeVec,
    model_loads: IntCounterVec,
    model_info: IntGaugeVec,
    http_requests: IntCounterVec,
    http_seconds: HistogramVec,
    api_events: IntCounterVec,
    live_watchers: IntGauge,
}

fn build() -> Metrics {
    let r = Registry::new_custom(Some("recstream".into()), None).expect("valid prefix");
    let latency_buckets = vec![
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    let mut names = Vec::new();
    macro_rules! reg {
        ($m:expr) => {{
            let m = $m;
            names.extend(
                prometheus::core::Collector::desc(&m)
                    .iter()
                    .map(|d| format!("recstream_{}", d.fq_name)),
            );
            r.register(Box::new(m.clone())).expect("unique metric");
            m
        }};
    }
    let hist = |name: &str, help: &str, buckets: Vec<f64>| {
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
            .expect("valid histogram")
    };
    #[cfg(target_os = "linux")]
    r.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))
    .expect("process collector");
    Metrics {
        events: reg!(IntCounterVec::new(
            Opts::new("events_total", "Input records by event type and outcome (applied, duplicate, dead_lettered)."),
            &["type", "outcome"]
        )
        .unwrap()),
        dead_letters: reg!(IntCounterVec::new(
            Opts::new("dead_letters_total", "Records sent to the dead-letter topic, by reason."),
            &["reason"]
        )
        .unwrap()),
        processing_seconds: reg!(hist(
            "processing_seconds",
            "Wall time from receiving a record to its outputs being acknowledged by the broker.",
            latency_buckets.clone()
        )),
        event_lag_seconds: reg!(hist(
            "event_to_publish_lag_seconds",
            "Event time of an applied event to the acknowledged publish of its outputs.",
            vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 3600.0, 86400.0]
        )),
        batch_size: reg!(hist(
            "batch_records",
            "Records per micro-batch.",
            vec![1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 20000.0]
        )),
        consumer_lag: reg!(IntGaugeVec::new(
            Opts::new("consumer_lag_records", "Consumer lag per input partition, from librdkafka statistics."),
            &["topic", "partition"]
        )
        .unwrap()),
        outputs: reg!(IntCounterVec::new(
            Opts::new("outputs_published_total", "Output records acknowledged by the broker, by kind."),
            &["kind"]
        )
        .unwrap()),
        users_recomputed: reg!(IntCounter::new(
            "users_recomputed_total",
            "Users whose outputs were recomputed (several events of a user in one batch count once)."
        )
        .unwrap()),
        output_chunks: reg!(IntCounter::new(
            "output_chunks_total",
            "Chunks of a big batch's outputs handed to the publisher before the batch ended."
        )
        .unwrap()),
        refreshes: reg!(IntCounterVec::new(
            Opts::new("refresh_commands_total", "Refresh commands applied, by scope (user, all)."),
            &["scope"]
        )
        .unwrap()),
        stage_seconds: reg!(HistogramVec::new(
            HistogramOpts::new("stage_seconds", "Time per micro-batch in each processing stage.")
                .buckets(latency_buckets.clone()),
            &["stage"]
        )
        .unwrap()),
        genre_weight: reg!(GaugeVec::new(
            Opts::new(
                "genre_weight_mean",
                "Mean share of each genre in the preferences of recently updated users (drift over time)."
            ),
            &["genre"]
        )
        .unwrap()),
        rocksdb_bytes: reg!(IntGaugeVec::new(
            Opts::new("rocksdb_bytes", "RocksDB size by measure (live, sst, memtable)."),
            &["measure"]
        )
        .unwrap()),
        rocksdb_cache_hit_ratio: reg!(Gauge::new(
            "rocksdb_block_cache_hit_ratio",
            "Block cache hits / (hits + misses) since start."
        )
        .unwrap()),
        catalog_movies: reg!(IntGauge::new("catalog_movies", "Movies in the catalog.").unwrap()),
        kafka_errors: reg!(IntCounterVec::new(
            Opts::new("kafka_errors_total", "Kafka client errors by operation (consume, produce)."),
            &["op"]
        )
        .unwrap()),
        assigned_partitions: reg!(IntGauge::new(
            "assigned_partitions",
            "Input partitions currently assigned to this instance."
        )
        .unwrap()),
        scorer_seconds: reg!(hist(
            "scorer_seconds",
            "Recompute time per user of a variant with a model: candidates, NCF re-scoring, blend and rows (tract alone: ncf_inference_seconds).",
            latency_buckets.clone()
        )),
        inference_seconds: reg!(hist(
            "ncf_inference_seconds",
            "NCF model (tract) run time per scored batch.",
            latency_buckets.clone()
        )),
        inference_batch: reg!(hist(
            "ncf_inference_batch_size",
            "Pairs scored per NCF model run.",
            vec![1.0, 10.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0]
        )),
        fold_in_seconds: reg!(hist(
            "ncf_fold_in_seconds",
            "Time to fold one user's new interactions into their NCF vector.",
            latency_buckets.clone()
        )),
        not_owned: reg!(IntCounter::new(
            "records_not_owned_total",
            "Records consumed just before their partition was revoked; left to the new owner."
        )
        .unwrap()),
        partition_handovers: reg!(IntCounterVec::new(
            Opts::new(
                "partition_handovers_total",
                "Partition state on assignment: kept (local copy current), restored (from the changelog), dropped (lost to another instance)."
            ),
            &["outcome"]
        )
        .unwrap()),
        restore_records: reg!(IntCounter::new(
            "restore_records_total",
            "Changelog records read while restoring partitions."
        )
        .unwrap()),
        restore_remaining: reg!(IntGauge::new(
            "restore_remaining_records",
            "Changelog records still to read before the partitions being restored can be processed (0: none in progress)."
        )
        .unwrap()),
        global_items_batches: reg!(IntCounterVec::new(
            Opts::new(
                "global_items_batches_total",
                "Changelog batches the global item follower read: applied (another instance's partition), own (a partition this instance holds, skipped), undecodable (skipped, logged)."
            ),
            &["outcome"]
        )
        .unwrap()),
        global_items_lag: reg!(Gauge::new(
            "global_items_lag_seconds",
            "How far the global item tables handed to the engine trail the changelog: 0 once every partition was read to its end; otherwise the age of the newest complete batch read of the furthest-behind partition."
        )
        .unwrap()),
        restore_seconds: reg!(hist(
            "restore_seconds",
            "Time to restore one partition's state from the changelog.",
            vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]
        )),
        changelog_records: reg!(IntCounter::new(
            "changelog_records_total",
            "State changes written to the changelog topic (acknowledged)."
        )
        .unwrap()),
        transactions: reg!(IntCounterVec::new(
            Opts::new(
                "transactions_total",
                "exactly_once: Kafka transactions by outcome (committed, aborted, fenced)."
            ),
            &["outcome"]
        )
        .unwrap()),
        transaction_seconds: reg!(hist(
            "transaction_commit_seconds",
            "exactly_once: time from the last record of a batch's transaction handed to the producer until the commit returned (offsets and EndTxn round trips).",
            latency_buckets.clone()
        )),
        broker_up: reg!(IntGauge::new(
            "broker_up",
            "1 while librdkafka reports at least one broker connection up, 0 during an outage."
        )
        .unwrap()),
        feedback_impressions: reg!(IntCounterVec::new(
            Opts::new(
                "feedback_impressions_total",
                "Items published in users' lists, by variant, list (recommendations or carousel row kind) and position."
            ),
            &["variant", "list", "position"]
        )
        .unwrap()),
        feedback_clicks: reg!(IntCounterVec::new(
            Opts::new(
                "feedback_clicks_total",
                "Clicks and plays on an item of the user's last published lists, by the variant, list and position it was shown at."
            ),
            &["variant", "list", "position"]
        )
        .unwrap()),
        feedback_plays: reg!(IntCounterVec::new(
            Opts::new("feedback_plays_total", "Plays by the user's variant."),
            &["variant"]
        )
        .unwrap()),
        feedback_completions: reg!(IntCounterVec::new(
            Opts::new("feedback_completions_total", "Completions by the user's variant."),
            &["variant"]
        )
        .unwrap()),
        feedback_dwell: reg!(prometheus::CounterVec::new(
            Opts::new("feedback_dwell_seconds_total", "Dwell seconds reported by events, by the user's variant."),
            &["variant"]
        )
        .unwrap()),
        variant_lists: reg!(IntCounterVec::new(
            Opts::new("variant_lists_total", "Users' output sets computed, by variant."),
            &["variant"]
        )
        .unwrap()),
        experiment_share: reg!(GaugeVec::new(
            Opts::new("experiment_share", "Configured traffic share of each variant in force."),
            &["variant"]
        )
        .unwrap()),
        model_loads: reg!(IntCounterVec::new(
            Opts::new(
                "model_loads_total",
                "Model and experiment loads: loaded, or rejected (the previous one keeps serving)."
            ),
            &["outcome"]
        )
        .unwrap()),
        model_info: reg!(IntGaugeVec::new(
            Opts::new("model_info", "1 for the model version each variant serves."),
            &["variant", "model_version"]
        )
        .unwrap()),
        http_requests: reg!(IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests by route pattern and status code."
            ),
            &["route", "status"]
        )
        .unwrap()),
        http_seconds: reg!(HistogramVec::new(
            HistogramOpts::new("http_request_seconds", "HTTP request latency by route pattern (SSE streams excluded).")
                .buckets(latency_buckets.clone()),
            &["route"]
        )
        .unwrap()),
        api_events: reg!(IntCounterVec::new(
            Opts::new(
                "api_events_total",
                "Interactions sent to POST /api/track: accepted (produced) or rejected with a reason."
            ),
            &["outcome"]
        )
        .unwrap()),
        live_watchers: reg!(IntGauge::new(
            "live_watchers",
            "Open server-sent-event streams of the live page."
        )
        .unwrap()),
        registry: r,
        names,
    }
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let m = build();
    // Both outcomes exist from the start, so the first rejection is an
    // increase that alerts can see.
    for outcome in ["loaded", "rejected"] {
        m.model_loads.with_label_values(&[outcome]);
    }
    m
});

pub fn event(kind: &str, outcome: &str) {
    METRICS.events.with_label_values(&[kind, outcome]).inc();
}

pub fn dead_letter(reason: &str) {
    METRICS.dead_letters.with_label_values(&[reason]).inc();
}

pub fn processing_latency(seconds: f64) {
    METRICS.processing_seconds.observe(seconds);
}

pub fn event_to_publish_lag(seconds: f64) {
    METRICS.event_lag_seconds.observe(seconds.max(0.0));
}

pub fn batch(records: usize) {
    METRICS.batch_size.observe(records as f64);
}

pub fn consumer_lag(topic: &str, partition: i32, lag: i64) {
    METRICS
        .consumer_lag
        .with_label_values(&[topic, &partition.to_string()])
        .set(lag);
}

pub fn output_published(kind: &str, n: u64) {
    METRICS.outputs.with_label_values(&[kind]).inc_by(n);
}

pub fn users_recomputed(n: u64) {
    METRICS.users_recomputed.inc_by(n);
}

pub fn output_chunk() {
    METRICS.output_chunks.inc();
}

pub fn refresh(scope: &str) {
    METRICS.refreshes.with_label_values(&[scope]).inc();
}

pub fn stage(stage: &str, seconds: f64) {
    METRICS
        .stage_seconds
        .with_label_values(&[stage])
        .observe(seconds);
}

pub fn genre_weight(genre: &str, mean_share: f64) {
    METRICS
        .genre_weight
        .with_label_values(&[genre])
        .set(mean_share);
}

pub fn catalog_size(n: usize) {
    METRICS.catalog_movies.set(n as i64);
}

pub fn kafka_error(op: &str) {
    METRICS.kafka_errors.with_label_values(&[op]).inc();
}

pub fn record_not_owned() {
    METRICS.not_owned.inc();
}

/// `outcome`: kept, restored or dropped.
/// `outcome`: applied, own or undecodable.
pub fn global_items_batch(outcome: &'static str) {
    METRICS
        .global_items_batches
        .with_label_values(&[outcome])
        .inc();
}

pub fn global_items_lag(seconds: f64) {
    METRICS.global_items_lag.set(seconds);
}

pub fn partition_handover(outcome: &'static str) {
    METRICS
        .partition_handovers
        .with_label_values(&[outcome])
        .inc();
}

pub fn restore_progress(read: u64, remaining: i64) {
    METRICS.restore_records.inc_by(read);
    METRICS.restore_remaining.set(remaining.max(0));
}

pub fn restore_finished(seconds: f64) {
    METRICS.restore_seconds.observe(seconds);
    METRICS.restore_remaining.set(0);
}

pub fn changelog_written(records: u64) {
    METRICS.changelog_records.inc_by(records);
}

/// `outcome`: committed, aborted or fenced.
pub fn transaction(outcome: &'static str) {
    METRICS.transactions.with_label_values(&[outcome]).inc();
}

pub fn transaction_commit(seconds: f64) {
    METRICS.transaction_seconds.observe(seconds);
}

pub fn broker_up(up: bool) {
    METRICS.broker_up.set(up as i64);
}

pub fn assigned_partitions(n: usize) {
    METRICS.assigned_partitions.set(n as i64);
}

pub fn scorer_latency(seconds: f64) {
    METRICS.scorer_seconds.observe(seconds);
}

pub fn inference(seconds: f64, batch: usize) {
    METRICS.inference_seconds.observe(seconds);
    METRICS.inference_batch.observe(batch as f64);
}

pub fn fold_in(seconds: f64) {
    METRICS.fold_in_seconds.observe(seconds);
}

pub fn rocksdb(stats: &StoreStats) {
    let m = &METRICS;
    m.rocksdb_bytes
        .with_label_values(&["live"])
        .set(stats.live_bytes as i64);
    m.rocksdb_bytes
        .with_label_values(&["sst"])
        .set(stats.sst_bytes as i64);
    m.rocksdb_bytes
        .with_label_values(&["memtable"])
        .set(stats.memtable_bytes as i64);
    let total = stats.block_cache_hits + stats.block_cache_misses;
    if total > 0 {
        m.rocksdb_cache_hit_ratio
            .set(stats.block_cache_hits as f64 / total as f64);
    }
}

/// Position labels 1..=MAX_POSITION and one for everything beyond.
static POSITIONS: LazyLock<Vec<String>> = LazyLock::new(|| {
    let max = crate::feedback::MAX_POSITION;
    (0..=max + 1)
        .map(|p| {
            if p > max {
                format!("{}+", max + 1)
            } else {
                p.to_string()
            }
        })
        .collect()
});

fn position_label(position: usize) -> &'static str {
    &POSITIONS[position.min(crate::feedback::MAX_POSITION + 1)]
}

/// The impressions counter of one (variant, list, position): callers that
/// count many impressions keep the handle (a label lookup hashes three
/// strings under a lock; the handle's increment is one atomic add).
pub fn feedback_impression_counter(variant: &str, list: &str, position: usize) -> IntCounter {
    METRICS
        .feedback_impressions
        .with_label_values(&[variant, list, position_label(position)])
}

pub fn feedback_click(variant: &str, list: &str, position: usize) {
    METRICS
        .feedback_clicks
        .with_label_values(&[variant, list, position_label(position)])
        .inc();
}

pub fn feedback_play(variant: &str) {
    METRICS.feedback_plays.with_label_values(&[variant]).inc();
}

pub fn feedback_completion(variant: &str) {
    METRICS
        .feedback_completions
        .with_label_values(&[variant])
        .inc();
}

pub fn feedback_dwell(variant: &str, seconds: f64) {
    METRICS
        .feedback_dwell
        .with_label_values(&[variant])
        .inc_by(seconds);
}

pub fn variant_list(variant: &str) {
    METRICS.variant_lists.with_label_values(&[variant]).inc();
}

/// The variants now in force: (name, share, model version).
pub fn experiment(variants: &[(&str, f64, Option<&str>)]) {
    METRICS.experiment_share.reset();
    METRICS.model_info.reset();
    for (name, share, model) in variants {
        METRICS
            .experiment_share
            .with_label_values(&[name])
            .set(*share);
        if let Some(version) = model {
            METRICS
                .model_info
                .with_label_values(&[name, version])
                .set(1);
        }
    }
}

/// `outcome`: loaded or rejected.
pub fn model_load(outcome: &'static str) {
    METRICS.model_loads.with_label_values(&[outcome]).inc();
}

/// `route` is the matched route pattern (bounded), never the raw path.
pub fn http_request(route: &str, status: u16, seconds: Option<f64>) {
    METRICS
        .http_requests
        .with_label_values(&[route, &status.to_string()])
        .inc();
    if let Some(s) = seconds {
        METRICS.http_seconds.with_label_values(&[route]).observe(s);
    }
}

/// `outcome`: accepted, or a decoder reason (a closed set).
pub fn api_event(outcome: &str) {
    METRICS.api_events.with_label_values(&[outcome]).inc();
}

pub fn live_watchers(delta: i64) {
    METRICS.live_watchers.add(delta);
}

/// The full name of every metric family the engine exports, including
/// vectors that have no series yet (for dashboard and alert checks).
pub fn names() -> Vec<String> {
    let mut names = METRICS.names.clone();
    for family in METRICS.registry.gather() {
        names.push(family.name().to_string());
    }
    names.sort();
    names.dedup();
    names
}

/// The Prometheus text exposition of every metric.
pub fn render() -> String {
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&METRICS.registry.gather(), &mut buf)
        .expect("text encoding cannot fail");
    String::from_utf8(buf).expect("exposition is UTF-8")
}
