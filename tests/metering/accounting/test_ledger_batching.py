"""Attribution over a simulated batching engine: both modes, device groups, weights.

The simulation advances in engine steps. In each step every admitted request does work:
its whole prompt in its first step (prefill), then one token per step (decode). Each
device draws idle power plus energy proportional to the work of the requests on it, and
the ledger is fed a reading after every step, as the sampler would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metering.accounting.attribution import DECODE_WEIGHT, Attribution, EngineQueue, Flight
from metering.accounting.groups import bind_channels, gpu_share
from metering.accounting.ledger import Ledger, Ticket
from metering.accounting.prompt_text import prompt_tokens_estimate
from metering.sources.base import Reading


@dataclass
class SimRequest:
    arrival: int
    prompt: int
    output: int
    group: int  # which GPU group it runs on
    ticket: Ticket | None = None
    produced: int = 0
    energy_j: float = 0.0
    done: bool = False


def simulate(
    requests: list[SimRequest], mode: str, n_groups: int, j_per_token: float = 0.01
) -> tuple[Ledger, dict[str, float]]:
    names = ["cpu"] + [f"gpu{g}" for g in range(n_groups)]
    ledger = Ledger(names)
    energy = dict.fromkeys(names, 0.0)
    t = 0.0
    for n in names:
        ledger.record(n, 0.0, t)
    step = 0
    while not all(r.done for r in requests):
        # admissions and finishes happen at step boundaries, after a reading
        for r in requests:
            if r.arrival == step and r.ticket is None:
                w = float(r.prompt) if mode == "tokens" else 1.0
                r.ticket = ledger.start(w, ["cpu", f"gpu{r.group}"])
        work = dict.fromkeys(range(n_groups), 0.0)
        active = [r for r in requests if r.ticket is not None and not r.done]
        for r in active:
            work[r.group] += r.prompt if r.produced == 0 else 1
        t += 0.05
        energy["cpu"] += 0.5 + 0.001 * sum(work.values())
        for g in range(n_groups):
            energy[f"gpu{g}"] += 3.0 + j_per_token * work[g]
        for n in names:
            ledger.record(n, energy[n], t)
        for r in active:
            r.produced += 1
            assert r.ticket is not None
            if r.produced == 1 and mode == "tokens":
                ledger.reweigh(r.ticket, DECODE_WEIGHT)
            if r.produced >= r.output:
                r.energy_j = sum(s.energy_j for s in ledger.finish(r.ticket))
                r.done = True
        step += 1
        if step > 10_000:
            raise AssertionError("simulation did not end")
    t += 0.05
    for n in names:
        energy[n] += 1.0
        ledger.record(n, energy[n], t)
    return ledger, energy


req = st.builds(
    SimRequest,
    arrival=st.integers(0, 20),
    prompt=st.integers(1, 400),
    output=st.integers(1, 40),
    group=st.integers(0, 2),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(req, min_size=1, max_size=12), st.sampled_from(["tokens", "equal"]))
def test_conservation_and_no_negative_shares(requests: list[SimRequest], mode: str) -> None:
    ledger, energy = simulate(requests, mode, n_groups=3)
    total_attributed = 0.0
    for r in requests:
        assert r.energy_j >= 0.0
        total_attributed += r.energy_j
    measured = sum(ch.measured_j for ch in ledger.channels.values())
    idle = sum(ch.idle_j for ch in ledger.channels.values())
    assert math.isclose(measured, sum(energy.values()), rel_tol=1e-9)
    assert math.isclose(total_attributed + idle, measured, rel_tol=1e-9)


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 300), st.integers(1, 30), st.integers(2, 6), st.sampled_from(["tokens", "equal"])
)
def test_equal_work_gets_equal_energy(prompt: int, output: int, n: int, mode: str) -> None:
    requests = [SimRequest(0, prompt, output, 0) for _ in range(n)]
    simulate(requests, mode, n_groups=1)
    for r in requests[1:]:
        assert math.isclose(r.energy_j, requests[0].energy_j, rel_tol=1e-9)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 300), st.integers(1, 30))
def test_twice_the_tokens_gets_more_energy_in_tokens_mode(prompt: int, output: int) -> None:
    short = SimRequest(0, prompt, output, 0)
    long = SimRequest(0, prompt, 2 * output, 0)
    simulate([short, long], "tokens", n_groups=1)
    assert long.energy_j > short.energy_j


def test_tokens_mode_charges_a_long_prompt_its_prefill() -> None:
    # Same output, one prompt 100x longer, running side by side: in tokens mode the long
    # prompt pays for its prefill; in equal mode both pay the same.
    for mode, expect_more in (("tokens", True), ("equal", False)):
        small, big = SimRequest(0, 10, 20, 0), SimRequest(0, 1000, 20, 0)
        simulate([small, big], mode, n_groups=1, j_per_token=0.05)
        if expect_more:
            assert big.energy_j > 2 * small.energy_j
        else:
            assert math.isclose(big.energy_j, small.energy_j, rel_tol=1e-9)


def test_gpu_energy_stays_in_its_group() -> None:
    # Group 0 busy, group 1 idle the whole time: nothing of gpu1 is attributed.
    requests = [SimRequest(0, 50, 10, 0), SimRequest(2, 50, 10, 0)]
    ledger, _ = simulate(requests, "tokens", n_groups=2)
    assert ledger.channels["gpu1"].attributed_j == 0.0
    assert ledger.channels["gpu1"].idle_j == pytest.approx(ledger.channels["gpu1"].measured_j)
    assert ledger.channels["gpu0"].attributed_j > 0.0


class FakeGpu:
    method = "constant"
    domain = "gpu"

    def __init__(self, index: int) -> None:
        self.gpu_index = index
        self.name = f"nvml:{index}"

    def read(self, now_s: float) -> Reading:
        return Reading(0.0, 0.0, now_s)

    def close(self) -> None:
        return None


class FakeCpu(FakeGpu):
    domain = "cpu"

    def __init__(self) -> None:
        super().__init__(-1)
        self.name = "rapl"


def test_bind_channels_groups_and_defaults() -> None:
    sources = [FakeCpu(), FakeGpu(0), FakeGpu(1), FakeGpu(2), FakeGpu(3)]
    channels, warnings = bind_channels(sources, {"tp2": [0, 1], "small": [2], "rest": None})
    assert channels["tp2"] == ("rapl", "nvml:0", "nvml:1")
    assert channels["small"] == ("rapl", "nvml:2")
    assert channels["rest"] == ("rapl", "nvml:3")  # the GPUs nobody claimed
    assert warnings == []
    assert gpu_share(channels["tp2"], sources) == 0.5
    single, _ = bind_channels(sources, {"only": None})  # auto: one backend, every GPU
    assert single["only"] == ("rapl", "nvml:0", "nvml:1", "nvml:2", "nvml:3")
    _, warnings = bind_channels(sources, {"x": [7]})
    assert len(warnings) == 1 and "GPU [7]" in warnings[0]
    assert gpu_share(("rapl",), [FakeCpu()]) == 1.0


def test_weights_documented_rules() -> None:
    chat = {"messages": [{"role": "user", "content": "x" * 400}]}
    assert prompt_tokens_estimate(chat) == 100.0
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "y" * 40}]}]}
    assert prompt_tokens_estimate(parts) == 10.0
    assert prompt_tokens_estimate({"input": ["ab", "cd"]}) == 1.0
    assert start_weight("tokens", chat, stream=True, embeddings=False) == 100.0
    assert start_weight("tokens", chat, stream=False, embeddings=False) == 1.0
    assert start_weight("tokens", {"input": "z" * 80}, stream=False, embeddings=True) == 20.0
    assert start_weight("equal", chat, stream=True, embeddings=False) == 1.0


def start_weight(mode: str, payload: dict[str, object], *, stream: bool, embeddings: bool) -> float:
    """The weight a request starts with, as the attribution gives it (nothing waiting)."""
    estimate = prompt_tokens_estimate(payload) if stream or embeddings else 1.0
    flight = Flight(estimate, stream=stream, embeddings=embeddings)
    return Attribution(mode).start(flight, EngineQueue())
