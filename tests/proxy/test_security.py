"""Keys, tenants and hostile input, against the proxy on a real socket (README: Security).

Two tenants' keys and one admin key are configured by their hashes. Every row of the
README's endpoint table is checked with no key, a wrong key, a tenant's key and the admin
key; each tenant sees only its own records, both by lookup and in the summary; an id
chosen to collide with another's record cannot overwrite or read it."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.auth import hash_key
from tests.conftest import serve_proxy
from tests.support.fakes.openai_backend import FakeState

KEY_A, KEY_B, KEY_ADMIN = "ep-tenant-a-key-1", "ep-tenant-b-key-2", "ep-admin-key-3"
KEYS = [
    f"team-a:{hash_key(KEY_A)}",
    f"team-b:{hash_key(KEY_B)}",
    f"ops:{hash_key(KEY_ADMIN)}:admin",
]
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def auth(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


@pytest.fixture
def proxy(fake_server: str, tmp_path: Path) -> Iterator[str]:
    with serve_proxy(tmp_path, fake_server, keys=KEYS, client_timeout=1.0) as url:
        yield url


def chat(proxy: str, key: str | None, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{proxy}/v1/chat/completions", json=CHAT, headers={**auth(key), **headers}, timeout=30
    )


# --- the endpoint table --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "open_"),
    [
        ("POST", "/v1/chat/completions", False),
        ("POST", "/v1/completions", False),
        ("POST", "/v1/embeddings", False),
        ("GET", "/v1/models", False),
        ("GET", "/v1/energy/summary", False),
        ("GET", "/v1/energy/requests/req-none", False),
        ("GET", "/v1/energy/label/fake-model.svg", False),
        ("GET", "/metrics", True),
        ("GET", "/healthz", True),
        ("GET", "/readyz", True),
    ],
)
def test_each_endpoint_without_and_with_a_key(
    proxy: str, method: str, path: str, open_: bool
) -> None:
    body = {"model": "fake-model", "input": "x", "prompt": "x", "messages": CHAT["messages"]}
    for key in (None, "not-a-key"):
        r = httpx.request(method, proxy + path, json=body if method == "POST" else None,
                          headers=auth(key))  # fmt: skip
        if open_:
            assert r.status_code in (200, 503), (path, r.status_code)
        else:
            assert r.status_code == 401, (path, key, r.status_code)
            assert r.json()["error"]["code"] == "invalid_api_key"
    for key in (KEY_A, KEY_ADMIN):
        r = httpx.request(method, proxy + path, json=body if method == "POST" else None,
                          headers=auth(key))  # fmt: skip
        assert r.status_code != 401, (path, r.status_code)


def test_protected_metrics_need_an_admin_key(fake_server: str, tmp_path: Path) -> None:
    with serve_proxy(tmp_path, fake_server, keys=KEYS, protect_metrics=True) as url:
        assert httpx.get(f"{url}/metrics").status_code == 401
        r = httpx.get(f"{url}/metrics", headers=auth(KEY_A))
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        assert httpx.get(f"{url}/metrics", headers=auth(KEY_ADMIN)).status_code == 200
        assert httpx.get(f"{url}/healthz").status_code == 200  # probes stay open


def test_metrics_on_their_own_address(fake_server: str, tmp_path: Path) -> None:
    from backends.local.launch import free_port

    port = free_port()
    with serve_proxy(tmp_path, fake_server, metrics_listen=f"127.0.0.1:{port}") as url:
        assert httpx.get(f"{url}/metrics").status_code == 404
        deadline = time.monotonic() + 10
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/metrics")
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert r.status_code == 200 and "energy_proxy_requests_total" in r.text


def test_the_old_api_key_flag_is_an_admin_key(fake_server: str, tmp_path: Path) -> None:
    with serve_proxy(tmp_path, fake_server, api_keys=["plain-old-key"]) as url:
        assert chat(url, None).status_code == 401
        r = chat(url, "plain-old-key")
        assert r.status_code == 200
        # admin: sees every record, and the tenant counter names it "admin"
        rid = r.headers["x-energy-request-id"]
        assert (
            httpx.get(f"{url}/v1/energy/requests/{rid}", headers=auth("plain-old-key")).status_code
            == 200
        )
        assert (
            'energy_proxy_tenant_requests_total{status="200",tenant="admin"} 1.0'
            in httpx.get(f"{url}/metrics").text
        )


# --- tenants -------------------------------------------------------------------------------


def lookup(proxy: str, rid: str, key: str) -> httpx.Response:
    return httpx.get(f"{proxy}/v1/energy/requests/{rid}", headers=auth(key))


def test_a_tenant_sees_only_its_own_records_and_summary(proxy: str) -> None:
    a = chat(proxy, KEY_A, **{"x-request-id": "order-1"})
    b1, b2 = chat(proxy, KEY_B), chat(proxy, KEY_B)
    assert a.status_code == b1.status_code == b2.status_code == 200
    a_id = a.headers["x-energy-request-id"]
    # lookup, both ways, by the proxy's id and by the client's own
    assert lookup(proxy, a_id, KEY_A).json()["request_id"] == a_id
    assert lookup(proxy, "order-1", KEY_A).json()["request_id"] == a_id
    assert lookup(proxy, a_id, KEY_B).status_code == 404
    assert lookup(proxy, "order-1", KEY_B).status_code == 404
    assert lookup(proxy, b1.headers["x-energy-request-id"], KEY_A).status_code == 404
    assert lookup(proxy, a_id, KEY_ADMIN).status_code == 200  # admins see all

    def count(key: str) -> int:
        rows = httpx.get(f"{proxy}/v1/energy/summary", headers=auth(key)).json()["rows"]
        return sum(r["count"] for r in rows)

    assert (count(KEY_A), count(KEY_B), count(KEY_ADMIN)) == (1, 2, 3)
    metrics = httpx.get(f"{proxy}/metrics").text
    assert 'energy_proxy_tenant_requests_total{status="200",tenant="team-b"} 2.0' in metrics


def test_a_colliding_request_id_overwrites_nothing(proxy: str) -> None:
    a = chat(proxy, KEY_A, **{"x-request-id": "shared-id"})
    a_id = a.headers["x-energy-request-id"]
    before = lookup(proxy, a_id, KEY_ADMIN).json()
    # Tenant B reuses A's client id, then A's proxy id, as its own x-request-id.
    b = chat(proxy, KEY_B, **{"x-request-id": "shared-id"})
    chat(proxy, KEY_B, **{"x-request-id": a_id})
    assert b.headers["x-energy-request-id"] != a_id
    assert lookup(proxy, a_id, KEY_ADMIN).json() == before  # untouched
    assert lookup(proxy, "shared-id", KEY_A).json()["request_id"] == a_id
    assert (
        lookup(proxy, "shared-id", KEY_B).json()["request_id"] == b.headers["x-energy-request-id"]
    )
    assert lookup(proxy, a_id, KEY_B).json()["request_id"] != a_id  # B's own, by client id


# --- hostile input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rid", "why"),
    [
        ("x" * 1_000, "longer than 128 characters"),
        ("<script>alert(1)</script>", "characters other than"),
    ],
)
def test_unusable_request_ids_are_replaced_and_the_client_told(
    proxy: str, fake: tuple[Any, FakeState], rid: str, why: str
) -> None:
    _, state = fake
    r = chat(proxy, KEY_A, **{"x-request-id": rid})
    assert r.status_code == 200
    mine = r.headers["x-energy-request-id"]
    assert r.headers["x-request-id"] == mine  # the proxy's own instead
    assert why in r.headers["x-request-id-rejected"]
    assert "client_request_id" not in r.json()["energy"]
    assert state.requests[-1]["headers"]["x-request-id"] == mine  # not the client's


def test_too_many_or_too_large_headers_are_431(proxy: str) -> None:
    r = chat(proxy, KEY_A, **{"x-request-id": "x" * 100_000})  # the 100,000 characters
    assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
    many = {f"x-h{i}": "1" for i in range(150)}
    r = httpx.post(f"{proxy}/v1/chat/completions", json=CHAT, headers={**auth(KEY_A), **many})
    assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
    r = httpx.get(f"{proxy}/v1/models", headers={**auth(KEY_A), "x-big": "y" * 40_000})
    assert r.status_code == 431


def test_long_model_and_category_are_refused_without_echo(proxy: str) -> None:
    r = httpx.post(f"{proxy}/v1/chat/completions", headers=auth(KEY_A),
                   json={**CHAT, "model": "m" * 5000})  # fmt: skip
    assert r.status_code == 400 and "m" * 300 not in r.text
    r = httpx.post(f"{proxy}/v1/chat/completions", json=CHAT,
                   headers={**auth(KEY_A), "x-prompt-category": "c" * 500})  # fmt: skip
    assert r.status_code == 400 and "c" * 100 not in r.text


def raw_request(port: int, head: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(head)
    return s


def test_a_trickled_body_times_out_with_408(proxy: str) -> None:
    port = int(proxy.rsplit(":", 1)[1])
    body = json.dumps(CHAT).encode()
    s = raw_request(
        port,
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + f"authorization: Bearer {KEY_A}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body[:5],
    )
    with s:
        answer = b""
        started = time.monotonic()
        while b"\r\n\r\n" not in answer and time.monotonic() - started < 20:
            s.sendall(body[5:6])  # one byte now and then, never the rest
            s.settimeout(0.3)
            try:
                answer += s.recv(65536)
            except TimeoutError:
                continue
        # The head and the body can come in two writes (and segments): read the body whole.
        head, _, got = answer.partition(b"\r\n\r\n")
        length = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))  # type: ignore[union-attr]
        s.settimeout(10)
        while len(got) < length and (chunk := s.recv(65536)):
            got += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request_timeout" in got, (head, got)


def test_an_answer_never_read_frees_the_backend(proxy: str, fake: tuple[Any, FakeState]) -> None:
    """A client that asks for a long stream and never reads it: after the client timeout
    the proxy drops it and closes the backend's stream (its slot is free again)."""
    _, state = fake
    state.tokens = ("x" * 4096,) * 20_000  # ~80 MB of events: more than any socket buffers
    port = int(proxy.rsplit(":", 1)[1])
    body = json.dumps({**CHAT, "stream": True, "max_tokens": 20_000}).encode()
    s = raw_request(
        port,
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + f"authorization: Bearer {KEY_A}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body,
    )
    closed = '{status="499",tenant="team-a"} 1.0'
    with s:  # never read
        deadline = time.monotonic() + 30
        while closed not in httpx.get(f"{proxy}/metrics").text:
            assert time.monotonic() < deadline, "the unread answer was never given up"
            time.sleep(0.1)
    metrics = httpx.get(f"{proxy}/metrics").text
    # Accounted as a client that went away (499), and no longer in flight to the backend.
    assert 'energy_proxy_inflight_requests{backend="fake"} 0.0' in metrics
    rows = httpx.get(f"{proxy}/v1/energy/summary", headers=auth(KEY_ADMIN)).json()["rows"]
    assert rows == []  # not a successful request


