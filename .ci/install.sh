#!/usr/bin/env bash
# Idempotent installation of everything the build and the tests need on a fresh
# machine: Debian packages, the Apache Kafka broker (from Maven Central, see
# ops/kafka/), and the Python Kafka client used as an independent
# producer/consumer in the end-to-end tests.
set -euo pipefail

# --build-only: just what compiling the engine needs (the demo); no broker, no Python clients.
BUILD_ONLY=false
[ "${1:-}" = "--build-only" ] && BUILD_ONLY=true

cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$HOME/.local/bin:$PATH"

need_apt=()
# libclang for the rocksdb crate's bindgen; cmake/g++/make for bundled librdkafka,
# libssl-dev for its SSL/SASL-SCRAM support; fonts-dejavu-core for the
# training-curve PNG; time (/usr/bin/time) for the benchmarks.
for pkg in libclang-dev clang cmake g++ make pkg-config zlib1g-dev libssl-dev curl fonts-dejavu-core time; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install: apt packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if $BUILD_ONLY; then
  exit 0
fi

# The Prometheus server and promtool for the operations tests (tests/ops.rs,
# tests/prometheus.rs).
if ! (command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1); then
  echo "install: apt package prometheus"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

# The Apache Kafka broker every broker test, benchmark and `ops/kafka/broker.sh`
# runs: jars resolved by Maven (Java 17) into ~/.cache/recstream; the version
# is pinned in ops/kafka/pom.xml.
for tool in java mvn; do
  command -v "$tool" >/dev/null || { echo "install: $tool is needed for the Kafka broker (Java 17, Maven)" >&2; exit 1; }
done
bash ops/kafka/broker.sh install

# rustfmt and clippy back the lint steps of the test command.
for component in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
    echo "install: rustup component $component"
    rustup component add "$component"
  fi
done

# Debian's Chromium for the live page's browser test (tests/browser), driven by
# playwright-core from the npm registry (tests/browser/package-lock.json).
if ! command -v chromium >/dev/null 2>&1; then
  echo "install: apt package chromium"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  echo "install: npm playwright-core (tests/browser)"
  (cd tests/browser && npm ci --silent --no-audit --no-fund)
fi

if ! python3 -c "import schemathesis" >/dev/null 2>&1; then
  echo "install: python schemathesis"
  python3 -m pip install --quiet --user "schemathesis>=3.39,<5" 2>/dev/null \
    || python3 -m pip install --quiet "schemathesis>=3.39,<5" 2>/dev/null \
    || python3 -m pip install --quiet --user --break-system-packages "schemathesis>=3.39,<5"
fi

if ! python3 -c "import confluent_kafka, jsonschema, yaml" >/dev/null 2>&1; then
  echo "install: python confluent-kafka, jsonschema, pyyaml"
  # A Debian system Python refuses plain pip installs (PEP 668); the user site is ours.
  python3 -m pip install --quiet --user "confluent-kafka>=2.10" jsonschema pyyaml 2>/dev/null \
    || python3 -m pip install --quiet "confluent-kafka>=2.10" jsonschema pyyaml 2>/dev/null \
    || python3 -m pip install --quiet --user --break-system-packages "confluent-kafka>=2.10" jsonschema pyyaml
fi

# benches/report.py draws the growth curves (benches/growth.png) with matplotlib.
if ! python3 -c "import matplotlib" >/dev/null 2>&1; then
  echo "install: python matplotlib (benchmark plots)"
  python3 -m pip install --quiet --user "matplotlib>=3.7" 2>/dev/null \
    || python3 -m pip install --quiet "matplotlib>=3.7" 2>/dev/null \
    || python3 -m pip install --quiet --user --break-system-packages "matplotlib>=3.7"
fi
