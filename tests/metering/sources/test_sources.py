"""Tests for the built-in power sources (constant, trace, cpu-estimate) and hardware names;
SPEC parsing is in test_spec.py."""

from __future__ import annotations

import itertools
import math
import os
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metering.sources.base import Reading, SourceError, SourceUnavailable
from metering.sources.constant import ConstantSource
from metering.sources.cpu_estimate import (
    DEFAULT_WATTS_PER_LOGICAL_CPU,
    CpuEstimateSource,
    parse_proc_stat_cpu,
    power_fraction_of_tdp,
)
from metering.sources.trace import TraceSource, parse_trace_csv
from tests.support.procfs import write_stat

# --------------------------------------------------------------------------- constant


def test_constant_energy_is_power_times_elapsed() -> None:
    source = ConstantSource(50.0, start_s=10.0)
    assert source.read(14.0) == Reading(energy_j=200.0, power_w=50.0, t_s=14.0)
    assert source.read(10.5).energy_j == 25.0


def test_constant_before_start_is_zero() -> None:
    assert ConstantSource(50.0, start_s=10.0).read(3.0).energy_j == 0.0


def test_constant_labels() -> None:
    source = ConstantSource(0.0, start_s=0.0)
    assert (source.name, source.method, source.domain) == ("constant", "constant", "system")
    assert source.read(100.0).energy_j == 0.0


@pytest.mark.parametrize("bad_w", [-1.0, math.nan, math.inf, -math.inf])
def test_constant_rejects_bad_power(bad_w: float) -> None:
    with pytest.raises(ValueError, match="finite number of watts >= 0"):
        ConstantSource(bad_w, start_s=0.0)


# --------------------------------------------------------------------------- trace

# 10 W -> 30 W over 2 s (40 J), then 30 W -> 0 W over 1 s (15 J): period 3 s, 55 J.
HAND_POINTS = [(0.0, 10.0), (2.0, 30.0), (3.0, 0.0)]


def test_trace_exact_integral_over_several_loops() -> None:
    source = TraceSource(HAND_POINTS, start_s=100.0)
    assert source.period_s == 3.0
    assert source.period_energy_j == 55.0
    # 11.5 s = 3 whole periods (165 J) + 2.5 s into the trace: at 2.5 s the power is
    # 15 W, and 0..2.5 s holds 40 J + (30 + 15) / 2 * 0.5 = 51.25 J.
    reading = source.read(111.5)
    assert reading.energy_j == pytest.approx(165.0 + 51.25, abs=1e-9)
    assert reading.power_w == pytest.approx(15.0, abs=1e-12)
    assert reading.t_s == 111.5


def test_trace_interpolates_inside_a_segment() -> None:
    source = TraceSource(HAND_POINTS, start_s=0.0)
    energy_j, power_w = source.energy_at(1.0)
    assert power_w == pytest.approx(20.0)
    assert energy_j == pytest.approx(15.0)  # (10 + 20) / 2 * 1 s
    # One whole period plus 0.5 s: the loop restarts at the first point's power.
    energy_j, power_w = source.energy_at(3.5)
    assert power_w == pytest.approx(15.0)
    assert energy_j == pytest.approx(55.0 + 6.25)


def test_trace_with_offset_times_and_before_start() -> None:
    source = TraceSource([(5.0, 100.0), (7.0, 100.0)], start_s=1.0)
    assert source.read(4.0).energy_j == pytest.approx(300.0)
    assert source.read(0.0).energy_j == pytest.approx(300.0)  # never decreases
    fresh = TraceSource([(5.0, 100.0), (7.0, 100.0)], start_s=1.0)
    assert fresh.read(0.0).energy_j == 0.0
    assert fresh.mean_power_w == pytest.approx(100.0)
    assert (fresh.name, fresh.method, fresh.domain) == ("trace", "trace", "system")


def test_trace_read_hides_rounding_dips_at_period_boundaries() -> None:
    # A case where the exact formula rounds down by one ULP right at the period boundary.
    source = TraceSource([(0.0, 0.7), (0.1, 1.9), (0.2, 0.7)], start_s=0.0)
    just_before_s = math.nextafter(0.2, -math.inf)
    assert source.energy_at(0.2)[0] < source.energy_at(just_before_s)[0]
    first = source.read(just_before_s)
    assert source.read(0.2).energy_j >= first.energy_j


