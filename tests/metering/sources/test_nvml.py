"""The NVML power source, tested through the real nvidia-ml-py binding over a fake library.

tests/support/fakenvml/fake_nvml.c is compiled once per session and loaded two ways:

* in-process: preloaded with RTLD_GLOBAL before pynvml's first nvmlInit, so pynvml's
  `CDLL("libnvidia-ml.so.1")` resolves to it. pynvml keeps that library for the life of the
  process, so every in-process test shares it and steers it by (re)writing its script;
* in a subprocess with LD_LIBRARY_PATH pointing at it (and once without, for "no library").

Times passed to `read` are a fake clock wherever the fake's behaviour does not depend on
real time; where it does (energy_rate_mw), only relations that cannot flake are asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pynvml
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metering.accounting.sampler import Sampler
from metering.sources.base import PowerSource, SourceError, SourceUnavailable
from metering.sources.nvml import (
    COUNTER_MAX_UPDATE_PERIOD_S,
    NvmlGpuSource,
    NvmlSession,
    nvml_factory,
    parse_gpu_indices,
)
from metering.sources.spec import parse_power_spec
from tests.conftest import Fake
from tests.support.fakenvml import (
    NVML_ERROR_NOT_SUPPORTED,
    NVML_SUCCESS,
    fake_nvml_env,
    write_script,
)
from tests.support.paths import REPO_ROOT

FACTORIES = {"nvml": nvml_factory}
# Float slack for sums of joules; far below any effect a test looks for.
EPS_J = 1e-9


def open_one(fake: Fake, script: str, start_s: float = 0.0) -> NvmlGpuSource:
    fake.write(script)
    (source,) = nvml_factory("0", start_s)
    assert isinstance(source, NvmlGpuSource)
    return source


def run_python(code: str, env: dict[str, str]) -> str:
    """Run a Python snippet in a subprocess; returns its stdout (fails on a non-zero exit)."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


# --------------------------------------------------------------------------- the fake itself


def test_fake_is_what_pynvml_loaded(fake: Fake) -> None:
    with NvmlSession() as session:
        assert session.device_count() == 1
        assert hasattr(pynvml.nvmlLib, "fakeNvmlInitRefs")
        assert fake.init_refs == 1


def test_fake_calls_before_init_are_uninitialized(fake: Fake) -> None:
    with NvmlSession():
        pass  # make sure pynvml has the library loaded, then shut down
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlDeviceGetCount()


def test_fake_field_value_carries_its_own_return(fake: Fake) -> None:
    fake.write("device 0 instant_mw=123000\ndevice 1\n")
    with NvmlSession():
        with_field = pynvml.nvmlDeviceGetHandleByIndex(0)
        without = pynvml.nvmlDeviceGetHandleByIndex(1)
        ids = [pynvml.NVML_FI_DEV_POWER_INSTANT, 999]
        good, other = pynvml.nvmlDeviceGetFieldValues(with_field, ids)
        assert (good.nvmlReturn, good.value.uiVal) == (NVML_SUCCESS, 123000)
        assert other.nvmlReturn == NVML_ERROR_NOT_SUPPORTED
        (missing,) = pynvml.nvmlDeviceGetFieldValues(without, ids[:1])  # the call succeeds
        assert missing.nvmlReturn == NVML_ERROR_NOT_SUPPORTED
        with pytest.raises(pynvml.NVMLError_InvalidArgument):
            pynvml.nvmlDeviceGetHandleByIndex(2)


def test_fake_malformed_script_fails_every_call(fake: Fake) -> None:
    fake.write("device 0 engery_mj=5\n")
    with pytest.raises(SourceUnavailable, match="Unknown Error"):
        nvml_factory("", 0.0)


# --------------------------------------------------------------------------- counter mode


