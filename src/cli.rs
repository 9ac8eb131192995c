//! Command line: raw arguments are validated into a [`Config`] once, here.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tracing::info;

use crate::catalog::{self, Catalog};
use crate::config::Config;
use crate::pipeline::{self, JobHandle};
use crate::topics;

#[derive(Debug, Parser)]
#[command(
    name = "recstream",
    version,
    about = "Kafka-native real-time movie recommendation engine"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the engine against a Kafka cluster (see ops/recstream.example.toml).
    Run(RunArgs),
    /// Self-contained demo: embedded broker, sample catalog, a scripted user.
    Demo(crate::demo::DemoArgs),
    /// Create the declared topics (idempotent).
    Topics {
        #[command(subcommand)]
        action: TopicsAction,
    },
    /// Publish a catalog file to the catalog topic (keyed by movie id).
    PublishCatalog {
        #[command(flatten)]
        kafka: KafkaArgs,
        /// Catalog file: movies.csv, u.item, movies.dat, canonical .csv, .parquet, .arrow.
        #[arg(long)]
        file: PathBuf,
    },
    /// Ask the engine to recompute one user, or everyone.
    Refresh {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        user: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// Produce synthetic load and measure throughput and event-to-output latency.
    Loadgen(crate::loadgen::LoadgenArgs),
    /// Archive the interactions topic as Parquet files by event day (what `train` reads).
    Archive(crate::archive::ArchiveArgs),
    /// Train a NeuMF model and export it to ONNX with its model card.
    Train(TrainArgs),
    /// Evaluate NCF against baselines and peers on MovieLens; writes a markdown table.
    Eval(crate::ncf::bench::EvalArgs),
    /// Prequential replay of MovieLens streams through the engine: every variant and peer, side by side.
    ReplayEval(crate::replay::command::ReplayArgs),
    /// Time tract's NCF scoring on random models of MovieLens sizes (see benches/scoring.sh).
    BenchScoring(crate::ncf::scoring::ScoringArgs),
    /// Live keys and bytes of every RocksDB database under a directory, per
    /// column family, as JSON (sizing; reads any RocksDB state directory,
    /// e.g. a Kafka Streams application's). Stop its owner first.
    StateSize {
        /// A state directory (searched for databases).
        dir: PathBuf,
    },
    /// Validate a config file and print it with every default filled in.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum TopicsAction {
    /// Create missing topics from the declarations; check existing ones.
    Apply {
        #[command(flatten)]
        kafka: KafkaArgs,
        /// Directory of topic declarations (defaults to the built-in ones).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Config file (TOML). Flags below override it.
    #[arg(long, env = "RECSTREAM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Bootstrap brokers, e.g. 127.0.0.1:9092.
    #[arg(long, env = "RECSTREAM_BROKERS")]
    pub brokers: Option<String>,
}

/// The config file a `--config` option names, if any; errors name the option.
pub fn config_file(path: Option<&Path>) -> Result<Option<Config>> {
    path.map(|p| Config::from_file(p).with_context(|| format!("--config {}", p.display())))
        .transpose()
}

impl KafkaArgs {
    pub fn load(&self) -> Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(b) = &self.brokers {
            config.kafka.brokers = b.clone();
        }
        config.validate()?;
        Ok(config)
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// RocksDB directory (overrides `state.dir`).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Catalog file loaded at start (overrides `catalog.path`).
    #[arg(long)]
    pub catalog: Option<PathBuf>,
    /// Address of /metrics, /healthz, /readyz (overrides `http.listen`).
    #[arg(long)]
    pub http_listen: Option<String>,
}

pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => {
            let mut config = args.kafka.load()?;
            if let Some(d) = args.state_dir {
                config.state.dir = d;
            }
            if let Some(c) = args.catalog {
                config.catalog.path = Some(c);
            }
            if let Some(h) = args.http_listen {
                config.http.listen = h;
            }
            config.validate()?;
            run_engine(config).await
        }
        Command::Demo(args) => crate::demo::run(args).await,
        Command::Topics {
            action: TopicsAction::Apply { kafka, dir },
        } => {
            let config = kafka.load()?;
            let decls = match dir {
                Some(d) => topics::load_dir(&d)?,
                None => topics::builtin(),
            };
            let decls = topics::with_names(decls, &config.topics);
            for (name, outcome) in topics::apply(&pipeline::client_config(&config), &decls).await? {
                println!("{name}: {outcome:?}");
            }
            Ok(())
        }
        Command::PublishCatalog { kafka, file } => {
            let config = kafka.load()?;
            let catalog = catalog::load(&file)?;
            let n = publish_catalog(&config, &catalog).await?;
            println!("published {n} movies to {}", config.topics.catalog);
            Ok(())
        }
        Command::Refresh { kafka, user, all } => {
            let config = kafka.load()?;
            let producer = pipeline::producer(&config)?;
            let command = crate::event::RefreshCommand { user_id: user, all };
            let sent = crate::api::send_refresh(
                &producer,
                &pipeline::client_config(&config),
                &config.topics.refresh,
                &command,
            )
            .await?;
            println!(
                "sent {sent} refresh command(s) to {}",
                config.topics.refresh
            );
            Ok(())
        }
        Command::Loadgen(args) => crate::loadgen::run(args).await,
        Command::Train(args) => train(args),
        Command::Archive(args) => crate::archive::run(&args).await,
        Command::Eval(args) => crate::ncf::bench::run(&args),
        Command::ReplayEval(args) => crate::replay::command::run(&args).await,
        Command::BenchScoring(args) => crate::ncf::scoring::run(&args),
        Command::StateSize { dir } => {
            let size = crate::state_size::measure(&dir)?;
            println!("{}", serde_json::to_string(&size)?);
            Ok(())
        }
        Command::CheckConfig { config } => {
            let config = Config::from_file(&config)?;
            print!("{}", toml::to_string_pretty(&config)?);
            Ok(())
        }
    }
}