def test_trace_csv_header_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "power.csv"
    path.write_text(
        "# recorded on a test box\n"
        "t_seconds,watts\n"
        "\n"
        "0,10   # idle\n"
        " 2 , 30\n"
        "# the spike is over\n"
        "3,0\n",
        encoding="utf-8",
    )
    source = TraceSource.from_csv(path, start_s=100.0)
    assert source.read(111.5).energy_j == pytest.approx(216.25, abs=1e-9)
    assert source.origin == str(path)


def test_trace_csv_without_header() -> None:
    assert parse_trace_csv("0,1\n1,2\n", "x.csv") == [(0.0, 1.0), (1.0, 2.0)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("t,w\n0,1\n", r": a trace needs at least 2 't_seconds,watts' points, found 1"),
        ("# nothing\n", r": a trace needs at least 2 .* found 0"),
        ("0,1\n2,1\n2,3\n", r":3: t_seconds must strictly increase, got 2\.0 after 2\.0"),
        ("0,1\n2,1\n1,3\n", r":3: t_seconds must strictly increase"),
        ("0,1\n1,-2\n", r":2: watts must be finite and >= 0, got -2\.0"),
        ("0,1\n1,nan\n", r":2: watts must be finite and >= 0, got nan"),
        ("0,1\n1,inf\n", r":2: watts must be finite and >= 0, got inf"),
        ("0,1\ninf,1\n", r":2: t_seconds must be finite"),
        ("0,1\n1,abc\n", r":2: cannot parse '1,abc'"),
        ("0,1\nt,w\n2,3\n", r":2: cannot parse 't,w'"),
        ("0,1,2\n1,2\n", r":1: expected 't_seconds,watts', got '0,1,2'"),
        ("0;1\n1;2\n", r":1: expected 't_seconds,watts'"),
    ],
)
def test_trace_csv_errors_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(str(path)) + message):
        TraceSource.from_csv(path, start_s=0.0)


def test_trace_missing_file_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"
    with pytest.raises(SourceUnavailable, match=r"nope\.csv"):
        TraceSource.from_csv(path, start_s=0.0)


def test_trace_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "binary.csv"
    path.write_bytes(b"0,1\n\xff\xfe,2\n")
    with pytest.raises(ValueError, match=r"binary\.csv: not UTF-8"):
        TraceSource.from_csv(path, start_s=0.0)


def test_trace_points_errors() -> None:
    with pytest.raises(ValueError, match="at least 2 points, found 1"):
        TraceSource([(0.0, 1.0)], start_s=0.0)
    with pytest.raises(ValueError, match="point 1: t_seconds must strictly increase"):
        TraceSource([(0.0, 1.0), (0.0, 2.0)], start_s=0.0)
    with pytest.raises(ValueError, match="point 0: watts must be finite and >= 0"):
        TraceSource([(0.0, -1.0), (1.0, 2.0)], start_s=0.0)


def _hand_mean_power_w(points: list[tuple[float, float]]) -> float:
    energy_j = sum((t1 - t0) * (w0 + w1) / 2.0 for (t0, w0), (t1, w1) in itertools.pairwise(points))
    return energy_j / (points[-1][0] - points[0][0])


@st.composite
def trace_points(draw: st.DrawFn) -> list[tuple[float, float]]:
    t0_s = draw(st.floats(-1e3, 1e3))
    steps_s = draw(st.lists(st.floats(1e-3, 100.0), min_size=1, max_size=20))
    watts = draw(
        st.lists(st.floats(0.0, 1e3), min_size=len(steps_s) + 1, max_size=len(steps_s) + 1)
    )
    times_s = [t0_s]
    for step_s in steps_s:
        times_s.append(times_s[-1] + step_s)
    return list(zip(times_s, watts, strict=True))


@given(
    points=trace_points(),
    start_s=st.floats(-1e4, 1e4),
    elapsed_s=st.lists(st.floats(-10.0, 1e5), min_size=2, max_size=30),
)
def test_trace_energy_never_decreases(
    points: list[tuple[float, float]], start_s: float, elapsed_s: list[float]
) -> None:
    source = TraceSource(points, start_s=start_s)
    scale_j = source.period_energy_j * (1.0 + max(elapsed_s) / source.period_s)
    previous_exact_j = 0.0
    previous_read_j = 0.0
    for e_s in sorted(elapsed_s):
        exact_j, power_w = source.energy_at(e_s)
        # The formula itself may wobble by rounding only; read() never goes back.
        assert exact_j >= previous_exact_j - 1e-12 * scale_j - 1e-12
        assert power_w >= -1e-9
        reading = source.read(start_s + e_s)
        assert reading.energy_j >= previous_read_j
        previous_exact_j, previous_read_j = exact_j, reading.energy_j


