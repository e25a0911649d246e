"""CPU package and DRAM energy from Linux powercap RAPL: `rapl`.

Intel and AMD (Zen: Linux 5.8+, 5.11+ for Zen 3) CPUs both expose RAPL energy counters
under `/sys/class/powercap/intel-rapl:*` (AMD's zones are named intel-rapl too).

Zones used
----------
- `intel-rapl:N` whose `name` reads `package-N` (or `package-N-die-D` on multi-die parts):
  one CPU package (socket or die).
- `intel-rapl:N:M` whose `name` reads `dram`: the memory attached to that package. DRAM is
  outside the package, so package + dram does not double count.

Zones ignored, on purpose
-------------------------
- `core` (PP0) and `uncore` (PP1, the integrated GPU): contained in their package; adding
  them would count the same joules twice.
- `psys` (the platform domain of some client machines): it covers the packages *and* the
  rest of the SoC/platform, so it overlaps them, and it is missing on most servers. Using it
  instead of the packages would change what this source measures (a "system" rather than a
  "cpu" figure), so it is left out.
- Any other name, and `intel-rapl-mmio:*` (a second interface to the same package counter).

Each zone's `energy_uj` is a counter in microjoules and `max_energy_range_uj` its range.

Wraparound
----------
In the kernel (drivers/powercap/intel_rapl_common.c, get_max_energy_counter),
`max_energy_range_uj = rapl_unit_xlate(rd, ENERGY_UNIT, ENERGY_STATUS_MASK, 0)` with
`ENERGY_STATUS_MASK = 0xffffffff`: it is the energy of the largest value of the 32-bit raw
counter, and `energy_uj` is the raw counter times the energy unit. So the counter climbs to
max_energy_range_uj and then restarts near 0. When a read is below the previous one, the
delta is

    delta_uj = (max_energy_range_uj - prev_uj) + new_uj

which is what CodeCarbon does (codecarbon/core/rapl.py, RAPLFile.delta: it adds
max_energy_reading to a reading below the last one). Strictly, the modulus is
max_energy_range_uj plus one energy unit (2^-ESU J: 61 uJ for ESU 14 on Intel packages,
15.3 uJ for ESU 16 on AMD and on server DRAM), which sysfs does not expose. So each wrap
undercounts by at most one unit, under 1e-9 of the ~65-262 kJ range. A "+1 uJ" would only
be exact for a 1 uJ unit, which no hardware uses, so it is not added. A whole wrap between
two reads cannot be seen; at the sampler's 20 Hz that needs megawatts.

A reading can also drop because the counter was reset (e.g. across a suspend that
powered the package down). Then the "wrap" delta is most of the range in a moment: if a
drop implies more than `max_zone_power_w` (default 5 kW, far above any package or DRAM
zone) over the time since the previous read (at least 1 s), it is taken as a reset and
only `new_uj` is counted.

Permissions
-----------
Since the fix for CVE-2020-8694 (Linux 5.10, backported to stable kernels), `energy_uj` is
readable by root only. Containers often have no /sys/class/powercap at all. Either way the
constructor raises SourceUnavailable with the reason, so `auto` falls back to
`cpu-estimate`. A read that fails later raises SourceError and changes nothing, so the
next good read covers the whole gap and no energy is lost.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from metering.sources.base import Domain, PowerSource, Reading, SourceError, SourceUnavailable
from metering.sources.hardware import cpu_model

DEFAULT_POWERCAP_ROOT = "/sys/class/powercap"
# Far above any CPU package or DRAM zone; a drop implying more is a counter reset.
DEFAULT_MAX_ZONE_POWER_W = 5000.0
# RAPL counters update about every millisecond: power over a shorter span is mostly
# quantisation noise, so power_w is refreshed only once this much time has passed.
DEFAULT_MIN_POWER_WINDOW_S = 0.02

# Counters are at most 20 decimal digits; 64 bytes holds one with its newline.
_SYSFS_READ_BYTES = 64
_UJ_PER_J = 1_000_000
_PACKAGE_ZONE_RE = re.compile(r"intel-rapl:(\d+)")
_SUB_ZONE_RE = re.compile(r"intel-rapl:(\d+):(\d+)")
_PACKAGE_NAME_RE = re.compile(r"package-\d+(?:-die-\d+)?")
_IGNORED_WHY = {
    "core": "contained in its package",
    "uncore": "contained in its package",
    "psys": "platform domain, overlaps the packages",
}

ZoneKind = Literal["package", "dram"]
SysfsReader = Callable[[str], bytes]


def read_sysfs_file(path: str) -> bytes:
    """The first bytes of a small sysfs file, with one open and one read. Raises OSError."""
    # os.open/os.read skip Python's buffered-file layers: this runs on the event loop.
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, _SYSFS_READ_BYTES)
    finally:
        os.close(fd)


def parse_counter_uj(data: bytes) -> int:
    """A non-negative integer counter (microjoules) from sysfs text. Raises ValueError."""
    text = data.strip()
    if not text.isdigit():
        raise ValueError(f"expected a non-negative integer, got {data[:32]!r}")
    return int(text)


def counter_delta_uj(prev_uj: int, new_uj: int, max_energy_range_uj: int) -> int:
    """Microjoules between two reads of a counter that wraps after max_energy_range_uj.

    A read below the previous one is one wrap: (max - prev) + new (see the module
    docstring for the kernel's semantics). Never negative.
    """
    if new_uj >= prev_uj:
        return new_uj - prev_uj
    return max(0, max_energy_range_uj - prev_uj) + new_uj


@dataclass(frozen=True, slots=True)
class RaplZone:
    """One powercap zone this source sums.

    zone_id: the directory name, e.g. "intel-rapl:0" or "intel-rapl:0:2".
    name:    the zone's `name` file, e.g. "package-0" or "dram".
    label:   unique and readable: the package name, or "<package name>/dram".
    max_energy_range_uj: the counter's range in microjoules (it wraps after this).
    """

    zone_id: str
    name: str
    kind: ZoneKind
    label: str
    energy_path: str
    max_energy_range_uj: int


@dataclass(frozen=True, slots=True)
class RaplDiscovery:
    """What discover_rapl_zones found.

    zones:       the zones to sum, packages and dram, in zone-id order.
    baseline_uj: each zone's energy_uj at discovery, aligned with zones.
    ignored:     (zone_id, why) for zones left out on purpose (core, uncore, psys, ...).
    skipped:     (zone_id, why) for dram zones that could not be read (not counted).
    """

    zones: tuple[RaplZone, ...]
    baseline_uj: tuple[int, ...]
    ignored: tuple[tuple[str, str], ...]
    skipped: tuple[tuple[str, str], ...]


def _zone_key(zone_id: str) -> tuple[int, int]:
    parts = zone_id.split(":")
    return int(parts[1]), int(parts[2]) if len(parts) > 2 else -1


def _find_zone_dirs(root: str) -> dict[str, str]:
    """zone_id -> directory, from root's entries and (for trees that only nest subzones)
    each package directory's children."""
    try:
        entries = os.listdir(root)
    except FileNotFoundError as exc:
        raise SourceUnavailable(
            f"rapl: no powercap tree at {root!r} (not Linux, RAPL driver not loaded, "
            f"or /sys not visible in this container)"
        ) from exc
    except OSError as exc:
        raise SourceUnavailable(f"rapl: cannot list {root!r}: {exc}") from exc
    dirs: dict[str, str] = {}
    tops: list[str] = []
    for entry in entries:
        path = os.path.join(root, entry)
        if _PACKAGE_ZONE_RE.fullmatch(entry) and os.path.isdir(path):
            dirs[entry] = path
            tops.append(entry)
        elif _SUB_ZONE_RE.fullmatch(entry) and os.path.isdir(path):
            dirs[entry] = path
    for top in tops:
        try:
            children = os.listdir(dirs[top])
        except OSError:
            continue  # the root-level entries are the usual way in anyway
        for child in children:
            path = os.path.join(dirs[top], child)
            if (
                child not in dirs
                and _SUB_ZONE_RE.fullmatch(child)
                and child.startswith(top + ":")
                and os.path.isdir(path)
            ):
                dirs[child] = path
    return dirs


def _unreadable_reason(path: str, exc: Exception) -> str:
    if isinstance(exc, PermissionError):
        return (
            f"permission denied reading {path!r}: since the CVE-2020-8694 fix (Linux 5.10) "
            f"energy_uj is readable by root only; run as root or grant read access to the "
            f"intel-rapl energy_uj files (e.g. a udev rule or sysfsutils)"
        )
    return f"cannot read {path!r}: {exc}"


def discover_rapl_zones(
    root: str = DEFAULT_POWERCAP_ROOT, reader: SysfsReader = read_sysfs_file
) -> RaplDiscovery:
    """Find the package and dram zones under root and read each once.

    Raises SourceUnavailable when there is no tree, no package zone, a zone whose name
    cannot be read, or a package zone whose energy_uj or max_energy_range_uj cannot be
    read (usually a permission problem). A dram zone that cannot be read is skipped and
    listed in `skipped` (some setups grant access to the package counters only).
    """
    dirs = _find_zone_dirs(root)
    if not dirs:
        raise SourceUnavailable(
            f"rapl: no intel-rapl zones under {root!r} (no RAPL driver, or a VM without RAPL)"
        )
    names: dict[str, str] = {}
    for zone_id in sorted(dirs, key=_zone_key):
        name_path = os.path.join(dirs[zone_id], "name")
        try:
            names[zone_id] = reader(name_path).decode("ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SourceUnavailable(f"rapl: {_unreadable_reason(name_path, exc)}") from exc

    zones: list[RaplZone] = []
    baseline_uj: list[int] = []
    ignored: list[tuple[str, str]] = []
    skipped: list[tuple[str, str]] = []
    for zone_id, name in names.items():
        is_top = _PACKAGE_ZONE_RE.fullmatch(zone_id) is not None
        kind: ZoneKind
        if is_top and _PACKAGE_NAME_RE.fullmatch(name):
            kind, label = "package", name
        elif name == "dram":
            kind = "dram"
            parent = names.get(zone_id.rsplit(":", 1)[0]) if not is_top else None
            label = f"{parent}/dram" if parent is not None else zone_id
        else:
            ignored.append((zone_id, f"{name}: {_IGNORED_WHY.get(name, 'not package or dram')}"))
            continue
        energy_path = os.path.join(dirs[zone_id], "energy_uj")
        max_path = os.path.join(dirs[zone_id], "max_energy_range_uj")
        try:
            max_energy_range_uj = parse_counter_uj(reader(max_path))
            if max_energy_range_uj <= 0:
                raise ValueError("max_energy_range_uj is 0")
        except (OSError, ValueError) as exc:
            reason = _unreadable_reason(max_path, exc)
            if kind == "dram":
                skipped.append((zone_id, reason))
                continue
            raise SourceUnavailable(f"rapl: {zone_id} ({name}): {reason}") from exc
        try:
            energy_uj = parse_counter_uj(reader(energy_path))
        except (OSError, ValueError) as exc:
            reason = _unreadable_reason(energy_path, exc)
            if kind == "dram":
                skipped.append((zone_id, reason))
                continue
            raise SourceUnavailable(f"rapl: {zone_id} ({name}): {reason}") from exc
        zones.append(RaplZone(zone_id, name, kind, label, energy_path, max_energy_range_uj))
        baseline_uj.append(energy_uj)

    if not any(zone.kind == "package" for zone in zones):
        found = ", ".join(f"{zone_id} ({name})" for zone_id, name in names.items())
        raise SourceUnavailable(f"rapl: no package zone under {root!r}; found {found}")
    return RaplDiscovery(tuple(zones), tuple(baseline_uj), tuple(ignored), tuple(skipped))


class RaplSource:
    """CPU package + DRAM energy of all sockets, from the powercap RAPL counters.

    energy_j counts from construction (the counters are read once then, at start_s) and
    survives wraps: each zone keeps an exact integer total in microjoules. power_w is the
    energy over the time since the last power update, refreshed once at least
    min_power_window_s has passed (0 until then). A failed read raises SourceError and
    changes nothing.
    """

    name: str = "rapl"
    method: str = "rapl"
    domain: Domain = "cpu"
    # Sysfs and /proc reads are usually microseconds but can stall: the sampler reads this
    # source on a thread of its own (metering/sources/background.py).
    blocking: bool = True
    hardware: str = ""  # the CPU's model name, set when opened

    def __init__(
        self,
        start_s: float,
        root: str = DEFAULT_POWERCAP_ROOT,
        *,
        reader: SysfsReader = read_sysfs_file,
        max_zone_power_w: float = DEFAULT_MAX_ZONE_POWER_W,
        min_power_window_s: float = DEFAULT_MIN_POWER_WINDOW_S,
    ) -> None:
        """start_s: clock time (s) of construction; energy counts from here.

        root: the powercap class directory. reader: reads a sysfs file (tests inject one).
        max_zone_power_w: a drop implying more than this per zone is a counter reset, not a
        wrap (math.inf: always a wrap). min_power_window_s: shortest span power_w is
        computed over (0: from every two reads).
        Raises SourceUnavailable (see discover_rapl_zones), ValueError for bad numbers.
        """
        if math.isnan(max_zone_power_w) or max_zone_power_w <= 0.0:
            raise ValueError(f"max_zone_power_w must be > 0 watts, got {max_zone_power_w!r}")
        if not math.isfinite(min_power_window_s) or min_power_window_s < 0.0:
            raise ValueError(
                f"min_power_window_s must be a finite number >= 0, got {min_power_window_s!r}"
            )
        self.root = root
        self.start_s = float(start_s)
        self.hardware = cpu_model()
        self.max_zone_power_w = float(max_zone_power_w)
        self.min_power_window_s = float(min_power_window_s)
        self._reader = reader
        found = discover_rapl_zones(root, reader)
        self.zones: tuple[RaplZone, ...] = found.zones
        self.ignored_zones: tuple[tuple[str, str], ...] = found.ignored
        self.skipped_zones: tuple[tuple[str, str], ...] = found.skipped
        self._prev_uj = list(found.baseline_uj)
        self._total_uj = [0] * len(self.zones)
        # Per zone: wraps handled, and drops taken as counter resets.
        self.wraps = [0] * len(self.zones)
        self.resets = [0] * len(self.zones)
        self._last_t_s = self.start_s
        # Power is measured from this (time, total microjoules) to the latest read.
        self._power_anchor: tuple[float, int] = (self.start_s, 0)
        self._power_w = 0.0

    @property
    def total_energy_uj(self) -> int:
        """Microjoules since construction, all zones summed (exact)."""
        return sum(self._total_uj)

    @property
    def zone_energy_j(self) -> dict[str, float]:
        """Joules since construction per zone, keyed by zone label (e.g. "package-0/dram")."""
        return {
            zone.label: total_uj / _UJ_PER_J
            for zone, total_uj in zip(self.zones, self._total_uj, strict=True)
        }

    def _read_raw_uj(self) -> list[int]:
        raw_uj: list[int] = []
        for zone in self.zones:
            try:
                raw_uj.append(parse_counter_uj(self._reader(zone.energy_path)))
            except (OSError, ValueError) as exc:
                raise SourceError(
                    f"rapl: reading {zone.energy_path!r} ({zone.label}) failed: {exc}"
                ) from exc
        return raw_uj

    def read(self, now_s: float) -> Reading:
        """Joules since construction (package + dram, all sockets) and the latest power, W.

        Raises SourceError if any zone cannot be read; then no zone's state changes.
        """
        raw_uj = self._read_raw_uj()  # all zones first: a failure must commit nothing
        # A drop bigger than this is a reset, not a wrap (at least 1 s of headroom).
        reset_above_uj = self.max_zone_power_w * max(now_s - self._last_t_s, 1.0) * _UJ_PER_J
        for i, zone in enumerate(self.zones):
            prev_uj, new_uj = self._prev_uj[i], raw_uj[i]
            delta_uj = counter_delta_uj(prev_uj, new_uj, zone.max_energy_range_uj)
            if new_uj < prev_uj:
                if delta_uj > reset_above_uj:
                    delta_uj = new_uj
                    self.resets[i] += 1
                else:
                    self.wraps[i] += 1
            self._total_uj[i] += delta_uj
            self._prev_uj[i] = new_uj
        self._last_t_s = now_s
        total_uj = sum(self._total_uj)
        anchor_t_s, anchor_uj = self._power_anchor
        elapsed_s = now_s - anchor_t_s
        if elapsed_s > 0.0 and elapsed_s >= self.min_power_window_s:
            self._power_w = (total_uj - anchor_uj) / _UJ_PER_J / elapsed_s
            self._power_anchor = (now_s, total_uj)
        return Reading(energy_j=total_uj / _UJ_PER_J, power_w=self._power_w, t_s=now_s)

    def close(self) -> None:
        """Nothing to release (each file is opened and closed on every read)."""

    def __repr__(self) -> str:
        labels = [zone.label for zone in self.zones]
        return f"RaplSource(root={self.root!r}, zones={labels!r})"


def rapl_factory(
    argument: str, start_s: float, root: str = DEFAULT_POWERCAP_ROOT
) -> list[PowerSource]:
    """The `rapl` kind for parse_power_spec: one RaplSource over all sockets.

    argument must be "" (`rapl` takes none). For another root, pass
    `functools.partial(rapl_factory, root=...)`. Raises ValueError for an argument,
    SourceUnavailable when RAPL cannot be read here.
    """
    if argument.strip():
        raise ValueError(f"rapl takes no argument, got {argument.strip()!r}")
    return [RaplSource(start_s, root)]