/// Runs the engine until SIGINT/SIGTERM; a second signal exits at once.
pub async fn run_engine(config: Config) -> Result<()> {
    let catalog = match &config.catalog.path {
        Some(p) => catalog::load(p).with_context(|| "loading `catalog.path`")?,
        None => Catalog::default(),
    };
    let job = Arc::new(JobHandle::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("signal received; shutting down (send another to exit immediately)");
        let _ = stop_tx.send(true);
        wait_for_signal().await;
        eprintln!("second signal: exiting immediately");
        std::process::exit(130);
    });
    let mut routing = None;
    if !config.http.listen.is_empty() {
        let addr = config.http.listen.parse().context("`http.listen`")?;
        let token = crate::api::load_token(&config.http)?;
        let api = crate::api::Api::new(&config, job.clone(), token, stop_rx.clone())?;
        let mut rx = stop_rx.clone();
        let (bound, _server) = crate::http::serve(addr, api.clone(), async move {
            let _ = rx.wait_for(|s| *s).await;
        })
        .await
        .with_context(|| format!("binding `http.listen` {addr}"))?;
        let url = crate::api::advertised_url(&config.http, bound);
        info!(%bound, instance = api.instance(), "live page at {url}/, API at {url}/api, metrics at {url}/metrics");
        routing = Some(api.start_routing(url, stop_rx.clone()));
    }
    // Restarts back off from 1 s to 30 s while they keep failing.
    let mut backoff = std::time::Duration::from_secs(1);
    loop {
        let mut rx = stop_rx.clone();
        let started = std::time::Instant::now();
        let stopped = async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        match pipeline::run(config.clone(), catalog.clone(), job.clone(), stopped).await {
            Ok(()) => break,
            // An aborted transaction (the local state is ahead of Kafka) or a
            // failed handover: a fresh run re-joins and restores what was committed.
            Err(e) if e.restartable() && !*stop_rx.borrow() => {
                if started.elapsed() > std::time::Duration::from_secs(60) {
                    backoff = std::time::Duration::from_secs(1);
                }
                tracing::warn!(error = %e, "restarting the job in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(30));
            }
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(routing) = routing {
        routing.finish().await;
    }
    Ok(())
}

pub(crate) async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

pub async fn publish_catalog(config: &Config, catalog: &Catalog) -> Result<usize> {
    let producer: FutureProducer = pipeline::producer(config)?;
    let mut pending = Vec::new();
    for id in catalog.ids() {
        let record = catalog.record(*id).expect("id from the catalog");
        let payload = serde_json::to_vec(&record)?;
        let key = id.to_string();
        let record = FutureRecord::to(&config.topics.catalog)
            .key(&key)
            .payload(&payload);
        pending.push(pipeline::enqueue(&producer, record).await?);
    }
    pipeline::await_deliveries(pending).await?;
    Ok(catalog.len())
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Training interactions: a MovieLens ratings file or directory (u.data,
    /// uN.base, ratings.dat, ratings.csv) or an interaction dump (.parquet, .arrow).
    #[arg(long, required_unless_present = "synthetic_users")]
    pub data: Option<PathBuf>,
    /// Train on synthetic interactions of this many users over --catalog instead.
    #[arg(long, requires = "catalog")]
    pub synthetic_users: Option<usize>,
    /// The catalog the synthetic users interact with.
    #[arg(long)]
    pub catalog: Option<PathBuf>,
    /// A test file in the same format (e.g. u1.test); without it 20 % of the
    /// ratings (explicit) or each user's latest interaction (implicit) is held out.
    #[arg(long)]
    pub test: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "implicit")]
    pub objective: ObjectiveArg,
    /// `neumf`: per-user embeddings (fold-in for new users). `history`: the
    /// user vector is computed from the last --max-len interactions, trained
    /// for next-item prediction with a softmax (models/README.md).
    #[arg(long, value_enum, default_value = "neumf")]
    pub architecture: ArchitectureArg,
    /// History models: how many recent interactions the user vector reads.
    #[arg(long)]
    pub max_len: Option<usize>,
    /// History models: catalogues up to this many items train with a full softmax.
    #[arg(long)]
    pub full_softmax_items: Option<usize>,
    /// History models: uniformly drawn items per batch in the sampled softmax.
    #[arg(long)]
    pub sampled_items: Option<usize>,
    /// Output stem: writes STEM.onnx, STEM.card.json, STEM.users.f32,
    /// STEM.report.json and STEM.curve.png.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub gmf_dim: Option<usize>,
    #[arg(long)]
    pub mlp_dim: Option<usize>,
    /// Hidden layer widths, e.g. 64,32,16.
    #[arg(long, value_delimiter = ',')]
    pub hidden: Option<Vec<usize>>,
    #[arg(long)]
    pub residual: bool,
    /// Train this many members (seeds seed, seed+1, …) and serve them as one merged NeuMF.
    #[arg(long)]
    pub ensemble: Option<usize>,
    /// Merge each member's this many best epochs (by validation) into it.
    #[arg(long)]
    pub snapshots: Option<usize>,
    /// SVD++-style history: users' vectors add a learned sum over the items
    /// they interacted with (`--history=false` turns the explicit default off).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub history: Option<bool>,
    /// The same for items: a learned sum over the users who interacted with
    /// each item (`--item-history=false` turns the explicit default off).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub item_history: Option<bool>,
    #[arg(long)]
    pub batch_norm: bool,
    #[arg(long)]
    pub dropout: Option<f32>,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub l2: Option<f64>,
    #[arg(long)]
    pub negatives: Option<usize>,
    #[arg(long)]
    pub patience: Option<usize>,
    #[arg(long)]
    pub validation_fraction: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, clap::ValueEnum)]
