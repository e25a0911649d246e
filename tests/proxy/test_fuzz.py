"""Fuzzing the proxy on a real socket (hypothesis): arbitrary bodies and headers, with and
without a key. Whatever arrives, the proxy itself answers no 5xx, keeps serving, and every
request it answered 200 has its record stored."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.auth import hash_key
from tests.conftest import serve_proxy

KEY = "ep-fuzz-key"
PATHS = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/models",
    "/v1/energy/summary",
    "/v1/energy/requests/x",
    "/healthz",
    "/nope",
]

TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=300)
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
CHAT_MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.just("user"), "content": TEXT}), min_size=1, max_size=3
)
# Mostly requests that a backend would answer, with odd values where they may go wrong.
VALID = st.fixed_dictionaries(
    {"model": st.just("fake-model"), "messages": CHAT_MESSAGES},
    optional={
        "stream": st.booleans(),
        "stream_options": JSONISH,
        "max_tokens": st.integers(1, 8),
        "user": TEXT,
    },
)
PAYLOAD = VALID | st.fixed_dictionaries(
    {"model": st.sampled_from(["fake-model", "other", ""]) | TEXT},
    optional={
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "system"]) | TEXT, "content": TEXT | JSONISH}
            ),
            max_size=4,
        )
        | JSONISH,
        "prompt": TEXT | JSONISH,
        "input": TEXT | JSONISH,
        "stream": st.booleans() | JSONISH,
        "stream_options": JSONISH,
        "max_tokens": st.integers(-5, 50) | JSONISH,
    },
)
BODY = PAYLOAD.map(lambda p: json.dumps(p).encode()) | st.binary(max_size=2000)
POST_PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
HEADER_NAME = st.sampled_from(
    [
        "x-request-id",
        "x-prompt-category",
        "content-type",
        "authorization",
        "accept",
        "x-custom",
        "connection",
        "te",
        "transfer-encoding-x",
        "cookie",
    ]
) | st.from_regex(r"x-[a-z0-9-]{1,20}", fullmatch=True).filter(lambda n: not n.startswith("x-fake"))
HEADERS = st.dictionaries(
    HEADER_NAME,
    st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=200),
    max_size=8,
)

seen: Counter[str] = Counter()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tests.support.fakes.openai_backend import make_fake_backend
    from tests.support.servers import ServerThread

    app, _ = make_fake_backend()
    tmp = tmp_path_factory.mktemp("fuzz")
    with (
        ServerThread(app) as backend,
        serve_proxy(tmp, backend, keys=[f"t:{hash_key(KEY)}"]) as url,
    ):
        yield url


@settings(
    max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(path=st.sampled_from(PATHS), body=BODY, headers=HEADERS, with_key=st.booleans())
def test_no_input_makes_the_proxy_fail(
    proxy: str, path: str, body: bytes, headers: dict[str, str], with_key: bool
) -> None:
    if with_key:
        headers = {**headers, "authorization": f"Bearer {KEY}"}
    method = "GET" if path.startswith(("/v1/models", "/v1/energy", "/healthz", "/nope")) else "POST"
    try:
        r = httpx.request(method, proxy + path, content=body if method == "POST" else None,
                          headers=headers, timeout=30)  # fmt: skip
    except httpx.LocalProtocolError:
        seen["refused by the client library"] += 1  # a header httpx itself will not send
        return
    seen[f"{r.status_code}"] += 1
    assert r.status_code < 500, (path, r.status_code, r.text[:300])
    if r.status_code >= 400 and path != "/nope":
        err: Any = r.json()["error"]
        assert err["message"] and err["type"]
    if r.status_code == 200 and method == "POST":
        rid = r.headers["x-energy-request-id"]
        found = httpx.get(
            f"{proxy}/v1/energy/requests/{rid}", headers={"authorization": f"Bearer {KEY}"}
        )
        assert found.status_code == 200, rid
        seen["answered and stored"] += 1


def test_the_proxy_still_serves_after_the_fuzzing(proxy: str, tmp_path: Path) -> None:
    assert httpx.get(f"{proxy}/healthz").status_code == 200
    (tmp_path / "fuzz-counts.json").write_text(json.dumps(seen))
    print("fuzz outcomes:", dict(seen))
