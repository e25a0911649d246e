"""GPU power limits through NVML, for benchmark sweeps that must leave the GPUs as they were.

Watts everywhere in this API; NVML speaks milliwatts, converted only at the NVML calls (a
limit is rounded to whole milliwatts). NVML's own GPU numbering is used, as in `nvml:IDS`
(it ignores CUDA_VISIBLE_DEVICES and matches `nvidia-smi -i`).

    limits = PowerLimits([0, 1])           # or None: every GPU NVML sees
    for limit_w in limits.sweep_points_w(5):
        with limits.applied(limit_w):      # the same limit on every GPU of the group
            run_the_benchmark()
    # or one session over the whole sweep (originals recorded once, restored once):
    with limits.session() as session:
        for limit_w in limits.sweep_points_w(5):
            session.set_w(limit_w)
            run_the_benchmark()

Setting a limit needs root; NVML answers NO_PERMISSION otherwise, raised here as
PowerLimitPermissionError naming root and `nvidia-smi -pl`. A limit outside what a GPU
accepts (nvmlDeviceGetPowerManagementLimitConstraints) is refused with ValueError before
anything is set on any GPU: limits are never silently clamped.

Restoring the originals
-----------------------
A session (`session()` or `applied()`) reads every GPU's current limit when it is entered,
before setting anything, and sets those originals back on the GPUs it changed:

* when the `with` block ends, however it ends: normally, by an exception, KeyboardInterrupt
  (Ctrl-C), SystemExit, or a generator/task being closed;
* on SIGTERM and SIGHUP, whose default action would end the process without running any
  `finally`: while a session is open, entered from the main thread, and the signal still has
  its default action, the session installs a handler that raises SystemExit(128 + signal),
  so the block unwinds and restores (the process then exits with status 143 for SIGTERM).
  A handler somebody else installed is left alone (its owner decides what the signal does);
  sessions entered from other threads install nothing;
* at interpreter exit (an `atexit` hook per session) for whatever is still not restored:
  a session entered and never exited, one running in a daemon thread when the main thread
  ends, or a restore that was itself interrupted half-way (a second Ctrl-C).

Nothing can be guaranteed when the process dies without running Python code: SIGKILL (also
the kernel's OOM killer, `docker kill`'s default), a crash inside native code, `os._exit`,
losing power or the machine. The GPU then keeps the last limit set until someone sets it
(`LimitSession.restore_commands()` gives the `nvidia-smi -i N -pl W` lines to print before
a long sweep, just in case) or the driver reloads (a reboot), which restores the default.
Another program changing the limits during a session is not detected: the session still puts
back what it read on entry. Nested sessions over the same GPUs restore in reverse order of
entry, so the outermost originals win; sessions that overlap without nesting are not supported.

When restoring fails (the GPU was lost, the permission was taken away) every other GPU is
still restored; the failure is raised as RestoreError after a clean block, or attached as a
note to the exception already unwinding the block (which is never replaced), and the atexit
hook tries once more. Either way the message names the `nvidia-smi` commands to run by hand.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from types import FrameType, TracebackType
from typing import Final, TypeVar

from metering.sources.base import SourceUnavailable
from metering.sources.nvml import (
    NVML_ERROR_INVALID_ARGUMENT,
    NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_NOT_SUPPORTED,
    DeviceHandle,
    NvmlError,
    NvmlSession,
)
from proxy.cli.signals import TERMINATING_SIGNALS

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Signals whose default action ends the process without unwinding Python frames, and that are
# sent to end a program politely: kill/systemd/docker stop (SIGTERM), a closed terminal
# (SIGHUP). SIGINT already raises KeyboardInterrupt; SIGKILL cannot be caught.


class PowerLimitError(Exception):
    """Power limits could not be read or set. `code`: the NVML return code, if NVML gave one."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class PowerLimitPermissionError(PowerLimitError, PermissionError):
    """NVML refused to set a power limit for lack of privilege: it needs root."""


