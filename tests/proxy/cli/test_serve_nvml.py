"""`energy-proxy serve` on GPUs, as a user starts it: a child process whose real
nvidia-ml-py loads the fake libnvidia-ml (LD_LIBRARY_PATH), in front of the fake
OpenAI backend on a real socket. Device groups come from a TOML config file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backends.local.launch import ChildServer, proxy_server
from metering.accounting.report import header_number
from tests.support.fakenvml import build_fake_nvml, fake_nvml_env, write_script
from tests.support.polling import wait_for

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}
TWO_GPUS = (
    "device 0 name=FakeGPU energy_mj=0 energy_rate_mw=300000 counter_period_ms=20 power_mw=300000\n"
    "device 1 name=FakeGPU energy_mj=0 energy_rate_mw=100000 counter_period_ms=20 power_mw=100000\n"
)


def samples(url: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest.fixture(scope="module")
def nvml_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fake_nvml(tmp_path_factory.mktemp("fakenvml"))


@pytest.fixture
def gpu_proxy(nvml_lib: Path, fake_server: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    script = tmp_path / "gpus.txt"
    write_script(script, TWO_GPUS)
    config = tmp_path / "proxy.toml"
    # Two backends on one fake server: "big" on GPU 0, "small" on GPU 1.
    config.write_text(
        f'power-source = "nvml"\nidle-watts = 0\ndb = "{tmp_path / "r.db"}"\n'
        f'[[backends]]\nname = "big"\nurl = "{fake_server}"\ngpus = [0]\n'
        f'[[backends]]\nname = "small"\nurl = "{fake_server}"\ngpus = [1]\n'
    )
    server: ChildServer = proxy_server(
        None, extra_args=["--config", str(config)], env=fake_nvml_env(nvml_lib, script)
    )
    with server:
        yield server.url, script


def test_gpu_energy_is_measured_by_the_counter_and_grouped(gpu_proxy: tuple[str, Path]) -> None:
    url, _ = gpu_proxy
    ready = httpx.get(url + "/readyz").json()
    assert {s["name"]: s["method"] for s in ready["power_sources"]} == {
        "nvml:0": "nvml-counter",
        "nvml:1": "nvml-counter",
    }
    r = httpx.post(url + "/v1/chat/completions", json=CHAT, headers={"x-fake-delay-s": "0.2"})
    assert r.status_code == 200
    assert r.headers["x-energy-method"] == "nvml-counter"
    gpu_j = float(r.headers["x-energy-gpu-joules"])
    assert "x-energy-cpu-joules" not in r.headers
    assert gpu_j == float(r.headers["x-energy-joules"]) > 0
    # The model is listed by both backends: the first configured ("big", GPU 0 at 300 W)
    # serves it, so in 0.2 s or more it drew about 300 W x duration from GPU 0 only.
    energy = r.json()["energy"]
    assert gpu_j == pytest.approx(300.0 * energy["duration_s"], rel=0.35)
    attributed = samples(url, "energy_proxy_energy_joules_total")
    assert attributed[(("scope", "attributed"), ("source", "nvml:0"))] == pytest.approx(
        energy["gpu_joules"]
    )
    assert r.headers["x-energy-gpu-joules"] == header_number(energy["gpu_joules"])
    assert attributed[(("scope", "attributed"), ("source", "nvml:1"))] == 0.0
    assert attributed[(("scope", "idle"), ("source", "nvml:1"))] > 0.0
    power = samples(url, "energy_proxy_power_watts")
    assert power[(("source", "nvml:0"),)] == 300.0
    # The hardware by name, in /readyz and on the Energy Score label (not "nvml:0").
    assert {s["hardware"] for s in ready["power_sources"]} == {"FakeGPU"}
    label = httpx.get(url + "/v1/energy/label/fake-model.svg")
    assert label.status_code == 200
    assert "2 x FakeGPU (nvml-counter)" in label.text and "nvml:0" not in label.text


def test_lost_gpu_degrades_one_source_and_the_proxy_keeps_serving(
    gpu_proxy: tuple[str, Path],
) -> None:
    url, script = gpu_proxy
    write_script(script, TWO_GPUS.replace("power_mw=300000\n", "power_mw=300000 lost=1\n"))

    def gpu0_degraded() -> bool:
        sources = httpx.get(url + "/readyz").json()["power_sources"]
        return {s["name"]: s["ok"] for s in sources} == {"nvml:0": False, "nvml:1": True}

    assert wait_for(gpu0_degraded)
    ready = httpx.get(url + "/readyz")
    assert ready.status_code == 200  # one source still reads
    r = httpx.post(url + "/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    # Its group's only GPU is lost: no method held for this request, and it says so.
    assert r.headers["x-energy-method"] == "none"
    up = samples(url, "energy_proxy_power_source_up")
    assert up[(("method", "nvml-counter"), ("source", "nvml:0"))] == 0.0
    # Recovery: the GPU comes back and its energy is counted again.
    write_script(script, TWO_GPUS)
    assert wait_for(lambda: not gpu0_degraded())
    r = httpx.post(url + "/v1/chat/completions", json=CHAT, headers={"x-fake-delay-s": "0.1"})
    assert r.headers["x-energy-method"] == "nvml-counter" and r.json()["energy"]["joules"] > 0
