"""GPU power limits (proxy/cli/bench/power_limit.py) through the real nvidia-ml-py over the
fake NVML.

Every NVML scenario runs in its own Python subprocess that loads the fake through
LD_LIBRARY_PATH (tests/support/fakenvml's `fake_nvml_env`). In-process, pynvml keeps the first
library it loads for the life of the process, and test_nvml.py preloads its own build of
the fake: a second build loaded here would be a second copy with its own state, and which
of the two pynvml talks to would depend on test order. Subprocesses also let the tests send
real signals and watch the atexit hook run at interpreter exit.

The fake appends `set <gpu> <mW>` to $FAKE_NVML_LOG for every successful
nvmlDeviceSetPowerManagementLimit, so the log is the exact sequence of limits set,
restores included.
"""

from __future__ import annotations

import ast
import itertools
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.cli.bench.power_limit import (
    PowerLimitError,
    PowerLimitPermissionError,
    PowerLimits,
    RestoreError,
    nvidia_smi_command,
)
from tests.support.fakenvml import build_fake_nvml, fake_nvml_env, write_script
from tests.support.paths import REPO_ROOT

# Two GPUs with different ranges; GPU 1 runs below its default.
TWO_GPUS = (
    "device 0 min_limit_mw=100000 max_limit_mw=400000 default_limit_mw=300000 limit_mw=300000\n"
    "device 1 min_limit_mw=150500 max_limit_mw=350000 default_limit_mw=320000 limit_mw=280000\n"
)
ORIGINALS = ["set 0 300000", "set 1 280000"]

# Run before every scenario: `out(name, value)` reports a value (repr, read back with
# ast.literal_eval); `refs()` is how many nvmlInit calls the fake has not seen shut down.
PRELUDE = """
import os, signal, sys, time
import pynvml
from proxy.cli.bench.power_limit import *
from metering.sources.nvml import NvmlError

def out(name, value):
    print(repr((name, value)), flush=True)

def refs():
    return int(pynvml.nvmlLib.fakeNvmlInitRefs()) if pynvml.nvmlLib is not None else 0

def error(call):
    try:
        call()
    except BaseException as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
"""


@pytest.fixture(scope="module")
def fake_nvml_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fake_nvml(tmp_path_factory.mktemp("fakenvml-limits"))


@dataclass
class Run:
    values: dict[str, Any]
    log: list[str]
    stderr: str
    returncode: int