class RestoreError(PowerLimitError):
    """Some original limits could not be put back. `unrestored_w`: GPU index -> original W."""

    def __init__(self, message: str, unrestored_w: dict[int, float]) -> None:
        super().__init__(message)
        self.unrestored_w = unrestored_w


def _to_mw(limit_w: float) -> int:
    return round(limit_w * 1000.0)


def nvidia_smi_command(index: int, limit_w: float) -> str:
    """The shell command that sets GPU `index`'s power limit to `limit_w` by hand."""
    return f"sudo nvidia-smi -i {index} -pl {limit_w:g}"


def _raise_system_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


class PowerLimits:
    """The power limits of a group of GPUs (NVML indices), read and changed together.

    indices: NVML GPU indices, or None for every GPU NVML sees (counted at each call).
    session: the NvmlSession to share (a new one if None). Every method initialises NVML for
    its own duration; a LimitSession holds it while open.

    Errors: ValueError for a malformed index or one NVML does not have (naming the valid
    ones); PowerLimitError when NVML cannot be initialised or a call fails (`code` set).
    """

    def __init__(
        self, indices: Sequence[int] | None = None, *, session: NvmlSession | None = None
    ) -> None:
        if indices is not None:
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices):
                raise ValueError(f"GPU indices must be non-negative integers, got {indices!r}")
            if len(set(indices)) != len(indices):
                raise ValueError(f"a GPU index is listed twice in {list(indices)!r}")
            if not indices:
                raise ValueError("no GPU index given (None means every GPU)")
        self._indices = None if indices is None else list(indices)
        self._session = NvmlSession() if session is None else session

    @property
    def nvml_session(self) -> NvmlSession:
        return self._session

    # ------------------------------------------------------------------ NVML edge

    def _acquire(self) -> None:
        try:
            self._session.acquire()
        except SourceUnavailable as exc:
            raise PowerLimitError(f"cannot reach NVML for power limits: {exc}") from exc

    @contextlib.contextmanager
    def _nvml(self) -> Iterator[None]:
        self._acquire()
        try:
            yield
        finally:
            self._session.release()

    def _handles(self) -> dict[int, DeviceHandle]:
        """GPU index -> handle, in the configured order (NVML must be initialised)."""
        try:
            count = self._session.device_count()
        except NvmlError as exc:
            raise PowerLimitError(f"NVML cannot count the GPUs: {exc}", exc.code) from exc
        indices = list(range(count)) if self._indices is None else self._indices
        if not indices:
            raise PowerLimitError("NVML sees no GPU")
        missing = [i for i in indices if i >= count]
        if missing:
            raise ValueError(
                f"no GPU with index {', '.join(map(str, missing))}: NVML sees {count} GPU(s)"
                + (f", valid indices are {', '.join(map(str, range(count)))}" if count else "")
            )
        handles: dict[int, DeviceHandle] = {}
        for index in indices:
            handles[index] = self._read(index, "opening", self._session.device_handle, index)
        return handles

    @staticmethod
    def _read(index: int, what: str, call: Callable[..., _T], *args: object) -> _T:
        try:
            return call(*args)
        except NvmlError as exc:
            if exc.code == NVML_ERROR_NOT_SUPPORTED:
                raise PowerLimitError(
                    f"GPU {index} does not support power limits ({what} GPU {index}: {exc})",
                    exc.code,
                ) from exc
            raise PowerLimitError(f"{what} GPU {index} failed: {exc}", exc.code) from exc

    def _constraints_w(self, handles: dict[int, DeviceHandle]) -> dict[int, tuple[float, float]]:
        session = self._session
        out: dict[int, tuple[float, float]] = {}
        for index, handle in handles.items():
            low_mw, high_mw = self._read(
                index,
                "reading the power limit range of",
                session.power_limit_constraints_mw,
                handle,
            )
            out[index] = (low_mw / 1000.0, high_mw / 1000.0)
        return out

    def _current_w(self, handles: dict[int, DeviceHandle]) -> dict[int, float]:
        read = self._session.power_limit_mw
        return {
            index: self._read(index, "reading the power limit of", read, handle) / 1000.0
            for index, handle in handles.items()
        }

    # ------------------------------------------------------------------ reads

    def indices(self) -> list[int]:
        """The GPU indices this object controls (all GPUs NVML sees now, if built with None)."""
        with self._nvml():
            return list(self._handles())

    def constraints_w(self) -> dict[int, tuple[float, float]]:
        """GPU index -> (min, max) power limit the GPU accepts, watts."""
        with self._nvml():
            return self._constraints_w(self._handles())

    def current_w(self) -> dict[int, float]:
        """GPU index -> the power limit in force now, watts."""
        with self._nvml():
            return self._current_w(self._handles())

    def default_w(self) -> dict[int, float]:
        """GPU index -> the GPU's default power limit (what it boots with), watts."""
        with self._nvml():
            read = self._session.default_power_limit_mw
            return {
                index: self._read(index, "reading the default power limit of", read, h) / 1000.0
                for index, h in self._handles().items()
            }

    def sweep_points_w(self, steps: int) -> list[float]:
        """Power limits to sweep, watts, one limit for all the GPUs, strictly decreasing.

        From the default limit down to the minimum the GPUs accept, in `steps` equal steps,
        each rounded to a whole watt (the two ends kept exact). Over several GPUs, the range is
        what all of them accept (the highest minimum to the lowest maximum) and the top is the
        lowest default, clamped into that range. Limits above the default are not swept: they
        let the GPU draw more, never less. Fewer than `steps` points come back when the range
        holds fewer whole watts; one point when the default is the minimum.

        Raises ValueError for steps < 1 or GPUs that accept no common limit.
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        constraints = self.constraints_w()
        defaults = self.default_w()
        low_w = max(low for low, _ in constraints.values())
        high_w = min(high for _, high in constraints.values())
        if low_w > high_w:
            raise ValueError(
                "these GPUs accept no common power limit: "
                + ", ".join(f"GPU {i}: {lo:g}-{hi:g} W" for i, (lo, hi) in constraints.items())
            )
        top_w = min(max(min(defaults.values()), low_w), high_w)
        if steps == 1:
            return [top_w]
        step_w = (top_w - low_w) / (steps - 1)
        points: list[float] = []
        for k in range(steps):
            if k == 0:
                point_w = top_w
            elif k == steps - 1:
                point_w = low_w
            else:
                point_w = min(max(float(round(top_w - k * step_w)), low_w), top_w)
            if not points or point_w < points[-1]:
                points.append(point_w)
        return points

    # ------------------------------------------------------------------ changes

    def session(self, *, handle_signals: bool = True) -> LimitSession:
        """A context manager that records the limits on entry and restores them on exit.

        Set limits inside it with `LimitSession.set_w`. handle_signals: install the
        SIGTERM/SIGHUP handler described in the module docstring (main thread only).
        """
        return LimitSession(self, None, handle_signals=handle_signals)

    def applied(self, limit_w: float, *, handle_signals: bool = True) -> LimitSession:
        """A session that sets `limit_w` (watts) on every GPU on entry; see session().

        Entering raises ValueError (nothing set) if any GPU does not accept `limit_w`,
        PowerLimitPermissionError (nothing set) without root, and restores whatever it set
        before raising any other error.
        """
        _check_finite(limit_w)
        return LimitSession(self, limit_w, handle_signals=handle_signals)


def _check_finite(limit_w: float) -> None:
    if isinstance(limit_w, bool) or not isinstance(limit_w, int | float):
        raise ValueError(f"a power limit must be a number of watts, got {limit_w!r}")
    if not math.isfinite(limit_w) or limit_w <= 0:
        raise ValueError(f"a power limit must be a positive finite number of watts, got {limit_w}")


class LimitSession:
    """Limits changed for a while, and the originals put back; see the module docstring.

    originals_w: GPU index -> the limit read on entry, W. applied_w: the last limit set by
    this session (None before the first). Entering twice is an error; exiting restores.
    """

    def __init__(
        self, limits: PowerLimits, initial_w: float | None, *, handle_signals: bool
    ) -> None:
        self._limits = limits
        self._initial_w = initial_w
        self._handle_signals = handle_signals
        self._lock = threading.RLock()
        self._entered = False
        self._open = False
        self._handles: dict[int, DeviceHandle] = {}
        self._constraints_w: dict[int, tuple[float, float]] = {}
        self.originals_w: dict[int, float] = {}
        self.applied_w: float | None = None
        # GPUs this session may have changed and not yet restored: what restoring walks.
        self._pending: set[int] = set()
        self._atexit_hook: Callable[[], None] | None = None
        self._signals_installed: list[signal.Signals] = []

    # ------------------------------------------------------------------ enter / exit

    def __enter__(self) -> LimitSession:
        if self._entered:
            raise RuntimeError("a LimitSession can be entered only once")
        self._entered = True
        limits = self._limits
        limits._acquire()  # held until the session closes
        try:
            handles = limits._handles()
            constraints = limits._constraints_w(handles)
            originals = limits._current_w(handles)
        except BaseException:
            limits.nvml_session.release()
            raise
        self._handles, self._constraints_w, self.originals_w = handles, constraints, originals
        self._open = True
        hook = self._restore_at_exit
        atexit.register(hook)
        self._atexit_hook = hook
        if self._handle_signals:
            self._install_signal_handlers()
        if self._initial_w is not None:
            try:
                self.set_w(self._initial_w)
            except BaseException as exc:
                self._close(exc)
                raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close(exc)

    def _close(self, exc: BaseException | None) -> None:
        """Restore, then let go of atexit, signals and NVML. Raises RestoreError if restoring
        failed and no exception `exc` is unwinding (else adds a note to `exc`)."""
        if not self._open:
            return
        failures = self._restore()
        self._restore_signal_handlers()
        if not self._pending and self._atexit_hook is not None:
            atexit.unregister(self._atexit_hook)
            self._atexit_hook = None
        self._open = False
        if not self._pending:
            self._limits.nvml_session.release()
        # else: keep NVML initialised for the atexit hook's last try.
        if failures:
            error = self._restore_error(failures)
            if exc is None:
                raise error
            exc.add_note(str(error))
            log.error("%s", error)

    # ------------------------------------------------------------------ setting

    def set_w(self, limit_w: float) -> None:
        """Set `limit_w` watts on every GPU of the session, in the order the GPUs were given.

        Raises ValueError, before setting anything, when a GPU does not accept it;
        PowerLimitPermissionError without root (stopping at the first GPU that refuses);
        PowerLimitError for other NVML failures. The session's exit restores every GPU this
        or an earlier call changed, whatever was raised.
        """
        _check_finite(limit_w)
        with self._lock:
            if not self._open:
                raise RuntimeError("set_w on a LimitSession that is not open")
            limit_mw = _to_mw(limit_w)
            refused = {
                index: (low_w, high_w)
                for index, (low_w, high_w) in self._constraints_w.items()
                if not _to_mw(low_w) <= limit_mw <= _to_mw(high_w)
            }
            if refused:
                raise ValueError(
                    f"power limit {limit_w:g} W is outside what "
                    + "; ".join(
                        f"GPU {i} accepts ({lo:g} W to {hi:g} W)" for i, (lo, hi) in refused.items()
                    )
                    + ": nothing was set"
                )
            session = self._limits.nvml_session
            for index, handle in self._handles.items():
                changed_before = index in self._pending
                self._pending.add(index)
                try:
                    session.set_power_limit_mw(handle, limit_mw)
                except NvmlError as exc:
                    if not changed_before and exc.code in _NOTHING_CHANGED:
                        self._pending.discard(index)
                    raise _set_error(index, limit_w, exc) from exc
            self.applied_w = limit_w

    # ------------------------------------------------------------------ restoring

    def restore_commands(self) -> list[str]:
        """`nvidia-smi` command lines that set every GPU back to its original limit."""
        return [nvidia_smi_command(i, w) for i, w in self.originals_w.items()]

    def restore(self) -> None:
        """Put the originals back now (the session stays open; exiting restores again only
        what a later set_w changes). Raises RestoreError naming what could not be restored."""
        failures = self._restore()
        if failures:
            raise self._restore_error(failures)

    def _restore(self) -> dict[int, NvmlError]:
        """Set the originals back on every pending GPU, in the order given; the failures."""
        failures: dict[int, NvmlError] = {}
        with self._lock:
            session = self._limits.nvml_session
            for index in [i for i in self._handles if i in self._pending]:
                try:
                    session.set_power_limit_mw(
                        self._handles[index], _to_mw(self.originals_w[index])
                    )
                except NvmlError as exc:
                    failures[index] = exc
                else:
                    self._pending.discard(index)
            if not self._pending:
                self.applied_w = None
        return failures

    def _restore_error(self, failures: dict[int, NvmlError]) -> RestoreError:
        unrestored_w = {i: self.originals_w[i] for i in failures}
        return RestoreError(
            "could not restore the power limit of "
            + "; ".join(
                f"GPU {i} to {self.originals_w[i]:g} W ({exc})" for i, exc in failures.items()
            )
            + ". Restore by hand: "
            + "; ".join(nvidia_smi_command(i, w) for i, w in unrestored_w.items()),
            unrestored_w,
        )

    def _restore_at_exit(self) -> None:
        """The atexit hook: a last try for anything not restored; logs what still fails."""
        if not self._pending:
            return
        failures = self._restore()
        if failures:
            log.error("%s", self._restore_error(failures))
        else:
            log.warning(
                "power limits restored at exit: %s",
                ", ".join(f"GPU {i} {w:g} W" for i, w in self.originals_w.items()),
            )

    # ------------------------------------------------------------------ signals

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in TERMINATING_SIGNALS:
            if signal.getsignal(signum) is signal.SIG_DFL:
                signal.signal(signum, _raise_system_exit)
                self._signals_installed.append(signum)

    def _restore_signal_handlers(self) -> None:
        for signum in self._signals_installed:
            # Only while it is still ours: whoever replaced it since then owns the signal.
            if signal.getsignal(signum) is _raise_system_exit:
                signal.signal(signum, signal.SIG_DFL)
        self._signals_installed.clear()


# NVML return codes after which a set is known to have changed nothing.
_NOTHING_CHANGED: Final = frozenset(
    {NVML_ERROR_NO_PERMISSION, NVML_ERROR_INVALID_ARGUMENT, NVML_ERROR_NOT_SUPPORTED}
)


def _set_error(index: int, limit_w: float, exc: NvmlError) -> PowerLimitError:
    if exc.code == NVML_ERROR_NO_PERMISSION:
        return PowerLimitPermissionError(
            f"setting the power limit of GPU {index} needs root (NVML: {exc}). Run the sweep as "
            f"root, or leave power limits out of it; by hand: {nvidia_smi_command(index, limit_w)}",
            exc.code,
        )
    if exc.code == NVML_ERROR_NOT_SUPPORTED:
        return PowerLimitError(
            f"GPU {index} does not support setting a power limit ({exc})", exc.code
        )
    if exc.code == NVML_ERROR_INVALID_ARGUMENT:
        return PowerLimitError(
            f"GPU {index} refused a power limit of {limit_w:g} W ({exc})", exc.code
        )
    return PowerLimitError(f"setting the power limit of GPU {index} failed: {exc}", exc.code)
