//! The operations files stay true to the engine: promtool accepts the scrape
//! config and the alert rules (and their unit tests pass), every metric the
//! dashboard and the rules query is one the engine exports, the YAML parses
//! and the deployment files only use subcommands and flags the CLI has, and
//! Kafka security settings reach librdkafka.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn run(program: &str, args: &[&str], dir: &Path) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (.ci/install.sh installs it)"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_accepts_the_scrape_config_and_the_rules_and_their_tests_pass() {
    let dir = repo("ops/prometheus");
    run("promtool", &["check", "config", "prometheus.yml"], &dir);
    run("promtool", &["check", "rules", "rules/recstream.yml"], &dir);
    run(
        "promtool",
        &["test", "rules", "tests/recstream.test.yml"],
        &dir,
    );
}

/// Metric names (`recstream_…`) in a text, without histogram suffixes.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("recstream_") {
        let start = i + at;
        // Not part of a longer identifier or a recording rule (`recstream:`).
        let standalone = start == 0 || {
            let b = bytes[start - 1];
            !(b.is_ascii_alphanumeric() || b == b'_' || b == b':')
        };
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if standalone {
            let name = &text[start..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            names.insert(base.to_string());
        }
        i = end.max(start + 1);
    }
    names
}

#[test]
fn the_dashboard_and_the_rules_query_only_metrics_the_engine_exports() {
    let exported: BTreeSet<String> = recstream::metrics::names().into_iter().collect();
    let dashboard: serde_json::Value = serde_json::from_slice(
        &std::fs::read(repo("ops/grafana/recstream-dashboard.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut queried = BTreeSet::new();
    let mut with_queries = 0;
    for panel in panels {
        let exprs: Vec<&str> = panel["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["expr"].as_str())
            .collect();
        if panel["type"] != "row" {
            assert!(!exprs.is_empty(), "panel {:?} has no query", panel["title"]);
            with_queries += 1;
        }
        for e in exprs {
            queried.extend(metric_names(e));
        }
    }
    let rules = std::fs::read_to_string(repo("ops/prometheus/rules/recstream.yml")).unwrap();
    queried.extend(metric_names(&rules));
    let unknown: Vec<&String> = queried.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "queried but not exported: {unknown:?}\nexported: {exported:?}"
    );
    for key in [
        "recstream_events_total",
        "recstream_processing_seconds",
        "recstream_consumer_lag_records",
        "recstream_dead_letters_total",
        "recstream_rocksdb_bytes",
        "recstream_ncf_inference_seconds",
        "recstream_feedback_clicks_total",
        "recstream_feedback_dwell_seconds_total",
        "recstream_feedback_completions_total",
        "recstream_genre_weight_mean",
    ] {
        assert!(queried.contains(key), "the dashboard shows no {key}");
    }
    println!(
        "ops: {with_queries} dashboard panels and the alert rules query {} metrics, all exported",
        queried.len()
    );
}

#[test]
fn yaml_parses_and_deployment_files_use_only_real_cli_flags() {
    let bin = env!("CARGO_BIN_EXE_recstream");
    run("python3", &["tests/clients/check_ops.py", bin], &repo(""));
}

/// SASL/SCRAM over SSL passes through `[kafka.client]` to librdkafka, which
/// accepts it (the build has SSL); no broker is contacted to create a client.
#[test]
fn kafka_security_settings_reach_librdkafka() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("recstream.toml");
    std::fs::write(
        &config,
        r#"
[kafka]
brokers = "kafka.example:9093"
[kafka.client]
"security.protocol" = "SASL_SSL"
"sasl.mechanisms" = "SCRAM-SHA-512"
"sasl.username" = "recstream"
"sasl.password" = "secret"
"ssl.endpoint.identification.algorithm" = "https"
"#,
    )
    .unwrap();
    let config = recstream::config::Config::from_file(&config).unwrap();
    let client = recstream::pipeline::consumer_config(&config);
    assert_eq!(client.get("security.protocol"), Some("SASL_SSL"));
    let consumer: Result<rdkafka::consumer::BaseConsumer, _> =
        client.clone().set("group.id", "security-check").create();
    if let Err(e) = consumer {
        panic!("librdkafka refused the security settings: {e}");
    }
    let producer: Result<rdkafka::producer::BaseProducer, _> = client.create();
    assert!(producer.is_ok(), "{:?}", producer.err());
}
