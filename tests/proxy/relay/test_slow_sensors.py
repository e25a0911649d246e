"""The proxy on a GPU as slow to read as an H100 (the energy counter 3 ms p50 / 16 ms p99 of
CPU, through the real nvidia-ml-py and the fake library, in this process): with 24 streams
in flight, every joule measured goes to a request or to idle, exactly, and the total
follows the board's own counter, read independently."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pynvml
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import create_app
from tests.conftest import Fake, proxy_settings
from tests.support.fakenvml import H100_LATENCY
from tests.support.servers import ServerThread

RATE_W = 300.0
GPU = (
    f"device 0 name=NVIDIA-H100-80GB-HBM3 energy_mj=0 energy_rate_mw={int(RATE_W * 1000)} "
    f"counter_period_ms=100 power_mw={int(RATE_W * 1000)} instant_mw={int(RATE_W * 1000)} "
    f"{H100_LATENCY}\n"
)
STREAM = {
    "model": "fake-model",
    "stream": True,
    "messages": [{"role": "user", "content": "hello"}],
}


def board_counter_j() -> float:
    """The GPU's own energy counter, read here, not by the proxy."""
    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return float(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)) / 1000.0
    finally:
        pynvml.nvmlShutdown()


def stream_energy(proxy: str) -> float:
    with httpx.stream(
        "POST",
        f"{proxy}/v1/chat/completions",
        json=STREAM,
        headers={"x-fake-token-delay-s": "0.05"},
        timeout=60,
    ) as r:
        assert r.status_code == 200
        energy = None
        for line in r.iter_lines():
            if line.startswith("data: {"):
                doc = json.loads(line[6:])
                energy = doc.get("energy", energy)
    assert energy is not None and energy["method"] == "nvml-counter"
    return float(energy["gpu_joules"])


def test_conservation_with_h100_latencies(
    fake_nvml: Fake, fake_server: str, tmp_path: Path
) -> None:
    fake_nvml.write(GPU)
    app = create_app(
        proxy_settings(
            tmp_path, backends=[f"fake={fake_server}"], power_source="nvml", idle_watts=0.0
        )
    )
    counter_open_j = board_counter_j()  # the proxy's GPU source opened just before
    with ServerThread(app) as proxy:
        with ThreadPoolExecutor(24) as pool:
            joules = list(pool.map(lambda _: stream_energy(proxy), range(24)))
        time.sleep(1.0)  # quiet: the counter has been read again since the last stream
        text = httpx.get(f"{proxy}/metrics").text  # totals as of this scrape
        counter_end_j = board_counter_j()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    by_scope = {
        s.labels["scope"]: s.value
        for s in families["energy_proxy_energy_joules"].samples
        if s.name == "energy_proxy_energy_joules_total" and s.labels["source"] == "nvml:0"
    }
    attributed, idle = by_scope["attributed"], by_scope["idle"]
    assert all(j > 0 for j in joules)
    # Exact in the ledger: every attributed joule is in some request's answer.
    assert sum(joules) == pytest.approx(attributed, rel=1e-9)
    # The counter is the truth: what the proxy measured from opening the GPU to the scrape
    # is the board counter's growth over the same window, read here independently, within
    # the counter's 100 ms quantisation at each end of the window.
    board_j = counter_end_j - counter_open_j
    assert attributed + idle == pytest.approx(board_j, abs=RATE_W * 0.25)
