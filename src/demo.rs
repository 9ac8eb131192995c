//! `recstream demo`: the whole engine on an embedded Kafka broker (librdkafka's
//! mock cluster) or a real one, a sample catalog, background traffic and a
//! scripted user whose rows are printed as each event arrives.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::Args;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::mpsc;

use crate::catalog::{self, Catalog};
use crate::config::Config;
use crate::output::{Carousels, Insights};
use crate::pipeline::{self, JobHandle};
use crate::topics;

const SAMPLE_CATALOG: &str = include_str!("demo/catalog.csv");
/// 2026-01-01T00:00:00Z: the demo's event time starts here.
const DEMO_EPOCH_MS: i64 = 1_767_225_600_000;
const MINUTE_MS: i64 = 60_000;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Use this Kafka cluster instead of the embedded broker.
    #[arg(long)]
    pub brokers: Option<String>,
    /// A MovieLens directory (ml-latest-small, ml-100k or ml-1m): its catalog,
    /// and its ratings (when present) replayed as background traffic.
    #[arg(long)]
    pub movielens: Option<PathBuf>,
    /// Ratings replayed from the MovieLens directory as background traffic.
    #[arg(long, default_value_t = 5000)]
    pub background_ratings: usize,
    /// Synthetic background users (without --movielens).
    #[arg(long, default_value_t = 60)]
    pub crowd: usize,
    /// Favourite genre of the scripted user.
    #[arg(long, default_value = "Sci-Fi")]
    pub genre: String,
    /// Keep the engine, the live page and /metrics running after the script,
    /// until Ctrl-C (the default when the output is a terminal).
    #[arg(long, conflicts_with = "exit_after_script")]
    pub keep_running: bool,
    /// Stop after the script even on a terminal.
    #[arg(long)]
    pub exit_after_script: bool,
    /// NCF model proposing and re-scoring candidates (by default the
    /// synthetic demo's history-based model: every event changes its input;
    /// it knows only the sample catalog, so it is skipped with --movielens).
    #[arg(long, default_value = "models/demo/ncf-history-demo.onnx")]
    pub model: PathBuf,
    /// Address of the live page, the API and /metrics.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub http_listen: String,
}

/// What the output watcher saw.
enum Seen {
    Carousels(Carousels),
    Insights(Insights),
    DeadLetter { reason: String, detail: String },
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let work = tempdir()?;
    // The embedded broker lives as long as this function.
    let mock = match &args.brokers {
        Some(_) => None,
        None => Some(MockCluster::new(1).context("starting the embedded Kafka broker")?),
    };
    let brokers = match (&args.brokers, &mock) {
        (Some(b), _) => b.clone(),
        (None, Some(m)) => m.bootstrap_servers(),
        (None, None) => unreachable!("a broker is always chosen"),
    };
    let mut config = Config::default();
    config.kafka.brokers = brokers.clone();
    config.kafka.group_id = format!("recstream-demo-{}", std::process::id());
    config.state.dir = work.join("state");
    config.http.listen = args.http_listen.clone();
    config.processing.batch_max_wait_ms = 5;
    config.validate()?;

    let (catalog, catalog_path) = load_catalog(&args, &work)?;
    let mut history_model = false;
    if args.movielens.is_none() && args.model.exists() {
        config.model.path = Some(args.model.clone());
        // A history model's signal is relative to the user's best item; it
        // blends at the weight the replay picked for it (eval/REPLAY.md).
        history_model = crate::ncf::serve::read_card(&args.model)?.history.is_some();
        if history_model {
            config.engine.blend.ncf = crate::replay::HISTORY_BLEND_NCF;
        }
    }
    config.catalog.path = Some(catalog_path);
    let genre = catalog
        .genre_id(&args.genre)
        .with_context(|| format!("--genre {:?} is not a genre of this catalog", args.genre))?;

    println!("recstream demo");
    println!(
        "  broker    : {}",
        if mock.is_some() {
            format!("embedded ({brokers})")
        } else {
            brokers.clone()
        }
    );
    println!(
        "  catalog   : {} movies, {} genres",
        catalog.len(),
        catalog.genre_count()
    );
    println!("  state     : RocksDB in {}", config.state.dir.display());
    println!(
        "  model     : {}",
        match &config.model.path {
            Some(p) if history_model => format!(
                "history NCF {} (tract; each user encoded from their recent events, no per-user training; also proposes its own candidates)",
                p.display()
            ),
            Some(p) => format!(
                "NCF {} (tract; new users folded in from their first event)",
                p.display()
            ),
            None => "none (blend without the NCF signal)".into(),
        }
    );
    let decls = topics::with_names(topics::builtin(), &config.topics);
    match &mock {
        // librdkafka's mock broker has no CreateTopics; it creates them directly.
        Some(m) => {
            for d in &decls {
                m.create_topic(&d.name, d.partitions, 1)?;
            }
        }
        None => {
            topics::apply(&pipeline::client_config(&config), &decls).await?;
        }
    }

