"""Estimate CPU power from utilisation: `cpu-estimate[:tdp=W]`.

This is a model, not a measurement, and is labelled `cpu-estimate` everywhere it appears.
Use it only where no sensor (RAPL, NVML) can be read.

Model
-----
Power is a fraction of the CPU package's TDP, as a function of utilisation u:

    P(u) = tdp_w * f(u)

where f is piecewise linear through these points (utilisation, fraction of TDP):

    (0 %, 0.12), (10 %, 0.32), (50 %, 0.75), (100 %, 1.02)

This curve was derived from SPECpower_ssj2008 results by Teads: Benjamin Davy, "Building
an AWS EC2 Carbon Emissions Dataset", Teads Engineering blog, September 2021,
https://medium.com/teads-engineering/building-an-aws-ec2-carbon-emissions-dataset-3f0fd76c98ac
The same four points are the CPU curve of the Green Software Foundation's Impact Framework
(its Teads-curve and interpolation plugins).

Utilisation comes from the aggregate `cpu` line of /proc/stat (all logical CPUs the
kernel shows, including work by other processes on the box): busy = total - idle -
iowait, with total = user + nice + system + idle + iowait + irq + softirq + steal
(guest time is already counted in user and nice). The model is applied per interval
between two reads: the interval's mean utilisation u = d_busy / d_total is known exactly
from the counter deltas, so its energy is P(u) * dt, with no sampling error. Because f is
concave, P of a mean utilisation is slightly above the mean of P over finer slices: the
sampler's steady tick (20 Hz by default) keeps intervals short.

Default TDP
-----------
Without `tdp=W`, the TDP is 3.5 W per logical CPU: Cloud Carbon Footprint's average
maximum watts per vCPU for AWS (MAX_WATTS_AVG = 3.5, computed from SPECpower_ssj2008
results; see https://www.cloudcarbonfootprint.org/docs/methodology and the
cloud-carbon-footprint/ccf-coefficients repository). It is a rough default for a cloud
vCPU; on your own hardware pass the package TDP from the CPU's data sheet (the sum over
sockets), e.g. `cpu-estimate:tdp=65`.
"""

from __future__ import annotations

import math
import os
from bisect import bisect_right

from metering.sources.base import Domain, Reading, SourceError, SourceUnavailable
from metering.sources.hardware import cpu_model

# (utilisation as a fraction, power as a fraction of TDP): the Teads curve, see above.
TEADS_CURVE: tuple[tuple[float, float], ...] = (
    (0.0, 0.12),
    (0.10, 0.32),
    (0.50, 0.75),
    (1.00, 1.02),
)
# Cloud Carbon Footprint's average max watts per vCPU (AWS), see the module docstring.
DEFAULT_WATTS_PER_LOGICAL_CPU = 3.5

_CURVE_U = tuple(u for u, _ in TEADS_CURVE)
_CURVE_FRACTION = tuple(fraction for _, fraction in TEADS_CURVE)
# The aggregate line is first and short; 1 KiB holds it even with 10-digit counters.
_PROC_STAT_READ_BYTES = 1024


def power_fraction_of_tdp(utilisation: float) -> float:
    """The fraction of TDP drawn at `utilisation` (0..1, clamped), per the Teads curve.

    Raises ValueError for NaN.
    """
    if math.isnan(utilisation):
        raise ValueError("utilisation must be a number in [0, 1], got nan")
    u = min(max(utilisation, 0.0), 1.0)
    i = min(bisect_right(_CURVE_U, u) - 1, len(_CURVE_U) - 2)
    u0, u1 = _CURVE_U[i], _CURVE_U[i + 1]
    f0, f1 = _CURVE_FRACTION[i], _CURVE_FRACTION[i + 1]
    return f0 + (f1 - f0) * (u - u0) / (u1 - u0)


def parse_proc_stat_cpu(data: bytes) -> tuple[int, int]:
    """(busy_jiffies, total_jiffies) from the aggregate `cpu` line at the start of /proc/stat.

    Raises ValueError if the text does not start with a well-formed `cpu` line.
    """
    first_line = data.split(b"\n", 1)[0]
    fields = first_line.split()
    if len(fields) < 5 or fields[0] != b"cpu":
        raise ValueError(f"no aggregate 'cpu' line with at least 4 counters: {first_line!r}")
    # user nice system idle [iowait irq softirq steal [guest guest_nice]]; old kernels
    # have fewer, and guest time is already inside user and nice, so stop at steal.
    counters = [int(field) for field in fields[1:9]]
    total = sum(counters)
    idle = counters[3] + (counters[4] if len(counters) > 4 else 0)
    return total - idle, total


