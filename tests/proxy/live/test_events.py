"""The live events (`/v1/energy/events`) and what feeds them (proxy/live/)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

import proxy.live.stream
from metering.accounting.ledger import Ledger
from proxy.auth import hash_key
from proxy.live.feed import Counters, power_sample
from proxy.live.hub import EventHub, TooManySubscribers, sse_event
from tests.conftest import serve_proxy
from tests.support.polling import wait_for

KEY_A, KEY_B, KEY_ADMIN = "live-key-a-0001", "live-key-b-0002", "live-key-admin-3"
KEYS = [f"a:{hash_key(KEY_A)}", f"b:{hash_key(KEY_B)}", f"ops:{hash_key(KEY_ADMIN)}:admin"]


class EventReader:
    """Reads server-sent events off a streaming httpx response, one at a time."""

    def __init__(self, response: httpx.Response) -> None:
        self._lines = response.iter_lines()

    def next(self) -> tuple[str, Any]:
        kind, data = "message", ""
        for line in self._lines:
            if line == "":
                if data:
                    return kind, json.loads(data)
                kind = "message"
                continue
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].lstrip(" ")
        raise EOFError("the stream ended")

    def until(self, kind: str, match: Any = None, limit: int = 200) -> Any:
        for _ in range(limit):
            k, d = self.next()
            if k == kind and (match is None or match(d)):
                return d
        raise AssertionError(f"no {kind!r} event in {limit}")


@pytest.fixture
def events_of() -> Iterator[Any]:
    """`events_of(url, key)`: a reader of the proxy's live events (closed after the test)."""
    opened: list[Any] = []

    def open_(url: str, key: str | None = None) -> EventReader:
        client = httpx.Client(timeout=httpx.Timeout(30.0))
        headers = {"authorization": f"Bearer {key}"} if key else {}
        cm = client.stream("GET", url + "/v1/energy/events", headers=headers)
        response = cm.__enter__()
        opened.append((client, cm))
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return EventReader(response)

    yield open_
    for client, cm in opened:
        cm.__exit__(None, None, None)
        client.close()