@given(points=trace_points(), periods=st.integers(0, 50), start_s=st.floats(-1e4, 1e4))
def test_trace_whole_periods_are_mean_power_times_time(
    points: list[tuple[float, float]], periods: int, start_s: float
) -> None:
    source = TraceSource(points, start_s=start_s)
    period_s = points[-1][0] - points[0][0]
    expected_j = _hand_mean_power_w(points) * period_s * periods
    energy_j, _ = source.energy_at(period_s * periods)
    assert energy_j == pytest.approx(expected_j, rel=1e-9, abs=1e-9)


# --------------------------------------------------------------------------- cpu-estimate


@pytest.mark.parametrize(
    ("utilisation", "fraction"),
    [
        (0.0, 0.12),
        (0.10, 0.32),
        (0.50, 0.75),
        (1.0, 1.02),
        (0.05, 0.22),
        (0.30, 0.535),
        (0.75, 0.885),
        (-0.5, 0.12),
        (2.0, 1.02),
    ],
)
def test_curve_points_interpolation_and_clamping(utilisation: float, fraction: float) -> None:
    assert power_fraction_of_tdp(utilisation) == pytest.approx(fraction, abs=1e-12)


def test_curve_rejects_nan() -> None:
    with pytest.raises(ValueError, match="nan"):
        power_fraction_of_tdp(math.nan)


