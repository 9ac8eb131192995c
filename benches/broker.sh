# Sourced by the benchmark scripts: builds the release engine, starts a tansu
# broker on a free port with the declared topics, and cleans up on exit.
# Sets BIN, work (a scratch directory), brokers, free_port, engine_config,
# cpu_seconds and start_engine; TANSU is the broker's pid and ENGINE the
# engine's, so that the cleanup stops it too.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash .ci/install.sh >/dev/null
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/recstream/target}"
cargo build --release --quiet --bin recstream
BIN="${BIN:-$CARGO_TARGET_DIR/release/recstream}"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work=$(mktemp -d)
kport=$(free_port)
tansu broker --listener-url "tcp://127.0.0.1:$kport" --advertised-listener-url "tcp://127.0.0.1:$kport" \
  --storage-engine memory://tansu/ >"$work/tansu.log" 2>&1 &
TANSU=$!
ENGINE=""
cleanup() { [ -n "$ENGINE" ] && kill "$ENGINE" 2>/dev/null; kill "$TANSU" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$kport") 2>/dev/null && break; sleep 0.1; done
brokers="127.0.0.1:$kport"
"$BIN" topics apply --brokers "$brokers" >/dev/null

# Starts the engine on the catalog $CATALOG with state in $1 and HTTP on port
# $2 (and the config file $ENGINE_CONFIG if set), and waits until GET $3
# answers (/metrics: up; /readyz: partitions assigned).
start_engine() {
  "$BIN" run --brokers "$brokers" --catalog "$CATALOG" --state-dir "$1" \
    --http-listen "127.0.0.1:$2" ${ENGINE_CONFIG:+--config "$ENGINE_CONFIG"} >>"$work/engine.log" 2>&1 &
  ENGINE=$!
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$2$3" >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "engine not answering $3 after 60 s (log: $work/engine.log)" >&2; exit 1
}

# Writes the engine's bench config to $ENGINE_CONFIG: the consumers'
# fetch.wait.max.ms ($FETCH_WAIT_MS) and the settings in the file
# $ENGINE_TOML, if set. tansu 0.6 answers a fetch only when its wait ends, and
# a produce to a partition waits for the fetch pending on it: every broker hop
# costs up to this wait. 1 ms is the freshness setting for tansu (Kafka wakes
# fetches on new data, so there the engine's default of 10 ms costs nothing).
FETCH_WAIT_MS=${FETCH_WAIT_MS:-1}
ENGINE_CONFIG="$work/bench.toml"
engine_config() {
  printf '[kafka.client]\n"fetch.wait.max.ms" = "%s"\n' "$FETCH_WAIT_MS" >"$ENGINE_CONFIG"
  if [ -n "${ENGINE_TOML:-}" ]; then
    cat "$ENGINE_TOML" >>"$ENGINE_CONFIG"
  fi
}

# CPU seconds (user + system) that process $1 has used so far.
cpu_seconds() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat"; }