    let job = Arc::new(JobHandle::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let token = random_token()?;
    let api = crate::api::Api::new(&config, job.clone(), Some(token.clone()), stop_rx.clone())?;
    let mut rx = stop_rx.clone();
    let (addr, http) = crate::http::serve(config.http.listen.parse()?, api.clone(), async move {
        let _ = rx.wait_for(|s| *s).await;
    })
    .await?;
    let routing = api.start_routing(
        crate::api::advertised_url(&config.http, addr),
        stop_rx.clone(),
    );
    let page = format!("http://{addr}/#user={}&token={token}", demo_user());
    println!("  live page : {page}");
    println!("  metrics   : http://{addr}/metrics");
    let mut rx = stop_rx.clone();
    let engine = tokio::spawn(pipeline::run(
        config.clone(),
        catalog.clone(),
        job.clone(),
        async move {
            let _ = rx.wait_for(|s| *s).await;
        },
    ));

    let (mut seen, watcher) = watch_outputs(&config)?;
    let producer = pipeline::producer(&config)?;

    // Background traffic gives popularity and trending something to measure.
    let background = match &args.movielens {
        Some(dir) => {
            replay_ratings(&producer, &config, &catalog, dir, args.background_ratings).await?
        }
        None => synthetic_crowd(&producer, &config, &catalog, args.crowd).await?,
    };
    println!(
        "  background: {} events from other users\n",
        background.events
    );
    let mut t = background.last_ts + MINUTE_MS;

    let script = script(&catalog, genre)?;
    let mut version = 0;
    let send_refresh = serde_json::json!({ "user_id": demo_user() }).to_string();
    producer
        .send(
            FutureRecord::to(&config.topics.refresh)
                .key(demo_user())
                .payload(&send_refresh),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    let (rows, insights) = wait_for_user(&mut seen, &mut version).await?;
    print_state(
        "a new user opens the app (refresh command: cold start)",
        &catalog,
        &rows,
        &insights,
        &[],
    );

    let mut consumed: Vec<u32> = Vec::new();
    for (i, (kind, movie, value)) in script.iter().enumerate() {
        t += 5 * MINUTE_MS;
        let mut event = serde_json::json!({
            "event_id": format!("demo-{i}"), "user_id": demo_user(), "movie_id": movie,
            "type": kind, "ts": t, "context": {"device": "tv", "surface": "home"}
        });
        if let Some(v) = value {
            event["value"] = serde_json::json!(v);
        }
        produce(
            &producer,
            &config.topics.interactions,
            demo_user(),
            &event.to_string(),
        )
        .await?;
        if *kind != "view" && *kind != "click" && !consumed.contains(movie) {
            consumed.push(*movie);
        }
        let (rows, insights) = wait_for_user(&mut seen, &mut version).await?;
        let title = &catalog
            .get(*movie)
            .expect("script uses catalog movies")
            .title;
        let what = match value {
            Some(v) => format!("{kind} {title:?} ({v})"),
            None => format!("{kind} {title:?}"),
        };
        print_state(&what, &catalog, &rows, &insights, &consumed);
        let leaked: Vec<u32> = rows
            .rows
            .iter()
            .flat_map(|r| r.movie_ids.iter().copied())
            .filter(|id| consumed.contains(id))
            .collect();
        if !leaked.is_empty() {
            bail!("consumed items came back in the rows: {leaked:?}");
        }
    }

    println!("── a malformed event (truncated JSON) ──");
    produce(
        &producer,
        &config.topics.interactions,
        demo_user(),
        r#"{"event_id":"bad","user_id":"demo-"#,
    )
    .await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(15), seen.recv()).await {
            Ok(Some(Seen::DeadLetter { reason, detail })) => {
                println!(
                    "  dead-lettered to {} with dlq.reason={reason}: {detail}\n",
                    config.topics.dead_letters
                );
                break;
            }
            Ok(Some(_)) => continue,
            _ => bail!("the malformed event did not reach the dead-letter topic"),
        }
    }

