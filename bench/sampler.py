"""What the sampler costs with 8 NVML GPUs: CPU time at 20 Hz and 100 Hz, and one read_all().

    python bench/sampler.py [--duration 5] [--gpus 8]

No GPU is needed: the script compiles the fake libnvidia-ml.so.1 (tests/fakenvml, with gcc)
into a temporary directory and reruns itself in a subprocess with LD_LIBRARY_PATH pointing
there, so the real nvidia-ml-py binding loads the fake. Every fake GPU's energy counter
grows on real time (energy_rate_mw) and updates every 20-100 ms, as real GPUs do.

The child opens the GPUs with nvml_factory, builds a real metering.sampler.Sampler, and lets
its run(hz) coroutine tick on an asyncio loop for --duration seconds per rate, measuring
time.process_time() (all CPU the process spends, the loop's own wake-ups included) as a
percentage of one core, next to the floor: an empty asyncio loop waking at the same rate
(on a VM, each wake-up alone can cost 100+ µs of CPU). It also times read_all() directly:
back to back (a request boundary, where power was sampled < 50 ms ago: one NVML call per
GPU) and with a power sample on every read (a fake clock 60 ms apart: the tick's worst
case).

The fake's C side costs next to nothing, so these numbers are the binding's and the
sampler's; a real driver adds its own time per NVML call. It is a report: nothing is
asserted, the target is printed next to the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET_CPU_PERCENT_AT_20_HZ = 1.0  # printed next to the number, never enforced
RATES_HZ = (20.0, 100.0)
READ_ALL_REPEATS = 2000


def fake_script(gpus: int, counter: bool) -> str:
    lines = ["# bench/sampler.py: GPUs drawing 150-290 W, counters updating every 20-100 ms"]
    for index in range(gpus):
        rate_mw = 150_000 + 20_000 * index
        period_ms = (20, 50, 100)[index % 3]
        lines.append(
            f"device {index} name=FakeH100-{index} energy_mj={10**9 + index} "
            f"energy_rate_mw={rate_mw} counter_period_ms={period_ms} "
            f"power_mw={rate_mw} instant_mw={rate_mw} counter={int(counter)}"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- child


def time_read_all(gpus_argument: str, spaced_s: float | None) -> float:
    """Mean wall time of one read_all(), µs. spaced_s: a fake clock advancing this much per
    call (forcing power samples), else the real monotonic clock, back to back."""
    from metering.sampler import Sampler
    from metering.sources.nvml import nvml_factory

    fake_now = [0.0]

    def fake_clock() -> float:
        fake_now[0] += spaced_s or 0.0
        return fake_now[0]

    clock = time.monotonic if spaced_s is None else fake_clock
    sampler = Sampler(nvml_factory(gpus_argument, clock()), idle_watts=None, clock=clock)
    try:
        for _ in range(100):  # warm up (pynvml caches function pointers on first use)
            sampler.read_all()
        start = time.perf_counter()
        for _ in range(READ_ALL_REPEATS):
            sampler.read_all()
        return (time.perf_counter() - start) / READ_ALL_REPEATS * 1e6
    finally:
        sampler.close()


async def tick_for(hz: float, duration_s: float) -> tuple[float, int, float, list[str]]:
    """Run a Sampler at `hz` for `duration_s`: (CPU % of one core, ticks, wall s, methods)."""
    from metering.sampler import Sampler
    from metering.sources.nvml import nvml_factory

    sampler = Sampler(nvml_factory("", time.monotonic()), idle_watts=None)
    ticks = 0
    read_all = sampler.read_all

    def counted() -> float:
        nonlocal ticks
        ticks += 1
        return read_all()

    sampler.read_all = counted  # type: ignore[method-assign]
    try:
        task = asyncio.create_task(sampler.run(hz))
        await asyncio.sleep(0.2)  # settle
        ticks = 0
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        await asyncio.sleep(duration_s)
        cpu_s, wall_s = time.process_time() - cpu_start, time.perf_counter() - wall_start
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        degraded = [st.source.name for st in sampler.states if not st.ok]
        if degraded:
            print(f"  warning: degraded sources {degraded}", file=sys.stderr)
        return 100.0 * cpu_s / wall_s, ticks, wall_s, sampler.methods
    finally:
        sampler.close()


async def loop_alone(hz: float, duration_s: float) -> float:
    """CPU % of one core of an asyncio loop waking at `hz` and doing nothing: the floor."""
    period_s = 1.0 / hz

    async def wake() -> None:
        # A periodic wake-up is the point here, not waiting for a condition.
        while True:  # noqa: ASYNC110
            await asyncio.sleep(period_s)

    task = asyncio.create_task(wake())
    await asyncio.sleep(0.2)
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    await asyncio.sleep(duration_s)
    cpu_s, wall_s = time.process_time() - cpu_start, time.perf_counter() - wall_start
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return 100.0 * cpu_s / wall_s


def child(duration_s: float, gpus: int, mode: str) -> None:
    boundary_us = time_read_all("", None)
    sampled_us = time_read_all("", 0.06)
    print(f"{mode} mode, {gpus} GPUs:")
    print(
        f"  read_all(): {boundary_us:7.1f} µs back to back (request boundary), "
        f"{sampled_us:7.1f} µs with a power sample on every read"
    )
    for hz in RATES_HZ:
        percent, ticks, wall_s, methods = asyncio.run(tick_for(hz, duration_s))
        floor = asyncio.run(loop_alone(hz, duration_s))
        target = (
            f"   (target < {TARGET_CPU_PERCENT_AT_20_HZ:g} % of one core)" if hz == 20.0 else ""
        )
        print(
            f"  sampler at {hz:5.0f} Hz: {percent:6.3f} % of one core "
            f"({ticks} ticks in {wall_s:.1f} s, {', '.join(methods)}){target}"
        )
        print(
            f"      of which an empty asyncio loop waking at {hz:g} Hz: {floor:6.3f} %; "
            f"reading the GPUs: {percent - floor:6.3f} %"
        )


# ---------------------------------------------------------------------------- parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per rate")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--child", choices=["counter", "power"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.duration, args.gpus, args.child)
        return

    sys.path.insert(0, str(REPO_ROOT))
    from tests.fakenvml import build_fake_nvml, fake_nvml_env, write_script

    with tempfile.TemporaryDirectory(prefix="bench-sampler-") as tmp:
        lib_dir = build_fake_nvml(Path(tmp) / "lib")
        print(f"fake NVML built in {lib_dir}; python {sys.version.split()[0]}\n")
        # Counter mode is what the target is about; power mode (no counter) for comparison.
        for mode in ("counter", "power"):
            script = Path(tmp) / f"{mode}.script"
            write_script(script, fake_script(args.gpus, counter=mode == "counter"))
            command = [
                sys.executable, str(Path(__file__).resolve()), "--child", mode,
                "--duration", str(args.duration), "--gpus", str(args.gpus),
            ]  # fmt: skip
            subprocess.run(command, env=fake_nvml_env(lib_dir, script), cwd=REPO_ROOT, check=True)
            print()


if __name__ == "__main__":
    main()