def chat(url: str, key: str | None = None, model: str = "fake-model") -> httpx.Response:
    r = httpx.post(
        url + "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        headers={"authorization": f"Bearer {key}"} if key else {},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r


# --- the hub and the math, alone -----------------------------------------------------------


async def test_the_hub_fans_out_filters_by_tenant_and_drops_who_falls_behind() -> None:
    drops: list[int] = []
    hub = EventHub(buffer_events=3, max_subscribers=3, on_drop=lambda: drops.append(1))
    everyone, a, b = hub.subscribe(None), hub.subscribe("a"), hub.subscribe("b")
    with pytest.raises(TooManySubscribers):
        hub.subscribe(None)
    hub.publish("request", {"n": 1}, tenant="a")
    hub.publish("power", {"w": 2})
    assert await everyone.next_batch(1.0) == [
        sse_event("request", {"n": 1}),
        sse_event("power", {"w": 2}),
    ]
    assert await a.next_batch(1.0) == [sse_event("request", {"n": 1}), sse_event("power", {"w": 2})]
    assert await b.next_batch(1.0) == [sse_event("power", {"w": 2})]  # not a's request
    # b stops reading: its buffer (3) fills, the next event drops it; the others go on.
    for n in range(4):
        hub.publish("power", {"w": n})
        await everyone.next_batch(1.0)
        await a.next_batch(1.0)
    assert b.dropped and len(hub) == 2 and hub.dropped_total == 1 and drops == [1]
    assert await b.next_batch(1.0) == []  # it returns at once, and its stream ends
    assert await everyone.next_batch(0.01) == []  # nothing new: a timeout, not a hang
    hub.close()
    assert everyone.closed and await everyone.next_batch(5.0) == []


def test_an_event_is_one_data_line_whatever_the_strings_hold() -> None:
    event = sse_event("request", {"model": "a\nb\r\n\ndata: x", "n": 1})
    head, data, end = event.split(b"\n", 2)
    assert head == b"event: request" and end == b"\n"
    assert json.loads(data.removeprefix(b"data: ")) == {"model": "a\nb\r\n\ndata: x", "n": 1}


def test_power_samples_split_what_the_ledger_counted() -> None:
    led = Ledger(["gpu"])
    led.record("gpu", 0.0, 0.0)
    ch = led.channels["gpu"]
    before = Counters(0.0, ch.measured_j, ch.attributed_j, ch.idle_j)
    led.record("gpu", 100.0, 1.0)  # idle: nothing in flight
    t = led.start(1.0)
    led.record("gpu", 400.0, 2.0)  # 300 J attributed
    led.finish(t)
    after = Counters(2.0, ch.measured_j, ch.attributed_j, ch.idle_j)
    sample = power_sample(before, after)
    assert sample == pytest.approx(
        {"watts": 200.0, "attributed_watts": 150.0, "idle_watts": 50.0, "untracked_watts": 0.0}
    )
    assert power_sample(after, after) is None
    reset = Counters(3.0, 0.0, 0.0, 0.0)  # a counter that went back counts nothing
    assert power_sample(after, reset) == {
        "watts": 0.0, "attributed_watts": 0.0, "idle_watts": 0.0, "untracked_watts": 0.0
    }


# --- the endpoint, on a real socket ----------------------------------------------------------


def test_a_finished_request_arrives_as_told_to_its_client(
    fake_server: str, tmp_path: Path, events_of: Any
) -> None:
    with serve_proxy(tmp_path, fake_server) as url:
        first = chat(url)  # before the page connects: in its hello
        events = events_of(url)
        hello = events.until("hello")
        assert hello["version"] == 1
        assert [s["name"] for s in hello["sources"]] == ["constant"]
        assert hello["sources"][0]["kind"] == "configured"  # a figure given, not measured
        assert hello["carbon"]["g_per_kwh"] == 500.0
        assert [r["energy"]["request_id"] for r in hello["requests"]] == [
            first.headers["x-request-id"]
        ]
        with OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
            raw = client.chat.completions.with_raw_response.create(
                model="fake-model", messages=[{"role": "user", "content": "Count to 3."}]
            )
        rid = raw.headers["x-request-id"]
        told = raw.parse().model_extra["energy"]  # type: ignore[index]
        seen = events.until("request", lambda d: d["energy"]["request_id"] == rid)
        assert seen["energy"] == told
        assert seen["status"] == 200 and seen["backend"] == "fake"
        assert abs(seen["finished_at"] - time.time()) < 3600  # unix seconds
        power = events.until("power")
        src = power["sources"]["constant"]
        assert src["watts"] == pytest.approx(100.0, rel=1e-6)  # the constant source's draw
        assert src["attributed_watts"] + src["idle_watts"] == pytest.approx(100.0, rel=1e-6)
        assert power["carbon"]["g_per_kwh"] == 500.0 and power["inflight"] == 0
        assert live_metrics(url) == {
            "energy_proxy_live_streams": 1.0,
            "energy_proxy_live_streams_dropped_total": 0.0,
        }


def test_keys_tenants_see_their_own_requests_and_admins_all(
    fake_server: str, tmp_path: Path, events_of: Any
) -> None:
    with serve_proxy(tmp_path, fake_server, keys=KEYS) as url:
        for key in (None, "wrong"):
            r = httpx.get(
                url + "/v1/energy/events",
                headers={"authorization": f"Bearer {key}"} if key else {},
            )
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        a, b, ops = events_of(url, KEY_A), events_of(url, KEY_B), events_of(url, KEY_ADMIN)
        for reader in (a, b, ops):
            reader.until("hello")
        ra = chat(url, KEY_A).headers["x-request-id"]
        rb = chat(url, KEY_B).headers["x-request-id"]
        assert a.until("request")["energy"]["request_id"] == ra  # not b's, which came after
        assert b.until("request")["energy"]["request_id"] == rb
        got = {ops.until("request")["energy"]["request_id"] for _ in range(2)}
        assert got == {ra, rb}
        # A page opened later gets only its tenant's requests in its hello.
        hello_a = events_of(url, KEY_A).until("hello")
        assert [r["energy"]["request_id"] for r in hello_a["requests"]] == [ra]


def test_a_page_that_stops_reading_is_dropped_and_cut_off(
    fake_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: Any
) -> None:
    monkeypatch.setattr(proxy.live.stream, "SEND_TIMEOUT_S", 0.2)
    server = serve_proxy(tmp_path, fake_server)
    with server as url:
        app: Any = server.server.config.app
        hub = app.live.hub
        hub.buffer_events = 16
        host, port = url.removeprefix("http://").split(":")
        # A client with a tiny receive window that reads the headers and then nothing.
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect((host, int(port)))
        stalled.sendall(f"GET /v1/energy/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert stalled.recv(64).startswith(b"HTTP/1.1 200")
        assert wait_for(lambda: len(hub) == 1)
        # Events of 100 KB, published on the server's loop until the socket buffers and
        # the stream's buffer are full and it is dropped; requests are answered meanwhile.
        loop = server.loop
        assert loop is not None
        padding = "x" * 100_000
        for i in range(3000):  # 300 MB at most; a few MB fill a socket's buffers
            loop.call_soon_threadsafe(hub.publish, "power", {"pad": padding, "n": i})
            if i % 10 == 0:
                chat(url)  # answered (200) while the page's stream is stuck
                if hub.dropped_total:
                    break
        assert wait_for(lambda: hub.dropped_total == 1)
        assert len(hub) == 0
        assert live_metrics(url) == {
            "energy_proxy_live_streams": 0.0,
            "energy_proxy_live_streams_dropped_total": 1.0,
        }
        # The proxy goes on serving, and a new page is welcome.
        assert chat(url).status_code == 200
        with httpx.stream("GET", url + "/v1/energy/events", timeout=30) as r:
            assert EventReader(r).next()[0] == "hello"
        # The stuck send is given up (SEND_TIMEOUT_S): the server closes the connection.
        stalled.settimeout(30)
        while stalled.recv(1 << 20):
            pass
        stalled.close()
    # ... so the shutdown did not wait for the stuck stream.
    assert "graceful shutdown exceeded" not in capfd.readouterr().err


def test_one_key_cannot_take_every_stream(fake_server: str, tmp_path: Path, events_of: Any) -> None:
    server = serve_proxy(tmp_path, fake_server, keys=KEYS)
    with server as url:
        app: Any = server.server.config.app
        app.live.hub.max_per_key = 1
        held = events_of(url, KEY_A)
        held.until("hello")
        r = httpx.get(url + "/v1/energy/events", headers={"authorization": f"Bearer {KEY_A}"})
        assert r.status_code == 503 and "this key has 1" in r.json()["error"]["message"]
        events_of(url, KEY_B).until("hello")  # another key still gets one


def test_streams_are_capped_and_end_when_the_server_stops(
    fake_server: str, tmp_path: Path, events_of: Any
) -> None:
    server = serve_proxy(tmp_path, fake_server)
    with server as url:
        app: Any = server.server.config.app
        app.live.hub.max_subscribers = 2
        first, last = events_of(url), events_of(url)  # kept: a reader dropped disconnects
        first.until("hello")
        last.until("hello")
        r = httpx.get(url + "/v1/energy/events", timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "too_many_streams"
        assert server.loop is not None
        server.loop.call_soon_threadsafe(app.close_live_streams)  # what ProxyServer does
        with pytest.raises(EOFError):  # the stream ends (the server is stopping)
            last.until("never")


def live_metrics(url: str) -> dict[str, float]:
    """The live-stream series of /metrics, through prometheus_client's own parser."""
    text = httpx.get(url + "/metrics").text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("energy_proxy_live_streams")
        for sample in family.samples
    }


def test_no_subscriber_costs_nothing_on_the_request_path() -> None:
    hub = EventHub()
    hub.publish("request", {"x": object()})  # not even encoded (this would not encode)
    assert hub.dropped_total == 0 and asyncio.iscoroutinefunction(hub.publish) is False
