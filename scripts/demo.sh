#!/usr/bin/env bash
# Set up, then run the demo: a real CPU backend (SmolLM2-135M from PyPI) behind energy-proxy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/energy-proxy demo "$@"
