"""Token-weighted vs equal attribution through the relay (in-process, constant 100 W)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from metering.sources.constant import ConstantSource
from proxy.app import create_app
from proxy.relay.upstream import HttpxUpstream
from tests.conftest import proxy_settings
from tests.support.fakes.openai_backend import make_fake_backend


async def overlap_run(mode: str, tmp_path: Path) -> dict[str, Any]:
    """A long-prompt stream in prefill (backend delay 1 s) and a short non-streaming request
    that runs entirely inside that prefill; returns the short request's energy object."""
    backend_app, _ = make_fake_backend()
    app = create_app(
        proxy_settings(tmp_path, attribution=mode, idle_watts=0.0),
        upstream=HttpxUpstream(30.0, transport=httpx.ASGITransport(app=backend_app)),
        sources=[ConstantSource(100.0, start_s=time.monotonic())],
    )
    async with (
        app.running(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as c,
    ):
        long_prompt = {"role": "user", "content": "word " * 800}  # ~1000 tokens
        a = asyncio.create_task(
            c.post(
                "/v1/chat/completions",
                json={"model": "fake-model", "messages": [long_prompt], "stream": True},
                headers={"x-fake-delay-s": "1.0"},
            )
        )
        await asyncio.sleep(0.1)
        b = await c.post(
            "/v1/chat/completions",
            json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
            headers={"x-fake-delay-s": "0.3"},
        )
        await a
        energy: dict[str, Any] = b.json()["energy"]
        return energy


@pytest.mark.parametrize("mode", ["tokens", "equal"])
async def test_short_request_beside_a_long_prefill(mode: str, tmp_path: Path) -> None:
    energy = await overlap_run(mode, tmp_path)
    alone_j = 100.0 * energy["duration_s"]  # what it would get running alone
    if mode == "tokens":
        # weight 1 against ~1000 prompt tokens in prefill: about a thousandth
        assert energy["joules"] < 0.05 * alone_j
    else:
        # an equal split with the one other request in flight: about half
        assert energy["joules"] == pytest.approx(0.5 * alone_j, rel=0.2)
