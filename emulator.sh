#!/usr/bin/env bash
# pushline, locally. Needs only Python 3.11+; installs the rest into .venv/ on first use.
#
#   ./emulator.sh            run the whole system locally (Ctrl-C stops everything it started)
#   ./emulator.sh test [ARGS] run the test suite (ARGS go to pytest)
#   ./emulator.sh stop       stop a stack started earlier
#   ./emulator.sh demo       run the walkthrough against the stack (starting one if needed)
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

ensure_venv() {
  local python=${PYTHON:-python3}
  if [[ ! -x "$PY" ]]; then
    echo "==> creating .venv with $($python --version)" >&2
    "$python" -m venv "$VENV"
  fi
  local stamp="$VENV/.requirements.sha"
  local want
  want=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
  if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    echo "==> installing dependencies into .venv" >&2
    "$PY" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
    "$PY" -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt >&2
    echo "$want" > "$stamp"
  fi
}

cmd=${1:-run}
case "$cmd" in
  test)
    shift
    ensure_venv
    # A real browser for the console test (Debian's chromium, where this machine can install it).
    bash local/install_browser.sh || echo "==> could not install chromium: the console test will say so" >&2
    exec "$PY" -m pytest "$@"
    ;;
  run|stop|demo)
    ensure_venv
    exec "$PY" -m local.stack "$cmd" "${@:2}"
    ;;
  *)
    echo "usage: $0 [run|test|stop|demo]" >&2
    exit 2
    ;;
esac
