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
//! The digest compares builds of the same toolchain (it uses the standard
//! library's hasher).

#[path = "../benches/common/mod.rs"]
#[allow(dead_code)]
mod common;

use std::hash::{DefaultHasher, Hash, Hasher};
use std::hint::black_box;

use anyhow::Context;
use recstream::engine::Engine;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USERS: u32 = 2_000;

/// `n` recomputes over the users in a stride that visits them all, as the
/// `engine/recompute_2000_users_in_turn` bench does.
#[inline(never)]
fn recompute_in_turn(engine: &mut Engine, users: &[String], n: usize) -> anyhow::Result<usize> {
    let mut turn = 0;
    let mut items = 0;
    for _ in 0..n {
        turn = (turn + 7_919) % users.len();
        items += engine
            .peek(0, black_box(&users[turn]))?
            .recommendations
            .items
            .len();
    }
    Ok(items)
}

fn main() -> anyhow::Result<()> {
    let arg = std::env::args().nth(1).unwrap_or_else(|| "2000".into());
    let dir = tempfile::tempdir()?;
    let mut engine = common::warm_engine(dir.path(), 20_000, USERS, 10_000);
    let users: Vec<String> = (0..USERS).map(|i| format!("u{i}")).collect();
    if arg == "--digest" {
        let mut hasher = DefaultHasher::new();
        for user in &users {
            for (_, bytes) in engine.peek(0, user)?.encode() {
                bytes.hash(&mut hasher);
            }
        }
        println!("outputs digest {:016x}", hasher.finish());
        return Ok(());
    }
    let n: usize = arg.parse().with_context(|| {
        format!("the argument is a number of recomputes or --digest, not {arg:?}")
    })?;
    let started = std::time::Instant::now();
    let items = recompute_in_turn(&mut engine, &users, n)?;
    let each = started.elapsed() / n.max(1) as u32;
    println!("{n} recomputes ({items} top picks), {each:?} each");
    Ok(())
}
