"""Tests for the RAPL power source, over fake powercap trees in a temporary directory."""

from __future__ import annotations

import functools
import math
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metering.sources.base import PowerSource, Reading, SourceError, SourceUnavailable
from metering.sources.rapl import (
    DEFAULT_MAX_ZONE_POWER_W,
    DEFAULT_MIN_POWER_WINDOW_S,
    DEFAULT_POWERCAP_ROOT,
    RaplSource,
    counter_delta_uj,
    discover_rapl_zones,
    parse_counter_uj,
    rapl_factory,
    read_sysfs_file,
)
from metering.sources.spec import parse_power_spec

# A real package range: 2^32 units of 61.035 uJ (ESU 14).
MAX_UJ = 262_143_328_850
# Server DRAM often uses 15.3 uJ units (ESU 16): a smaller range.
DRAM_MAX_UJ = 65_712_999_613

# zone_id -> (name, energy_uj, max_energy_range_uj): two sockets with dram, and the zones
# that must be ignored (core, uncore, psys).
TWO_SOCKETS: dict[str, tuple[str, int, int]] = {
    "intel-rapl:0": ("package-0", 1_000_000, MAX_UJ),
    "intel-rapl:0:0": ("core", 500_000, MAX_UJ),
    "intel-rapl:0:1": ("uncore", 100_000, MAX_UJ),
    "intel-rapl:0:2": ("dram", 2_000_000, DRAM_MAX_UJ),
    "intel-rapl:1": ("package-1", 3_000_000, MAX_UJ),
    "intel-rapl:1:0": ("core", 700_000, MAX_UJ),
    "intel-rapl:1:1": ("dram", 4_000_000, DRAM_MAX_UJ),
    "intel-rapl:2": ("psys", 9_000_000, MAX_UJ),
}


class FakePowercap:
    """A powercap tree laid out like the kernel's: zone directories nested under
    devices/virtual/powercap/intel-rapl, and a flat class/powercap of symlinks to every
    zone, the intel-rapl control type, and an intel-rapl-mmio zone that must be ignored."""

    def __init__(
        self, base: Path, zones: dict[str, tuple[str, int, int]], *, symlinks: bool = True
    ) -> None:
        self.root = base / "class" / "powercap"
        self.root.mkdir(parents=True)
        control = base / "devices" / "virtual" / "powercap" / "intel-rapl"
        control.mkdir(parents=True)
        (control / "enabled").write_text("1\n")
        self.dirs: dict[str, Path] = {}
        self.max_uj: dict[str, int] = {}
        for zone_id in sorted(zones, key=lambda z: z.count(":")):
            name, energy_uj, max_uj = zones[zone_id]
            parent = zone_id.rsplit(":", 1)[0]
            zone_dir = (self.dirs[parent] if zone_id.count(":") == 2 else control) / zone_id
            zone_dir.mkdir()
            (zone_dir / "name").write_text(name + "\n")
            (zone_dir / "max_energy_range_uj").write_text(f"{max_uj}\n")
            self.dirs[zone_id] = zone_dir
            self.max_uj[zone_id] = max_uj
            self.set(zone_id, energy_uj)
        if symlinks:
            (self.root / "intel-rapl").symlink_to(control)
            for zone_id, zone_dir in self.dirs.items():
                (self.root / zone_id).symlink_to(zone_dir)
        else:  # plain directories, subzones only nested inside their package
            for zone_id, zone_dir in self.dirs.items():
                if zone_id.count(":") == 1:
                    zone_dir.rename(self.root / zone_id)
                    self.dirs[zone_id] = self.root / zone_id
            for zone_id in self.dirs:
                if zone_id.count(":") == 2:
                    parent = zone_id.rsplit(":", 1)[0]
                    self.dirs[zone_id] = self.dirs[parent] / zone_id
        mmio = base / "devices" / "virtual" / "powercap" / "intel-rapl-mmio" / "intel-rapl-mmio:0"
        mmio.mkdir(parents=True)
        (mmio / "name").write_text("package-0\n")
        (mmio / "energy_uj").write_text("123\n")
        (mmio / "max_energy_range_uj").write_text(f"{MAX_UJ}\n")
        (self.root / "intel-rapl-mmio:0").symlink_to(mmio)

    def energy_path(self, zone_id: str) -> Path:
        return self.dirs[zone_id] / "energy_uj"

    def get(self, zone_id: str) -> int:
        return int(self.energy_path(zone_id).read_text())

    def set(self, zone_id: str, energy_uj: int) -> None:
        self.energy_path(zone_id).write_text(f"{energy_uj}\n")

    def add(self, zone_id: str, delta_uj: int) -> None:
        """Advance a counter by delta_uj (< its range), wrapping like the hardware."""
        self.set(zone_id, (self.get(zone_id) + delta_uj) % self.max_uj[zone_id])