def test_counter_mode_energy_is_the_counter_delta(fake: Fake) -> None:
    source = open_one(fake, "device 0 energy_mj=5000 power_mw=200000\n", start_s=10.0)
    try:
        assert (source.name, source.method, source.domain) == ("nvml:0", "nvml-counter", "gpu")
        assert source.gpu_index == 0
        assert source.read(10.0).energy_j == 0.0
        fake.write("device 0 energy_mj=12000 power_mw=200000\n")
        first = source.read(11.0)
        # The counter's growth, and what was drawn since its value was written: half an
        # update period ago on average (200 W x 50 ms).
        lag_j = 200.0 * COUNTER_MAX_UPDATE_PERIOD_S / 2
        assert (first.energy_j, first.power_w, first.t_s) == (7.0 + lag_j, 200.0, 11.0)
        fake.write("device 0 energy_mj=12500 power_mw=200000\n")
        assert source.read(12.0).energy_j == 7.5 + lag_j
        assert source.read(12.0).energy_j == 7.5 + lag_j  # no time passed: nothing added
    finally:
        source.close()


def test_counter_interpolates_between_updates_and_caps(fake: Fake) -> None:
    # A counter that never moves: everything reported is interpolation at P = 100 W.
    source = open_one(fake, "device 0 energy_mj=1000 instant_mw=100000 power_mw=1\n")
    try:
        assert source.read(0.010).energy_j == pytest.approx(1.0)  # 100 W x 10 ms
        assert source.read(0.020).energy_j == pytest.approx(2.0)
        cap_j = 100.0 * COUNTER_MAX_UPDATE_PERIOD_S
        assert source.read(0.5).energy_j == pytest.approx(cap_j)
        assert source.read(9.0).energy_j == pytest.approx(cap_j)  # never runs further ahead
        # The counter moves by less than was interpolated: hold, never go back. (Each new
        # value is taken as written half an update period before the read: + 100 W x 50 ms.)
        fake.write("device 0 energy_mj=2000 instant_mw=100000\n")
        assert source.read(9.1).energy_j == pytest.approx(cap_j)  # 1 J + 5 J: held at 10
        # 1 J + 100 W x (50 ms since + the value's age, 25 ms now: see the test below)
        assert source.read(9.15).energy_j == pytest.approx(cap_j)  # 8.5 J: held at 10
        assert source.read(9.17).energy_j == pytest.approx(cap_j)  # 9.5 J: held
        # The counter moves past the estimate: snap to it, and to what was drawn since it
        # moved, some time in the 30 ms since the read before: 100 W x 15 ms.
        fake.write("device 0 energy_mj=21000 instant_mw=100000\n")
        assert source.read(9.2).energy_j == pytest.approx(21.5)
    finally:
        source.close()


def test_a_counter_values_age_shrinks_while_the_counter_does_not_move(fake: Fake) -> None:
    """A value seen at a read 100 ms after the last one was written, on average, 50 ms
    before; if the counter has not moved 50 ms later, it was written at most 50 ms before
    the read (it moves every 100 ms): the expected age halves. A period after the move,
    the estimate is the value plus one period's draw and goes no further: never more
    than the counter could be behind."""
    source = open_one(fake, "device 0 energy_mj=0 instant_mw=100000\n")
    try:
        source.read(0.0)
        fake.write("device 0 energy_mj=20000 instant_mw=100000\n")
        assert source.read(0.1).energy_j == pytest.approx(25.0)  # 20 J + 100 W x 50 ms
        assert source.read(0.15).energy_j == pytest.approx(27.5)  # + 5 J since + 2.5 J age
        assert source.read(0.18).energy_j == pytest.approx(29.0)  # + 8 J since + 1 J age
        bound_j = 20.0 + 100.0 * COUNTER_MAX_UPDATE_PERIOD_S
        assert source.read(0.2).energy_j == pytest.approx(bound_j)
        assert source.read(0.9).energy_j == pytest.approx(bound_j)
    finally:
        source.close()


def test_counter_quantised_short_request_gets_energy(fake: Fake) -> None:
    """Two reads 10 ms apart inside one 100 ms counter period still see energy."""
    source = open_one(
        fake,
        "device 0 energy_mj=0 energy_rate_mw=300000 counter_period_ms=100 instant_mw=300000\n",
    )
    try:
        start = source.read(0.0)
        end = source.read(0.010)
        # Interpolated (counter unchanged) or the counter moved: either way, > 0 J.
        assert end.energy_j - start.energy_j > 0.0
    finally:
        source.close()


