"""NVIDIA GPUs through NVML: `nvml` / `nvml:IDS`, one source per GPU, named `nvml:<index>`.

NVML is reached only through the official binding, nvidia-ml-py (import name `pynvml`),
which loads `libnvidia-ml.so.1` at the first nvmlInit. Each source picks its method when
it opens, and keeps it:

nvml-counter (Volta and newer)
------------------------------
The GPU's total energy counter (nvmlDeviceGetTotalEnergyConsumption, mJ since the driver
loaded). energy_j is the counter's growth since the source opened, / 1000.

The counter only moves every 20-100 ms, and the background reader reads it far less often
(every 0.75 s at an H100's 3 ms a read), so between counter reads the source interpolates:
it keeps the last counter value, the clock time that value was first seen (t_seen), and the
integral of its power samples since then (trapezoids between consecutive samples). It
reports

    counter + integral of the power samples from t_seen to now   (at most `cap` seconds)

and, on a read where the counter has moved, max(previous report, new counter value + the
power sample x the value's expected age): the value holds the energy up to the counter's
last move, some instant of the update period before the read (or of the time since the
read before, if sooner), so half of that ago on average over where reads fall. Energy
never decreases, and since every move snaps back to the counter, the estimate never drifts
from it over time. The integral places each stretch of energy when the power was drawn
(carrying the latest sample back over the time since t_seen put a prefill's spike on
whoever prefilled when it was sampled: the fair split through an H100 was off by 0.16).

Where the GPU has no instant-power field, the power sample is nvmlDeviceGetPowerUsage,
which on Ampere and newer GPUs is the mean over the last second: integrated as it is, it
would put a prefill's energy up to a second late, on the requests decoding after it. Such
a sample is read for what it is, the energy of the last second: the estimate is

    E(now) = E(now - 1 s) + P_average * 1 s

with E(now - 1 s) from the source's own recent estimates (a trail of them, counter values
included), and the counter still the floor and the truth at every move.

A power sample is taken on at most one read per 50 ms (field
NVML_FI_DEV_POWER_INSTANT through nvmlDeviceGetFieldValues, checking the field's own
nvmlReturn; else nvmlDeviceGetPowerUsage), so a request boundary usually costs one NVML
call. Should the counter ever go backwards (a driver reload or GPU reset while the proxy
runs), the source rebases on the new value and adds nothing for the jump.

nvml-power (no energy counter)
------------------------------
Power is sampled at every read (field NVML_FI_DEV_POWER_INSTANT, checking each field
value's own return code; else nvmlDeviceGetPowerUsage, mW) and integrated with the
trapezoid rule between consecutive reads, starting from a sample taken at open.
nvmlDeviceGetPowerUsage is a 1-second average on some GPUs (Hopper), which is why the
counter is preferred wherever it exists.

The instant-power field is tried once at open; a GPU where it fails there (the call is
NOT_SUPPORTED, or the field value carries an error of its own) uses nvmlDeviceGetPowerUsage
from then on. A later read whose field value carries an error of its own falls back to
nvmlDeviceGetPowerUsage for that read.

Errors
------
Any NVML error on a read (GPU lost, NVML not answering, ...) raises SourceError and changes
nothing; the sampler marks the source degraded and keeps serving. The next good read goes
on as if the failed ones never happened: in counter mode it catches up from the counter (no
energy is lost); in power mode it integrates one trapezoid from the last good sample to the
new one. That trapezoid is the only estimate made for the gap: power during an outage is not
known, and nothing more is invented for it.

A GPU that cannot be opened (lost, or no power reading at all) makes the whole `nvml`
part SourceUnavailable, naming the GPU, rather than silently reporting fewer GPUs; name the
good ones with `nvml:IDS` to leave a broken one out.

Cost
----
NVML calls are synchronous. The instant power field and nvmlDeviceGetPowerUsage take
microseconds; the energy counter takes milliseconds (2.8-3.1 ms p50, up to 16 ms p99 on an
H100, burning the caller's CPU), and a hung driver blocks its caller for good. So this
source is `blocking`: the sampler reads it on a thread of its own
(metering/sources/background.py), the counter on a schedule (`read`), power samples in
between (`read_fast`), and the event loop never calls NVML.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from types import TracebackType
from typing import Any, Final

import pynvml

from metering.sources.base import Domain, PowerSource, Reading, SourceError, SourceUnavailable
from metering.sources.nvml_estimate import (
    between_counter_values,
    between_samples_j,
    interpolate,
)

# nvmlReturn_t values (nvml.h) this module tells apart.
NVML_SUCCESS: Final = 0
NVML_ERROR_INVALID_ARGUMENT: Final = 2
NVML_ERROR_NOT_SUPPORTED: Final = 3
NVML_ERROR_NO_PERMISSION: Final = 4
NVML_ERROR_DRIVER_NOT_LOADED: Final = 9
NVML_ERROR_LIBRARY_NOT_FOUND: Final = 12
NVML_ERROR_FUNCTION_NOT_FOUND: Final = 13
# Field id of the instantaneous power draw, mW (nvml.h, NVML_FI_DEV_POWER_INSTANT).
NVML_FI_DEV_POWER_INSTANT: Final = 186
NVML_POWER_SCOPE_GPU: Final = 0

# The longest time the energy counter goes without moving: the interpolation cap.
COUNTER_MAX_UPDATE_PERIOD_S: Final = 0.1
# In counter mode, power is sampled on at most one read per this many seconds.
POWER_SAMPLE_INTERVAL_S: Final = 0.05
# nvmlDeviceGetPowerUsage averages over the last second on Ampere (but GA100) and newer
# GPUs (NVML's documentation of the call): what such a reading means for the energy.
POWER_USAGE_AVERAGE_S: Final = 1.0
TRAIL_S: Final = 3.0  # how much of its own recent estimate the source keeps

_UNSUPPORTED: Final = frozenset({NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_FUNCTION_NOT_FOUND})
# nvmlValueType_t -> the member of nvmlValue_t holding the value.
_VALUE_MEMBERS: Final = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")

DeviceHandle = object  # an nvmlDevice_t, opaque outside NvmlSession


class NvmlError(RuntimeError):
    """An NVML call failed. `function`: the NVML function; `code`: its nvmlReturn_t."""

    def __init__(self, function: str, code: int, message: str) -> None:
        super().__init__(f"{function}: {message} (NVML error {code})")
        self.function = function
        self.code = code


def _init_failure_reason(exc: Any) -> str:
    code = int(exc.value)
    if code == NVML_ERROR_LIBRARY_NOT_FOUND:
        return "NVML library libnvidia-ml.so.1 not found (no NVIDIA driver installed?)"
    if code == NVML_ERROR_DRIVER_NOT_LOADED:
        return "the NVIDIA driver is not loaded (no NVIDIA GPU, or the driver is not running)"
    return f"nvmlInit failed: {exc} (NVML error {code})"


class NvmlSession:
    """nvmlInit/nvmlShutdown, shared by reference count, and typed wrappers of NVML calls.

    The first acquire() initialises NVML, the last release() shuts it down. Every
    pynvml call goes through here, so nothing else touches the untyped binding; failed
    calls raise NvmlError.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refs = 0

    @property
    def refs(self) -> int:
        """How many holders the session has (0: NVML not initialised by this session)."""
        return self._refs

    def acquire(self) -> None:
        """Take a reference, initialising NVML on the first. Raises SourceUnavailable."""
        with self._lock:
            if self._refs == 0:
                try:
                    pynvml.nvmlInit()
                except pynvml.NVMLError as exc:
                    raise SourceUnavailable(_init_failure_reason(exc)) from exc
            self._refs += 1

    def release(self) -> None:
        """Drop a reference, shutting NVML down with the last one."""
        with self._lock:
            if self._refs == 0:
                raise RuntimeError("NvmlSession released more often than acquired")
            self._refs -= 1
            if self._refs == 0:
                # Nothing useful to do if shutdown fails: the process keeps going either way.
                with contextlib.suppress(pynvml.NVMLError):
                    pynvml.nvmlShutdown()

    def __enter__(self) -> NvmlSession:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    @staticmethod
    def _call(function: str, *args: object) -> Any:
        try:
            return getattr(pynvml, function)(*args)
        except pynvml.NVMLError as exc:
            raise NvmlError(function, int(exc.value), str(exc)) from exc

    def device_count(self) -> int:
        return int(self._call("nvmlDeviceGetCount"))

    def device_handle(self, index: int) -> DeviceHandle:
        handle: DeviceHandle = self._call("nvmlDeviceGetHandleByIndex", index)
        return handle

    def device_name(self, handle: DeviceHandle) -> str:
        return str(self._call("nvmlDeviceGetName", handle))

    def device_uuid(self, handle: DeviceHandle) -> str:
        return str(self._call("nvmlDeviceGetUUID", handle))

    def total_energy_mj(self, handle: DeviceHandle) -> int:
        """The GPU's energy counter, millijoules since the driver loaded."""
        return int(self._call("nvmlDeviceGetTotalEnergyConsumption", handle))

    def power_usage_mw(self, handle: DeviceHandle) -> int:
        """nvmlDeviceGetPowerUsage: milliwatts (a 1 s average on some GPUs)."""
        return int(self._call("nvmlDeviceGetPowerUsage", handle))

    def instant_power_mw(self, handle: DeviceHandle) -> float | None:
        """Field NVML_FI_DEV_POWER_INSTANT in milliwatts, or None when the field value
        carries an error of its own (the call itself succeeded)."""
        # (field, scope) pairs: scope 0 is the GPU itself (NVML_POWER_SCOPE_GPU), and a
        # pair spares pynvml a TypeError it would otherwise raise and catch per field.
        values = self._call(
            "nvmlDeviceGetFieldValues", handle, [(NVML_FI_DEV_POWER_INSTANT, NVML_POWER_SCOPE_GPU)]
        )
        value = values[0]
        if int(value.nvmlReturn) != NVML_SUCCESS:
            return None
        value_type = int(value.valueType)
        if not 0 <= value_type < len(_VALUE_MEMBERS):
            return None
        return float(getattr(value.value, _VALUE_MEMBERS[value_type]))

    def power_limit_mw(self, handle: DeviceHandle) -> int:
        return int(self._call("nvmlDeviceGetPowerManagementLimit", handle))

    def default_power_limit_mw(self, handle: DeviceHandle) -> int:
        return int(self._call("nvmlDeviceGetPowerManagementDefaultLimit", handle))

    def power_limit_constraints_mw(self, handle: DeviceHandle) -> tuple[int, int]:
        """(min, max) power limit the GPU accepts, milliwatts."""
        low, high = self._call("nvmlDeviceGetPowerManagementLimitConstraints", handle)
        return int(low), int(high)

    def set_power_limit_mw(self, handle: DeviceHandle, limit_mw: int) -> None:
        self._call("nvmlDeviceSetPowerManagementLimit", handle, limit_mw)