@pytest.fixture
def tree(tmp_path: Path) -> FakePowercap:
    return FakePowercap(tmp_path, TWO_SOCKETS)


def open_source(
    tree: FakePowercap,
    start_s: float = 0.0,
    *,
    max_zone_power_w: float = DEFAULT_MAX_ZONE_POWER_W,
    min_power_window_s: float = DEFAULT_MIN_POWER_WINDOW_S,
) -> RaplSource:
    return RaplSource(
        start_s,
        str(tree.root),
        max_zone_power_w=max_zone_power_w,
        min_power_window_s=min_power_window_s,
    )


class FlakyReader:
    """A sysfs reader that raises `error` for the files in `failing` (given as
    "ZONE_ID/FILE", e.g. "intel-rapl:0/energy_uj"), else reads the file."""

    def __init__(self, error: OSError) -> None:
        self.error = error
        self.failing: set[str] = set()

    def __call__(self, path: str) -> bytes:
        zone_file = os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))
        if zone_file in self.failing:
            raise self.error
        return read_sysfs_file(path)


# --------------------------------------------------------------------------- discovery


def test_discovers_package_and_dram_of_both_sockets(tree: FakePowercap) -> None:
    source = open_source(tree)
    assert [z.zone_id for z in source.zones] == [
        "intel-rapl:0",
        "intel-rapl:0:2",
        "intel-rapl:1",
        "intel-rapl:1:1",
    ]
    assert [z.label for z in source.zones] == [
        "package-0",
        "package-0/dram",
        "package-1",
        "package-1/dram",
    ]
    assert [z.kind for z in source.zones] == ["package", "dram", "package", "dram"]
    assert [z.max_energy_range_uj for z in source.zones] == [
        MAX_UJ,
        DRAM_MAX_UJ,
        MAX_UJ,
        DRAM_MAX_UJ,
    ]
    ignored = dict(source.ignored_zones)
    assert set(ignored) == {"intel-rapl:0:0", "intel-rapl:0:1", "intel-rapl:1:0", "intel-rapl:2"}
    assert ignored["intel-rapl:2"].startswith("psys")
    assert source.skipped_zones == ()
    assert (source.name, source.method, source.domain) == ("rapl", "rapl", "cpu")
    assert "package-1/dram" in repr(source)


def test_subzones_found_inside_their_package_without_top_level_links(tmp_path: Path) -> None:
    tree = FakePowercap(tmp_path, TWO_SOCKETS, symlinks=False)
    found = discover_rapl_zones(str(tree.root))
    assert [z.label for z in found.zones] == [
        "package-0",
        "package-0/dram",
        "package-1",
        "package-1/dram",
    ]
    assert found.baseline_uj == (1_000_000, 2_000_000, 3_000_000, 4_000_000)


def test_multi_die_packages_are_packages(tmp_path: Path) -> None:
    tree = FakePowercap(
        tmp_path,
        {
            "intel-rapl:0": ("package-0-die-0", 10, MAX_UJ),
            "intel-rapl:1": ("package-0-die-1", 20, MAX_UJ),
        },
    )
    assert [z.label for z in open_source(tree).zones] == ["package-0-die-0", "package-0-die-1"]


def test_sums_package_and_dram_only(tree: FakePowercap) -> None:
    source = open_source(tree, start_s=100.0)
    assert source.read(100.0) == Reading(energy_j=0.0, power_w=0.0, t_s=100.0)
    tree.add("intel-rapl:0", 10_000_000)  # package-0: 10 J
    tree.add("intel-rapl:0:2", 2_000_000)  # dram-0: 2 J
    tree.add("intel-rapl:1", 7_000_000)  # package-1: 7 J
    tree.add("intel-rapl:1:1", 1_000_000)  # dram-1: 1 J
    for ignored in ("intel-rapl:0:0", "intel-rapl:0:1", "intel-rapl:1:0", "intel-rapl:2"):
        tree.add(ignored, 50_000_000)  # core/uncore/psys: contained or overlapping
    reading = source.read(102.0)
    assert reading.energy_j == 20.0
    assert reading.power_w == 10.0
    assert source.total_energy_uj == 20_000_000
    assert source.zone_energy_j == {
        "package-0": 10.0,
        "package-0/dram": 2.0,
        "package-1": 7.0,
        "package-1/dram": 1.0,
    }