def test_counter_tracks_quantised_counter_without_drift(fake: Fake) -> None:
    """A counter stepping every 100 ms at 100 W, read every 10 ms (fake clock throughout):
    the report stays within [counter, counter + cap] and lands on the counter at each step."""
    power_mw = 100_000
    source = open_one(fake, f"device 0 energy_mj=0 instant_mw={power_mw}\n")
    try:
        cap_j = power_mw / 1000.0 * COUNTER_MAX_UPDATE_PERIOD_S
        previous_j = 0.0
        for tick in range(1, 301):
            now_s = tick * 0.010
            counter_mj = (tick // 10) * power_mw // 10  # +10 J at every 100 ms step
            if tick % 10 == 0:
                fake.write(f"device 0 energy_mj={counter_mj} instant_mw={power_mw}\n")
            energy_j = source.read(now_s).energy_j
            assert energy_j >= previous_j
            assert counter_mj / 1000.0 <= energy_j <= counter_mj / 1000.0 + cap_j + EPS_J
            if tick % 10 == 0:
                # No drift: back on the counter, plus what was drawn since it moved (half
                # the 10 ms since the read before, when it had not).
                assert energy_j == pytest.approx(counter_mj / 1000.0 + 0.5)
            previous_j = energy_j
        assert previous_j == pytest.approx(300.0, abs=cap_j)
    finally:
        source.close()


def test_counter_real_time_run_stays_within_the_cap(fake: Fake) -> None:
    """The fake's counter runs on real time (100 W, 100 ms updates); read it on real time for
    a while. Only bounds that hold whatever the scheduler does are asserted."""
    fake.write("device 0 energy_mj=0 energy_rate_mw=100000 counter_period_ms=100 instant_mw=100000")
    with NvmlSession():
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)

        def counter_j() -> float:
            return float(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)) / 1000.0

        base_before_j = counter_j()
        (source,) = nvml_factory("0", time.monotonic())
        base_after_j = counter_j()
        try:
            # Ahead of the counter by at most the cap, and the half period a new value is
            # taken to have aged by when read.
            cap_j = 100.0 * COUNTER_MAX_UPDATE_PERIOD_S * 1.5
            previous_j = 0.0
            deadline_s = time.monotonic() + 0.6
            while time.monotonic() < deadline_s:
                before_j = counter_j()
                energy_j = source.read(time.monotonic()).energy_j
                after_j = counter_j()
                assert energy_j >= previous_j
                assert energy_j >= before_j - base_after_j - EPS_J  # never lags the counter
                assert energy_j <= after_j - base_before_j + cap_j + EPS_J  # nor runs ahead
                previous_j = energy_j
                time.sleep(0.005)
            assert previous_j > 0.0
        finally:
            source.close()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    steps=st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=0.2),  # time to the next read, s
            st.integers(min_value=0, max_value=30_000),  # counter growth before it, mJ
            st.integers(min_value=0, max_value=400_000),  # power from then on, mW
        ),
        min_size=1,
        max_size=25,
    )
)
def test_counter_report_is_monotonic_and_bounded(
    fake: Fake, steps: list[tuple[float, int, int]]
) -> None:
    source = open_one(fake, "device 0 energy_mj=0 instant_mw=0\n")
    try:
        now_s, counter_mj, max_power_w, previous_j = 0.0, 0, 0.0, 0.0
        for dt_s, grow_mj, power_mw in steps:
            now_s += dt_s
            counter_mj += grow_mj
            max_power_w = max(max_power_w, power_mw / 1000.0)
            fake.write(f"device 0 energy_mj={counter_mj} instant_mw={power_mw}\n")
            energy_j = source.read(now_s).energy_j
            assert energy_j >= previous_j
            assert energy_j >= counter_mj / 1000.0
            bound_j = counter_mj / 1000.0 + max_power_w * COUNTER_MAX_UPDATE_PERIOD_S
            assert energy_j <= bound_j + EPS_J
            previous_j = energy_j
    finally:
        source.close()


