"""Power source SPEC parsing (metering/sources/spec.py): kinds, combinations, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from metering.sources.base import Domain, PowerSource, Reading, SourceUnavailable
from metering.sources.constant import ConstantSource
from metering.sources.cpu_estimate import (
    CpuEstimateSource,
)
from metering.sources.spec import SourceFactory, parse_power_spec, split_power_spec
from metering.sources.trace import TraceSource
from tests.support.procfs import write_stat

# --------------------------------------------------------------------------- spec


class FakeSource:
    """A stand-in for a sensor a factory would build (NVML, RAPL)."""

    method: str = "fake"

    def __init__(self, name: str, domain: Domain = "gpu") -> None:
        self.name = name
        self.domain: Domain = domain
        self.closed = False

    def read(self, now_s: float) -> Reading:
        return Reading(energy_j=0.0, power_w=0.0, t_s=now_s)

    def close(self) -> None:
        self.closed = True


def fixed(*sources: FakeSource, calls: list[tuple[str, float]] | None = None) -> SourceFactory:
    """A factory returning `sources`, recording its arguments in `calls`."""

    def factory(argument: str, start_s: float) -> list[PowerSource]:
        if calls is not None:
            calls.append((argument, start_s))
        return list(sources)

    return factory


def unavailable(reason: str) -> SourceFactory:
    def factory(argument: str, start_s: float) -> list[PowerSource]:
        raise SourceUnavailable(reason)

    return factory


@pytest.fixture
def stat_path(tmp_path: Path) -> str:
    stat = tmp_path / "stat"
    write_stat(stat, user=10, system=10, idle=80)
    return str(stat)


@pytest.fixture
def trace_path(tmp_path: Path) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text("t_seconds,watts\n0,10\n2,30\n3,0\n", encoding="utf-8")
    return path


def test_spec_constant(stat_path: str) -> None:
    (source,) = parse_power_spec("constant:50", start_s=7.0, proc_stat_path=stat_path)
    assert isinstance(source, ConstantSource)
    assert source.read(9.0).energy_j == 100.0


def test_spec_trace(trace_path: Path) -> None:
    (source,) = parse_power_spec(f"trace:{trace_path}", start_s=100.0)
    assert isinstance(source, TraceSource)
    assert source.read(111.5).energy_j == pytest.approx(216.25)


def test_spec_cpu_estimate_default_and_tdp(stat_path: str) -> None:
    (default,) = parse_power_spec("cpu-estimate", start_s=0.0, proc_stat_path=stat_path)
    assert isinstance(default, CpuEstimateSource)
    assert default.tdp_is_default
    (given_tdp,) = parse_power_spec("cpu-estimate:tdp=65", start_s=0.0, proc_stat_path=stat_path)
    assert isinstance(given_tdp, CpuEstimateSource)
    assert given_tdp.tdp_w == 65.0
    assert given_tdp.proc_stat_path == stat_path


def test_spec_combination_keeps_order(stat_path: str) -> None:
    sources = parse_power_spec(
        " constant:50 + CPU-Estimate:tdp=65 ", start_s=0.0, proc_stat_path=stat_path
    )
    assert [s.name for s in sources] == ["constant", "cpu-estimate"]
    assert [s.domain for s in sources] == ["system", "cpu"]


def test_spec_auto_without_sensors_falls_back_to_cpu_estimate(stat_path: str) -> None:
    (source,) = parse_power_spec("auto", start_s=0.0, proc_stat_path=stat_path)
    assert source.name == "cpu-estimate"
    factories = {"nvml": unavailable("no driver"), "rapl": unavailable("no permission")}
    (source,) = parse_power_spec("auto", start_s=0.0, proc_stat_path=stat_path, factories=factories)
    assert source.name == "cpu-estimate"


def test_spec_auto_takes_every_sensor_that_opens(stat_path: str) -> None:
    gpu0, gpu1, rapl = FakeSource("nvml:0"), FakeSource("nvml:1"), FakeSource("rapl", "cpu")
    calls: list[tuple[str, float]] = []
    sources = parse_power_spec(
        "auto",
        start_s=3.0,
        proc_stat_path=stat_path,
        factories={"nvml": fixed(gpu0, gpu1, calls=calls), "rapl": fixed(rapl)},
    )
    assert sources == [gpu0, gpu1, rapl]
    assert calls == [("", 3.0)]
    only_rapl = parse_power_spec(
        "auto",
        start_s=0.0,
        proc_stat_path=stat_path,
        factories={"nvml": unavailable("no GPU"), "rapl": fixed(rapl)},
    )
    assert only_rapl == [rapl]


def test_spec_auto_with_nothing_usable_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(SourceUnavailable, match=r"nvml: no GPU.*cpu-estimate"):
        parse_power_spec(
            "auto",
            start_s=0.0,
            proc_stat_path=str(tmp_path / "missing"),
            factories={"nvml": unavailable("no GPU")},
        )


@pytest.mark.parametrize(("spec", "argument"), [("nvml", ""), ("nvml:0,1", "0,1"), ("rapl", "")])
def test_spec_sensor_kinds_go_to_their_factory(spec: str, argument: str) -> None:
    calls: list[tuple[str, float]] = []
    fake = FakeSource("sensor")
    kind = spec.partition(":")[0]
    sources = parse_power_spec(spec, start_s=5.0, factories={kind: fixed(fake, calls=calls)})
    assert sources == [fake]
    assert calls == [(argument, 5.0)]


@pytest.mark.parametrize("spec", ["nvml", "nvml:0,1", "rapl", "constant:5+rapl"])
def test_spec_sensor_kinds_without_factory(spec: str) -> None:
    kind = "rapl" if "rapl" in spec else "nvml"
    with pytest.raises(ValueError, match=f"power source '{kind}' is not available in this build"):
        parse_power_spec(spec, start_s=0.0)


def test_spec_explicit_sensor_unavailable_propagates() -> None:
    with pytest.raises(SourceUnavailable, match="no driver"):
        parse_power_spec("nvml", start_s=0.0, factories={"nvml": unavailable("no driver")})


def test_spec_factory_value_error_names_the_spec() -> None:
    def bad(argument: str, start_s: float) -> list[PowerSource]:
        raise ValueError(f"no GPU index {argument}")

    with pytest.raises(ValueError, match=r"'nvml:9'.*no GPU index 9.*accepted forms"):
        parse_power_spec("nvml:9", start_s=0.0, factories={"nvml": bad})


def test_spec_factories_cannot_replace_builtins() -> None:
    with pytest.raises(ValueError, match="cannot replace built-in"):
        parse_power_spec("constant:5", start_s=0.0, factories={"constant": fixed()})


def test_spec_extra_kind_from_factory() -> None:
    fake = FakeSource("ipmi", "system")
    assert parse_power_spec("ipmi", start_s=0.0, factories={"ipmi": fixed(fake)}) == [fake]


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("constant:abc", "constant needs watts as a finite number >= 0, got 'abc'"),
        ("constant:-5", "constant needs watts as a finite number >= 0, got '-5'"),
        ("constant:inf", "constant needs watts as a finite number >= 0"),
        ("constant", "constant needs watts"),
        ("constant:", "nothing after ':'"),
        ("cpu-estimate:tdp=0", "cpu-estimate tdp needs watts as a finite number > 0, got '0'"),
        ("cpu-estimate:tdp=abc", "cpu-estimate tdp needs watts"),
        ("cpu-estimate:foo=1", "cpu-estimate takes only tdp=W"),
        ("cpu-estimate:65", "cpu-estimate takes only tdp=W"),
        ("constant:5+", "empty part"),
        ("+constant:5", "empty part"),
        ("constant:5++trace:x", "empty part"),
        ("", "it is empty"),
        ("   ", "it is empty"),
        (":5", "no kind before ':'"),
        ("bogus", "unknown power source kind 'bogus'"),
        ("constant:5+bogus:1", "unknown power source kind 'bogus'"),
        ("auto:1", "auto takes no argument"),
        ("trace", "trace needs a file"),
        ("constant:5+constant:6", "source 'constant' appears more than once"),
        ("cpu-estimate+auto", "source 'cpu-estimate' appears more than once"),
    ],
)
def test_spec_errors_name_the_spec_and_the_accepted_forms(
    stat_path: str, spec: str, problem: str
) -> None:
    with pytest.raises(ValueError) as excinfo:
        parse_power_spec(spec, start_s=0.0, proc_stat_path=stat_path)
    message = str(excinfo.value)
    assert repr(spec) in message
    assert problem in message
    assert "accepted forms: auto, nvml, nvml:0,1, rapl, cpu-estimate" in message


def test_spec_duplicate_closes_what_was_opened() -> None:
    gpu = FakeSource("nvml:0")
    with pytest.raises(ValueError, match="'nvml:0' appears more than once"):
        parse_power_spec("nvml+nvml", start_s=0.0, factories={"nvml": fixed(gpu)})
    assert gpu.closed


def test_spec_later_failure_closes_earlier_sources() -> None:
    gpu = FakeSource("nvml:0")
    with pytest.raises(ValueError, match="unknown power source kind"):
        parse_power_spec("nvml+bogus", start_s=0.0, factories={"nvml": fixed(gpu)})
    assert gpu.closed


def test_spec_trace_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceUnavailable, match=r"missing\.csv"):
        parse_power_spec(f"trace:{tmp_path / 'missing.csv'}", start_s=0.0)
    bad = tmp_path / "bad.csv"
    bad.write_text("0,1\n1,-1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"power source spec 'trace:.*bad\.csv:2: watts"):
        parse_power_spec(f"trace:{bad}", start_s=0.0)


def test_split_power_spec_shapes() -> None:
    assert split_power_spec("nvml:0,1+rapl+Constant:5") == [
        ("nvml", "0,1"),
        ("rapl", None),
        ("constant", "5"),
    ]