pub enum ArchitectureArg {
    Neumf,
    History,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ObjectiveArg {
    Explicit,
    Implicit,
}

impl From<ObjectiveArg> for crate::ncf::model::Objective {
    fn from(o: ObjectiveArg) -> Self {
        match o {
            ObjectiveArg::Explicit => crate::ncf::model::Objective::Explicit,
            ObjectiveArg::Implicit => crate::ncf::model::Objective::Implicit,
        }
    }
}

/// Copies each given (`Some`) flag of `args` over the same field of `config`.
macro_rules! set_given {
    ($args:expr, $config:expr; $($field:ident),*) => {
        $( if let Some(v) = $args.$field.clone() { $config.$field = v; } )*
    };
}

/// The first flag of `flags` that was given, if any.
fn first_given<'a>(flags: &[(&'a str, bool)]) -> Option<&'a str> {
    flags
        .iter()
        .find(|(_, given)| *given)
        .map(|(flag, _)| *flag)
}

impl TrainArgs {
    /// The objective's defaults with every given flag on top.
    pub fn config(&self) -> crate::ncf::train::TrainConfig {
        let mut c = crate::ncf::train::TrainConfig::defaults(self.objective.into());
        set_given!(self, c;
            gmf_dim,
            mlp_dim,
            hidden,
            dropout,
            epochs,
            batch_size,
            l2,
            negatives,
            patience,
            validation_fraction,
            seed,
            ensemble,
            snapshots
        );
        if let Some(lr) = self.lr {
            c.learning_rate = lr;
        }
        c.residual |= self.residual;
        if let Some(on) = self.history {
            c.history = on;
        }
        if let Some(on) = self.item_history {
            c.item_history = on;
        }
        c.batch_norm |= self.batch_norm;
        c
    }