# --- the backend's own key -----------------------------------------------------------------


def keyed_backend(secret: str) -> tuple[Any, list[dict[str, str]]]:
    """A backend started with an API key: every endpoint wants it (as vLLM's --api-key)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    seen: list[dict[str, str]] = []

    def guard(request: Request) -> Response | None:
        seen.append({"path": request.url.path, **request.headers})
        if request.headers.get("authorization") != f"Bearer {secret}":
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        return None

    async def models(request: Request) -> Response:
        return guard(request) or JSONResponse(
            {"object": "list", "data": [{"id": "keyed-model", "object": "model"}]}
        )

    async def metrics(request: Request) -> Response:
        return guard(request) or PlainTextResponse("vllm:num_requests_running 0\n")

    async def health(request: Request) -> Response:
        return guard(request) or PlainTextResponse("")

    async def chat(request: Request) -> Response:
        return guard(request) or JSONResponse(
            {"id": "c", "object": "chat.completion", "model": "keyed-model",
             "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                          "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        )  # fmt: skip

    app = Starlette(routes=[
        Route("/v1/models", models), Route("/metrics", metrics), Route("/health", health),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ])  # fmt: skip
    return app, seen


@pytest.mark.parametrize("forward", [False, True])
def test_a_backends_own_key_goes_with_every_call_and_the_clients_only_if_configured(
    tmp_path: Path, forward: bool
) -> None:
    from tests.support.servers import ServerThread

    app, seen = keyed_backend("backend-secret")
    with ServerThread(app) as url:
        backend = {"name": "keyed", "url": url, "api_key": "backend-secret", "kind": "vllm",
                   "forward_authorization": forward}  # fmt: skip
        with serve_proxy(tmp_path, url, backends=[backend], backend_metrics_s=0.05) as proxy:
            # Discovery, health and metrics were allowed in: the backend is ready.
            deadline = time.monotonic() + 10
            while httpx.get(f"{proxy}/readyz").status_code != 200:
                assert time.monotonic() < deadline, httpx.get(f"{proxy}/readyz").text
                time.sleep(0.05)
            r = httpx.post(
                f"{proxy}/v1/chat/completions",
                json={"model": "keyed-model", "messages": [{"role": "user", "content": "hi"}]},
                headers={"authorization": "Bearer the-clients-own"},
            )
            assert r.status_code == (401 if forward else 200)
    by_path = {s["path"]: s["authorization"] for s in seen if "authorization" in s}
    assert by_path["/v1/models"] == by_path["/metrics"] == "Bearer backend-secret"
    chats = [s.get("authorization") for s in seen if s["path"] == "/v1/chat/completions"]
    # Forwarding passes the client's header on (here the backend then refuses it).
    assert chats == (["Bearer the-clients-own"] if forward else ["Bearer backend-secret"])