# --------------------------------------------------------------------------- power


def test_power_from_the_last_two_reads(tree: FakePowercap) -> None:
    source = open_source(tree, start_s=0.0, min_power_window_s=0.0)
    assert source.read(0.0).power_w == 0.0  # nothing measured yet
    tree.add("intel-rapl:0", 5_000_000)
    assert source.read(0.5).power_w == 10.0
    tree.add("intel-rapl:1", 1_000_000)
    reading = source.read(0.6)
    assert math.isclose(reading.power_w, 10.0)  # 1 J over 0.1 s
    assert reading.energy_j == 6.0
    assert source.read(0.6).power_w == reading.power_w  # no time passed: keep the last


def test_power_over_a_minimum_window(tree: FakePowercap) -> None:
    source = open_source(tree, start_s=10.0)  # default window 0.02 s
    tree.add("intel-rapl:0", 1_000_000)
    first = source.read(10.01)  # 10 ms after start: too short to tell power
    assert (first.energy_j, first.power_w) == (1.0, 0.0)
    tree.add("intel-rapl:0", 1_000_000)
    assert math.isclose(source.read(10.05).power_w, 2.0 / 0.05)  # since start_s
    tree.add("intel-rapl:0", 100)  # a read 1 ms later keeps the last power...
    assert math.isclose(source.read(10.051).power_w, 40.0)
    tree.add("intel-rapl:0", 999_900)  # ...and the next window includes its joules
    assert math.isclose(source.read(10.1).power_w, 1.0 / 0.05)


# --------------------------------------------------------------------------- wraparound


@pytest.mark.parametrize(
    ("prev_uj", "new_uj", "expected_uj"),
    [
        (100, 250, 150),
        (100, 100, 0),
        (MAX_UJ - 1000, 500, 1500),  # wrapped
        (MAX_UJ - 1000, MAX_UJ, 1000),  # up to exactly the max: no wrap yet
        (MAX_UJ, 0, 0),  # the max and 0 are the same point of the counter
        (MAX_UJ, 7, 7),
        (0, MAX_UJ, MAX_UJ),
        (MAX_UJ + 5, 3, 3),  # a value above the range never makes a negative delta
    ],
)
def test_counter_delta(prev_uj: int, new_uj: int, expected_uj: int) -> None:
    assert counter_delta_uj(prev_uj, new_uj, MAX_UJ) == expected_uj


def test_wraparound_keeps_cumulative_energy(tree: FakePowercap) -> None:
    tree.set("intel-rapl:0", MAX_UJ - 1_000_000)
    source = open_source(tree, start_s=0.0)
    tree.set("intel-rapl:0", 2_000_000)  # 1 J to the max, then 2 J
    assert source.read(1.0).energy_j == 3.0
    tree.add("intel-rapl:0", 4_000_000)
    assert source.read(2.0).energy_j == 7.0
    assert source.wraps == [1, 0, 0, 0]
    assert source.resets == [0, 0, 0, 0]


def test_wraps_of_different_zones(tree: FakePowercap) -> None:
    tree.set("intel-rapl:0", MAX_UJ - 3_000_000)
    tree.set("intel-rapl:1:1", DRAM_MAX_UJ - 1_000_000)
    source = open_source(tree, start_s=0.0)
    # Read 1: only package-0 wraps (+5 J); dram-1 climbs to 0.5 J below its max.
    tree.add("intel-rapl:0", 5_000_000)
    tree.add("intel-rapl:1:1", 500_000)
    assert source.read(1.0).energy_j == 5.5
    # Read 2: dram-1 wraps (+2 J), with its own (smaller) range; package-1 +1 J.
    tree.add("intel-rapl:1:1", 2_000_000)
    tree.add("intel-rapl:1", 1_000_000)
    assert source.read(2.0).energy_j == 8.5
    # Read 3: both sockets' packages and dram-0 wrap in the same read.
    for zone_id in ("intel-rapl:0", "intel-rapl:1", "intel-rapl:0:2"):
        tree.set(zone_id, tree.max_uj[zone_id] - 250_000)
    source_reading = source.read(3.0)  # the jumps up to near the max are counted too
    before_uj = source.total_energy_uj
    for zone_id in ("intel-rapl:0", "intel-rapl:1", "intel-rapl:0:2"):
        tree.add(zone_id, 1_000_000)
    assert source.read(4.0).energy_j == (before_uj + 3_000_000) / 1e6
    assert source_reading.energy_j == before_uj / 1e6
    assert source.wraps == [2, 1, 1, 1]
    assert source.zone_energy_j["package-1/dram"] == 2.5


