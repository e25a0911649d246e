"""A backend whose model list cannot be read takes any model name: the names are stored as
"other" (as the metrics count them), never as labels of their own, one per name sent."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.conftest import serve_proxy
from tests.support.polling import wait_for
from tests.support.servers import ServerThread


async def _chat(request: Request) -> JSONResponse:
    body = await request.json()
    return JSONResponse(
        {
            "id": "x",
            "object": "chat.completion",
            "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
        }
    )


async def _no_models(_: Request) -> JSONResponse:
    return JSONResponse({"error": "nope"}, status_code=500)


def test_names_no_backend_lists_are_stored_as_other(tmp_path: Path) -> None:
    app = Starlette(routes=[Route("/v1/chat/completions", _chat, methods=["POST"]),
                            Route("/v1/models", _no_models)])  # fmt: skip
    names = [f"made-up-{i}" for i in range(5)]
    with ServerThread(app) as backend, serve_proxy(tmp_path, backend) as proxy:
        ids = []
        for name in names:
            r = httpx.post(
                f"{proxy}/v1/chat/completions",
                json={"model": name, "messages": [{"role": "user", "content": "hi"}]},
            )
            assert r.status_code == 200, r.text
            assert r.json()["energy"]["model"] == name  # the client is told its own name
            ids.append(r.headers["x-energy-request-id"])
        for rid in ids:
            assert wait_for(
                lambda rid=rid: httpx.get(f"{proxy}/v1/energy/requests/{rid}").status_code == 200
            )
            assert httpx.get(f"{proxy}/v1/energy/requests/{rid}").json()["model"] == "other"
    with closing(sqlite3.connect(tmp_path / "requests.db")) as c:
        texts = {t for (t,) in c.execute("SELECT text FROM labels")}
    assert not texts & set(names)
