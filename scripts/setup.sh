#!/usr/bin/env bash
# Create .venv (Python 3.11+), install energy-proxy with its test tools, then the bundled CPU
# backend: llama-cpp-python built for a portable instruction set (not -march=native), checked
# and smoke-tested by generating a few tokens. The first run compiles llama-cpp-python (about
# 5 minutes on 2 cores); pip caches the wheel.
#   ./scripts/setup.sh                    set up (a no-op when all is in place)
#   ./scripts/setup.sh --rebuild-backend  rebuild llama-cpp-python from source, ignoring pip's cache
set -euo pipefail
cd "$(dirname "$0")/.."
rebuild=()
for arg in "$@"; do
  case "$arg" in
    --rebuild-backend) rebuild=(--rebuild) ;;
    *) echo "setup.sh: unknown argument $arg (known: --rebuild-backend)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY=$cand; break; fi
  done
fi
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed")'
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -U pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
# Exits non-zero, saying why and what to do, when the backend cannot generate here.
.venv/bin/python -m backends.local.bundled install "${rebuild[@]}"