def test_wrap_exactly_at_the_max(tree: FakePowercap) -> None:
    tree.set("intel-rapl:0", MAX_UJ - 2_000_000)
    source = open_source(tree, start_s=0.0)
    tree.set("intel-rapl:0", MAX_UJ)  # reaches the max exactly: not a wrap
    assert source.read(1.0).energy_j == 2.0
    tree.set("intel-rapl:0", 0)  # the counter restarts: the max and 0 are the same point
    assert source.read(2.0).energy_j == 2.0
    tree.set("intel-rapl:0", 3_000_000)
    assert source.read(3.0).energy_j == 5.0
    tree.set("intel-rapl:0", MAX_UJ)  # straight to the max again...
    assert source.read(4.0).energy_j == (5_000_000 + MAX_UJ - 3_000_000) / 1e6
    tree.set("intel-rapl:0", 1_000_000)  # ...and over it
    assert source.read(5.0).energy_j == (6_000_000 + MAX_UJ - 3_000_000) / 1e6
    assert source.wraps[0] == 2


def test_a_counter_reset_is_not_a_wrap(tree: FakePowercap) -> None:
    tree.set("intel-rapl:0", MAX_UJ // 2)
    source = open_source(tree, start_s=0.0)
    tree.set("intel-rapl:0", 4_000_000)  # dropped by half the range within 50 ms
    assert source.read(0.05).energy_j == 4.0  # a reset: only the new count is energy
    assert (source.resets[0], source.wraps[0]) == (1, 0)
    # With the guard off, the same drop is taken as a wrap.
    tree.set("intel-rapl:1", MAX_UJ // 2)
    unguarded = open_source(tree, start_s=0.0, max_zone_power_w=math.inf)
    tree.set("intel-rapl:1", 4_000_000)
    assert unguarded.read(0.05).energy_j == (MAX_UJ - MAX_UJ // 2 + 4_000_000) / 1e6
    assert (unguarded.resets[2], unguarded.wraps[2]) == (0, 1)


def test_a_plausible_wrap_after_a_long_gap_is_a_wrap(tree: FakePowercap) -> None:
    tree.set("intel-rapl:0", MAX_UJ // 2)
    source = open_source(tree, start_s=0.0)
    tree.set("intel-rapl:0", 4_000_000)  # ~131 kJ in an hour: 36 W, a wrap
    assert source.read(3600.0).energy_j == (MAX_UJ - MAX_UJ // 2 + 4_000_000) / 1e6
    assert source.wraps[0] == 1


@settings(deadline=None, max_examples=60)
@given(
    ranges_uj=st.lists(st.integers(2, 2**40), min_size=4, max_size=4),
    data=st.data(),
)
def test_cumulative_energy_is_the_sum_of_increments(
    ranges_uj: list[int], data: st.DataObject
) -> None:
    zone_ids = ["intel-rapl:0", "intel-rapl:0:2", "intel-rapl:1", "intel-rapl:1:1"]
    names = ["package-0", "dram", "package-1", "dram"]
    starts = [data.draw(st.integers(0, max_uj - 1)) for max_uj in ranges_uj]
    steps = data.draw(
        st.lists(
            st.tuples(*(st.integers(0, max_uj - 1) for max_uj in ranges_uj)),
            min_size=1,
            max_size=12,
        )
    )
    with tempfile.TemporaryDirectory() as base:
        zones = {
            zone_id: (name, start_uj, max_uj)
            for zone_id, name, start_uj, max_uj in zip(
                zone_ids, names, starts, ranges_uj, strict=True
            )
        }
        tree = FakePowercap(Path(base), zones)
        source = open_source(tree, start_s=0.0)
        expected_uj = 0
        for step, increments in enumerate(steps, start=1):
            for zone_id, increment_uj in zip(zone_ids, increments, strict=True):
                tree.add(zone_id, increment_uj)
                expected_uj += increment_uj
            # 1000 s per step: even a whole range (2^40 uJ) is a plausible 1.1 kW.
            reading = source.read(1000.0 * step)
            assert source.total_energy_uj == expected_uj
            assert reading.energy_j == expected_uj / 1e6
        assert source.resets == [0, 0, 0, 0]


# --------------------------------------------------------------------------- unavailable


def test_missing_tree_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(SourceUnavailable, match="no powercap tree"):
        RaplSource(0.0, str(tmp_path / "absent"))


def test_tree_without_rapl_zones_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "dtpm").mkdir()
    with pytest.raises(SourceUnavailable, match="no intel-rapl zones"):
        RaplSource(0.0, str(tmp_path))


def test_root_that_is_a_file_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "powercap").write_text("")
    with pytest.raises(SourceUnavailable, match="rapl: cannot list"):
        RaplSource(0.0, str(tmp_path / "powercap"))


def test_zones_without_a_package_are_unavailable(tmp_path: Path) -> None:
    tree = FakePowercap(tmp_path, {"intel-rapl:0": ("psys", 5, MAX_UJ)})
    with pytest.raises(SourceUnavailable, match=r"no package zone.*intel-rapl:0 \(psys\)"):
        open_source(tree)


def test_permission_denied_is_unavailable_with_the_reason(tree: FakePowercap) -> None:
    # Injected, so this runs as root too (where chmod 000 does not deny reads).
    reader = FlakyReader(PermissionError(13, "Permission denied"))
    reader.failing.add("intel-rapl:0/energy_uj")
    with pytest.raises(SourceUnavailable) as info:
        RaplSource(0.0, str(tree.root), reader=reader)
    message = str(info.value)
    assert "intel-rapl:0 (package-0)" in message
    assert "permission denied" in message
    assert "CVE-2020-8694" in message


def test_directory_instead_of_energy_file_is_unavailable(tree: FakePowercap) -> None:
    path = tree.energy_path("intel-rapl:1")
    path.unlink()
    path.mkdir()  # unreadable for root too: read() on a directory fails with EISDIR
    with pytest.raises(SourceUnavailable, match=r"intel-rapl:1 \(package-1\): cannot read"):
        open_source(tree)


@pytest.mark.parametrize("content", ["0\n", "n/a\n", "-5\n", ""])
def test_bad_package_range_is_unavailable(tree: FakePowercap, content: str) -> None:
    (tree.dirs["intel-rapl:0"] / "max_energy_range_uj").write_text(content)
    with pytest.raises(SourceUnavailable, match="max_energy_range_uj"):
        open_source(tree)


def test_unreadable_name_is_unavailable(tree: FakePowercap) -> None:
    (tree.dirs["intel-rapl:1:0"] / "name").unlink()
    with pytest.raises(SourceUnavailable, match=r"intel-rapl:1:0/name"):
        open_source(tree)


def test_unreadable_dram_is_skipped_not_fatal(tree: FakePowercap) -> None:
    reader = FlakyReader(PermissionError(13, "Permission denied"))
    reader.failing.add("intel-rapl:1:1/energy_uj")
    source = RaplSource(0.0, str(tree.root), reader=reader)
    assert [z.label for z in source.zones] == ["package-0", "package-0/dram", "package-1"]
    ((zone_id, why),) = source.skipped_zones
    assert zone_id == "intel-rapl:1:1"
    assert "permission denied" in why
    tree.add("intel-rapl:1", 1_000_000)
    assert source.read(1.0).energy_j == 1.0


# --------------------------------------------------------------------------- read failures


def test_failed_read_raises_and_the_next_read_catches_up(tree: FakePowercap) -> None:
    tree.set("intel-rapl:1", MAX_UJ - 500_000)
    reader = FlakyReader(OSError(5, "Input/output error"))
    source = RaplSource(0.0, str(tree.root), reader=reader, min_power_window_s=0.0)
    tree.add("intel-rapl:0", 1_000_000)
    assert source.read(1.0).energy_j == 1.0
    reader.failing.add("intel-rapl:1:1/energy_uj")
    tree.add("intel-rapl:0", 2_000_000)  # drawn while the source is failing...
    tree.add("intel-rapl:1:1", 3_000_000)
    with pytest.raises(SourceError, match=r"package-1/dram.*Input/output error"):
        source.read(2.0)
    tree.add("intel-rapl:1", 1_500_000)  # ...including a wrap of package-1
    with pytest.raises(SourceError):
        source.read(3.0)
    assert source.total_energy_uj == 1_000_000  # the failed reads committed nothing
    reader.failing.clear()
    reading = source.read(4.0)
    assert source.total_energy_uj == 7_500_000
    assert reading.energy_j == 7.5
    assert math.isclose(reading.power_w, 6.5 / 3.0)
    assert source.wraps == [0, 0, 1, 0]


def test_read_failure_from_the_filesystem(tree: FakePowercap) -> None:
    source = open_source(tree)
    path = tree.energy_path("intel-rapl:0")
    path.unlink()  # the zone went away (e.g. CPU hot-unplug)
    with pytest.raises(SourceError, match=r"package-0"):
        source.read(1.0)
    path.write_text("garbage\n")
    with pytest.raises(SourceError, match="non-negative integer"):
        source.read(2.0)
    path.write_text(f"{1_000_000 + 42}\n")
    assert source.read(3.0).energy_j == 42 / 1e6


# --------------------------------------------------------------------------- helpers


def test_parse_counter() -> None:
    assert parse_counter_uj(b"262143328850\n") == 262_143_328_850
    for bad in (b"", b"\n", b"-1\n", b"1.5\n", b"abc"):
        with pytest.raises(ValueError):
            parse_counter_uj(bad)


def test_read_sysfs_file(tmp_path: Path) -> None:
    path = tmp_path / "energy_uj"
    path.write_text("123\n")
    assert read_sysfs_file(str(path)) == b"123\n"
    with pytest.raises(FileNotFoundError):
        read_sysfs_file(str(tmp_path / "absent"))


def test_bad_settings(tree: FakePowercap) -> None:
    for bad_w in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="max_zone_power_w"):
            open_source(tree, max_zone_power_w=bad_w)
    for bad_s in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="min_power_window_s"):
            open_source(tree, min_power_window_s=bad_s)


# --------------------------------------------------------------------------- factory, spec


def test_factory(tree: FakePowercap) -> None:
    (source,) = rapl_factory("", 5.0, root=str(tree.root))
    assert isinstance(source, RaplSource)
    assert source.start_s == 5.0
    with pytest.raises(ValueError, match="rapl takes no argument"):
        rapl_factory("0", 5.0, root=str(tree.root))
    with pytest.raises(SourceUnavailable):
        rapl_factory("", 5.0, root=str(tree.root / "absent"))
    assert DEFAULT_POWERCAP_ROOT == "/sys/class/powercap"


def test_parse_power_spec_end_to_end(tree: FakePowercap) -> None:
    factories = {"rapl": functools.partial(rapl_factory, root=str(tree.root))}
    sources: list[PowerSource] = parse_power_spec(
        "constant:5+RAPL", start_s=0.0, factories=factories
    )
    assert [(s.name, s.method, s.domain) for s in sources] == [
        ("constant", "constant", "system"),
        ("rapl", "rapl", "cpu"),
    ]
    rapl = sources[1]
    tree.add("intel-rapl:0", 3_000_000)
    tree.add("intel-rapl:1:1", 1_000_000)
    assert rapl.read(2.0) == Reading(energy_j=4.0, power_w=2.0, t_s=2.0)
    rapl.close()
    (auto,) = parse_power_spec("auto", start_s=0.0, factories=factories)
    assert isinstance(auto, RaplSource)
    with pytest.raises(ValueError, match=r"'rapl:1'.*rapl takes no argument"):
        parse_power_spec("rapl:1", start_s=0.0, factories=factories)


def test_parse_power_spec_without_rapl(tmp_path: Path) -> None:
    factories = {"rapl": functools.partial(rapl_factory, root=str(tmp_path / "absent"))}
    with pytest.raises(SourceUnavailable, match="no powercap tree"):
        parse_power_spec("rapl", start_s=0.0, factories=factories)
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 100 800 0 0 0 0 0 0\n")
    (fallback,) = parse_power_spec(
        "auto", start_s=0.0, proc_stat_path=str(stat), factories=factories
    )
    assert fallback.name == "cpu-estimate"
