#!/usr/bin/env bash
# Set-up plus the two everyday commands (README.md):
#   ./dev.sh bench [deltaflex bench options]   the main job: the benchmark (CPU default without a GPU)
#   ./dev.sh test  [pytest options]            the test suite
# The first run makes .venv: a CPU build of torch where no NVIDIA GPU is present (fast: no CUDA
# libraries), PyPI's CUDA build where one is; then deltaflex in editable mode with its test extras.
set -euo pipefail
cd "$(dirname "$0")"
venv=${DELTAFLEX_VENV:-.venv}

setup() {
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  local stamp="$venv/.deltaflex-installed" want
  want=$(sha1sum pyproject.toml | cut -d' ' -f1)
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && return
  if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      "$venv/bin/pip" install -q "torch>=2.11"
    else
      "$venv/bin/pip" install -q "torch==2.13.0"
    fi
  fi
  "$venv/bin/pip" install -q -e ".[test]"
  echo "$want" >"$stamp"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  bench) setup; exec "$venv/bin/deltaflex" bench "$@" ;;
  test) setup; exec "$venv/bin/python" -m pytest "$@" ;;
  *) echo "usage: ./dev.sh bench|test [options]" >&2; exit 2 ;;
esac