@given(st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_curve_is_monotone(u1: float, u2: float) -> None:
    low, high = sorted((u1, u2))
    assert 0.12 <= power_fraction_of_tdp(low) <= power_fraction_of_tdp(high) + 1e-15 <= 1.02 + 1e-15


def test_parse_proc_stat_counts_busy_and_total() -> None:
    # guest (99) is already inside user and must not count twice.
    assert parse_proc_stat_cpu(b"cpu  10 5 5 70 10 0 0 0 99 0\ncpu0 1\n") == (20, 100)
    # A kernel without iowait and later fields: user nice system idle.
    assert parse_proc_stat_cpu(b"cpu 10 0 10 80\n") == (20, 100)
    with pytest.raises(ValueError, match="aggregate 'cpu' line"):
        parse_proc_stat_cpu(b"intr 1 2 3 4 5\n")
    with pytest.raises(ValueError):
        parse_proc_stat_cpu(b"cpu 1 x 3 4 5\n")


def test_cpu_estimate_known_deltas_give_known_energy(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    write_stat(stat, user=1000, system=500, idle=8000, iowait=500)
    source = CpuEstimateSource(100.0, start_s=0.0, proc_stat_path=str(stat))
    assert (source.name, source.method, source.domain) == ("cpu-estimate", "cpu-estimate", "cpu")
    first = source.read(10.0)
    assert first.energy_j == 0.0
    assert first.power_w == pytest.approx(12.0, abs=1e-9)  # u taken as 0 before any interval

    # busy +150 (user +100, system +50) of total +500 (idle +250, iowait +100): u = 0.3,
    # f(0.3) = 0.32 + (0.75 - 0.32) * 0.5 = 0.535, so 53.5 W for 2 s = 107 J.
    write_stat(stat, user=1100, system=550, idle=8250, iowait=600)
    second = source.read(12.0)
    assert source.utilisation == pytest.approx(0.3, abs=1e-12)
    assert second.power_w == pytest.approx(53.5, abs=1e-9)
    assert second.energy_j == pytest.approx(107.0, abs=1e-9)

    # d_total == 0 (reads within one jiffy): the last utilisation carries on.
    third = source.read(13.0)
    assert third.energy_j == pytest.approx(107.0 + 53.5, abs=1e-9)
    assert third.power_w == pytest.approx(53.5, abs=1e-9)

    # Fully busy (irq, softirq and steal count as busy) for 1 s: 102 W.
    write_stat(stat, user=1200, system=600, idle=8250, iowait=600, irq=20, softirq=20, steal=10)
    fourth = source.read(14.0)
    assert source.utilisation == 1.0
    assert fourth.energy_j == pytest.approx(107.0 + 53.5 + 102.0, abs=1e-9)


def test_cpu_estimate_failed_read_loses_nothing(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    write_stat(stat, user=0, system=0, idle=1000)
    source = CpuEstimateSource(10.0, start_s=0.0, proc_stat_path=str(stat))
    assert source.read(0.0).energy_j == 0.0
    stat.unlink()
    with pytest.raises(SourceError, match="cpu-estimate"):
        source.read(1.0)
    stat.write_text("garbage\n", encoding="ascii")
    with pytest.raises(SourceError, match="aggregate 'cpu' line"):
        source.read(2.0)
    # The next good read covers 0..4 s with that span's utilisation: 10 % -> 3.2 W.
    write_stat(stat, user=100, system=0, idle=1900)
    assert source.read(4.0).energy_j == pytest.approx(3.2 * 4.0, abs=1e-9)


def test_cpu_estimate_default_tdp(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    write_stat(stat, user=0, system=0, idle=10)
    given_count = CpuEstimateSource(None, start_s=0.0, proc_stat_path=str(stat), cpu_count=4)
    assert given_count.tdp_w == 4 * DEFAULT_WATTS_PER_LOGICAL_CPU == 14.0
    assert given_count.tdp_is_default
    host = CpuEstimateSource(None, start_s=0.0, proc_stat_path=str(stat))
    assert host.tdp_w == DEFAULT_WATTS_PER_LOGICAL_CPU * (os.cpu_count() or 1)
    assert not CpuEstimateSource(65.0, start_s=0.0, proc_stat_path=str(stat)).tdp_is_default


@pytest.mark.parametrize("bad_tdp_w", [0.0, -5.0, math.nan, math.inf])
def test_cpu_estimate_rejects_bad_tdp(tmp_path: Path, bad_tdp_w: float) -> None:
    stat = tmp_path / "stat"
    write_stat(stat, user=0, system=0, idle=10)
    with pytest.raises(ValueError, match="tdp must be a finite number of watts > 0"):
        CpuEstimateSource(bad_tdp_w, start_s=0.0, proc_stat_path=str(stat))


def test_cpu_estimate_rejects_bad_cpu_count(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    write_stat(stat, user=0, system=0, idle=10)
    with pytest.raises(ValueError, match="cpu_count must be an integer >= 1"):
        CpuEstimateSource(None, start_s=0.0, proc_stat_path=str(stat), cpu_count=0)


def test_cpu_estimate_unreadable_stat_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(SourceUnavailable, match="missing"):
        CpuEstimateSource(None, start_s=0.0, proc_stat_path=str(tmp_path / "missing"))
    garbage = tmp_path / "garbage"
    garbage.write_text("not a stat file\n", encoding="ascii")
    with pytest.raises(SourceUnavailable, match="garbage"):
        CpuEstimateSource(None, start_s=0.0, proc_stat_path=str(garbage))


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc/stat")
def test_cpu_estimate_reads_the_real_proc_stat() -> None:
    source = CpuEstimateSource(None, start_s=0.0)
    assert source.read(0.0).energy_j == 0.0
    reading = source.read(1.0)
    # Between the idle floor and full load of the default TDP, whatever the box does.
    assert 0.12 * source.tdp_w - 1e-9 <= reading.energy_j <= 1.02 * source.tdp_w + 1e-9


def test_hardware_is_named_by_model_and_identical_devices_are_counted() -> None:
    from metering.sources.hardware import describe_hardware

    assert (
        describe_hardware(
            [
                ("nvml:0", "NVIDIA H100 80GB HBM3", "nvml-counter"),
                ("nvml:1", "NVIDIA H100 80GB HBM3", "nvml-counter"),
                ("rapl", "AMD EPYC 9654 96-Core Processor", "rapl"),
            ]
        )
        == "2 x NVIDIA H100 80GB HBM3 (nvml-counter), AMD EPYC 9654 96-Core Processor (rapl)"
    )
    assert describe_hardware([("constant", "", "constant")]) == "constant (constant)"
    assert describe_hardware([]) == "unknown"


def test_cpu_model_from_cpuinfo(tmp_path: Path) -> None:
    from metering.sources.hardware import cpu_model

    intel = tmp_path / "cpuinfo"
    intel.write_text(
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t: fpu\n"
    )
    assert cpu_model(str(intel)) == "Intel(R) Xeon(R) Platinum 8480+"
    assert cpu_model(str(tmp_path / "missing")) == ""
