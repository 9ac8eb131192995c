#!/usr/bin/env bash
# The test command: installs what the tests need, then runs lints and every test
# (unit, property, schema and end-to-end tests against a real Apache Kafka broker).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install.sh
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/recstream/target}"
cargo fmt --check
cargo clippy --quiet --all-targets -- -D warnings
python3 tests/clients/check_schemas.py samples
# The Kafka Streams peer of the benchmarks: compiled, and its parity test run.
bash benches/peers/kafka-streams/run.sh build
cargo test --benches   # the criterion benches run once as smoke tests
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test 2>&1 | tee "$log"
# One closing line over every test binary above.
awk '/^test result:/ { p += $4; f += $6 } END { printf "all tests: %d passed, %d failed\n", p, f }' "$log"
# The live page's browser test keeps its screenshot as an artefact.
echo "artefacts: ${RECSTREAM_ARTIFACTS:-tests/browser/artifacts}/live_page.png"
