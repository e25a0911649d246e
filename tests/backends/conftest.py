"""Fixtures for the adapter tests: one fake server per backend kind, and a client that
reaches them all without sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.fakes.kind_servers import KINDS, FakeClient, FakeServer, fake_server


@pytest.fixture
def servers() -> dict[str, FakeServer]:
    return {kind: fake_server(kind) for kind in KINDS}


@pytest.fixture
async def client(servers: dict[str, FakeServer]) -> AsyncIterator[FakeClient]:
    c = FakeClient(servers)
    yield c
    await c.aclose()
