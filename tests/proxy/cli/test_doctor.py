"""`energy-proxy doctor` as a user runs it: on this GPU-less machine, and in front of the
fake NVML library as slow as an H100 (through the real nvidia-ml-py, in a subprocess)."""

from __future__ import annotations

import ctypes.util
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import serve_proxy
from tests.support.fakenvml import H100_LATENCY, build_fake_nvml, fake_nvml_env, write_script

DOCTOR = [sys.executable, "-m", "proxy.cli", "doctor"]
H100 = (
    "device 0 name=NVIDIA-H100-80GB-HBM3 energy_mj=0 energy_rate_mw=71000 "
    f"counter_period_ms=100 power_mw=71000 instant_mw=71000 {H100_LATENCY}"
)


def doctor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DOCTOR, *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


@pytest.fixture(scope="module")
def nvml_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fake_nvml(tmp_path_factory.mktemp("fakenvml"))


def gpu_env(nvml_lib: Path, tmp_path: Path, script: str) -> dict[str, str]:
    path = tmp_path / "gpu.script"
    write_script(path, script + "\n")
    return fake_nvml_env(nvml_lib, path)


@pytest.mark.skipif(
    ctypes.util.find_library("nvidia-ml") is not None, reason="this host has an NVIDIA driver"
)
def test_without_a_gpu_it_says_why_nvml_is_absent_and_what_works() -> None:
    done = doctor()
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "nvml: not available: NVML library libnvidia-ml.so.1 not found" in out
    assert "usable: " in out
    # Every figure serve would use, and no GPU server's embodied figure on this host.
    line = next(ln for ln in out.splitlines() if ln.startswith("energy-proxy: power "))
    for part in (
        "carbon intensity 480 gCO2eq/kWh, static",
        "PUE 1",
        "embodied none:",
        "store ",
        "keys off",
        "attribution model",
        "request log on",
    ):
        assert part in line, line  # fmt: skip
    doc = json.loads(doctor("--json", "--calls", "10").stdout)
    assert doc["usable"], doc
    for src in doc["sources"]:
        if src["ok"]:
            assert src["calls"] and src["calls"][0]["p50_s"] > 0
            assert "never on a request" in src["plan"] or "at each request boundary" in src["plan"]


def test_no_working_source_exits_1() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH",)}
    done = doctor("--power-source", "nvml", env={**env, "LD_LIBRARY_PATH": "/nonexistent"})
    if ctypes.util.find_library("nvidia-ml") is not None:
        pytest.skip("this host has an NVIDIA driver")
    assert done.returncode == 1
    assert "no power source works on this host" in done.stdout


def test_a_malformed_spec_exits_2() -> None:
    done = doctor("--power-source", "constant:")
    assert done.returncode == 2
    assert "invalid power source spec" in done.stderr


def test_an_h100_slow_gpu(nvml_lib: Path, tmp_path: Path) -> None:
    done = doctor("--power-source", "nvml", "--json", env=gpu_env(nvml_lib, tmp_path, H100))
    assert done.returncode == 0, done.stderr
    (gpu,) = json.loads(done.stdout)["sources"]
    assert gpu["name"] == "nvml:0" and gpu["ok"] and gpu["method"] == "nvml-counter"
    assert gpu["hardware"] == "NVIDIA-H100-80GB-HBM3"
    calls = {c["call"]: c for c in gpu["calls"]}
    counter = calls["nvmlDeviceGetTotalEnergyConsumption"]
    assert counter["p50_s"] >= 0.0027 and counter["cpu_p50_s"] >= 0.0027  # the fake's 3 ms
    assert counter["p99_s"] >= counter["p50_s"]
    assert calls["nvmlDeviceGetFieldValues (instant power)"]["p50_s"] < 0.001
    assert gpu["counter_period_s"] == pytest.approx(0.1, abs=0.03)
    assert gpu["power_w"] == pytest.approx(71.0)
    assert "read on the sampler thread every 0.7" in gpu["plan"]  # 3 ms / 0.4 % of a core
    assert "never on a request" in gpu["plan"]
    # What serve would say at its start: the GPU measured, one GPU's embodied figure.
    doc = json.loads(done.stdout)
    assert "nvml:0 NVIDIA-H100-80GB-HBM3 (nvml-counter, measured" in doc["serve_would_say"]
    assert doc["embodied"]["kgco2eq"] == pytest.approx(318.0)
    assert "1 GPU x 318 kg" in doc["embodied"]["basis"]
    text = doctor("--power-source", "nvml", env=gpu_env(nvml_lib, tmp_path, H100)).stdout
    assert "nvml:0  NVIDIA-H100-80GB-HBM3  nvml-counter  ok" in text
    assert "embodied 318 kgCO2eq over 4 years: 1 GPU x 318 kg" in text
    assert re.search(r"energy counter moves every 0\.(0[7-9]|1[0-3])\d s", text), text


def test_a_gpu_without_counter_and_without_power_limit_permission(
    nvml_lib: Path, tmp_path: Path
) -> None:
    script = "device 0 name=OldGPU counter=0 power_mw=50000 set_limit=0"
    done = doctor("--power-source", "nvml", "--json", env=gpu_env(nvml_lib, tmp_path, script))
    (gpu,) = json.loads(done.stdout)["sources"]
    assert gpu["method"] == "nvml-power" and gpu["counter_period_s"] is None
    assert gpu["plan"].startswith("no energy counter: power sampled every 50 ms")
    expected = "setting it needs root" if os.geteuid() != 0 else "NVML refuses to set it here"
    assert expected in gpu["power_limit"]


def test_a_lost_gpu_fails_its_row_and_the_exit_code(nvml_lib: Path, tmp_path: Path) -> None:
    done = doctor("--power-source", "nvml", env=gpu_env(nvml_lib, tmp_path, "device 0 lost=1"))
    assert done.returncode == 1
    assert "nvml: not available: nvml:0: cannot read GPU 0" in done.stdout


def test_it_shows_a_running_proxys_cost_models(fake_server: str, tmp_path: Path) -> None:
    with serve_proxy(tmp_path, fake_server) as url:
        r = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
            headers={"x-fake-timings": "vllm:1,20,300"},
            timeout=30,
        )
        assert r.status_code == 200
        done = doctor("--power-source", "constant:100", "--calls", "10", "--proxy", url)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"the split at {url}:" in done.stdout
        assert "fake  cost-v1 defaults (never fitted, 0 intervals" in done.stdout
        assert "fixed 280.0 W, prefill 5.00 mJ/token, decode 5.00 mJ/token" in done.stdout
        assert "queue capacity none known (unknown); 1 answers carried" in done.stdout
        assert "prefill a prompt a step (none)" in done.stdout
        doc = json.loads(doctor("--power-source", "constant:100", "--json", "--proxy", url).stdout)
        assert doc["proxy"]["cost_models"]["fake"]["timed_requests"] == 1


def test_a_proxy_it_cannot_read_is_a_clear_error_and_exit_1() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    done = doctor("--power-source", "constant:100", "--proxy", f"http://127.0.0.1:{port}")
    assert done.returncode == 1
    assert f"could not read http://127.0.0.1:{port}/readyz" in done.stderr
