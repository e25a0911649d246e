#!/usr/bin/env bash
# Set up, then run the checks CI runs: ruff, mypy (strict), and the whole pytest suite,
# including the end-to-end tests against the real llama-cpp-python backend.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Prometheus and promtool for tests/deploy (Debian's package; a no-op when present).
bash scripts/install-test-tools.sh
.venv/bin/ruff check proxy backends metering tests bench
.venv/bin/mypy
# pytest exits 5 when it collected no test: that fails here too (set -e).
.venv/bin/python -m pytest -q "$@"
