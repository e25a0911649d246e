"""Shared fixtures: a fake backend, and a proxy over it with a constant power source."""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pynvml
import pytest

from metering.sources.constant import ConstantSource
from proxy.app import EnergyProxyApp, create_app
from proxy.relay.upstream import HttpxUpstream
from proxy.settings import Settings
from tests.support.fakenvml import build_fake_nvml, fake_init_refs, preload_fake_nvml, write_script
from tests.support.fakes.openai_backend import FakeState, make_fake_backend
from tests.support.pg import PostgresServer
from tests.support.servers import ServerThread


@pytest.fixture(scope="session", autouse=True)
def _state_home_of_our_own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Point $XDG_STATE_HOME (where a proxy started without --db keeps its request store)
    at a directory of this run, for this process and every child it starts: a test never
    writes the user's own store, nor reads one left by another version of the code."""
    state = tmp_path_factory.mktemp("state-home")
    before = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(state)
    yield
    if before is None:
        del os.environ["XDG_STATE_HOME"]
    else:
        os.environ["XDG_STATE_HOME"] = before


@pytest.fixture(scope="session", autouse=True)
def _ctrl_c_reaches_the_programs_under_test() -> None:
    """A shell without job control starts a command run with `&` with SIGINT ignored, and
    children inherit that: Python then never raises KeyboardInterrupt, so the tests of what
    Ctrl-C does (the demo, the bench's partial files and power limits) failed whenever the
    suite itself was started in the background. Catching SIGINT here again (Python's own
    handler) gives every child the default disposition back at exec."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test() -> Iterator[None]:
    """Finalize what each test leaves in reference cycles before the next test starts.

    An unclosed socket or transport in a cycle warns (ResourceWarning) only when the
    garbage collector reaches it; pytest turns that into an error of whichever test is
    running then. Without this, that was a random later test: one allocating a lot, such
    as a hypothesis test, triggers the collection, fails once in a full run and passes
    alone. Collected here, a leak fails the test that leaked, every time."""
    yield
    gc.collect()


def proxy_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for a test proxy; its request store lives in `tmp_path`."""
    base: dict[str, Any] = {
        "db": str(tmp_path / "requests.db"),
        "backends": ["fake=http://fake-backend"],
        "power_source": "constant:100",
        "idle_watts": 40.0,
        "carbon_intensity": 500.0,
    }
    base.update(overrides)
    return Settings.model_validate(base)


def serve_proxy(tmp_path: Path, backend_url: str, **overrides: Any) -> ServerThread:
    """The proxy on a real 127.0.0.1 socket (`with serve_proxy(...) as url:`), in front of
    `backend_url` as backend "fake", drawing a constant 100 W."""
    overrides.setdefault("backends", [f"fake={backend_url}"])
    settings = proxy_settings(tmp_path, **overrides)
    return ServerThread(
        create_app(settings, sources=[ConstantSource(100.0, start_s=time.monotonic())])
    )


@pytest.fixture
def fake() -> tuple[Any, FakeState]:
    return make_fake_backend()


@pytest.fixture
async def proxy_app(fake: tuple[Any, FakeState], tmp_path: Path) -> AsyncIterator[EnergyProxyApp]:
    """The proxy, in-process, forwarding to the in-process fake backend (no sockets)."""
    backend_app, _ = fake
    upstream = HttpxUpstream(30.0, transport=httpx.ASGITransport(app=backend_app))
    app = create_app(
        proxy_settings(tmp_path),
        upstream=upstream,
        sources=[ConstantSource(100.0, start_s=0.0)],
    )
    async with app.running():
        yield app


@pytest.fixture
async def client(proxy_app: EnergyProxyApp) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=proxy_app), base_url="http://proxy"
    ) as c:
        yield c


@pytest.fixture
def fake_server(fake: tuple[Any, FakeState]) -> Iterator[str]:
    """The fake backend on a real 127.0.0.1 socket."""
    backend_app, _ = fake
    with ServerThread(backend_app) as url:
        yield url


# --- the fake NVML library, loaded into this process ----------------------------------------
# Loaded with RTLD_GLOBAL before pynvml's first nvmlInit, so pynvml's
# `CDLL("libnvidia-ml.so.1")` resolves to it; pynvml keeps that library for the life of the
# process, so every in-process test shares it and steers it by (re)writing its script.


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
def fake_nvml(
    fake_lib: ctypes.CDLL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Fake]:
    """The in-process fake with a fresh script; checks nvmlInit/nvmlShutdown balance."""
    fake = Fake(fake_lib, tmp_path / "nvml.script", tmp_path / "nvml.log")
    fake.write("device 0\n")
    monkeypatch.setenv("FAKE_NVML_SCRIPT", str(fake.script))
    monkeypatch.setenv("FAKE_NVML_LOG", str(fake.log))
    assert fake.init_refs == 0
    yield fake
    assert fake.init_refs == 0, "a test left NVML initialised (a source not closed?)"


# --- PostgreSQL, for the request store -------------------------------------------------------


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One private PostgreSQL server for the session (tests/support/pg.py), on 127.0.0.1."""
    server = PostgresServer()
    with server:
        yield server


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """A fresh, empty database on the session's server; its URL."""
    return postgres.new_database()
