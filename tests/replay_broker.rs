//! The prequential replay through the real Apache Kafka broker scores every event
//! exactly as the in-process replay does: the Kafka path (produce, consume,
//! decode, micro-batch, RocksDB, publish) and the in-process path run the same
//! engine code, and the broker replay's lists come from the pipeline's
//! interactive queries before each event is produced. The full blend gets its
//! NCF model (trained at the cut) through the pipeline's experiment file.

mod common;

use common::Broker;
use recstream::config::EngineConfig;
use recstream::ncf::foldin::FoldInConfig;
use recstream::replay::{self, Models, Settings, Stream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kafka_path_scores_like_the_in_process_replay() {
    let broker = Broker::start();
    let stream = Stream::synthetic(160, 11);
    let work = tempfile::tempdir().unwrap();
    let settings = Settings {
        window_days: 1.0,
        epochs: Some(2),
        work_dir: work.path().to_path_buf(),
        fold_in: FoldInConfig::default(),
        tail_from: None,
        history: Default::default(),
    };
    // One model cache: both paths serve the same trained files.
    let mut models = Models::default();
    for name in ["popularity", "co-watched", "blend-no-model", "full-blend"] {
        let spec =
            replay::standard_variants(&EngineConfig::default(), 14.0, replay::HISTORY_BLEND_NCF)
                .into_iter()
                .find(|v| v.name == name)
                .unwrap();
        let in_process = replay::run_variant(&stream, &spec, &settings, &mut models).unwrap();
        let through_kafka = replay::broker::run_variant(
            &stream,
            &spec,
            &settings,
            &mut models,
            &broker.bootstrap(),
        )
        .await
        .unwrap();
        assert_eq!(in_process.trainings, through_kafka.trainings, "{name}");
        assert_eq!(in_process.ranks, through_kafka.ranks, "{name}");
        assert_eq!(in_process.all, through_kafka.all, "{name}");
        eprintln!(
            "{name}: {} events, HR@10 {:.4} both ways; through Kafka in {:.1} s",
            stream.events.len(),
            in_process.all.hr,
            through_kafka.seconds
        );
    }
}