class NvmlGpuSource:
    """One GPU read through NVML; see the module docstring for the two methods.

    energy_j counts from `start_s`, the clock time the source was opened; power_w is the
    latest power sample in watts.
    """

    domain: Domain = "gpu"
    # The counter read costs milliseconds (3-16 ms on an H100): the sampler reads this
    # source on a thread of its own (metering/sources/background.py).
    blocking: bool = True

    def __init__(self, session: NvmlSession, gpu_index: int, start_s: float) -> None:
        """Open GPU `gpu_index` (NVML's index) on `session`, taking a reference on it.

        Raises SourceUnavailable if NVML cannot be initialised or the GPU cannot be read.
        """
        self.gpu_index: int = gpu_index
        self.name: str = f"nvml:{gpu_index}"
        self.method: str = "nvml-counter"
        self.start_s = float(start_s)
        self.device_name = ""
        self.uuid = ""
        # How far past the last counter value seen an estimate may run (counter mode): one
        # update period when the counter is read at every read; the background reader
        # widens it to the gap between its counter reads.
        self.interpolation_cap_s = COUNTER_MAX_UPDATE_PERIOD_S
        # Where the power most likely stepped between the last sample and the next: a
        # request boundary (a prefill starts or ends there), set by the background reader
        # for the sample it takes just after one (None: no boundary known).
        self.step_at_s: float | None = None
        self._session = session
        session.acquire()
        self._closed = False
        try:
            self._open(float(start_s))
        except NvmlError as exc:
            self.close()
            raise SourceUnavailable(f"{self.name}: cannot read GPU {gpu_index}: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def _open(self, start_s: float) -> None:
        session = self._session
        self._handle = session.device_handle(self.gpu_index)
        self.device_name = session.device_name(self._handle)
        self.uuid = session.device_uuid(self._handle)
        try:
            counter_mj: int | None = session.total_energy_mj(self._handle)
        except NvmlError as exc:
            if exc.code not in _UNSUPPORTED:
                raise
            counter_mj = None
        self._use_instant_field = True
        try:
            instant_mw = session.instant_power_mw(self._handle)
        except NvmlError as exc:
            if exc.code not in _UNSUPPORTED:
                raise
            instant_mw = None
        if instant_mw is None:
            self._use_instant_field = False
            instant_mw = float(session.power_usage_mw(self._handle))
        # The window its power readings average over (0: instant samples): how finely it
        # places energy in time between counter moves (the band's resolution).
        self.power_window_s = 0.0 if self._use_instant_field else POWER_USAGE_AVERAGE_S
        # The latest power sample (W) and when it was taken.
        self._power_w = instant_mw / 1000.0
        self._power_t_s = start_s
        self._energy_j = 0.0
        # Counter mode: the counter's growth since open (mJ, exact), the last raw value and
        # the clock time that value was first seen.
        self._counter_total_mj = 0
        self._counter_mj = counter_mj if counter_mj is not None else 0
        self._counter_seen_s = start_s
        # Counter mode: the counter's update period (the background reader sets the one it
        # learnt) and when it was last read.
        self.counter_period_s = COUNTER_MAX_UPDATE_PERIOD_S
        self._counter_read_s = start_s
        self._lag_j = 0.0  # what was drawn between the value's writing and its read
        self._lag_s = 0.0  # how long before its read the value was taken to be written
        # Counter mode: the integral of the power samples since the counter last moved,
        # up to when, and the sample it ended on.
        self._since_counter_j = 0.0
        self._since_t_s = start_s
        self._since_power_w = self._power_w
        self._trail: deque[tuple[float, float]] = deque()  # (t, reported J)
        # One-second means: the energy's shape over time as the means tell it, without the
        # counter's snaps (t, J from an arbitrary origin), and the last mean's estimate.
        self._shape: deque[tuple[float, float]] = deque()
        self._shape_j = 0.0
        self._mean_estimate_j: float | None = None
        self._counter_points: deque[tuple[float, float]] = deque([(start_s, 0.0)])
        self.method = "nvml-counter" if counter_mj is not None else "nvml-power"

    @property
    def counter_mode(self) -> bool:
        return self.method == "nvml-counter"

    @property
    def hardware(self) -> str:
        """The GPU's model, as NVML names it ("NVIDIA H100 80GB HBM3")."""
        return self.device_name

    @property
    def counter_seen_s(self) -> float:
        """Clock time the current counter value was first seen (counter mode): it equals
        the `now_s` of the read at which the counter moved."""
        return self._counter_seen_s

    def _sample_power_w(self) -> float:
        if self._use_instant_field:
            instant_mw = self._session.instant_power_mw(self._handle)
            if instant_mw is not None:
                return instant_mw / 1000.0
        return self._session.power_usage_mw(self._handle) / 1000.0

    def read(self, now_s: float) -> Reading:
        """Joules since open and the latest power (W). Raises SourceError on any NVML error
        (or after close), leaving the state as it was."""
        if self._closed:
            raise SourceError(f"{self.name}: read after close")
        try:
            if self.method == "nvml-counter":
                counter_mj = self._session.total_energy_mj(self._handle)
                if now_s - self._power_t_s >= POWER_SAMPLE_INTERVAL_S:
                    self._power_w, self._power_t_s = self._sample_power_w(), now_s
                previous_s, self._counter_read_s = self._counter_read_s, now_s
                # A value that moved since the last read was written at some instant of
                # the last update period (or since that read, if sooner): half of it ago,
                # expected over the phases at which a read can fall.
                lag_s = max(0.0, min(self.counter_period_s, now_s - previous_s)) / 2.0
                self._advance_counter(counter_mj, now_s, lag_s)
            else:
                self._integrate_power(self._sample_power_w(), now_s)
        except NvmlError as exc:
            raise SourceError(f"{self.name}: {exc}") from exc
        return Reading(energy_j=self._energy_j, power_w=self._power_w, t_s=now_s)

    def read_fast(self, now_s: float) -> Reading:
        """A read without the counter (counter mode): one power sample (microseconds) and
        the estimate from the last counter value seen, at most `interpolation_cap_s` ahead
        of it. In power mode, the same as `read` (power is all there is to read)."""
        if self._closed:
            raise SourceError(f"{self.name}: read after close")
        if self.method != "nvml-counter":
            return self.read(now_s)
        try:
            self._power_w, self._power_t_s = self._sample_power_w(), now_s
        except NvmlError as exc:
            raise SourceError(f"{self.name}: {exc}") from exc
        self._advance_counter(self._counter_mj, now_s)
        return Reading(energy_j=self._energy_j, power_w=self._power_w, t_s=now_s)

    def _advance_counter(self, counter_mj: int, now_s: float, lag_s: float = 0.0) -> None:
        back_j = None if self._use_instant_field else self._trail_at(now_s)
        if back_j is not None:
            self._follow_shape(back_j + self._power_w * POWER_USAGE_AVERAGE_S, now_s)
        if counter_mj != self._counter_mj:
            if counter_mj > self._counter_mj:
                self._counter_total_mj += counter_mj - self._counter_mj
            # else: the counter went backwards (driver reload, GPU reset): rebase, add nothing.
            self._counter_mj = counter_mj
            self._counter_seen_s = now_s
            # The value is the energy up to about `lag_s` ago; what was drawn since then is
            # the power sample's over that lag. (Taken as the energy at the read itself, the
            # estimate fell short by that much, about 35 J at 700 W, until the next counter
            # read 0.75 s later handed it to whoever was running then.)
            points = self._counter_points
            points.append((now_s - lag_s, self._counter_total_mj / 1000.0))
            while len(points) > 2 and points[1][0] < now_s - TRAIL_S:
                points.popleft()
            self._lag_j, self._lag_s = self._power_w * lag_s, lag_s
            self._since_counter_j = 0.0
            self._since_t_s = now_s
            estimate_j = self._counter_total_mj / 1000.0 + self._lag_j
        elif back_j is not None:
            # A one-second mean: the energy of the last second, on the estimate of then.
            # Within a window of the counter's last move, the energy since it is at most
            # the window's own energy (the ceiling), reached over one counter period: at
            # the instant it was read, the counter is the truth.
            counter_j = self._counter_total_mj / 1000.0
            window_j = self._power_w * POWER_USAGE_AVERAGE_S
            ahead_s = max(0.0, now_s - self._counter_seen_s)
            ceiling_j = (
                counter_j + self._lag_j + window_j * min(1.0, ahead_s / COUNTER_MAX_UPDATE_PERIOD_S)
            )
            estimate_j = min(ceiling_j, max(counter_j, back_j + window_j))
        else:
            # The power drawn since the counter last moved, sample by sample (trapezoids),
            # up to `interpolation_cap_s` past it, plus the value's age when it was seen.
            end_s = min(now_s, self._counter_seen_s + self.interpolation_cap_s)
            if end_s > self._since_t_s:
                self._since_counter_j += between_samples_j(
                    self._since_t_s, self._since_power_w, end_s, self._power_w, self.step_at_s
                )
                self._since_t_s = end_s
            estimate_j = (
                self._counter_total_mj / 1000.0 + self._since_counter_j + self._aged_lag_j(now_s)
            )
        self._since_power_w = self._power_w
        self._energy_j = max(self._energy_j, estimate_j)
        trail = self._trail
        trail.append((now_s, self._energy_j))
        while trail and trail[0][0] < now_s - TRAIL_S:
            trail.popleft()

    def _follow_shape(self, mean_estimate_j: float, now_s: float) -> None:
        """One-second means: extend the shape by what this mean's estimate grew since the
        last one's (the energy drawn between them, as the means tell it)."""
        if self._mean_estimate_j is not None:
            self._shape_j += max(0.0, mean_estimate_j - self._mean_estimate_j)
        self._mean_estimate_j = mean_estimate_j
        shape = self._shape
        shape.append((now_s, self._shape_j))
        while shape and shape[0][0] < now_s - TRAIL_S:
            shape.popleft()

    def _aged_lag_j(self, now_s: float) -> float:
        """The value's expected age, in joules, given that the counter has not moved
        again by `now_s`: it moves within a period of its writing, so the writing was
        at most a period ago, and the expected age shrinks as the wait grows (to 0 a
        period after the move). The estimate stays within a period's draw of the value."""
        if self._lag_s <= 0.0:
            return 0.0
        waited_s = now_s - self._counter_seen_s
        age_s = min(self._lag_s, max(0.0, self.interpolation_cap_s - waited_s) / 2.0)
        return self._lag_j * age_s / self._lag_s

    def _trail_at(self, now_s: float) -> float | None:
        """The energy one averaging window ago: between two counter values when they
        bracket that instant (the counter is exact where it moved), else from the source's
        own recent estimates; None when neither reaches that far back."""
        t_s = now_s - POWER_USAGE_AVERAGE_S
        value = between_counter_values(self._counter_points, self._shape, t_s)
        return value if value is not None else interpolate(self._trail, t_s)

    def _integrate_power(self, power_w: float, now_s: float) -> None:
        dt_s = now_s - self._power_t_s
        if dt_s > 0.0:
            self._energy_j += (self._power_w + power_w) / 2.0 * dt_s
            self._power_t_s = now_s
        self._power_w = power_w

    def close(self) -> None:
        """Release the session reference (once; later calls do nothing)."""
        if not self._closed:
            self._closed = True
            self._session.release()

    def _device(self) -> tuple[NvmlSession, DeviceHandle]:
        if self._closed:
            raise ValueError(f"{self.name} is closed")
        return self._session, self._handle

    def __repr__(self) -> str:
        return (
            f"NvmlGpuSource(gpu_index={self.gpu_index!r}, method={self.method!r}, "
            f"device_name={self.device_name!r})"
        )


def parse_gpu_indices(argument: str) -> list[int] | None:
    """The GPU indices of an `nvml:IDS` argument ("0,1"), or None for "" (every GPU).

    Raises ValueError for anything but distinct non-negative integers separated by commas.
    """
    if not argument.strip():
        return None
    indices: list[int] = []
    for part in argument.split(","):
        text = part.strip()
        if not text.isdigit():
            raise ValueError(
                f"nvml takes GPU indices separated by commas, e.g. nvml:0,1; got {argument!r}"
            )
        index = int(text)
        if index in indices:
            raise ValueError(f"GPU index {index} is listed twice in {argument!r}")
        indices.append(index)
    return indices


def nvml_factory(
    argument: str, start_s: float, *, session: NvmlSession | None = None
) -> list[PowerSource]:
    """The `factories["nvml"]` hook of parse_power_spec: one NvmlGpuSource per GPU.

    argument: "" for every GPU NVML sees, or indices such as "0,1" (NVML's numbering,
    which ignores CUDA_VISIBLE_DEVICES). All the sources share one NvmlSession (a new one
    unless `session` is given) and open at clock time start_s.

    Raises ValueError for a malformed argument or an index NVML does not have (naming the
    valid ones), SourceUnavailable when NVML cannot be initialised, sees no GPU, or a GPU
    cannot be read.
    """
    indices = parse_gpu_indices(argument)
    session = NvmlSession() if session is None else session
    sources: list[PowerSource] = []
    with session:
        try:
            count = session.device_count()
        except NvmlError as exc:
            raise SourceUnavailable(f"NVML cannot count the GPUs: {exc}") from exc
        if count == 0:
            raise SourceUnavailable("NVML sees no GPU")
        if indices is None:
            indices = list(range(count))
        missing = [i for i in indices if i >= count]
        if missing:
            raise ValueError(
                f"no GPU with index {', '.join(map(str, missing))}: NVML sees {count} GPU(s), "
                f"valid indices are {', '.join(map(str, range(count)))}"
            )
        try:
            for index in indices:
                sources.append(NvmlGpuSource(session, index, start_s))
        except BaseException:
            for source in sources:
                source.close()
            raise
    return sources
