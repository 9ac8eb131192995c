//! `recstream archive`: the interactions topic as Parquet files, partitioned
//! by event day, for retraining.
//!
//! Exactly-once files without broker transactions: a flush writes one file per
//! (input partition, event day) of what it buffered, each first to a temporary
//! name, synced, then renamed and the directory synced. File names carry the
//! flush's offset range and how many files it made
//! (`day=2026-11-27/p3-00000000000000000100-00000000000000000199-1of2.parquet`),
//! so on start a flush is known complete or not: files of an incomplete flush
//! are deleted (their records were never committed, so they are read again),
//! and records at or below a partition's last complete flush are skipped when
//! the broker redelivers them. Consumer offsets are committed only after a
//! flush is durable; they tell where to resume, the files tell what is done.
//!
//! One archiver writes one directory; invalid records (the engine dead-letters
//! them) are counted and logged, never archived.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use arrow::array::{ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray};
use clap::Args;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tracing::{info, warn};

use crate::engine::{Body, SourcePos};
use crate::event::Interaction;
use crate::pipeline;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: writing Parquet: {source}")]
    Parquet {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },
    #[error("building the record batch: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Io {
        path: path.into(),
        source,
    }
}

#[derive(Debug, Args)]
pub struct ArchiveArgs {
    #[command(flatten)]
    pub kafka: crate::cli::KafkaArgs,
    /// The archive directory (one `day=YYYY-MM-DD/` folder per event day).
    #[arg(long)]
    pub out: PathBuf,
    /// The archiver's consumer group.
    #[arg(long, default_value = "recstream-archive")]
    pub group: String,
    /// Records buffered before a flush.
    #[arg(long, default_value_t = 50_000)]
    pub max_records: usize,
    /// Longest time a record waits for its flush, in ms.
    #[arg(long, default_value_t = 5_000)]
    pub flush_ms: u64,
    /// Exit after this many ms without a new record, once flushed (batch jobs, tests).
    #[arg(long)]
    pub exit_when_idle_ms: Option<u64>,
}

/// One archived interaction with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub partition: i32,
    pub offset: i64,
    pub event: Interaction,
}

/// What is durably archived: per input partition, the last offset of its last
/// complete flush.
#[derive(Debug, Default)]
pub struct Archive {
    dir: PathBuf,
    done: HashMap<i32, i64>,
}

/// A parsed file name: `p{partition}-{first}-{last}-{k}of{n}.parquet`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct FlushName {
    partition: i32,
    first: i64,
    last: i64,
    k: u32,
    n: u32,
}

impl FlushName {
    fn parse(name: &str) -> Option<FlushName> {
        let stem = name.strip_prefix('p')?.strip_suffix(".parquet")?;
        let mut parts = stem.split('-');
        let partition = parts.next()?.parse().ok()?;
        let first = parts.next()?.parse().ok()?;
        let last = parts.next()?.parse().ok()?;
        let (k, n) = parts.next()?.split_once("of")?;
        if parts.next().is_some() {
            return None;
        }
        Some(FlushName {
            partition,
            first,
            last,
            k: k.parse().ok()?,
            n: n.parse().ok()?,
        })
    }

    fn file_name(&self) -> String {
        format!(
            "p{}-{:020}-{:020}-{}of{}.parquet",
            self.partition, self.first, self.last, self.k, self.n
        )
    }
}