def test_counter_samples_power_at_most_every_50_ms(fake: Fake) -> None:
    source = open_one(fake, "device 0 instant_mw=100000\n")
    try:
        fake.write("device 0 instant_mw=200000\n")
        assert source.read(0.03).power_w == 100.0  # sampled at open, 30 ms ago
        assert source.read(0.05).power_w == 200.0
    finally:
        source.close()


def test_counter_going_backwards_rebases(fake: Fake) -> None:
    source = open_one(fake, "device 0 energy_mj=50000\n")
    try:
        fake.write("device 0 energy_mj=60000\n")
        assert source.read(1.0).energy_j == 10.0
        fake.write("device 0 energy_mj=100\n")  # driver reloaded: counter restarted
        assert source.read(2.0).energy_j == 10.0
        fake.write("device 0 energy_mj=2100\n")
        assert source.read(3.0).energy_j == 12.0
    finally:
        source.close()


# --------------------------------------------------------------------------- power mode


def test_power_mode_integrates_trapezoids_exactly(fake: Fake) -> None:
    source = open_one(fake, "device 0 counter=0 power_mw=100000\n", start_s=5.0)
    try:
        assert source.method == "nvml-power"
        fake.write("device 0 counter=0 power_mw=200000\n")
        assert source.read(6.0).energy_j == 150.0  # (100 + 200) / 2 W x 1 s
        fake.write("device 0 counter=0 power_mw=0\n")
        reading = source.read(8.0)
        assert (reading.energy_j, reading.power_w) == (350.0, 0.0)  # + (200 + 0) / 2 x 2
        assert source.read(8.0).energy_j == 350.0
    finally:
        source.close()


def test_power_mode_prefers_the_instant_field(fake: Fake) -> None:
    source = open_one(fake, "device 0 counter=0 instant_mw=50000 power_mw=70000\n")
    try:
        assert source.read(1.0).power_w == 50.0
        assert source.power_window_s == 0.0  # instant samples: the band's finer class
        # The field now carries NOT_SUPPORTED of its own: this read uses GetPowerUsage.
        fake.write("device 0 counter=0 power_mw=70000\n")
        reading = source.read(2.0)
        assert (reading.power_w, reading.energy_j) == (70.0, 50.0 + 60.0)
    finally:
        source.close()


def test_field_with_own_not_supported_falls_back_to_power_usage(fake: Fake) -> None:
    for script in ("device 0 power_mw=80000\n", "device 0 counter=0 power_mw=80000\n"):
        source = open_one(fake, script)
        try:
            assert source.read(1.0).power_w == 80.0
            # GetPowerUsage: a one-second mean, which places energy only so finely.
            assert source.power_window_s == 1.0
        finally:
            source.close()


# --------------------------------------------------------------------------- errors


def test_lost_gpu_raises_source_error_then_counter_catches_up(fake: Fake) -> None:
    source = open_one(fake, "device 0 energy_mj=1000\n")
    try:
        assert source.read(1.0).energy_j == 0.0
        fake.write("device 0 energy_mj=1000 lost=1\n")
        with pytest.raises(SourceError, match=r"nvml:0.*GPU is lost"):
            source.read(2.0)
        fake.write("device 0 energy_mj=9000\n")
        assert source.read(3.0).energy_j == 8.0  # nothing drawn during the outage is lost
    finally:
        source.close()


def test_lost_gpu_in_power_mode_resumes_with_one_trapezoid(fake: Fake) -> None:
    source = open_one(fake, "device 0 counter=0 power_mw=100000\n")
    try:
        assert source.read(1.0).energy_j == 100.0
        fake.write("device 0 counter=0 lost=1\n")
        for now_s in (2.0, 3.0):
            with pytest.raises(SourceError):
                source.read(now_s)
        fake.write("device 0 counter=0 power_mw=300000\n")
        assert source.read(5.0).energy_j == 100.0 + (100.0 + 300.0) / 2 * 4.0
    finally:
        source.close()