def read_proc_stat_cpu(path: str) -> tuple[int, int]:
    """(busy_jiffies, total_jiffies) from the file at `path`, read with one open and read.

    Raises OSError or ValueError.
    """
    # os.open/os.read skip Python's buffered-file layers: this runs on the event loop.
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.read(fd, _PROC_STAT_READ_BYTES)
    finally:
        os.close(fd)
    return parse_proc_stat_cpu(data)


class CpuEstimateSource:
    """CPU power estimated from /proc/stat utilisation and a TDP (see the module docstring).

    The first read is the baseline: energy 0. Each later read adds P(u) * dt for the
    interval since the previous successful read, u being that interval's utilisation.
    A failed read (SourceError) changes nothing, so the next good read covers the whole gap
    with its exact mean utilisation.
    """

    name: str = "cpu-estimate"
    method: str = "cpu-estimate"
    domain: Domain = "cpu"
    # Sysfs and /proc reads are usually microseconds but can stall: the sampler reads this
    # source on a thread of its own (metering/sources/background.py).
    blocking: bool = True
    hardware: str = ""  # the CPU's model name, set when opened

    def __init__(
        self,
        tdp_w: float | None,
        start_s: float,
        proc_stat_path: str = "/proc/stat",
        cpu_count: int | None = None,
    ) -> None:
        """tdp_w: the CPU package TDP in watts (all sockets), or None for the default of
        DEFAULT_WATTS_PER_LOGICAL_CPU per logical CPU (cpu_count, else os.cpu_count()).

        start_s: clock time (s) the source was opened; energy counts from the first read.
        Raises ValueError for a bad tdp_w or cpu_count, SourceUnavailable if proc_stat_path
        cannot be read or parsed.
        """
        if cpu_count is not None and (isinstance(cpu_count, bool) or cpu_count < 1):
            raise ValueError(f"cpu_count must be an integer >= 1, got {cpu_count!r}")
        if tdp_w is None:
            logical_cpus = cpu_count or os.cpu_count() or 1
            tdp_w = DEFAULT_WATTS_PER_LOGICAL_CPU * logical_cpus
            self.tdp_is_default = True
        else:
            tdp_w = float(tdp_w)
            if not math.isfinite(tdp_w) or tdp_w <= 0.0:
                raise ValueError(
                    f"cpu-estimate tdp must be a finite number of watts > 0, got {tdp_w!r}"
                )
            self.tdp_is_default = False
        self.tdp_w: float = tdp_w
        self.start_s = float(start_s)
        self.proc_stat_path = proc_stat_path
        self.hardware = cpu_model()
        try:
            read_proc_stat_cpu(proc_stat_path)
        except (OSError, ValueError) as exc:
            raise SourceUnavailable(
                f"cpu-estimate cannot read CPU utilisation from {proc_stat_path!r}: {exc}"
            ) from exc
        self._energy_j = 0.0
        # The previous read's counters and time; None until the first (baseline) read.
        self._prev: tuple[int, int, float] | None = None
        # Utilisation of the latest interval; 0 before any interval is known.
        self.utilisation = 0.0

    def read(self, now_s: float) -> Reading:
        """Estimated joules since the first read, and the estimated power now (watts).

        Raises SourceError if /proc/stat cannot be read or parsed this time.
        """
        try:
            busy, total = read_proc_stat_cpu(self.proc_stat_path)
        except (OSError, ValueError) as exc:
            raise SourceError(
                f"cpu-estimate: reading {self.proc_stat_path!r} failed: {exc}"
            ) from exc
        prev = self._prev
        if prev is not None:
            prev_busy, prev_total, prev_t_s = prev
            d_total = total - prev_total
            # d_total <= 0: reads within one jiffy (or a counter reset); keep the last u.
            if d_total > 0:
                d_busy = busy - prev_busy
                # Clamped: iowait is known to go backwards on some kernels.
                self.utilisation = min(max(d_busy / d_total, 0.0), 1.0)
            dt_s = max(0.0, now_s - prev_t_s)
            self._energy_j += self.tdp_w * power_fraction_of_tdp(self.utilisation) * dt_s
        self._prev = (busy, total, now_s)
        power_w = self.tdp_w * power_fraction_of_tdp(self.utilisation)
        return Reading(energy_j=self._energy_j, power_w=power_w, t_s=now_s)

    def close(self) -> None:
        """Nothing to release (the file is opened and closed on every read)."""

    def __repr__(self) -> str:
        path = self.proc_stat_path
        return f"CpuEstimateSource(tdp_w={self.tdp_w!r}, proc_stat_path={path!r})"