/// Every `.parquet` file under `dir`, sorted by path.
pub fn parquet_files(dir: &Path) -> Result<Vec<PathBuf>, ArchiveError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(io(&d))? {
            let path = entry.map_err(io(&d))?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// `YYYY-MM-DD` (UTC) of an event time in ms (Howard Hinnant's civil-from-days).
pub fn event_day(ts_ms: i64) -> String {
    let z = ts_ms.div_euclid(86_400_000) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

fn sync_dir(dir: &Path) -> Result<(), ArchiveError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

impl Archive {
    /// Opens (or creates) an archive directory: finds each partition's last
    /// complete flush and deletes what an interrupted flush left behind.
    pub fn open(dir: &Path) -> Result<Archive, ArchiveError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut flushes: BTreeMap<(i32, i64, i64, u32), Vec<PathBuf>> = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).map_err(io(&d))? {
                let path = entry.map_err(io(&d))?.path();
                let name = path
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                if path.is_dir() {
                    stack.push(path);
                } else if name.ends_with(".tmp") {
                    std::fs::remove_file(&path).map_err(io(&path))?;
                } else if let Some(f) = FlushName::parse(&name) {
                    flushes
                        .entry((f.partition, f.first, f.last, f.n))
                        .or_default()
                        .push(path);
                }
            }
        }
        let mut done: HashMap<i32, i64> = HashMap::new();
        for ((partition, _, last, n), files) in flushes {
            if files.len() as u32 == n {
                let d = done.entry(partition).or_insert(last);
                *d = (*d).max(last);
            } else {
                warn!(
                    partition,
                    files = files.len(),
                    expected = n,
                    "removing an interrupted flush"
                );
                for f in files {
                    std::fs::remove_file(&f).map_err(io(&f))?;
                }
            }
        }
        Ok(Archive {
            dir: dir.to_path_buf(),
            done,
        })
    }

    /// Whether a record still has to be archived.
    pub fn is_new(&self, partition: i32, offset: i64) -> bool {
        self.done.get(&partition).is_none_or(|d| offset > *d)
    }

    /// The last archived offset of a partition.
    pub fn done(&self, partition: i32) -> Option<i64> {
        self.done.get(&partition).copied()
    }

    /// Durably writes one partition's buffered rows (one file per event day).
    /// Blocking file IO: call it off the async runtime.
    pub fn flush(
        &mut self,
        partition: i32,
        mut rows: Vec<Row>,
    ) -> Result<Vec<PathBuf>, ArchiveError> {
        rows.retain(|r| self.is_new(partition, r.offset));
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        rows.sort_by_key(|r| r.offset);
        let (first, last) = (rows[0].offset, rows[rows.len() - 1].offset);
        let mut by_day: BTreeMap<String, Vec<Row>> = BTreeMap::new();
        for r in rows {
            by_day.entry(event_day(r.event.ts)).or_default().push(r);
        }
        let n = by_day.len() as u32;
        let mut written = Vec::new();
        for (k, (day, rows)) in by_day.into_iter().enumerate() {
            let day_dir = self.dir.join(format!("day={day}"));
            std::fs::create_dir_all(&day_dir).map_err(io(&day_dir))?;
            let name = FlushName {
                partition,
                first,
                last,
                k: k as u32 + 1,
                n,
            };
            let path = day_dir.join(name.file_name());
            let tmp = day_dir.join(format!("{}.tmp", name.file_name()));
            write_parquet(&tmp, &rows)?;
            std::fs::rename(&tmp, &path).map_err(io(&path))?;
            sync_dir(&day_dir)?;
            sync_dir(&self.dir)?;
            written.push(path);
        }
        self.done.insert(partition, last);
        Ok(written)
    }
}

/// The archive's columns: what `train` reads (`user_id`, `movie_id`, `ts`,
/// `rating`, `type`) plus the full event and where it came from.
fn write_parquet(path: &Path, rows: &[Row]) -> Result<(), ArchiveError> {
    let col = |a: ArrayRef| a;
    let batch = RecordBatch::try_from_iter([
        (
            "event_id",
            col(Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.event.event_id.as_str()),
            ))),
        ),
        (
            "user_id",
            col(Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.event.user_id.as_str()),
            ))),
        ),
        (
            "movie_id",
            col(Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| r.event.movie_id as i64),
            ))),
        ),
        (
            "type",
            col(Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.event.kind.as_str()),
            ))),
        ),
        (
            "value",
            col(Arc::new(
                rows.iter().map(|r| r.event.value).collect::<Float64Array>(),
            )),
        ),
        (
            "rating",
            col(Arc::new(
                rows.iter()
                    .map(|r| {
                        (r.event.kind == crate::event::EventType::Rate)
                            .then_some(r.event.value)
                            .flatten()
                    })
                    .collect::<Float64Array>(),
            )),
        ),
        (
            "ts",
            col(Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| r.event.ts),
            ))),
        ),
        (
            "context",
            col(Arc::new(
                rows.iter()
                    .map(|r| {
                        r.event
                            .context
                            .as_ref()
                            .and_then(|c| serde_json::to_string(c).ok())
                    })
                    .collect::<StringArray>(),
            )),
        ),
        (
            "partition",
            col(Arc::new(Int32Array::from_iter_values(
                rows.iter().map(|r| r.partition),
            ))),
        ),
        (
            "offset",
            col(Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| r.offset),
            ))),
        ),
    ])?;
    let file = File::create(path).map_err(io(path))?;
    let parquet = |source| ArchiveError::Parquet {
        path: path.into(),
        source,
    };
    let mut w =
        parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).map_err(parquet)?;
    w.write(&batch).map_err(parquet)?;
    let file = w.into_inner().map_err(parquet)?;
    file.sync_all().map_err(io(path))?;
    Ok(())
}

