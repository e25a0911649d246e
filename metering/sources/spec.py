"""Turn a `--power-source` SPEC into power sources.

Grammar (docs/INTERFACE.md, "Power source SPEC"):

    SPEC := PART ("+" PART)*
    PART := "auto" | "nvml" | "nvml:" IDS | "rapl" | "cpu-estimate" | "cpu-estimate:tdp=" W
          | "constant:" W | "trace:" PATH

`auto` means every sensor that can be opened here (NVML, then RAPL), else `cpu-estimate`.
NVML and RAPL live in other modules: they come in through `factories`, a mapping from a
kind name to a callable `(argument, start_s) -> list[PowerSource]` (argument is the text
after the first ':', or "" when there is none). A factory raises SourceUnavailable when its
sensor is absent and ValueError for a bad argument. Factories may also add new kinds.

Kinds are case-insensitive. A trace PATH cannot contain '+', which separates the parts.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping

from metering.sources.base import PowerSource, SourceUnavailable
from metering.sources.constant import ConstantSource
from metering.sources.cpu_estimate import CpuEstimateSource
from metering.sources.trace import TraceSource

SourceFactory = Callable[[str, float], list[PowerSource]]

BUILTIN_KINDS: tuple[str, ...] = ("auto", "constant", "trace", "cpu-estimate")
# Valid in the grammar, built elsewhere and supplied through `factories`.
SENSOR_KINDS: tuple[str, ...] = ("nvml", "rapl")
ACCEPTED_FORMS = (
    "auto, nvml, nvml:0,1, rapl, cpu-estimate, cpu-estimate:tdp=W, constant:W, trace:PATH, "
    "or several joined with '+' (e.g. constant:50+cpu-estimate)"
)


def _spec_error(spec: str, problem: str) -> ValueError:
    return ValueError(
        f"invalid power source spec {spec!r}: {problem}; accepted forms: {ACCEPTED_FORMS}"
    )


def split_power_spec(spec: str) -> list[tuple[str, str | None]]:
    """Split a SPEC into (kind, argument) pairs; argument is None when there is no ':'.

    Kinds are lower-cased; nothing is checked beyond the shape. Raises ValueError for an
    empty spec, an empty part (`constant:5+`) or an empty argument (`constant:`).
    """
    if not spec.strip():
        raise _spec_error(spec, "it is empty")
    pairs: list[tuple[str, str | None]] = []
    for raw_part in spec.split("+"):
        part = raw_part.strip()
        if not part:
            raise _spec_error(spec, "it has an empty part (a '+' with nothing on one side)")
        kind, colon, argument = part.partition(":")
        kind = kind.strip().lower()
        if not kind:
            raise _spec_error(spec, f"part {part!r} has no kind before ':'")
        if colon and not argument.strip():
            raise _spec_error(spec, f"part {part!r} has nothing after ':'")
        pairs.append((kind, argument if colon else None))
    return pairs


def _parse_constant(spec: str, argument: str | None, start_s: float) -> ConstantSource:
    if argument is None:
        raise _spec_error(spec, "constant needs watts, e.g. constant:50")
    try:
        power_w = float(argument)
    except ValueError:
        power_w = math.nan
    if not math.isfinite(power_w) or power_w < 0.0:
        raise _spec_error(
            spec, f"constant needs watts as a finite number >= 0, got {argument.strip()!r}"
        )
    return ConstantSource(power_w, start_s)


def _parse_cpu_estimate(
    spec: str, argument: str | None, start_s: float, proc_stat_path: str
) -> CpuEstimateSource:
    tdp_w: float | None = None
    if argument is not None:
        key, equals, value = argument.partition("=")
        if key.strip().lower() != "tdp" or not equals:
            raise _spec_error(
                spec, f"cpu-estimate takes only tdp=W (watts), got {argument.strip()!r}"
            )
        try:
            tdp_w = float(value)
        except ValueError:
            tdp_w = math.nan
        if not math.isfinite(tdp_w) or tdp_w <= 0.0:
            raise _spec_error(
                spec, f"cpu-estimate tdp needs watts as a finite number > 0, got {value.strip()!r}"
            )
    return CpuEstimateSource(tdp_w, start_s, proc_stat_path=proc_stat_path)


def _auto(
    start_s: float, proc_stat_path: str, factories: Mapping[str, SourceFactory]
) -> list[PowerSource]:
    """Every sensor that opens here; cpu-estimate only when none does."""
    sources: list[PowerSource] = []
    unavailable: list[str] = []
    for kind in SENSOR_KINDS:
        factory = factories.get(kind)
        if factory is None:
            unavailable.append(f"{kind}: not in this build")
            continue
        try:
            sources.extend(factory("", start_s))
        except SourceUnavailable as exc:
            unavailable.append(f"{kind}: {exc}")
    if sources:
        return sources
    try:
        return [CpuEstimateSource(None, start_s, proc_stat_path=proc_stat_path)]
    except SourceUnavailable as exc:
        unavailable.append(f"cpu-estimate: {exc}")
        raise SourceUnavailable(
            "auto found no usable power source: " + "; ".join(unavailable)
        ) from exc


def _build_part(
    spec: str,
    kind: str,
    argument: str | None,
    start_s: float,
    proc_stat_path: str,
    factories: Mapping[str, SourceFactory],
) -> list[PowerSource]:
    if kind == "auto":
        if argument is not None:
            raise _spec_error(spec, "auto takes no argument")
        return _auto(start_s, proc_stat_path, factories)
    if kind == "constant":
        return [_parse_constant(spec, argument, start_s)]
    if kind == "cpu-estimate":
        return [_parse_cpu_estimate(spec, argument, start_s, proc_stat_path)]
    if kind == "trace":
        if argument is None:
            raise _spec_error(spec, "trace needs a file, e.g. trace:power.csv")
        try:
            return [TraceSource.from_csv(argument, start_s)]
        except ValueError as exc:
            raise ValueError(f"power source spec {spec!r}: {exc}") from exc
    factory = factories.get(kind)
    if factory is not None:
        try:
            return factory(argument or "", start_s)
        except ValueError as exc:
            raise _spec_error(spec, f"{kind}: {exc}") from exc
    if kind in SENSOR_KINDS:
        raise ValueError(
            f"power source {kind!r} is not available in this build (spec {spec!r}); "
            f"use auto, cpu-estimate, constant:W or trace:PATH"
        )
    raise _spec_error(spec, f"unknown power source kind {kind!r}")


def parse_power_spec(
    spec: str,
    *,
    start_s: float,
    proc_stat_path: str = "/proc/stat",
    factories: Mapping[str, SourceFactory] | None = None,
) -> list[PowerSource]:
    """Build the power sources a SPEC names, in order, all started at clock time start_s.

    factories: extra kinds, e.g. {"nvml": ..., "rapl": ...}; see the module docstring.
    They cannot replace the built-in kinds.

    Raises ValueError (naming the spec and the accepted forms) for a malformed spec, an
    unknown kind, a bad number, a kind this build lacks, or two sources with the same name.
    Raises SourceUnavailable when an explicitly named source cannot be opened here (e.g.
    `trace:missing.csv`, or nothing at all for `auto`). On any error, the sources already
    opened are closed.
    """
    extra: Mapping[str, SourceFactory] = {
        kind.lower(): factory for kind, factory in (factories or {}).items()
    }
    clashes = sorted(set(extra) & set(BUILTIN_KINDS))
    if clashes:
        raise ValueError(f"factories cannot replace built-in power source kinds: {clashes}")
    pairs = split_power_spec(spec)
    sources: list[PowerSource] = []
    try:
        for kind, argument in pairs:
            sources.extend(_build_part(spec, kind, argument, start_s, proc_stat_path, extra))
        seen: set[str] = set()
        for source in sources:
            if source.name in seen:
                raise _spec_error(spec, f"source {source.name!r} appears more than once")
            seen.add(source.name)
    except BaseException:
        for source in sources:
            # Best effort: the original error is the one worth reporting.
            with contextlib.suppress(Exception):
                source.close()
        raise
    return sources
