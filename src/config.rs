//! Engine configuration: read once from TOML, validated into typed values.
//! Every validation error names the offending field.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::decay::{HalfLives, MS_PER_HOUR};
use crate::event::EventType;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid config: `{field}` {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub topics: TopicNames,
    pub state: StateConfig,
    pub processing: ProcessingConfig,
    pub catalog: CatalogConfig,
    pub http: HttpConfig,
    pub engine: EngineConfig,
    pub model: ModelConfig,
    pub experiment: ExperimentConfig,
    pub global_items: GlobalItemsConfig,
}

/// `[global_items]`: every instance follows the item side (popularity,
/// trending, genre counters, co-watch lists) of the partitions other
/// instances hold, from the changelog topic, so scaling out does not split
/// what the crowd teaches (see `global`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GlobalItemsConfig {
    pub enabled: bool,
    /// How often followed changes are folded into the item tables the
    /// candidates read: the view lags the other instances by about this
    /// plus the changelog's own delay (`recstream_global_items_lag_seconds`).
    pub flush_interval_ms: u64,
}

impl Default for GlobalItemsConfig {
    fn default() -> Self {
        GlobalItemsConfig {
            enabled: true,
            flush_interval_ms: 1000,
        }
    }
}

/// A/B variants (see `experiment`): the file is re-read while the engine
/// runs, as are the model files it names.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExperimentConfig {
    /// Without a file, everyone is in one `default` variant.
    pub file: Option<PathBuf>,
    /// How often the experiment and model files are checked for changes.
    pub reload_interval_ms: u64,
}

impl Default for ExperimentConfig {
    fn default() -> Self {
        ExperimentConfig {
            file: None,
            reload_interval_ms: 2_000,
        }
    }
}

/// The NCF model re-scoring candidates (see `models/README.md`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// `NAME.onnx`, with `NAME.card.json` and `NAME.users.f32` beside it.
    /// Without a model the blend uses the other signals only.
    pub path: Option<PathBuf>,
    pub fold_in: crate::ncf::foldin::FoldInConfig,
    /// A learned blend (`NAME.blend.json`, see `models/README.md`) that ranks
    /// candidates instead of `[blend]`'s weights.
    pub ranker: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    pub brokers: String,
    pub group_id: String,
    /// Static group membership (`group.instance.id`), unique per instance: a
    /// restarted instance takes its partitions back at once instead of waiting
    /// for its old membership to expire. Recommended (e.g. the pod name).
    pub instance_id: Option<String>,
    /// Passed through to librdkafka verbatim (e.g. `security.protocol`, `sasl.*`, `ssl.*`).
    pub client: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            group_id: "recstream".into(),
            instance_id: None,
            client: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicNames {
    pub interactions: String,
    pub catalog: String,
    pub recommendations: String,
    pub carousels: String,
    pub insights: String,
    pub refresh: String,
    pub dead_letters: String,
    /// Compacted; partitioned like `interactions`. Internal to the engine.
    pub changelog: String,
    /// Compacted; which instance owns which partitions (query routing). Internal.
    pub instances: String,
}