def test_fail_after_n_calls(fake: Fake) -> None:
    # Power mode without the instant field: open costs 2 power calls (the field, which
    # answers NOT_SUPPORTED for itself, then GetPowerUsage); each read costs one.
    source = open_one(fake, "device 0 counter=0 power_mw=10000 fail_after=3\n")
    try:
        assert source.read(1.0).energy_j == 10.0
        for now_s in (2.0, 3.0):
            with pytest.raises(SourceError, match="GPU is lost"):
                source.read(now_s)
        fake.write("device 0 counter=0 power_mw=10000 fail_after=3\n")  # reload: count reset
        assert source.read(4.0).energy_j == 40.0
    finally:
        source.close()


def test_sampler_marks_a_failing_gpu_degraded_and_recovers(fake: Fake) -> None:
    fake.write("device 0 energy_mj=0\n")
    clock_s = [0.0]
    sampler = Sampler(
        nvml_factory("", 0.0), idle_watts=0.0, clock=lambda: clock_s[0], background=False
    )
    try:
        state = sampler.by_name["nvml:0"]
        fake.write("device 0 lost=1\n")
        clock_s[0] = 1.0
        sampler.read_all()
        assert not state.ok and "GPU is lost" in state.last_error
        assert sampler.methods == []
        fake.write("device 0 energy_mj=4000\n")
        clock_s[0] = 2.0
        sampler.read_all()
        assert state.ok and sampler.methods == ["nvml-counter"]
        assert sampler.ledger.channels["nvml:0"].measured_j == pytest.approx(4.0)
    finally:
        sampler.close()


def test_init_failure_is_source_unavailable(fake: Fake) -> None:
    fake.write("init 9\ndevice 0\n")
    with pytest.raises(SourceUnavailable, match="driver is not loaded"):
        nvml_factory("", 0.0)
    fake.write("init 18\ndevice 0\n")
    with pytest.raises(SourceUnavailable, match=r"nvmlInit failed.*version mismatch"):
        nvml_factory("0", 0.0)


