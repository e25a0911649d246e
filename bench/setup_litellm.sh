#!/usr/bin/env bash
# LiteLLM's proxy in a venv of its own, for `bench/overhead.py --compare litellm`.
# Prints the path of the litellm executable (pass it as --litellm).
set -euo pipefail
venv=${LITELLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/energy-proxy/litellm-venv}
if [ ! -x "$venv/bin/litellm" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check 'litellm[proxy]' >&2
fi
echo "$venv/bin/litellm"