    let metrics = crate::metrics::render();
    println!("── a few of the engine's metrics (http://{addr}/metrics) ──");
    for line in metrics.lines().filter(|l| {
        !l.starts_with('#')
            && (l.starts_with("recstream_events_total")
                || l.starts_with("recstream_dead_letters_total")
                || l.starts_with("recstream_outputs_published_total")
                || l.starts_with("recstream_users_recomputed_total"))
    }) {
        println!("  {line}");
    }
    let on_terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    if args.keep_running || (on_terminal && !args.exit_after_script) {
        println!("\nengine still running: open the live page {page}\n(metrics at http://{addr}/metrics) — Ctrl-C to stop");
        tokio::signal::ctrl_c().await?;
    } else {
        println!("\n(the live page stays up with --keep-running)");
    }
    let _ = stop_tx.send(true);
    engine.await??;
    // Every client of the embedded broker closes before it goes away.
    routing.finish().await;
    let _ = http.await;
    drop(api);
    // Close every client before the embedded broker goes away.
    watcher.abort();
    let _ = watcher.await;
    drop(producer);
    println!("\ndemo finished: engine drained and stopped cleanly");
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// A bearer token for this run's write endpoints (the page takes it from its URL).
fn random_token() -> Result<String> {
    use std::io::Read as _;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom for the demo's API token")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The scripted user; unique per run so a real cluster's older records never mix in.
fn demo_user() -> &'static str {
    static USER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    USER.get_or_init(|| format!("demo-alice-{}", std::process::id()))
}

fn tempdir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("recstream-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn load_catalog(args: &DemoArgs, work: &Path) -> Result<(Catalog, PathBuf)> {
    let path = match &args.movielens {
        Some(dir) => ["movies.csv", "u.item", "movies.dat"]
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.exists())
            .with_context(|| format!("no movies.csv, u.item or movies.dat in {}", dir.display()))?,
        None => {
            let p = work.join("catalog.csv");
            std::fs::write(&p, SAMPLE_CATALOG)?;
            p
        }
    };
    Ok((catalog::load(&path)?, path))
}

/// Likes and plays in the favourite genre, one dislike elsewhere.
fn script(catalog: &Catalog, genre: u8) -> Result<Vec<(&'static str, u32, Option<f64>)>> {
    let in_genre: Vec<u32> = catalog
        .movies()
        .filter(|m| m.genres.contains(genre))
        .map(|m| m.id)
        .collect();
    let other = catalog
        .movies()
        .find(|m| !m.genres.contains(genre) && !m.genres.is_empty())
        .map(|m| m.id);
    let (Some(other), true) = (other, in_genre.len() >= 6) else {
        bail!("the catalog needs at least 6 movies of the chosen genre and one outside it");
    };
    // Spread picks over the genre so they are not neighbours by id.
    let pick = |i: usize| in_genre[i * (in_genre.len() - 1) / 5];
    Ok(vec![
        ("view", pick(0), None),
        ("like", pick(0), None),
        ("play", pick(1), Some(1800.0)),
        ("complete", pick(1), Some(5400.0)),
        ("dislike", other, None),
        ("rate", pick(2), Some(5.0)),
        ("like", pick(3), None),
        ("watchlist_add", pick(4), None),
    ])
}

