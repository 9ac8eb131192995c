#!/usr/bin/env bash
# Installs the Python peers of `recstream replay-eval` and `recstream eval`
# into two virtualenvs under ~/.cache/recstream (idempotent; CPU only):
#   venv-peers       river, implicit, Surprise        (eval/requirements.txt)
#   venv-sequential  SASRec on TensorFlow 2.15 (CPU)  (eval/requirements-sequential.txt)
# replay-eval uses them when they exist (python3 otherwise).
set -euo pipefail
cd "$(dirname "$0")"
root="${RECSTREAM_PEERS_HOME:-$HOME/.cache/recstream}"
make_env() {
  local dir="$1" stamp="$1/.installed-$(sha1sum "$2" | cut -c1-12)"
  [ -f "$stamp" ] && return 0
  python3 -m venv "$dir"
  "$dir/bin/pip" install --quiet -r "$2"
  touch "$stamp"
}
make_env "$root/venv-peers" requirements.txt
make_env "$root/venv-sequential" requirements-sequential.txt
"$root/venv-sequential/bin/pip" install --quiet --no-deps "recommenders==1.2.1"
echo "peers installed under $root (venv-peers, venv-sequential)"
