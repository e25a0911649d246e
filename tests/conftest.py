"""Shared fixtures: a fake backend, and a proxy over it with a constant power source."""

from __future__ import annotations

import gc
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from metering.sources.constant import ConstantSource
from proxy.app import EnergyProxyApp, create_app
from proxy.settings import Settings
from proxy.upstream import HttpxUpstream
from tests.fakes.openai_backend import FakeState, make_fake_backend
from tests.servers import ServerThread


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
    settings = proxy_settings(tmp_path, backends=[f"fake={backend_url}"], **overrides)
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