impl Default for TopicNames {
    fn default() -> Self {
        TopicNames {
            interactions: "reco.interactions.v1".into(),
            catalog: "reco.catalog.v1".into(),
            recommendations: "reco.recommendations.v1".into(),
            carousels: "reco.carousels.v2".into(),
            insights: "reco.insights.v1".into(),
            refresh: "reco.refresh.v1".into(),
            dead_letters: "reco.dead-letters.v1".into(),
            changelog: "reco.state-changelog.v1".into(),
            instances: "reco.instances.v1".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    pub dir: PathBuf,
    pub block_cache_mb: usize,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            dir: PathBuf::from("./recstream-state"),
            block_cache_mb: 64,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessingConfig {
    /// A micro-batch closes at this many records...
    pub batch_max_records: usize,
    /// ...or this long after its first record. Batches form only while the
    /// engine is busy: a record that finds it idle is processed at once, and
    /// a gathered batch goes as soon as the engine has room. A user's events
    /// in one batch cost one recompute and one set of records (the
    /// counterpart of Kafka Streams' record cache), so under load bigger
    /// batches cost less per event (benches/README.md, "A coalescing window").
    pub batch_max_wait_ms: u64,
    pub max_event_bytes: usize,
    /// Graceful shutdown deadline.
    pub shutdown_timeout_ms: u64,
    /// What a crash or a rebalance may do to the output topics.
    pub guarantee: Guarantee,
    /// `exactly_once`: how long the broker lets a transaction stay open before
    /// it aborts it (a crashed instance's open transaction holds back
    /// `read_committed` readers of its partitions for this long, unless the
    /// instance restarts sooner). Kafka Streams uses 10 s for the same reason.
    pub transaction_timeout_ms: u64,
}

impl Default for ProcessingConfig {
    fn default() -> Self {
        ProcessingConfig {
            batch_max_records: 20_000,
            batch_max_wait_ms: 1000,
            max_event_bytes: crate::event::DEFAULT_MAX_EVENT_BYTES,
            shutdown_timeout_ms: 10_000,
            guarantee: Guarantee::AtLeastOnce,
            transaction_timeout_ms: 10_000,
        }
    }
}

/// `processing.guarantee`. State is exactly-once in both modes (each event is
/// applied once, offsets live with the state); they differ in the outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Guarantee {
    /// Outputs are published, then offsets stored; after a crash the records
    /// since the last acknowledged batch are recomputed and their outputs
    /// published again with the same `version` (consumers drop repeats).
    #[default]
    AtLeastOnce,
    /// Each micro-batch's outputs, dead letters, changelog records and input
    /// offsets are one Kafka transaction: a `read_committed` consumer sees
    /// every output record exactly once, in order.
    ExactlyOnce,
}

impl Guarantee {
    pub fn as_str(self) -> &'static str {
        match self {
            Guarantee::AtLeastOnce => "at_least_once",
            Guarantee::ExactlyOnce => "exactly_once",
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CatalogConfig {
    /// A catalog file loaded at start (see `catalog::load`); the catalog topic
    /// adds and replaces movies on top of it.
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the HTTP server (`/metrics`, `/healthz`, `/readyz`, the API
    /// under `/api` and the live page at `/`); empty disables the server.
    pub listen: String,
    /// The URL other instances send clients to for the users this instance
    /// owns. Default: `http://` + the bound address, with an unspecified IP
    /// (`0.0.0.0`) replaced by the host name.
    pub advertised_url: Option<String>,
    /// A file holding the bearer token of the write endpoints (`POST
    /// /api/track`, `POST /api/refresh`); the environment variable
    /// `RECSTREAM_API_TOKEN` takes precedence. Without either, the write
    /// endpoints answer 403.
    pub api_token_file: Option<PathBuf>,
    /// Largest accepted request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// How often this instance re-announces its partitions on the instances topic.
    pub announce_interval_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:9898".into(),
            advertised_url: None,
            api_token_file: None,
            max_body_bytes: 64 * 1024,
            announce_interval_ms: 5_000,
        }
    }
}

/// Everything the pure processing functions depend on.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    pub decay: DecayConfig,
    pub event_weights: EventWeights,
    pub blend: BlendWeights,
    pub lists: ListConfig,
    pub co_watch: CoWatchConfig,
}

/// The co-watch candidate source (see `cowatch`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoWatchConfig {
    /// Neighbours kept per item (and per partition).
    pub neighbors: usize,
    /// How many of the user's previously consumed items each new one is paired with.
    pub window: usize,
    /// The user's most recently consumed items whose neighbours become candidates.
    pub seeds: usize,
    /// Specificity of the association: 0 ranks a seed's neighbours by
    /// conditional probability (popular ones first), 0.5 by cosine.
    pub alpha: f64,
    /// Evidence needed for full weight: the signal is scaled by
    /// `n / (n + support)`, where `n` is how often the candidate was
    /// co-watched with the seeds, so a single co-occurrence does not count
    /// as much as fifty. 0 turns the damping off.
    pub support: f64,
}

impl Default for CoWatchConfig {
    fn default() -> Self {
        CoWatchConfig {
            neighbors: 200,
            window: 2,
            seeds: 5,
            alpha: 0.0,
            support: 3.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecayConfig {
    /// Half-life of a user's genre preferences.
    pub user_half_life_hours: f64,
    /// Half-life of item and genre popularity.
    pub popularity_half_life_hours: f64,
    /// Half-life of the short window that trending compares with popularity.
    pub trending_half_life_hours: f64,
}

impl Default for DecayConfig {
    fn default() -> Self {
        DecayConfig {
            user_half_life_hours: 24.0 * 30.0,
            popularity_half_life_hours: 24.0 * 30.0,
            trending_half_life_hours: 6.0,
        }
    }
}

impl DecayConfig {
    pub fn user_half_life_ms(&self) -> f64 {
        self.user_half_life_hours * MS_PER_HOUR
    }
    pub fn item_half_lives(&self) -> HalfLives {
        HalfLives {
            long_ms: self.popularity_half_life_hours * MS_PER_HOUR,
            short_ms: self.trending_half_life_hours * MS_PER_HOUR,
        }
    }
}

/// How much one event of each type moves the user's genre preferences.
/// `progress` is multiplied by the progress fraction; `rate` by
/// `(rating - 3) / 2`, so 5 stars is `+rate`, 1 star is `-rate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventWeights {
    pub view: f64,
    pub click: f64,
    pub play: f64,
    pub progress: f64,
    pub complete: f64,
    pub rate: f64,
    pub like: f64,
    pub dislike: f64,
    pub watchlist_add: f64,
    pub watchlist_remove: f64,
    pub skip: f64,
}

impl Default for EventWeights {
    fn default() -> Self {
        EventWeights {
            view: 0.2,
            click: 0.5,
            play: 1.0,
            progress: 1.0,
            complete: 2.0,
            rate: 2.0,
            like: 3.0,
            dislike: -3.0,
            watchlist_add: 1.5,
            watchlist_remove: -0.5,
            skip: -1.0,
        }
    }
}

impl EventWeights {
    pub fn base(&self, kind: EventType) -> f64 {
        match kind {
            EventType::View => self.view,
            EventType::Click => self.click,
            EventType::Play => self.play,
            EventType::Progress => self.progress,
            EventType::Complete => self.complete,
            EventType::Rate => self.rate,
            EventType::Like => self.like,
            EventType::Dislike => self.dislike,
            EventType::WatchlistAdd => self.watchlist_add,
            EventType::WatchlistRemove => self.watchlist_remove,
            EventType::Skip => self.skip,
        }
    }

    /// The signed preference weight of one event with its value.
    pub fn weight(&self, kind: EventType, value: Option<f64>) -> f64 {
        let base = self.base(kind);
        match kind {
            EventType::Progress => base * value.unwrap_or(0.0),
            EventType::Rate => base * (value.unwrap_or(3.0) - 3.0) / 2.0,
            _ => base,
        }
    }
}

/// Weights of the normalized signals in the blended score (see `blend`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlendWeights {
    pub affinity: f64,
    pub similarity: f64,
    pub popularity: f64,
    pub trending: f64,
    /// Items co-watched with the user's recent ones (collaborative).
    pub co_watched: f64,
    /// Used only when a model scorer is loaded.
    pub ncf: f64,
}

impl Default for BlendWeights {
    fn default() -> Self {
        BlendWeights {
            affinity: 0.40,
            similarity: 0.50,
            popularity: 0.80,
            trending: 0.0,
            co_watched: 8.0,
            ncf: 0.60,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListConfig {
    /// Length of the recommendation list.
    pub top_n: usize,
    /// Length of each carousel row.
    pub row_size: usize,
    /// How many of the user's strongest genres get their own row.
    pub genre_rows: usize,
    /// No genre may fill more than this share of the recommendation list.
    pub max_genre_share: f64,
    /// Recent items kept per user.
    pub recent_items: usize,
    /// Candidates taken from each global source (popular, trending, per genre).
    pub candidates_per_source: usize,
    /// Recent positive items whose similar items become candidates.
    pub similar_seeds: usize,
    /// How far (event time) the catalog-wide rankings every user's lists draw
    /// on (popular, trending, their item signals) may trail the newest event
    /// before they are rebuilt; 0 rebuilds them for every batch. A rebuild
    /// scores every recently active item (≈ 0.2 ms at 10,000), which a light
    /// load would otherwise pay per event; against half-lives of 6 hours
    /// (trending) and 30 days (popularity), a second moves no ranking.
    pub ranking_refresh_ms: i64,
    /// How deep the model re-scores each list ranked by score (the top
    /// picks, each genre row), in multiples of the list's length: the
    /// other signals rank every candidate first, and a model scores only the
    /// first `rescore_depth × top_n` of that ranking and the first
    /// `rescore_depth × row_size` of each genre row's, plus the items the
    /// other rows show. 0 scores every candidate.
    pub rescore_depth: usize,
}

impl Default for ListConfig {
    fn default() -> Self {
        ListConfig {
            top_n: 10,
            row_size: 10,
            genre_rows: 3,
            max_genre_share: 1.0,
            recent_items: 30,
            candidates_per_source: 60,
            similar_seeds: 5,
            ranking_refresh_ms: 1000,
            rescore_depth: 2,
        }
    }
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source: Box::new(source),
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let f = &self.model.fold_in;
        if f.learning_rate
            .is_some_and(|lr| !(lr.is_finite() && lr > 0.0))
        {
            return Err(invalid("model.fold_in.learning_rate", "must be positive"));
        }
        if !(f.l2.is_finite() && f.l2 >= 0.0) {
            return Err(invalid("model.fold_in.l2", "must be zero or positive"));
        }
        if f.steps > 1000 || f.warm_steps > 1000 || f.max_history > 1000 || f.negatives > 100 {
            return Err(invalid(
                "model.fold_in",
                "steps, warm_steps and max_history must be at most 1000, negatives at most 100",
            ));
        }
        if self.kafka.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", "must name at least one broker"));
        }
        if self.kafka.group_id.trim().is_empty() {
            return Err(invalid("kafka.group_id", "must not be empty"));
        }
        if self
            .kafka
            .instance_id
            .as_ref()
            .is_some_and(|i| i.trim().is_empty())
        {
            return Err(invalid("kafka.instance_id", "must not be empty when set"));
        }
        for (field, name) in [
            ("topics.interactions", &self.topics.interactions),
            ("topics.catalog", &self.topics.catalog),
            ("topics.recommendations", &self.topics.recommendations),
            ("topics.carousels", &self.topics.carousels),
            ("topics.insights", &self.topics.insights),
            ("topics.refresh", &self.topics.refresh),
            ("topics.dead_letters", &self.topics.dead_letters),
            ("topics.changelog", &self.topics.changelog),
            ("topics.instances", &self.topics.instances),
        ] {
            crate::topics::validate_topic_name(name).map_err(|reason| invalid(field, reason))?;
        }
        if !(100..=3_600_000).contains(&self.experiment.reload_interval_ms) {
            return Err(invalid(
                "experiment.reload_interval_ms",
                "must be in 100..=3600000",
            ));
        }
        if !(10..=600_000).contains(&self.global_items.flush_interval_ms) {
            return Err(invalid(
                "global_items.flush_interval_ms",
                "must be in 10..=600000",
            ));
        }
        if let Some(file) = &self.experiment.file {
            crate::experiment::ExperimentSpec::from_file(file)
                .map_err(|e| invalid("experiment.file", e.to_string()))?;
        }
        if !(256..=16 * 1024 * 1024).contains(&self.http.max_body_bytes) {
            return Err(invalid("http.max_body_bytes", "must be in 256..=16777216"));
        }
        if !(100..=600_000).contains(&self.http.announce_interval_ms) {
            return Err(invalid(
                "http.announce_interval_ms",
                "must be in 100..=600000",
            ));
        }
        if let Some(url) = &self.http.advertised_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) || url.ends_with('/') {
                return Err(invalid(
                    "http.advertised_url",
                    "must start with http:// or https:// and not end with /",
                ));
            }
        }
        crate::routing::Partitioner::from_client_config(&self.kafka.client)
            .map_err(|reason| invalid("kafka.client.partitioner", reason))?;
        if self.state.block_cache_mb == 0 {
            return Err(invalid("state.block_cache_mb", "must be at least 1"));
        }
        let p = &self.processing;
        if !(1..=100_000).contains(&p.batch_max_records) {
            return Err(invalid(
                "processing.batch_max_records",
                "must be in 1..=100000",
            ));
        }
        if !(1..=60_000).contains(&p.batch_max_wait_ms) {
            return Err(invalid(
                "processing.batch_max_wait_ms",
                "must be in 1..=60000",
            ));
        }
        if p.guarantee == Guarantee::ExactlyOnce
            && !(1_000..=900_000).contains(&p.transaction_timeout_ms)
        {
            // The broker caps it at transaction.max.timeout.ms (15 min by default).
            return Err(invalid(
                "processing.transaction_timeout_ms",
                "must be in 1000..=900000",
            ));
        }
        if !(256..=1 << 20).contains(&p.max_event_bytes) {
            return Err(invalid(
                "processing.max_event_bytes",
                "must be in 256..=1048576",
            ));
        }
        if !self.http.listen.is_empty() && self.http.listen.parse::<SocketAddr>().is_err() {
            return Err(invalid(
                "http.listen",
                "must be an ip:port address or empty",
            ));
        }
        self.engine.validate()
    }
}

impl EngineConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let d = &self.decay;
        for (field, v) in [
            ("engine.decay.user_half_life_hours", d.user_half_life_hours),
            (
                "engine.decay.popularity_half_life_hours",
                d.popularity_half_life_hours,
            ),
            (
                "engine.decay.trending_half_life_hours",
                d.trending_half_life_hours,
            ),
        ] {
            // `inf` is allowed: no decay (all-time counts). NaN fails too.
            if v.is_nan() || v <= 0.0 {
                return Err(invalid(
                    field,
                    "must be a positive number of hours (or inf)",
                ));
            }
        }
        if d.trending_half_life_hours >= d.popularity_half_life_hours {
            return Err(invalid(
                "engine.decay.trending_half_life_hours",
                "must be shorter than popularity_half_life_hours",
            ));
        }
        for kind in EventType::ALL {
            let w = self.event_weights.base(kind);
            if !w.is_finite() || w.abs() > 100.0 {
                return Err(invalid(
                    &format!("engine.event_weights.{}", kind.as_str()),
                    "must be a finite number in -100..=100",
                ));
            }
        }
        let b = &self.blend;
        for (field, w) in [
            ("engine.blend.affinity", b.affinity),
            ("engine.blend.similarity", b.similarity),
            ("engine.blend.popularity", b.popularity),
            ("engine.blend.trending", b.trending),
            ("engine.blend.co_watched", b.co_watched),
            ("engine.blend.ncf", b.ncf),
        ] {
            if !(w.is_finite() && w >= 0.0) {
                return Err(invalid(field, "must be a non-negative number"));
            }
        }
        if b.affinity + b.similarity + b.popularity + b.trending + b.co_watched <= 0.0 {
            return Err(invalid(
                "engine.blend",
                "at least one non-model weight must be positive",
            ));
        }
        let l = &self.lists;
        if !(1..=500).contains(&l.top_n) {
            return Err(invalid("engine.lists.top_n", "must be in 1..=500"));
        }
        if !(1..=100).contains(&l.row_size) {
            return Err(invalid("engine.lists.row_size", "must be in 1..=100"));
        }
        if l.genre_rows > 10 {
            return Err(invalid("engine.lists.genre_rows", "must be at most 10"));
        }
        if !(l.max_genre_share > 0.0 && l.max_genre_share <= 1.0) {
            return Err(invalid("engine.lists.max_genre_share", "must be in (0, 1]"));
        }
        if !(1..=1000).contains(&l.recent_items) {
            return Err(invalid("engine.lists.recent_items", "must be in 1..=1000"));
        }
        if !(1..=5000).contains(&l.candidates_per_source) {
            return Err(invalid(
                "engine.lists.candidates_per_source",
                "must be in 1..=5000",
            ));
        }
        if l.similar_seeds > 50 {
            return Err(invalid("engine.lists.similar_seeds", "must be at most 50"));
        }
        if !(0..=3_600_000).contains(&l.ranking_refresh_ms) {
            return Err(invalid(
                "engine.lists.ranking_refresh_ms",
                "must be in 0..=3600000 (one hour)",
            ));
        }
        if l.rescore_depth > 100 {
            return Err(invalid(
                "engine.lists.rescore_depth",
                "must be at most 100 (0 scores every candidate)",
            ));
        }
        let c = &self.co_watch;
        if !(1..=1000).contains(&c.neighbors) {
            return Err(invalid("engine.co_watch.neighbors", "must be in 1..=1000"));
        }
        if c.window > l.recent_items {
            return Err(invalid(
                "engine.co_watch.window",
                "must be at most engine.lists.recent_items",
            ));
        }
        if c.seeds > l.recent_items {
            return Err(invalid(
                "engine.co_watch.seeds",
                "must be at most engine.lists.recent_items",
            ));
        }
        if !(0.0..=1.0).contains(&c.alpha) {
            return Err(invalid("engine.co_watch.alpha", "must be in 0..=1"));
        }
        if !(0.0..=1000.0).contains(&c.support) {
            return Err(invalid("engine.co_watch.support", "must be in 0..=1000"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn the_example_config_is_valid_and_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("ops/recstream.example.toml");
        let c = Config::from_file(&path).unwrap();
        let d = Config::default();
        assert_eq!(c.topics.interactions, d.topics.interactions);
        assert_eq!(c.engine.blend.affinity, d.engine.blend.affinity);
        assert_eq!(c.engine.event_weights.skip, d.engine.event_weights.skip);
        assert_eq!(c.engine.lists.top_n, d.engine.lists.top_n);
        assert_eq!(
            c.processing.batch_max_records,
            d.processing.batch_max_records
        );
        assert_eq!(c.processing.guarantee, d.processing.guarantee);
        assert_eq!(
            c.processing.transaction_timeout_ms,
            d.processing.transaction_timeout_ms
        );
    }

    #[test]
    fn errors_name_the_field() {
        let mut c = Config::default();
        c.engine.lists.max_genre_share = 1.5;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("engine.lists.max_genre_share"), "{e}");

        let mut c = Config::default();
        c.engine.event_weights.skip = f64::NAN;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("engine.event_weights.skip"));

        let e = toml::from_str::<Config>("[processing]\nbatch_max_record = 3\n").unwrap_err();
        assert!(e.to_string().contains("batch_max_record"), "{e}");

        let e = toml::from_str::<Config>("[processing]\nguarantee = \"exactly-once\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("guarantee") && e.contains("exactly_once"),
            "names the field and the choices: {e}"
        );
        let mut c: Config = toml::from_str("[processing]\nguarantee = \"exactly_once\"\n").unwrap();
        assert_eq!(c.processing.guarantee, Guarantee::ExactlyOnce);
        c.processing.transaction_timeout_ms = 10;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("processing.transaction_timeout_ms"), "{e}");

