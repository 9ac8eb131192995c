use std::process::ExitCode;
use std::time::Duration;

// The engine allocates many short-lived records per event; glibc malloc's
// consolidation showed up as a third of the batch time in profiles.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use recstream::cli::{Cli, Command};

fn main() -> ExitCode {
    let allocator = recstream::allocator::tune_for_batches();
    let cli = Cli::parse();
    // The demo prints its own story; keep its logs to warnings unless asked.
    let default_filter = match cli.command {
        Command::Demo(_) => "warn",
        _ => "recstream=info,warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    tracing::debug!(?allocator, "allocator tuned for per-batch memory");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(recstream::cli::run(cli));
    // A blocking call left waiting on a broker that no longer answers (see the
    // pipeline's bounded close) must not keep the process alive.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