@dataclass
class Scenario:
    lib_dir: Path
    script: Path
    log: Path

    def env(self, *, with_script: bool = True) -> dict[str, str]:
        return fake_nvml_env(self.lib_dir, self.script if with_script else None, log=self.log)

    def argv(self, code: str) -> list[str]:
        return [sys.executable, "-c", PRELUDE + textwrap.dedent(code)]

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def result(self, stdout: str, stderr: str, returncode: int) -> Run:
        values = dict(ast.literal_eval(line) for line in stdout.splitlines() if line)
        return Run(values, self.log_lines(), stderr, returncode)

    def run(
        self, nvml_script: str, code: str, *, exit_code: int = 0, with_script: bool = True
    ) -> Run:
        """Run `code` (after PRELUDE) against the fake scripted with `nvml_script`."""
        write_script(self.script, nvml_script)
        done = subprocess.run(
            self.argv(code),
            env=self.env(with_script=with_script),
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == exit_code, done.stderr
        return self.result(done.stdout, done.stderr, done.returncode)


@pytest.fixture
def scenario(fake_nvml_dir: Path, tmp_path: Path) -> Scenario:
    return Scenario(fake_nvml_dir, tmp_path / "nvml.script", tmp_path / "nvml.log")


# --------------------------------------------------------------------------- reading


def test_constraints_current_default_and_sweep_points(scenario: Scenario) -> None:
    run = scenario.run(
        TWO_GPUS,
        """
        limits = PowerLimits(None)
        out("indices", limits.indices())
        out("constraints", limits.constraints_w())
        out("current", limits.current_w())
        out("default", limits.default_w())
        out("sweep5", limits.sweep_points_w(5))
        out("sweep1", limits.sweep_points_w(1))
        out("sweep1000", limits.sweep_points_w(1000))
        out("gpu1", PowerLimits([1]).constraints_w())
        out("missing", error(lambda: PowerLimits([0, 5]).current_w()))
        out("refs", refs())
        """,
    )
    values = run.values
    assert values["indices"] == [0, 1]
    assert values["constraints"] == {0: (100.0, 400.0), 1: (150.5, 350.0)}
    assert values["current"] == {0: 300.0, 1: 280.0}
    assert values["default"] == {0: 300.0, 1: 320.0}
    # Common range 150.5-350 W, from the lowest default (300 W) down in 4 equal steps of
    # 37.375 W, rounded to whole watts inside, the ends exact.
    assert values["sweep5"] == [300.0, 263.0, 225.0, 188.0, 150.5]
    assert values["sweep1"] == [300.0]
    sweep = values["sweep1000"]
    assert sweep[0] == 300.0 and sweep[-1] == 150.5
    assert all(a > b for a, b in itertools.pairwise(sweep))
    assert len(sweep) == 151  # 300, 299, ... 151, 150.5: no more whole watts than that
    assert values["gpu1"] == {1: (150.5, 350.0)}
    assert values["missing"] == (
        "ValueError: no GPU with index 5: NVML sees 2 GPU(s), valid indices are 0, 1"
    )
    assert values["refs"] == 0
    assert run.log == []  # reading sets nothing


def test_sweep_needs_a_common_range(scenario: Scenario) -> None:
    run = scenario.run(
        "device 0 min_limit_mw=50000 max_limit_mw=100000 default_limit_mw=100000\n"
        "device 1 min_limit_mw=150000 max_limit_mw=300000 default_limit_mw=300000\n"
        "device 2 min_limit_mw=200000 max_limit_mw=400000 default_limit_mw=200000\n",
        """
        out("disjoint", error(lambda: PowerLimits([0, 1]).sweep_points_w(3)))
        out("flat", PowerLimits([2]).sweep_points_w(3))
        # A default above the common maximum is clamped into the range.
        out("clamped", PowerLimits([1, 2]).sweep_points_w(2))
        """,
    )
    assert run.values["disjoint"] == (
        "ValueError: these GPUs accept no common power limit: GPU 0: 50-100 W, GPU 1: 150-300 W"
    )
    assert run.values["flat"] == [200.0]  # the default is the minimum: one point
    assert run.values["clamped"] == [200.0]  # lowest default 200 W = the common minimum


def test_constructor_and_steps_are_checked_before_nvml() -> None:
    # No NVML call happens here: safe in-process.
    for indices in ([0, 0], [-1], [], [True]):
        with pytest.raises(ValueError, match=r"index|indices"):
            PowerLimits(indices)
    for steps in (0, -2, 1.5):
        with pytest.raises(ValueError, match="steps must be a positive integer"):
            PowerLimits([0]).sweep_points_w(steps)  # type: ignore[arg-type]
    for bad_w in (float("nan"), float("inf"), -5.0, 0.0):
        with pytest.raises(ValueError, match="positive finite number of watts"):
            PowerLimits([0]).applied(bad_w)
    assert nvidia_smi_command(1, 250.0) == "sudo nvidia-smi -i 1 -pl 250"
    assert nvidia_smi_command(0, 187.5) == "sudo nvidia-smi -i 0 -pl 187.5"


def test_nvml_unavailable_is_a_power_limit_error(scenario: Scenario) -> None:
    run = scenario.run(
        TWO_GPUS,
        """
        out("current", error(lambda: PowerLimits(None).current_w()))
        out("applied", error(lambda: PowerLimits(None).applied(200.0).__enter__()))
        """,
        with_script=False,  # the fake then answers "driver not loaded"
    )
    for key in ("current", "applied"):
        assert run.values[key].startswith(
            "PowerLimitError: cannot reach NVML for power limits: the NVIDIA driver is not loaded"
        )
    assert run.log == []


# --------------------------------------------------------------------------- setting and restoring


def test_limits_are_set_in_order_and_restored_after_success(scenario: Scenario) -> None:
    run = scenario.run(
        TWO_GPUS,
        """
        limits = PowerLimits(None)
        with limits.session() as session:
            out("originals", session.originals_w)
            out("commands", session.restore_commands())
            for limit_w in (250.0, 200.0, 187.5):
                session.set_w(limit_w)
                out(f"current@{limit_w}", limits.current_w())
            out("applied", session.applied_w)
            out("refs_inside", refs())
        out("after", limits.current_w())
        with limits.applied(160.0) as one:
            out("applied_one", (one.applied_w, limits.current_w()))
        out("after_one", limits.current_w())
        out("refs", refs())
        """,
    )
    values = run.values
    assert values["originals"] == {0: 300.0, 1: 280.0}
    assert values["commands"] == ["sudo nvidia-smi -i 0 -pl 300", "sudo nvidia-smi -i 1 -pl 280"]
    assert values["current@250.0"] == {0: 250.0, 1: 250.0}
    assert values["current@187.5"] == {0: 187.5, 1: 187.5}
    assert values["applied"] == 187.5
    assert values["refs_inside"] == 1  # the session holds NVML while open
    assert values["after"] == values["after_one"] == {0: 300.0, 1: 280.0}
    assert values["applied_one"] == (160.0, {0: 160.0, 1: 160.0})
    assert values["refs"] == 0
    assert run.log == [
        "set 0 250000", "set 1 250000",
        "set 0 200000", "set 1 200000",
        "set 0 187500", "set 1 187500",
        *ORIGINALS,
        "set 0 160000", "set 1 160000",
        *ORIGINALS,
    ]  # fmt: skip
    assert "restored at exit" not in run.stderr  # nothing was left for the atexit hook


def test_restored_after_an_exception(scenario: Scenario) -> None:
    run = scenario.run(
        TWO_GPUS,
        """
        limits = PowerLimits(None)
        try:
            with limits.applied(200.0):
                raise RuntimeError("the benchmark failed")
        except RuntimeError as exc:
            out("raised", str(exc))
        out("after", limits.current_w())
        out("refs", refs())
        """,
    )
    assert run.values["raised"] == "the benchmark failed"  # not replaced
    assert run.values["after"] == {0: 300.0, 1: 280.0}
    assert run.values["refs"] == 0
    assert run.log == ["set 0 200000", "set 1 200000", *ORIGINALS]


def test_restored_after_keyboard_interrupt(scenario: Scenario) -> None:
    run = scenario.run(
        TWO_GPUS,
        """
        limits = PowerLimits(None)
        try:
            with limits.session() as session:
                session.set_w(250.0)
                session.set_w(200.0)
                os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C
                time.sleep(60)
        except KeyboardInterrupt:
            out("interrupted", True)
        out("after", limits.current_w())
        out("sigterm", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
        """,
    )
    assert run.values["interrupted"] is True
    assert run.values["after"] == {0: 300.0, 1: 280.0}
    assert run.values["sigterm"] is True  # the session's handler is gone again
    assert run.log == ["set 0 250000", "set 1 250000", "set 0 200000", "set 1 200000", *ORIGINALS]


def test_restored_on_sigterm(scenario: Scenario) -> None:
    write_script(scenario.script, TWO_GPUS)
    code = """
        with PowerLimits(None).applied(200.0):
            out("handler", signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL)
            print("ready", flush=True)
            time.sleep(120)
        out("not reached", True)
        """
    with subprocess.Popen(
        scenario.argv(code),
        env=scenario.env(),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:  # wait until the limits are set, then terminate it
            if line.strip() == "ready":
                break
            lines.append(line)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    run = scenario.result("".join(lines) + stdout, stderr, process.returncode)
    assert run.returncode == 128 + signal.SIGTERM, run.stderr
    assert run.values == {"handler": True}
    assert run.log == ["set 0 200000", "set 1 200000", *ORIGINALS]


def test_a_handler_someone_else_installed_is_left_alone(scenario: Scenario) -> None:
    run = scenario.run(
        TWO_GPUS,
        """
        def mine(signum, frame):
            pass
        signal.signal(signal.SIGTERM, mine)
        with PowerLimits(None).applied(200.0):
            out("inside", signal.getsignal(signal.SIGTERM) is mine)
        out("after", signal.getsignal(signal.SIGTERM) is mine)
        with PowerLimits(None).applied(200.0, handle_signals=False):
            out("opted_out", signal.getsignal(signal.SIGHUP) is signal.SIG_DFL)
        """,
    )
    assert run.values == {"inside": True, "after": True, "opted_out": True}


def test_a_session_never_exited_is_restored_at_exit(scenario: Scenario) -> None:
    run = scenario.run(
        TWO_GPUS,
        """
        session = PowerLimits(None).applied(200.0)
        session.__enter__()
        out("entered", session.applied_w)
        # The script ends with the session still open: the atexit hook restores.
        """,
    )
    assert run.values == {"entered": 200.0}
    assert run.log == ["set 0 200000", "set 1 200000", *ORIGINALS]
    assert "power limits restored at exit: GPU 0 300 W, GPU 1 280 W" in run.stderr


# --------------------------------------------------------------------------- refusals


def test_out_of_range_is_refused_before_anything_is_set(scenario: Scenario) -> None:
    run = scenario.run(
        TWO_GPUS,
        """
        limits = PowerLimits(None)
        out("too_high", error(lambda: limits.applied(360.0).__enter__()))
        out("gpu1_only", error(lambda: limits.applied(120.0).__enter__()))
        with limits.session() as session:
            session.set_w(250.0)
            out("in_session", error(lambda: session.set_w(99.0)))
            out("still", limits.current_w())
            # The fake, like NVML, refuses out-of-range limits itself too.
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            out("nvml", error(lambda: pynvml.nvmlDeviceSetPowerManagementLimit(handle, 99999)))
        out("after", limits.current_w())
        out("refs", refs())
        """,
    )
    values = run.values
    assert values["too_high"] == (
        "ValueError: power limit 360 W is outside what GPU 1 accepts (150.5 W to 350 W): "
        "nothing was set"
    )
    assert values["gpu1_only"] == (
        "ValueError: power limit 120 W is outside what GPU 1 accepts (150.5 W to 350 W): "
        "nothing was set"
    )
    assert values["in_session"].startswith(
        "ValueError: power limit 99 W is outside what GPU 0 accepts (100 W to 400 W); "
        "GPU 1 accepts (150.5 W to 350 W)"
    )
    assert values["still"] == {0: 250.0, 1: 250.0}
    assert values["nvml"] == "NVMLError_InvalidArgument: Invalid Argument"
    assert values["after"] == {0: 300.0, 1: 280.0}
    assert values["refs"] == 0
    assert run.log == ["set 0 250000", "set 1 250000", *ORIGINALS]


def test_no_permission_is_a_clear_error_and_changes_nothing(scenario: Scenario) -> None:
    run = scenario.run(
        "device 0 set_limit=0 limit_mw=300000\ndevice 1 set_limit=0 limit_mw=280000\n",
        """
        limits = PowerLimits(None)
        try:
            with limits.applied(200.0):
                out("not reached", True)
        except PowerLimitPermissionError as exc:
            out("error", str(exc))
            out("is_permission_error", isinstance(exc, PermissionError))
            out("code", exc.code)
        out("after", limits.current_w())
        out("refs", refs())
        """,
    )
    values = run.values
    assert values["error"] == (
        "setting the power limit of GPU 0 needs root (NVML: nvmlDeviceSetPowerManagementLimit: "
        "Insufficient Permissions (NVML error 4)). Run the sweep as root, or leave power limits "
        "out of it; by hand: sudo nvidia-smi -i 0 -pl 200"
    )
    assert values["is_permission_error"] is True
    assert values["code"] == 4
    assert values["after"] == {0: 300.0, 1: 280.0}
    assert values["refs"] == 0
    assert run.log == []


def test_permission_refused_on_a_later_gpu_restores_the_earlier_ones(scenario: Scenario) -> None:
    run = scenario.run(
        "device 0 limit_mw=300000\ndevice 1 set_limit=0\n",
        """
        limits = PowerLimits(None)
        out("error", error(lambda: limits.applied(200.0).__enter__()))
        out("after", limits.current_w())
        """,
    )
    assert run.values["error"].startswith(
        "PowerLimitPermissionError: setting the power limit of GPU 1 needs root"
    )
    assert run.values["after"] == {0: 300.0, 1: 300.0}
    assert run.log == ["set 0 200000", "set 0 300000"]  # GPU 1 was never changed


# --------------------------------------------------------------------------- failing to restore


def test_a_failed_restore_names_the_gpu_and_still_restores_the_others(scenario: Scenario) -> None:
    # GPU 0 accepts one set, then every further set fails as if the GPU were lost.
    script = TWO_GPUS.replace("device 0 ", "device 0 set_fail_after=1 ")
    run = scenario.run(
        script,
        """
        try:
            with PowerLimits(None).applied(200.0):
                pass
        except RestoreError as exc:
            out("error", str(exc))
            out("unrestored", exc.unrestored_w)
        """,
    )
    assert run.values["error"] == (
        "could not restore the power limit of GPU 0 to 300 W (nvmlDeviceSetPowerManagementLimit:"
        " GPU is lost (NVML error 15)). Restore by hand: sudo nvidia-smi -i 0 -pl 300"
    )
    assert run.values["unrestored"] == {0: 300.0}
    assert run.log == ["set 0 200000", "set 1 200000", "set 1 280000"]
    # The atexit hook tried once more, and said so.
    assert "could not restore the power limit of GPU 0" in run.stderr


def test_a_failed_restore_never_hides_the_original_exception(scenario: Scenario) -> None:
    script = TWO_GPUS.replace("device 0 ", "device 0 set_fail_after=1 ")
    run = scenario.run(
        script,
        """
        try:
            with PowerLimits(None).applied(200.0):
                raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            out("notes", exc.__notes__)
        """,
    )
    (note,) = run.values["notes"]
    assert note.startswith("could not restore the power limit of GPU 0 to 300 W")
    assert note.endswith("Restore by hand: sudo nvidia-smi -i 0 -pl 300")
    assert run.log == ["set 0 200000", "set 1 200000", "set 1 280000"]


def test_error_classes() -> None:
    assert issubclass(PowerLimitPermissionError, PowerLimitError)
    assert issubclass(PowerLimitPermissionError, PermissionError)
    assert issubclass(RestoreError, PowerLimitError)