        let c: Config = toml::from_str("[model.fold_in]\nlearning_rate = 0.0\n").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("model.fold_in.learning_rate"), "{e}");
    }

    /// Unset, the fold-in's step follows the model's loss; set, it wins.
    #[test]
    fn the_fold_in_step_follows_the_objective_unless_set() {
        use crate::ncf::model::Objective;
        let f = Config::default().model.fold_in;
        assert_eq!(f.step_size(Objective::Implicit), 1.0);
        assert_eq!(f.step_size(Objective::Explicit), 0.5);
        let c: Config = toml::from_str("[model.fold_in]\nlearning_rate = 0.25\n").unwrap();
        c.validate().unwrap();
        assert_eq!(c.model.fold_in.step_size(Objective::Implicit), 0.25);
        assert_eq!(c.model.fold_in.step_size(Objective::Explicit), 0.25);
    }

    #[test]
    fn ratings_move_preferences_both_ways() {
        let w = EventWeights::default();
        assert!(w.weight(EventType::Rate, Some(5.0)) > 0.0);
        assert!(w.weight(EventType::Rate, Some(1.0)) < 0.0);
        assert_eq!(w.weight(EventType::Rate, Some(3.0)), 0.0);
        assert!(
            w.weight(EventType::Progress, Some(0.5)) < w.weight(EventType::Progress, Some(1.0))
        );
    }
}
