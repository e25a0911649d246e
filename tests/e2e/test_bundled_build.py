"""The installed bundled backend is the portable build: its check passes, and its machine
code holds no AVX-512 or AMX instruction (what crashed on the Sapphire Rapids Xeon)."""

from __future__ import annotations

import importlib.util
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

# Registers only AVX-512 (zmm, mask k0-k7 via {%k}) and AMX (tmm, tile*) instructions use.
WIDE = re.compile(r"%zmm\d|%tmm\d|\btile(?:zero|loadd|stored|release|cfg)|\{%k[1-7]\}")


def test_the_bundled_check_passes() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "backends.local.bundled", "check"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "bundled backend: ok: llama-cpp-python 0.3.36" in done.stdout


@pytest.mark.skipif(platform.machine() != "x86_64", reason="AVX-512 and AMX are x86 only")
def test_no_avx512_or_amx_instruction_in_the_libraries() -> None:
    objdump = shutil.which("objdump")
    assert objdump is not None, "objdump (binutils, installed with gcc) is needed"
    spec = importlib.util.find_spec("llama_cpp")
    assert spec is not None and spec.submodule_search_locations
    libs = sorted((Path(next(iter(spec.submodule_search_locations))) / "lib").glob("lib*.so"))
    assert any(p.name == "libggml-cpu.so" for p in libs), libs
    for lib in libs:
        asm = subprocess.run(
            [objdump, "-d", "--no-show-raw-insn", str(lib)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert len(asm) > 10_000, f"{lib.name}: objdump printed almost nothing"
        hits = WIDE.findall(asm)
        assert hits == [], f"{lib.name}: {len(hits)} AVX-512/AMX operands, e.g. {hits[:5]}"
