"""Blocking sources read off the event loop (metering/sources/background.py).

The schedule and the extrapolation are pure and tested as such. The rest goes through the
real nvidia-ml-py and the fake libnvidia-ml with real latencies and real hangs: a boundary
must complete while the sensor's read is blocked in the driver (no timing is asserted: a
boundary that waited would never finish, and a watchdog fails the test)."""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from metering.accounting.sampler import Sampler
from metering.sources.background import (
    DEFAULT_COUNTER_PERIOD_S,
    FULL_READ_CPU_BUDGET,
    LEARN_MIN_INTERVAL_S,
    NUDGE_DELAY_S,
    NUDGE_MIN_GAP_S,
    BackgroundSource,
    Published,
    ReadSchedule,
    extrapolated_j,
)
from metering.sources.base import Reading, SourceError
from metering.sources.nvml import nvml_factory
from metering.sources.rapl import RaplSource, read_sysfs_file
from tests.conftest import Fake
from tests.metering.sources.test_rapl import TWO_SOCKETS, FakePowercap
from tests.support.fakenvml import H100_LATENCY, fake_blocked_calls, write_script
from tests.support.polling import wait_until

# --- pure ----------------------------------------------------------------------------------


def test_extrapolation_is_capped_and_never_runs_backwards() -> None:
    r = Reading(energy_j=10.0, power_w=200.0, t_s=5.0)
    assert extrapolated_j(r, 5.0, 0.1) == 10.0
    assert extrapolated_j(r, 5.05, 0.1) == pytest.approx(20.0)
    assert extrapolated_j(r, 9.0, 0.1) == pytest.approx(30.0)  # capped at 0.1 s
    assert extrapolated_j(r, 4.0, 0.1) == 10.0  # a reading from the future is not undone


def test_schedule_learns_the_counter_period_then_reads_no_faster() -> None:
    s = ReadSchedule(0.05, learn=True, budget=FULL_READ_CPU_BUDGET)
    assert s.learning and s.interval_s == LEARN_MIN_INTERVAL_S
    t = 0.0
    # Reads every 10 ms of a counter moving every 100 ms: moves seen at 0.1, 0.2, ...
    while s.learning:
        t = round(t + 0.01, 6)
        s.observe(t, 2e-6, moved=abs(t * 10 - round(t * 10)) < 1e-9)
    assert s.period_s == pytest.approx(0.1)
    assert s.interval_s == pytest.approx(0.1)  # cheap reads: one per update period


def test_schedule_keeps_an_expensive_read_within_the_cpu_budget() -> None:
    s = ReadSchedule(0.05, learn=True, budget=0.005)
    # While learning, a 3 ms read is taken at most every 60 ms (5 % of a core).
    s.observe(0.0, 0.003, moved=True)
    assert s.interval_s == pytest.approx(0.06)
    for i in range(1, 20):
        s.observe(i * 0.1, 0.003, moved=True)
    assert not s.learning and s.period_s == pytest.approx(0.1)
    # Then 3 ms of CPU per read within 0.5 % of a core: one read per 600 ms.
    assert s.interval_s == pytest.approx(0.6)
    assert s.cost_s / s.interval_s <= 0.005 + 1e-12


