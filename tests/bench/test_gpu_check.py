"""bench/gpu_check.py run as on a GPU host, against the fake NVML library (as slow as an
H100, in every process it starts) and the fake backend on real sockets."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from backends.local.launch import ChildServer, free_port
from tests.support.fakenvml import H100_LATENCY, build_fake_nvml, fake_nvml_env, write_script
from tests.support.paths import REPO_ROOT

ROOT = REPO_ROOT


@pytest.fixture
def backend() -> ChildServer:
    port = free_port()
    argv = [sys.executable, str(ROOT / "tests" / "support" / "fakes" / "fast_backend.py"),
            "--host", "127.0.0.1", "--port", str(port), "--tokens", "16",
            "--token-delay-ms", "2"]  # fmt: skip
    return ChildServer(argv, port, "/v1/models", name="fake backend")


def test_gpu_check_reports_ttft_cpu_and_conservation(backend: ChildServer, tmp_path: Path) -> None:
    lib = build_fake_nvml(tmp_path / "lib")
    script = tmp_path / "gpu.script"
    write_script(
        script,
        "device 0 name=FakeH100 energy_mj=0 energy_rate_mw=300000 counter_period_ms=100 "
        f"power_mw=300000 instant_mw=300000 {H100_LATENCY}\n",
    )
    with backend:
        done = subprocess.run(
            [sys.executable, "-m", "bench.gpu_check", "--backend", backend.url,
             "--streams", "4", "--concurrent", "12", "--idle-s", "2", "--settle-s", "1"],
            env=fake_nvml_env(lib, script), capture_output=True, text=True, timeout=300,
            check=False, cwd=ROOT,
        )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "GPUs 0: FakeH100" in out
    assert re.search(r"added by the proxy, p50\s+[+-]\d+\.\d\d ms", out)
    assert re.search(r"proxy CPU, nothing in flight\s+\d+\.\d\d % of a core", out)
    row = re.search(r"nvml:0: attributed\+idle / board counter\s+([\d.]+) / ([\d.]+) J ok", out)
    assert row is not None, out
    assert float(row[1]) > 0 and float(row[2]) > 0
    told = re.search(r"sum told to requests / attributed\s+([\d.]+) / ([\d.]+) J", out)
    assert told is not None  # every attributed joule was told (both rounded to 0.1 J)
    assert float(told[1]) == pytest.approx(float(told[2]), abs=0.11)
    assert re.search(r"requests that failed\s+0$", out, re.M)
