#!/usr/bin/env bash
# Builds the Kafka Streams peer if needed (Maven, output under
# ~/.cache/recstream/peer-kafka-streams) and runs it in the foreground.
#   benches/peers/kafka-streams/run.sh build            # compile + unit test
#   benches/peers/kafka-streams/run.sh --brokers HOST:PORT --catalog FILE [options of PeerApp]
#   benches/peers/kafka-streams/run.sh relay --brokers HOST:PORT [options of Relay]   # the do-nothing floor
# JAVA_OPTS overrides the JVM settings (default: 1 GiB heap).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$HOME/.cache/recstream/peer-kafka-streams"
stamp="$out/.built-from"
sources=$(cd "$here" && find pom.xml src -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)

build() {
  rm -rf "$out/lib"
  mvn -q -f "$here/pom.xml" package "$@"
  echo "$sources" >"$stamp"
}

if [ "${1:-}" = "build" ]; then
  shift
  build "$@"
  exit 0
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$sources" ]; then
  build -DskipTests >&2
fi
main=recstream.peer.PeerApp
if [ "${1:-}" = "relay" ]; then
  shift
  main=recstream.peer.Relay
fi
# shellcheck disable=SC2086
exec java ${JAVA_OPTS:--Xms256m -Xmx1g} -Dorg.slf4j.simpleLogger.defaultLogLevel=warn \
  -cp "$out/classes:$out/lib/*" "$main" "$@"