    /// The history model's defaults with the flags that apply to it; flags
    /// that only mean something for per-user models are refused by name.
    pub fn sequence_config(&self) -> Result<crate::ncf::sequence::SequenceConfig> {
        let not_for_history = [
            ("--test", self.test.is_some()),
            ("--residual", self.residual),
            ("--ensemble", self.ensemble.is_some()),
            ("--snapshots", self.snapshots.is_some()),
            ("--history", self.history.is_some()),
            ("--item-history", self.item_history.is_some()),
            ("--batch-norm", self.batch_norm),
            ("--dropout", self.dropout.is_some()),
            ("--negatives", self.negatives.is_some()),
            ("--validation-fraction", self.validation_fraction.is_some()),
        ];
        if let Some(flag) = first_given(&not_for_history) {
            bail!("{flag} does not apply to --architecture history (it validates on each user's last interaction)");
        }
        let mut c = match self.objective {
            ObjectiveArg::Explicit => crate::ncf::sequence::SequenceConfig::rating_head(),
            ObjectiveArg::Implicit => crate::ncf::sequence::SequenceConfig::default(),
        };
        set_given!(self, c;
            gmf_dim,
            mlp_dim,
            hidden,
            epochs,
            batch_size,
            patience,
            seed,
            max_len,
            full_softmax_items,
            sampled_items
        );
        if let Some(lr) = self.lr {
            c.learning_rate = lr;
        }
        if let Some(l2) = self.l2 {
            c.weight_decay = l2;
        }
        c.validate()?;
        Ok(c)
    }
}

fn train(args: TrainArgs) -> Result<()> {
    use crate::ncf::{data, eval};
    let history_only = [
        ("--max-len", args.max_len.is_some()),
        ("--full-softmax-items", args.full_softmax_items.is_some()),
        ("--sampled-items", args.sampled_items.is_some()),
    ];
    if let Some(flag) = first_given(&history_only) {
        if args.architecture != ArchitectureArg::History {
            bail!("{flag} applies to --architecture history only");
        }
    }
    let sequence = match args.architecture {
        ArchitectureArg::History => Some(args.sequence_config()?),
        ArchitectureArg::Neumf => None,
    };
    let config = args.config();
    config.validate()?;
    let (train, data_name) = match (&args.data, args.synthetic_users) {
        (Some(path), _) => (data::load_interactions(path)?, path.display().to_string()),
        (None, Some(users)) => {
            let path = args
                .catalog
                .as_deref()
                .context("--synthetic-users needs --catalog")?;
            let catalog = catalog::load(path)?;
            (
                crate::ncf::synthetic::interactions(&catalog, users, 40, config.seed),
                format!("synthetic: {users} users over {}", path.display()),
            )
        }
        (None, None) => bail!("--data or --synthetic-users is required"),
    };
    if let Some(sequence) = sequence {
        let (_, r) = crate::ncf::sequence::train_and_export(
            &sequence,
            &train,
            &data_name,
            &args.out,
            !args.quiet,
        )?;
        println!(
            "trained {} on {} interactions ({} users, {} items): best epoch {} of {}, {:.1}s; {} (each user's last interaction) {:.4}; parity-checked through tract",
            r.model_version,
            r.train_interactions,
            r.users,
            r.items,
            r.best_epoch,
            r.epochs.len(),
            r.train_seconds,
            r.validation_metric,
            r.validation
        );
        for f in &r.files {
            println!("wrote {f}");
        }
        return Ok(());
    }
    let test = args
        .test
        .as_deref()
        .map(data::load_interactions)
        .transpose()?;
    let run = eval::run(eval::RunInput {
        config,
        train: &train,
        test: test.as_deref(),
        data_name,
        out: args.out.clone(),
        progress: !args.quiet,
    })?;
    let r = &run.report;
    println!(
        "trained {} on {} interactions ({} users, {} items): best epoch {} of {}, {:.1}s, {:.0} samples/s",
        r.model_version,
        r.train_interactions,
        r.users,
        r.items,
        r.best_epoch,
        r.epochs.len(),
        r.train_seconds,
        r.samples_per_second
    );
    println!(
        "test (through tract): {}",
        serde_json::Value::Object(r.test.clone())
    );
    for f in &r.files {
        println!("wrote {f}");
    }
    Ok(())
}
