#!/usr/bin/env bash
# The demo: builds the engine (installing build prerequisites if missing) and
# runs it on an embedded Kafka broker. Extra arguments go to `recstream demo`,
# e.g. --movielens ../shared/data/movielens/ml-latest-small or --brokers host:9092.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install.sh --build-only
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/recstream/target}"
cargo build --quiet --bin recstream
exec "$CARGO_TARGET_DIR/debug/recstream" demo "$@"