@pytest.mark.parametrize("phase_s", [0.0, 0.013, 0.051, 0.097])
def test_schedule_learns_the_period_from_reads_further_apart_than_half_of_it(
    phase_s: float,
) -> None:
    """An H100's 3 ms read is taken every 60 ms while learning: each move is seen up to
    60 ms late, so the gaps between moves seen are 60 or 120 ms (their median said 120 ms
    for a 100 ms counter); over the span of the moves seen it is 100 ms."""
    s = ReadSchedule(0.05, learn=True, budget=FULL_READ_CPU_BUDGET)
    t, last_move = 0.0, -1
    while s.learning:
        t = round(t + 0.06, 9)
        move = int((t - phase_s) // 0.1)
        s.observe(t, 0.003, moved=move != last_move)
        last_move = move
    assert s.period_s == pytest.approx(0.1, abs=0.006)


def test_schedule_without_moves_falls_back_to_the_default_period() -> None:
    s = ReadSchedule(0.05, learn=True, budget=0.005)
    for i in range(400):
        s.observe(i * 0.01, 1e-6, moved=False)
    assert not s.learning and s.period_s == DEFAULT_COUNTER_PERIOD_S


def test_schedule_for_a_source_without_counter() -> None:
    s = ReadSchedule(0.05, learn=False, budget=0.005)
    s.observe(0.0, 1e-5, None)
    assert not s.learning and s.period_s is None and s.interval_s == 0.05


class _Scripted:
    """A blocking source whose readings the test hands out."""

    name, method, domain, blocking = "scripted", "constant", "system", True

    def __init__(self) -> None:
        self.next = Reading(0.0, 100.0, 0.0)
        self.closed = False

    def read(self, now_s: float) -> Reading:
        return Reading(self.next.energy_j, self.next.power_w, now_s)

    def close(self) -> None:
        self.closed = True


def test_the_loop_side_reports_monotone_estimates_and_degrades_when_stale() -> None:
    clock = [0.0]
    src = _Scripted()
    bg = BackgroundSource(src, fast_interval_s=0.05, clock=lambda: clock[0], start=False)
    assert bg.read(0.0).energy_j == 0.0
    assert bg.read(0.05).energy_j == pytest.approx(5.0)  # 100 W x 50 ms, from the reading
    # A later reading below the estimate already reported: the report does not go back.
    bg._published = Published(Reading(4.0, 100.0, 0.06), "", 0.06)
    assert bg.read(0.06).energy_j == pytest.approx(5.0)
    assert bg.read(0.07).energy_j == pytest.approx(5.0)
    assert bg.read(0.08).energy_j == pytest.approx(6.0)
    # The thread's last attempt failed: degraded until a good one.
    bg._published = Published(Reading(4.0, 100.0, 0.06), "GPU is lost", 0.1)
    with pytest.raises(SourceError, match="GPU is lost"):
        bg.read(0.1)
    # Nothing finished for longer than stale_after_s: a hung read.
    bg._published = Published(Reading(8.0, 100.0, 0.2), "", 0.2)
    with pytest.raises(SourceError, match=r"no reading for .* hung driver"):
        bg.read(0.2 + bg.stale_after_s + 0.1)
    bg.close()
    assert src.closed


class _Sampled(_Scripted):
    """A scripted source with a fast read (a power sample between counter reads); counts
    the fast reads."""

    def __init__(self) -> None:
        super().__init__()
        self.fast_reads: list[float] = []

    def read_fast(self, now_s: float) -> Reading:
        self.fast_reads.append(now_s)
        return self.read(now_s)


def test_a_boundary_asks_for_one_power_sample_a_moment_later() -> None:
    bg = BackgroundSource(_Sampled(), fast_interval_s=0.05, clock=lambda: 0.0, start=False)
    bg.nudge(1.0)
    assert bg.nudge_due_s == pytest.approx(1.0 + NUDGE_DELAY_S)
    bg.nudge(1.001)  # one pending at a time: a burst of boundaries asks once
    assert bg.nudge_due_s == pytest.approx(1.0 + NUDGE_DELAY_S)
    bg.poll(1.0015, full=False, cost_s=0.0)  # the regular sample, before it is due
    assert bg.nudge_due_s is not None
    bg.poll(1.0 + NUDGE_DELAY_S, full=False, cost_s=0.0)
    assert bg.nudge_due_s is None  # served
    # The next boundary soon after waits for the gap rather than being dropped: at most
    # one such sample per NUDGE_MIN_GAP_S, each after its boundary.
    bg.nudge(1.004)
    assert bg.nudge_due_s == pytest.approx(1.0 + NUDGE_DELAY_S + NUDGE_MIN_GAP_S)
    bg.nudge_due_s = None
    bg.nudge(2.0)
    assert bg.nudge_due_s == pytest.approx(2.0 + NUDGE_DELAY_S)
    bg.close()


def test_a_source_without_a_fast_read_ignores_nudges() -> None:
    bg = BackgroundSource(_Scripted(), fast_interval_s=0.05, clock=lambda: 0.0, start=False)
    bg.nudge(1.0)
    assert bg.nudge_due_s is None
    bg.close()


def test_the_thread_takes_the_nudged_sample_between_its_scheduled_ones() -> None:
    """Power sampled every 30 s on schedule: the only fast reads that come within the test
    are the ones its boundaries asked for, each at or after its boundary."""
    src = _Sampled()
    bg = BackgroundSource(src, fast_interval_s=30.0, clock=time.monotonic)
    try:
        for _ in range(3):
            asked_s = time.monotonic()
            before = len(src.fast_reads)
            bg.nudge(asked_s)
            wait_until(lambda n=before: len(src.fast_reads) > n, timeout_s=10)  # type: ignore[misc]
            assert src.fast_reads[-1] >= asked_s + NUDGE_DELAY_S - 1e-6
        assert len(src.fast_reads) == 3
    finally:
        bg.close()
    assert src.closed


def test_request_boundaries_nudge_and_the_tick_does_not() -> None:
    clock = [0.0]
    bg = BackgroundSource(_Sampled(), fast_interval_s=0.05, clock=lambda: clock[0], start=False)
    sampler = Sampler([bg], idle_watts=0.0, clock=lambda: clock[0], background=False)
    clock[0] = 1.0
    sampler.tick()
    assert bg.nudge_due_s is None
    ticket, _ = sampler.start()
    assert bg.nudge_due_s == pytest.approx(1.0 + NUDGE_DELAY_S)
    bg.poll(1.0 + NUDGE_DELAY_S, full=False, cost_s=0.0)
    clock[0] = 2.0
    sampler.finish(ticket)
    assert bg.nudge_due_s == pytest.approx(2.0 + NUDGE_DELAY_S)
    sampler.close()


# --- through the real binding and the fake library --------------------------------------


def run_with_watchdog(fn: Callable[[], object], limit_s: float = 30.0) -> object:
    """Run `fn` on a thread; fail if it has not returned within `limit_s` (a boundary that
    waits for a hung read never returns). Not a speed assertion: the bound is generous."""
    out: list[object] = []
    worker = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    worker.start()
    worker.join(limit_s)
    assert not worker.is_alive(), "the boundary waited for a blocked sensor read"
    return out[0]


GPU = "device 0 name=NVIDIA-H100-80GB-HBM3 energy_mj=0 energy_rate_mw=300000 " \
    "counter_period_ms=100 power_mw=300000 instant_mw=300000"  # fmt: skip


@pytest.fixture
def hung_gpu(fake: Fake) -> Iterator[tuple[Fake, Sampler]]:
    fake.write(GPU + "\n")
    sampler = Sampler(nvml_factory("", time.monotonic()), idle_watts=0.0, fast_interval_s=0.01)
    try:
        yield fake, sampler
    finally:
        fake.write(GPU + "\n")  # release any hung call before closing
        sampler.close()


def test_a_boundary_never_waits_for_a_hung_driver(hung_gpu: tuple[Fake, Sampler]) -> None:
    fake, sampler = hung_gpu
    # Every NVML read of the GPU now blocks in the driver, the thread's included.
    fake.write(GPU + " hang=1\n")
    wait_until(lambda: fake_blocked_calls(fake.lib) >= 1)

    def request() -> float:
        ticket, _ = sampler.start()
        time.sleep(0.02)
        shares, _ = sampler.finish(ticket)
        return sum(s.energy_j for s in shares)

    joules = run_with_watchdog(request)
    assert fake_blocked_calls(fake.lib) >= 1  # still hung: the request did not wait for it
    # Shorter than a counter period and the counter never read during it: still a share,
    # from the power the thread sampled before the hang (300 W x ~20 ms, capped).
    assert isinstance(joules, float) and joules > 0.0
    # The driver answers again: readings resume and nothing drawn meanwhile is lost.
    fake.write(GPU + "\n")
    wait_until(lambda: fake_blocked_calls(fake.lib) == 0)
    ch = sampler.ledger.channels["nvml:0"]
    before = ch.measured_j
    wait_until(lambda: (sampler.read_all(), ch.measured_j)[1] > before + 1.0)
    assert ch.attributed_j + ch.idle_j == pytest.approx(ch.measured_j, rel=1e-12)


def test_a_hang_longer_than_the_stale_limit_degrades_and_recovers(
    hung_gpu: tuple[Fake, Sampler],
) -> None:
    fake, sampler = hung_gpu
    (bg,) = [st.source for st in sampler.states]
    assert isinstance(bg, BackgroundSource)
    fake.write(GPU + " hang=1\n")
    wait_until(lambda: fake_blocked_calls(fake.lib) >= 1)
    state = sampler.by_name["nvml:0"]
    wait_until(lambda: (sampler.read_all(), not state.ok)[1], timeout_s=bg.stale_after_s + 30)
    assert "has not returned" in state.last_error
    fake.write(GPU + "\n")
    wait_until(lambda: (sampler.read_all(), state.ok)[1])


def test_h100_latencies_read_the_counter_within_the_cpu_budget(fake: Fake) -> None:
    """With the counter costing 3 ms of CPU (16 ms at p99) as on an H100: the thread learns
    the counter's 100 ms period and reads it once per cost / budget, not at every boundary;
    the loop's reads never call NVML (they are counted by the fake's call counters below)."""
    fake.write(f"{GPU} {H100_LATENCY}\n")
    sampler = Sampler(nvml_factory("", time.monotonic()), idle_watts=0.0, fast_interval_s=0.05)
    try:
        (bg,) = [st.source for st in sampler.states]
        assert isinstance(bg, BackgroundSource)
        wait_until(lambda: not bg.schedule.learning, timeout_s=60)
        period = bg.schedule.period_s
        assert period is not None and 0.05 <= period <= 0.5
        wait_until(lambda: len(bg._full_costs_s) >= 12, timeout_s=60)
        stats = bg.stats()
        assert stats["full_read_cpu_p50_s"] is not None
        assert stats["full_read_cpu_p50_s"] >= 0.0027  # the fake burns P50 - 10 % at least
        # One counter read per (median CPU cost / budget): 3 ms / 0.4 % = 0.75 s.
        assert bg.schedule.cost_s >= 0.0027
        assert bg.schedule.interval_s == pytest.approx(bg.schedule.cost_s / FULL_READ_CPU_BUDGET)
        for _ in range(200):  # boundaries: no NVML call, so no 3 ms each
            ticket, _ = sampler.start()
            sampler.finish(ticket)
    finally:
        sampler.close()


def test_rapl_reads_go_the_same_way(tmp_path: Path) -> None:
    """A sysfs read that blocks (a stalled file) holds only the source's thread."""
    tree = FakePowercap(tmp_path, TWO_SOCKETS)
    gate = threading.Event()
    gate.set()
    blocked = threading.Event()

    def reader(path: str) -> bytes:
        if path.endswith("energy_uj") and not gate.is_set():
            blocked.set()
            gate.wait()
        return read_sysfs_file(path)

    src = RaplSource(time.monotonic(), str(tree.root), reader=reader)
    sampler = Sampler([src], idle_watts=0.0, fast_interval_s=0.01)
    try:
        assert isinstance(sampler.states[0].source, BackgroundSource)
        gate.clear()
        assert blocked.wait(30)

        def request() -> list[object]:
            ticket, _ = sampler.start()
            shares, _ = sampler.finish(ticket)
            return list(shares)

        assert run_with_watchdog(request)
        assert not gate.is_set()  # the read was still blocked while the request ran
    finally:
        gate.set()
        sampler.close()


def test_the_fake_library_takes_the_time_it_is_told(fake: Fake) -> None:
    """The latency knobs model cost, not only answers: an energy read with
    energy_latency_us=3000 burns at least 2.7 ms of the caller's CPU."""
    fake.write(f"{GPU} energy_latency_us=3000 latency_mode=spin\n")
    (src,) = nvml_factory("", 0.0)
    try:
        costs = []
        for i in range(20):
            c0 = time.thread_time()
            src.read(float(i))
            costs.append(time.thread_time() - c0)
        assert sorted(costs)[len(costs) // 2] >= 0.0027
    finally:
        src.close()


def test_fake_script_knobs_are_validated(
    fake: Fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "bad.script"
    write_script(bad, "device 0 energy_latency_us=3000:1000\n")  # p99 below p50
    monkeypatch.setenv("FAKE_NVML_SCRIPT", str(bad))
    count = ctypes.c_uint(0)
    assert fake.lib.nvmlInit_v2() != 0  # the script is refused: every call fails
    assert fake.lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0
