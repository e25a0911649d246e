"""A fake NVML library (`libnvidia-ml.so.1`, written in C) for testing without a GPU.

The fake sits below the real binding: the code under test imports the real `pynvml`
(nvidia-ml-py), which loads this library by its soname. Two ways to get it loaded:

* subprocess: run Python with `fake_nvml_env(lib_dir, script)` (LD_LIBRARY_PATH and
  FAKE_NVML_SCRIPT set), and pynvml's `CDLL("libnvidia-ml.so.1")` finds the fake;
* in-process: `preload_fake_nvml(lib_dir)` before pynvml's first nvmlInit. The dynamic
  loader then resolves the soname to the already loaded fake. pynvml caches the library and
  its function pointers for the life of the process, so in-process tests share one fake
  and steer it by rewriting the script file (the fake reads $FAKE_NVML_SCRIPT at call time).

Script format (one directive per line, '#' comments), re-read whenever the file changes:

    init <code>                   nvmlInit returns this NVML return code (0 = success)
    device <index> key=value ...  one GPU; the device count is the number of these lines

    name, uuid          strings (no spaces)
    energy_mj           energy counter (mJ) when the script was (re)loaded        [0]
    energy_rate_mw      counter growth, mW of real CLOCK_MONOTONIC time since load [0]
    counter_period_ms   the counter moves only every N ms (elapsed time quantised) [0]
    power_mw            what nvmlDeviceGetPowerUsage returns                       [0]
    instant_mw          field NVML_FI_DEV_POWER_INSTANT (186); absent -> that field's own
                        nvmlReturn is NOT_SUPPORTED while the call succeeds
    counter=0|1         0 -> nvmlDeviceGetTotalEnergyConsumption is NOT_SUPPORTED     [1]
    lost=0|1            1 -> every call on the device returns GPU_IS_LOST            [0]
    fail_after=N        after N successful energy/power calls, GPU_IS_LOST (reset on reload)
    limit_mw, min_limit_mw, max_limit_mw, default_limit_mw  [300000, 100000, 400000, 300000]
    set_limit=0|1       0 -> nvmlDeviceSetPowerManagementLimit is NO_PERMISSION      [1]
    energy_latency_us   P50[:P99] microseconds each energy counter read takes (also the
                        energy field 83 of nvmlDeviceGetFieldValues)                  [0]
    instant_latency_us  the same for nvmlDeviceGetFieldValues without the energy field [0]
    power_latency_us    the same for nvmlDeviceGetPowerUsage                           [0]
    latency_mode        spin (burn the caller's CPU, as the real counter read does) or
                        sleep                                                     [spin]
    hang_energy=0|1     1 -> energy counter reads block until the script says 0     [0]
    hang=0|1            1 -> every energy and power read blocks until the script says 0

About 1.5 % of calls take P99, the rest P50 +- 10 %. H100_LATENCY holds the figures
measured on a real H100 (driver 580.159.04, nvidia-ml-py 13.610.43), to paste into a
device line.

A successful set stores the limit in memory (until the next reload) and appends
`set <index> <mw>` to the file named by $FAKE_NVML_LOG, if set. No $FAKE_NVML_SCRIPT means
"driver not loaded"; a malformed script makes every call fail with NVML_ERROR_UNKNOWN.
Two non-NVML exports: fakeNvmlInitRefs() counts nvmlInit calls not yet shut down, and
fakeNvmlBlockedCalls() the calls a hang holds right now.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

FAKE_NVML_SOURCE = Path(__file__).resolve().parent / "fake_nvml.c"
LIBRARY_NAME = "libnvidia-ml.so.1"
# What the NVML calls cost on a real H100 (p50:p99, microseconds), as device keys.
H100_LATENCY = "energy_latency_us=3000:16000 instant_latency_us=3:14 power_latency_us=2:5"
# NVML return codes the fake produces (nvml.h).
NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_GPU_IS_LOST = 15


class FakeNvmlBuildError(RuntimeError):
    """gcc is missing or could not compile the fake library."""


def build_fake_nvml(out_dir: Path) -> Path:
    """Compile fake_nvml.c into `out_dir/libnvidia-ml.so.1`; returns `out_dir`.

    Raises FakeNvmlBuildError with gcc's output if gcc is missing or fails.
    """
    gcc = shutil.which("gcc")
    if gcc is None:
        raise FakeNvmlBuildError("gcc not found on PATH: it is needed to build the fake NVML")
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [
        gcc, "-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden",
        "-shared", "-fPIC", "-Wl,-soname," + LIBRARY_NAME,
        "-o", str(out_dir / LIBRARY_NAME), str(FAKE_NVML_SOURCE), "-lpthread",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise FakeNvmlBuildError(
            f"building the fake NVML failed (exit {result.returncode}): {' '.join(command)}\n"
            f"{result.stdout}{result.stderr}"
        )
    return out_dir


def write_script(path: Path, text: str) -> None:
    """Write a fake NVML script so that the fake is sure to notice the change.

    File mtimes tick at the kernel's coarse clock (milliseconds), so two writes of the same
    size in quick succession could look unchanged: the mtime is forced strictly forward.
    """
    try:
        old_mtime_ns = path.stat().st_mtime_ns
    except FileNotFoundError:
        old_mtime_ns = 0
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    new_mtime_ns = max(time.time_ns(), old_mtime_ns + 1_000)
    os.utime(tmp, ns=(new_mtime_ns, new_mtime_ns))
    os.replace(tmp, path)  # a reader never sees a half-written script


def fake_nvml_env(
    lib_dir: Path,
    script: Path | None,
    *,
    log: Path | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """An environment for a subprocess that should load the fake through the real pynvml.

    script None leaves FAKE_NVML_SCRIPT unset (the fake then reports "driver not loaded").
    """
    env = dict(os.environ if base is None else base)
    env.pop("FAKE_NVML_SCRIPT", None)
    env.pop("FAKE_NVML_LOG", None)
    previous = env.get("LD_LIBRARY_PATH")
    env["LD_LIBRARY_PATH"] = str(lib_dir) + (os.pathsep + previous if previous else "")
    if script is not None:
        env["FAKE_NVML_SCRIPT"] = str(script)
    if log is not None:
        env["FAKE_NVML_LOG"] = str(log)
    return env


def fake_init_refs(lib: ctypes.CDLL) -> int:
    """How many nvmlInit calls the fake has seen that no nvmlShutdown has matched yet."""
    return int(lib.fakeNvmlInitRefs())


def fake_blocked_calls(lib: ctypes.CDLL) -> int:
    """How many NVML calls a `hang` / `hang_energy` in the script is holding right now."""
    return int(lib.fakeNvmlBlockedCalls())


def preload_fake_nvml(lib_dir: Path) -> ctypes.CDLL:
    """Load the fake into this process so that `CDLL("libnvidia-ml.so.1")` resolves to it.

    Must run before pynvml loads any library (its first nvmlInit). Keep the returned handle
    alive for as long as the fake is used.
    """
    return ctypes.CDLL(str(lib_dir / LIBRARY_NAME), mode=ctypes.RTLD_GLOBAL)
