"""The fake NVML library loaded into this process, shared by the metering tests.

Loaded with RTLD_GLOBAL before pynvml's first nvmlInit, so pynvml's
`CDLL("libnvidia-ml.so.1")` resolves to it; pynvml keeps that library for the life of the
process, so every in-process test shares it and steers it by (re)writing its script.
"""

from __future__ import annotations

import ctypes
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pynvml
import pytest

from tests.fakenvml import build_fake_nvml, fake_init_refs, preload_fake_nvml, write_script


@pytest.fixture(scope="session")
def fake_nvml_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fake_nvml(tmp_path_factory.mktemp("fakenvml"))


@pytest.fixture(scope="session")
def fake_lib(fake_nvml_dir: Path) -> ctypes.CDLL:
    """The fake, loaded into this process before pynvml loads anything."""
    loaded = pynvml.nvmlLib
    if loaded is not None and not hasattr(loaded, "fakeNvmlInitRefs"):
        pytest.fail("pynvml already loaded a real libnvidia-ml.so.1 in this process")
    return preload_fake_nvml(fake_nvml_dir)


@dataclass
class Fake:
    """The in-process fake: its script, its set-limit log and its nvmlInit count."""

    lib: ctypes.CDLL
    script: Path
    log: Path

    def write(self, text: str) -> None:
        write_script(self.script, textwrap.dedent(text))

    @property
    def init_refs(self) -> int:
        return fake_init_refs(self.lib)

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture
def fake(fake_lib: ctypes.CDLL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fake]:
    """The in-process fake with a fresh script; checks nvmlInit/nvmlShutdown balance."""
    fake = Fake(fake_lib, tmp_path / "nvml.script", tmp_path / "nvml.log")
    fake.write("device 0\n")
    monkeypatch.setenv("FAKE_NVML_SCRIPT", str(fake.script))
    monkeypatch.setenv("FAKE_NVML_LOG", str(fake.log))
    assert fake.init_refs == 0
    yield fake
    assert fake.init_refs == 0, "a test left NVML initialised (a source not closed?)"


