"""How often the backends' gauges are read: every period while nothing may be waiting,
at once and then every `fast_s` while requests may be (more in flight than the backend
runs at once). Counted reads, never timed: the period is an hour, so every read beyond the
first is one the policy asked for."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from backends.backend import Backend, BackendConfig
from backends.fetch import Headers
from backends.registry import BackendRegistry

HOUR_S = 3600.0


class _NoGetter:
    async def get_json(self, url: str, timeout_s: float, headers: Headers = None) -> Any:
        raise AssertionError("not used here")

    async def get_text(self, url: str, timeout_s: float, headers: Headers = None) -> str:
        raise AssertionError("not used here")


async def async_wait_for(cond: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """`cond()` until true or `timeout_s` passes (a deadline, not a measure)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


def _registry() -> tuple[BackendRegistry, list[int]]:
    reg = BackendRegistry([Backend(BackendConfig(name="v", url="http://v"))], _NoGetter())
    reads = [0]

    async def counted() -> None:
        reads[0] += 1

    reg.scrape_own_metrics = counted  # type: ignore[method-assign]
    return reg, reads


async def test_a_quiet_backend_is_read_once_a_period_and_at_once_when_woken() -> None:
    reg, reads = _registry()
    task = asyncio.create_task(reg.run_own_metrics(HOUR_S, 0.01, lambda name: False))
    try:
        assert await async_wait_for(lambda: reads[0] == 1)
        await asyncio.sleep(0.1)
        assert reads[0] == 1  # the next is an hour away
        reg.wake_gauges("v")  # a request opened with more in flight than it may run
        assert await async_wait_for(lambda: reads[0] == 2)
        await asyncio.sleep(0.1)
        assert reads[0] == 2  # once: quiet again
    finally:
        task.cancel()


async def test_while_requests_may_wait_the_gauges_are_read_every_fast_period() -> None:
    reg, reads = _registry()
    busy = [True]
    task = asyncio.create_task(reg.run_own_metrics(HOUR_S, 0.01, lambda name: busy[0]))
    try:
        assert await async_wait_for(lambda: reads[0] >= 5)
        busy[0] = False
        settled = reads[0]
        await asyncio.sleep(0.1)
        assert reads[0] <= settled + 1  # the read under way, then back to the hour
    finally:
        task.cancel()
