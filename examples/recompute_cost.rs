//! The recompute alone, on the stages bench's warm synthetic state (2,000
//! users, 10,000 movies), for counting its instructions and checking that a
//! change leaves every output byte as it was. This host's timings move by a
//! third between runs; an instruction count does not:
//!
//! ```text
//! cargo run --release --example recompute_cost -- 20000     # µs per recompute
//! cargo run --release --example recompute_cost -- --digest  # hash of all outputs
//! valgrind --tool=callgrind --toggle-collect='recompute_cost::recompute_in_turn' \
//!     <target dir>/release/examples/recompute_cost 300      # instructions / 300
//! ```
//!
//! `--evict MIB [N]` runs N recomputes (300 by default), reading MIB MiB
//! before each one (outside the timing and the toggled function), as the
//! broker's JVM does to the caches between two small batches; with
//! callgrind's `--cache-sim=yes` it tells which functions miss the
//! last-level cache when a recompute starts cold.
//!
//! The digest compares builds of the same toolchain (it uses the standard
//! library's hasher).

#[path = "../benches/common/mod.rs"]
#[allow(dead_code)]
mod common;

use std::hash::{DefaultHasher, Hash, Hasher};
use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::Context;
use recstream::engine::Engine;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USERS: u32 = 2_000;

/// `n` recomputes over the users in a stride that visits them all, as the
/// `engine/recompute_2000_users_in_turn` bench does, each after `evictor`
/// reads its buffer (of 0 MiB: none).
fn recompute_all(
    engine: &mut Engine,
    users: &[String],
    n: usize,
    evictor: &common::CacheEvictor,
) -> anyhow::Result<(usize, Duration)> {
    let mut turn = 0;
    let mut items = 0;
    let mut spent = Duration::ZERO;
    for _ in 0..n {
        turn = (turn + 7_919) % users.len();
        evictor.evict();
        let started = Instant::now();
        items += recompute_in_turn(engine, &users[turn])?;
        spent += started.elapsed();
    }
    Ok((items, spent))
}

/// One recompute: the function callgrind's `--toggle-collect` names.
#[inline(never)]
fn recompute_in_turn(engine: &mut Engine, user: &str) -> anyhow::Result<usize> {
    Ok(engine.peek(0, black_box(user))?.recommendations.items.len())
}

/// What to run, from the arguments, checked before the state is warmed.
enum Mode {
    Digest,
    /// Recomputes, and MiB read before each.
    Time {
        recomputes: usize,
        evict_mib: usize,
    },
}

fn mode() -> anyhow::Result<Mode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None => Ok(Mode::Time {
            recomputes: 2000,
            evict_mib: 0,
        }),
        Some("--digest") => Ok(Mode::Digest),
        Some("--evict") => {
            let mib = args
                .get(1)
                .context("--evict needs MIB, the MiB to read before each recompute")?;
            let evict_mib = number(mib, "--evict's MIB")?;
            anyhow::ensure!(
                evict_mib <= 1 << 20,
                "--evict's MIB is at most 1048576 (1 TiB), not {evict_mib}"
            );
            let recomputes = match args.get(2) {
                Some(n) => number(n, "--evict's N")?,
                None => 300,
            };
            Ok(Mode::Time {
                recomputes,
                evict_mib,
            })
        }
        Some(n) => {
            let recomputes = n.parse().with_context(|| {
                format!("the argument is a number of recomputes, --digest or --evict MIB [N], not {n:?}")
            })?;
            Ok(Mode::Time {
                recomputes,
                evict_mib: 0,
            })
        }
    }
}

fn main() -> anyhow::Result<()> {
    let mode = mode()?;
    let dir = tempfile::tempdir()?;
    let mut engine = common::warm_engine(dir.path(), 20_000, USERS, 10_000);
    let users: Vec<String> = (0..USERS).map(|i| format!("u{i}")).collect();
    let (n, evict_mib) = match mode {
        Mode::Digest => {
            let mut hasher = DefaultHasher::new();
            for user in &users {
                for (_, bytes) in engine.peek(0, user)?.encode() {
                    bytes.hash(&mut hasher);
                }
            }
            println!("outputs digest {:016x}", hasher.finish());
            return Ok(());
        }
        Mode::Time {
            recomputes,
            evict_mib,
        } => (recomputes, evict_mib),
    };
    let evictor = common::CacheEvictor::new(evict_mib);
    let (items, spent) = recompute_all(&mut engine, &users, n, &evictor)?;
    let each = spent / n.max(1) as u32;
    println!("{n} recomputes ({items} top picks), {each:?} each");
    Ok(())
}

fn number(text: &str, what: &str) -> anyhow::Result<usize> {
    text.parse()
        .with_context(|| format!("{what} must be a whole number, not {text:?}"))
}