/// Reads every archived interaction under `dir` (for training), in file order.
pub fn load(
    dir: &Path,
) -> Result<Vec<crate::ncf::data::RawInteraction>, crate::catalog::CatalogError> {
    let files = parquet_files(dir).map_err(|e| crate::catalog::CatalogError::Format {
        path: dir.into(),
        detail: e.to_string(),
    })?;
    let mut out = Vec::new();
    for f in files {
        out.extend(crate::ratings::load_dump(&f)?);
    }
    Ok(out)
}

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    archived: u64,
    skipped_invalid: u64,
    skipped_done: u64,
    files: u64,
}

/// Consumes the interactions topic into the archive until a signal (or idle).
pub async fn run(args: &ArchiveArgs) -> Result<()> {
    let config = args.kafka.load()?;
    let archive = Archive::open(&args.out)
        .with_context(|| format!("opening the archive {}", args.out.display()))?;
    let topic = config.topics.interactions.clone();
    let consumer: StreamConsumer = pipeline::consumer_config(&config)
        .set("group.id", &args.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .context("creating the archive's consumer")?;
    consumer
        .subscribe(&[topic.as_str()])
        .with_context(|| format!("subscribing to `topics.interactions` {topic}"))?;
    info!(dir = %args.out.display(), %topic, "archiving");
    let max_bytes = config.processing.max_event_bytes;
    let mut archive = Some(archive);
    let mut buffers: BTreeMap<i32, Vec<Row>> = BTreeMap::new();
    let mut next_offsets: BTreeMap<i32, i64> = BTreeMap::new();
    let mut buffered = 0usize;
    let mut stats = Stats::default();
    let mut ticker = tokio::time::interval(Duration::from_millis(args.flush_ms.max(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_record = tokio::time::Instant::now();
    let mut assigned_at: Option<tokio::time::Instant> = None;
    let stop = crate::cli::wait_for_signal();
    tokio::pin!(stop);
    let topic_name: Arc<str> = Arc::from(topic.as_str());
    loop {
        let flush_now = tokio::select! {
            message = consumer.recv() => {
                let m = message.context("reading the interactions topic")?;
                last_record = tokio::time::Instant::now();
                let (partition, offset) = (m.partition(), m.offset());
                next_offsets.insert(partition, offset + 1);
                let source = SourcePos { topic: topic_name.clone(), partition, offset };
                let record = pipeline::decode(source, m.key(), m.payload().unwrap_or_default(), false, max_bytes);
                match record.body {
                    Body::Event(event) => {
                        if archive.as_ref().is_some_and(|a| a.is_new(partition, offset)) {
                            buffers.entry(partition).or_default().push(Row { partition, offset, event });
                            buffered += 1;
                        } else {
                            stats.skipped_done += 1;
                        }
                    }
                    Body::Invalid(r) => {
                        stats.skipped_invalid += 1;
                        warn!(partition, offset, reason = r.reason, "not archived: invalid record (the engine dead-letters it)");
                    }
                    Body::Refresh(_) => {}
                }
                buffered >= args.max_records
            }
            _ = ticker.tick() => {
                if let Some(idle) = args.exit_when_idle_ms {
                    // Idle counts from the first assignment: joining the group takes a while.
                    if assigned_at.is_none() && consumer.assignment().is_ok_and(|a| a.count() > 0) {
                        assigned_at = Some(tokio::time::Instant::now());
                        last_record = last_record.max(tokio::time::Instant::now());
                    }
                    if assigned_at.is_some()
                        && buffered == 0
                        && last_record.elapsed() >= Duration::from_millis(idle)
                    {
                        break;
                    }
                }
                true
            }
            _ = &mut stop => break,
        };
        if flush_now && (buffered > 0 || !next_offsets.is_empty()) {
            let a = archive.take().expect("present between flushes");
            let taken = std::mem::take(&mut buffers);
            let (a, result) = tokio::task::spawn_blocking(move || {
                let mut a = a;
                let mut files = 0u64;
                for (p, rows) in taken {
                    match a.flush(p, rows) {
                        Ok(w) => files += w.len() as u64,
                        Err(e) => return (a, Err(e)),
                    }
                }
                (a, Ok(files))
            })
            .await
            .context("the flush task")?;
            archive = Some(a);
            stats.files += result?;
            stats.archived += buffered as u64;
            buffered = 0;
            commit(&consumer, &topic, &mut next_offsets)?;
        }
    }
    // Whatever is buffered is flushed before exiting.
    if let Some(mut a) = archive.take() {
        let taken = std::mem::take(&mut buffers);
        let files = tokio::task::spawn_blocking(move || -> Result<u64, ArchiveError> {
            let mut n = 0;
            for (p, rows) in taken {
                n += a.flush(p, rows)?.len() as u64;
            }
            Ok(n)
        })
        .await
        .context("the final flush")??;
        stats.files += files;
        stats.archived += buffered as u64;
        commit(&consumer, &topic, &mut next_offsets)?;
    }
    println!(
        "{}",
        serde_json::json!({
            "archived": stats.archived,
            "files": stats.files,
            "skipped_invalid": stats.skipped_invalid,
            "skipped_already_archived": stats.skipped_done,
        })
    );
    Ok(())
}

/// Commits what was read (everything read is archived or deliberately skipped).
fn commit(
    consumer: &StreamConsumer,
    topic: &str,
    next_offsets: &mut BTreeMap<i32, i64>,
) -> Result<()> {
    if next_offsets.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    for (p, o) in next_offsets.iter() {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o))
            .context("building the commit")?;
    }
    consumer
        .commit(&tpl, CommitMode::Sync)
        .context("committing the archive's offsets")?;
    next_offsets.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventType;

    fn row(partition: i32, offset: i64, ts: i64) -> Row {
        Row {
            partition,
            offset,
            event: Interaction {
                event_id: format!("e{offset}"),
                user_id: format!("u{}", offset % 3),
                movie_id: 1 + offset as u32,
                kind: if offset % 2 == 0 {
                    EventType::Rate
                } else {
                    EventType::Play
                },
                value: (offset % 2 == 0).then_some(4.0),
                ts,
                context: None,
            },
        }
    }

    const DAY: i64 = 86_400_000;

    #[test]
    fn event_days_are_utc_calendar_days() {
        assert_eq!(event_day(0), "1970-01-01");
        assert_eq!(event_day(951_782_400_000), "2000-02-29");
        assert_eq!(event_day(1_795_823_999_999), "2026-11-27");
        assert_eq!(event_day(-1), "1969-12-31");
    }

    #[test]
    fn a_flush_writes_one_file_per_day_that_train_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Archive::open(dir.path()).unwrap();
        let rows = vec![row(2, 10, 5), row(2, 11, DAY + 5), row(2, 12, 7)];
        let files = a.flush(2, rows).unwrap();
        assert_eq!(files.len(), 2);
        assert!(files[0].to_string_lossy().contains("day=1970-01-01/p2-"));
        assert_eq!(a.done(2), Some(12));
        let back = load(dir.path()).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(back.iter().filter(|r| r.rating == 4.0).count(), 2);
    }

    #[test]
    fn redelivered_records_are_not_archived_twice_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut a = Archive::open(dir.path()).unwrap();
            a.flush(0, (0..5).map(|o| row(0, o, o)).collect()).unwrap();
        }
        // Crash before the commit: the broker redelivers 0..8.
        let mut a = Archive::open(dir.path()).unwrap();
        assert!(!a.is_new(0, 4));
        assert!(a.is_new(0, 5));
        assert!(a.is_new(1, 0), "other partitions are untouched");
        a.flush(0, (0..8).map(|o| row(0, o, o)).collect()).unwrap();
        let back = load(dir.path()).unwrap();
        assert_eq!(back.len(), 8, "each record once");
    }

    #[test]
    fn an_interrupted_flush_is_removed_and_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Archive::open(dir.path()).unwrap();
        let files = a
            .flush(1, vec![row(1, 0, 0), row(1, 1, DAY), row(1, 2, 2 * DAY)])
            .unwrap();
        // Only the first of three files made it; a temporary file was left.
        std::fs::remove_file(&files[1]).unwrap();
        std::fs::remove_file(&files[2]).unwrap();
        std::fs::write(dir.path().join("x.parquet.tmp"), b"partial").unwrap();
        let a = Archive::open(dir.path()).unwrap();
        assert_eq!(a.done(1), None);
        assert!(parquet_files(dir.path()).unwrap().is_empty());
        assert!(!dir.path().join("x.parquet.tmp").exists());
    }

    #[test]
    fn flush_names_round_trip() {
        let n = FlushName {
            partition: 3,
            first: 100,
            last: 199,
            k: 1,
            n: 2,
        };
        assert_eq!(FlushName::parse(&n.file_name()), Some(n));
        assert_eq!(FlushName::parse("p3-1-2.parquet"), None);
    }
}