def test_no_driver_lets_auto_fall_back(fake: Fake, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAKE_NVML_SCRIPT")  # the fake then answers "driver not loaded"
    (source,) = parse_power_spec("auto", start_s=0.0, factories=FACTORIES)
    assert source.name == "cpu-estimate"
    source.close()


def test_library_missing_entirely_is_source_unavailable(fake_nvml_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_NVML")}
    env.pop("LD_LIBRARY_PATH", None)
    out = run_python(
        """
        from metering.sources.base import SourceUnavailable
        from metering.sources.nvml import nvml_factory
        from metering.sources.spec import parse_power_spec
        try:
            nvml_factory("", 0.0)
        except SourceUnavailable as exc:
            print("unavailable:", exc)
        sources = parse_power_spec("auto", start_s=0.0, factories={"nvml": nvml_factory})
        print("auto:", [s.name for s in sources])
        """,
        env,
    )
    assert "unavailable: NVML library libnvidia-ml.so.1 not found" in out
    assert "auto: ['cpu-estimate']" in out


# --------------------------------------------------------------------------- factory and spec


def test_factory_opens_every_gpu_or_the_chosen_ones(fake: Fake) -> None:
    fake.write("device 0 name=A\ndevice 1 name=B counter=0\ndevice 2 name=C\n")
    sources = nvml_factory("", 0.0)
    try:
        assert [s.name for s in sources] == ["nvml:0", "nvml:1", "nvml:2"]
        assert [s.method for s in sources] == ["nvml-counter", "nvml-power", "nvml-counter"]
        assert [s.device_name for s in sources if isinstance(s, NvmlGpuSource)] == list("ABC")
        assert fake.init_refs == 1  # one session, one nvmlInit
    finally:
        for source in sources[:2]:
            source.close()
    assert fake.init_refs == 1  # the last source still holds the session
    sources[2].close()
    sources[2].close()  # closing twice releases once
    assert fake.init_refs == 0
    chosen = nvml_factory(" 2, 0 ", 0.0)
    try:
        assert [s.name for s in chosen] == ["nvml:2", "nvml:0"]
        assert [getattr(s, "gpu_index", None) for s in chosen] == [2, 0]
    finally:
        for source in chosen:
            source.close()


def test_factory_rejects_indices_nvml_does_not_have(fake: Fake) -> None:
    fake.write("device 0\ndevice 1\n")
    with pytest.raises(ValueError, match=r"no GPU with index 5.*valid indices are 0, 1"):
        nvml_factory("0,5", 0.0)


@pytest.mark.parametrize("argument", ["a", "0,,1", "-1", "1.5", "0,0"])
def test_factory_rejects_malformed_indices(fake: Fake, argument: str) -> None:
    with pytest.raises(ValueError, match=r"nvml takes GPU indices|listed twice"):
        nvml_factory(argument, 0.0)


def test_parse_gpu_indices() -> None:
    assert parse_gpu_indices("") is None
    assert parse_gpu_indices("3") == [3]
    assert parse_gpu_indices("1, 0") == [1, 0]


def test_factory_without_gpus_is_unavailable(fake: Fake) -> None:
    fake.write("# a machine with the driver but no GPU\n")
    with pytest.raises(SourceUnavailable, match="NVML sees no GPU"):
        nvml_factory("", 0.0)


def test_factory_with_a_broken_gpu_is_unavailable_and_closes_the_rest(fake: Fake) -> None:
    fake.write("device 0\ndevice 1 lost=1\ndevice 2\n")
    with pytest.raises(SourceUnavailable, match=r"nvml:1: cannot read GPU 1.*GPU is lost"):
        nvml_factory("", 0.0)
    sources = nvml_factory("0,2", 0.0)  # naming the good ones leaves the broken one out
    assert [s.name for s in sources] == ["nvml:0", "nvml:2"]
    for source in sources:
        source.close()


def test_factory_without_any_power_reading_is_unavailable(fake: Fake) -> None:
    fake.write("device 0 counter=0 fail_after=0\n")
    with pytest.raises(SourceUnavailable, match="nvml:0"):
        nvml_factory("", 0.0)


def test_parse_power_spec_with_nvml(fake: Fake) -> None:
    fake.write("device 0\ndevice 1\n")
    sources: list[PowerSource] = parse_power_spec("nvml", start_s=0.0, factories=FACTORIES)
    sources += parse_power_spec("NVML:1+constant:5", start_s=0.0, factories=FACTORIES)
    try:
        assert [s.name for s in sources] == ["nvml:0", "nvml:1", "nvml:1", "constant"]
    finally:
        for source in sources:
            source.close()
    with pytest.raises(ValueError, match=r"invalid power source spec 'nvml:7'.*valid indices"):
        parse_power_spec("nvml:7", start_s=0.0, factories=FACTORIES)
    with pytest.raises(ValueError, match="appears more than once"):
        parse_power_spec("nvml:0+nvml:0", start_s=0.0, factories=FACTORIES)


def test_auto_picks_nvml_gpus_in_a_subprocess(fake_nvml_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "nvml.script"
    write_script(
        script,
        "device 0 energy_rate_mw=150000 counter_period_ms=20 instant_mw=150000\n"
        "device 1 counter=0 power_mw=60000\n",
    )
    out = run_python(
        """
        import json, time
        from metering.sources.nvml import nvml_factory
        from metering.sources.spec import parse_power_spec
        sources = parse_power_spec(
            "auto", start_s=time.monotonic(), factories={"nvml": nvml_factory}
        )
        time.sleep(0.05)
        readings = [s.read(time.monotonic()) for s in sources]
        print(json.dumps({
            "names": [s.name for s in sources],
            "methods": [s.method for s in sources],
            "energy_j": [r.energy_j for r in readings],
            "power_w": [r.power_w for r in readings],
        }))
        for s in sources:
            s.close()
        """,
        fake_nvml_env(fake_nvml_dir, script),
    )
    result = json.loads(out)
    assert result["names"] == ["nvml:0", "nvml:1"]
    assert result["methods"] == ["nvml-counter", "nvml-power"]
    assert result["power_w"] == [150.0, 60.0]
    assert all(energy_j > 0.0 for energy_j in result["energy_j"])