async fn produce(producer: &FutureProducer, topic: &str, key: &str, payload: &str) -> Result<()> {
    producer
        .send(
            FutureRecord::to(topic).key(key).payload(payload),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    Ok(())
}

struct Background {
    events: usize,
    last_ts: i64,
}

/// Synthetic users with skewed tastes, from a deterministic stream.
async fn synthetic_crowd(
    producer: &FutureProducer,
    config: &Config,
    catalog: &Catalog,
    users: usize,
) -> Result<Background> {
    let ids = catalog.ids();
    let mut rng = crate::rng::Rng::new(0x9e37_79b9_7f4a_7c15);
    let mut next = move || rng.next_u64();
    let kinds = ["play", "complete", "like", "rate", "click", "skip"];
    let mut t = DEMO_EPOCH_MS;
    let mut sends = Vec::new();
    for u in 0..users {
        let user = format!("crowd-{u}");
        for e in 0..8 {
            // Squaring a uniform draw skews picks towards low ids: a popularity head.
            let r = (next() % 10_000) as f64 / 10_000.0;
            let movie = ids[((r * r) * ids.len() as f64) as usize];
            let kind = kinds[(next() % kinds.len() as u64) as usize];
            t += MINUTE_MS / 4;
            let mut event = serde_json::json!({
                "event_id": format!("{user}-{e}"), "user_id": user, "movie_id": movie, "type": kind, "ts": t
            });
            if kind == "rate" {
                event["value"] = serde_json::json!(1 + next() % 5);
            }
            let payload = event.to_string();
            let record = FutureRecord::to(&config.topics.interactions)
                .key(&user)
                .payload(&payload);
            sends.push(pipeline::enqueue(producer, record).await?);
        }
    }
    let n = sends.len();
    pipeline::await_deliveries(sends).await?;
    Ok(Background {
        events: n,
        last_ts: t,
    })
}

/// Replays the first ratings of a MovieLens ratings file in event-time order.
async fn replay_ratings(
    producer: &FutureProducer,
    config: &Config,
    catalog: &Catalog,
    dir: &Path,
    limit: usize,
) -> Result<Background> {
    let mut ratings = crate::ratings::load_dir(dir)?;
    ratings.retain(|r| catalog.contains(r.movie_id));
    ratings.sort_by_key(|r| (r.ts_ms, r.user_id, r.movie_id));
    ratings.truncate(limit);
    let mut sends = Vec::new();
    let mut last_ts = DEMO_EPOCH_MS;
    for (i, r) in ratings.iter().enumerate() {
        let user = format!("ml-{}", r.user_id);
        let payload = serde_json::json!({
            "event_id": format!("ml-{i}"), "user_id": user, "movie_id": r.movie_id,
            "type": "rate", "value": r.rating, "ts": r.ts_ms
        })
        .to_string();
        last_ts = r.ts_ms;
        let record = FutureRecord::to(&config.topics.interactions)
            .key(&user)
            .payload(&payload);
        sends.push(pipeline::enqueue(producer, record).await?);
    }
    let n = sends.len();
    pipeline::await_deliveries(sends).await?;
    Ok(Background { events: n, last_ts })
}

fn watch_outputs(config: &Config) -> Result<(mpsc::Receiver<Seen>, tokio::task::JoinHandle<()>)> {
    let consumer: StreamConsumer = pipeline::consumer_config(config)
        .set(
            "group.id",
            format!("recstream-demo-watch-{}", std::process::id()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[
        &config.topics.carousels,
        &config.topics.insights,
        &config.topics.dead_letters,
    ])?;
    let topics = config.topics.clone();
    let (tx, rx) = mpsc::channel(1024);
    let watcher = tokio::spawn(async move {
        while let Ok(m) = consumer.recv().await {
            let is_demo_user = m.key() == Some(demo_user().as_bytes());
            let payload = m.payload().unwrap_or_default();
            let seen = if m.topic() == topics.carousels && is_demo_user {
                serde_json::from_slice(payload).ok().map(Seen::Carousels)
            } else if m.topic() == topics.insights && is_demo_user {
                serde_json::from_slice(payload).ok().map(Seen::Insights)
            } else if m.topic() == topics.dead_letters {
                let header = |name: &str| {
                    m.headers()
                        .and_then(|h| h.iter().find(|x| x.key == name))
                        .and_then(|x| x.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default()
                };
                Some(Seen::DeadLetter {
                    reason: header("dlq.reason"),
                    detail: header("dlq.detail"),
                })
            } else {
                None
            };
            if let Some(s) = seen {
                if tx.send(s).await.is_err() {
                    break;
                }
            }
        }
    });
    Ok((rx, watcher))
}

/// Waits for the demo user's next carousels and insights (newer than `version`).
async fn wait_for_user(
    seen: &mut mpsc::Receiver<Seen>,
    version: &mut u64,
) -> Result<(Carousels, Insights)> {
    let mut rows: Option<Carousels> = None;
    let mut insights: HashMap<u64, Insights> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(r) = &rows {
            if let Some(i) = insights.remove(&r.version) {
                *version = r.version;
                return Ok((rows.take().expect("checked"), i));
            }
        }
        match tokio::time::timeout_at(deadline, seen.recv()).await {
            Ok(Some(Seen::Carousels(c))) if c.version > *version => rows = Some(c),
            Ok(Some(Seen::Insights(i))) if i.version > *version => {
                insights.insert(i.version, i);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => bail!("no new outputs for {} within 30 s", demo_user()),
        }
    }
}

fn print_state(
    what: &str,
    catalog: &Catalog,
    rows: &Carousels,
    insights: &Insights,
    consumed: &[u32],
) {
    println!("── {what} ── (version {})", rows.version);
    let genres: Vec<String> = insights
        .genres
        .iter()
        .filter(|g| g.share > 0.0)
        .take(3)
        .map(|g| format!("{} {:.0}%", g.genre, g.share * 100.0))
        .collect();
    if !genres.is_empty() {
        println!("  taste     : {}", genres.join(" · "));
    }
    let titles: Vec<&str> = rows.rows.iter().map(|r| r.title.as_str()).collect();
    println!("  rows      : {}", titles.join(" | "));
    if let Some(top) = rows.rows.first() {
        for (i, item) in rows.row_items(top).take(5).enumerate() {
            let year = item.year.map(|y| format!(", {y}")).unwrap_or_default();
            println!(
                "  {}. {:<34} {:<28} {}",
                i + 1,
                item.title,
                format!("({}{year})", item.genres.join("|")),
                item.reason
            );
        }
    }
    if !consumed.is_empty() {
        let names: Vec<&str> = consumed
            .iter()
            .filter_map(|id| catalog.get(*id))
            .map(|m| &*m.title)
            .collect();
        println!(
            "  excluded  : {} (already consumed; never shown again)",
            names.join(", ")
        );
    }
    println!();
}
