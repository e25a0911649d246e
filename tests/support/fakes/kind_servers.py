"""Small fake servers of each backend kind, answering with the recorded shapes in
tests/support/fakes/recorded/ (see its README for where each shape comes from).

Each is a Starlette app with a `FakeServer` state the test flips: `down` (connections
refused), `loading` (llama-server loading a model, TGI unhealthy), `metrics` (llama-server
started without --metrics). `FakeClient` is the getter the adapters take: get_json,
get_text and post_json over `httpx.ASGITransport`, raising like the proxy's upstream
clients do (on a status other than 200, on a body that is not JSON).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

RECORDED = Path(__file__).resolve().parent / "recorded"
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def recorded(kind: str, name: str) -> str:
    return (RECORDED / kind / name).read_text(encoding="utf-8")


def recorded_json(kind: str, name: str) -> Any:
    return json.loads(recorded(kind, name))


@dataclass
class FakeServer:
    kind: str
    app: Starlette | None = None
    down: bool = False
    loading: bool = False  # llamacpp: 503 but for the model list; tgi: /health says unhealthy
    metrics: bool = True  # llamacpp: False = started without --metrics
    openai_models: bool = True  # ollama: False = a version without /v1/models
    requests: list[tuple[str, str, Any]] = field(default_factory=list)


def _json_file(kind: str, name: str, status: int = 200) -> Response:
    return Response(
        recorded(kind, name).encode(), status_code=status, media_type="application/json"
    )


def _tokenize(srv: FakeServer, path: str, needs: tuple[str, ...], answer: str) -> Route:
    """POST `path`: the recorded `answer` when the body has every key in `needs`, else 422."""

    async def handler(request: Request) -> Response:
        body = await request.json()
        srv.requests.append(("POST", path, body))
        if not isinstance(body, dict) or any(k not in body for k in needs):
            return JSONResponse({"error": f"missing one of {needs}"}, status_code=422)
        return _json_file(srv.kind, answer)

    return Route(path, handler, methods=["POST"])


def _vllm(srv: FakeServer) -> list[Route]:
    async def health(_: Request) -> Response:
        return Response(status_code=200)  # vLLM: an empty 200

    async def metrics(_: Request) -> Response:
        return Response(recorded("vllm", "metrics.txt"), media_type=PROMETHEUS_TEXT)

    async def models(_: Request) -> Response:
        return _json_file("vllm", "models.json")

    async def version(_: Request) -> Response:
        return JSONResponse({"version": "0.8.5"})

    return [
        Route("/health", health),
        Route("/metrics", metrics),
        Route("/v1/models", models),
        Route("/version", version),
        _tokenize(srv, "/tokenize", ("model", "prompt"), "tokenize.json"),
    ]


def _tgi(srv: FakeServer) -> list[Route]:
    async def health(_: Request) -> Response:
        if srv.loading:
            return _json_file("tgi", "health_unhealthy.json", 503)
        return Response(status_code=200)

    async def info(_: Request) -> Response:
        return _json_file("tgi", "info.json")

    async def metrics(_: Request) -> Response:
        return Response(recorded("tgi", "metrics.txt"), media_type="text/plain")

    async def models(_: Request) -> Response:
        return _json_file("tgi", "models.json")

    return [
        Route("/health", health),
        Route("/info", info),
        Route("/metrics", metrics),
        Route("/v1/models", models),
        _tokenize(srv, "/tokenize", ("inputs",), "tokenize.json"),
    ]


def _llamacpp(srv: FakeServer) -> list[Route]:
    def loading() -> Response:
        return _json_file("llamacpp", "health_loading.json", 503)

    async def health(_: Request) -> Response:
        return loading() if srv.loading else _json_file("llamacpp", "health.json")

    async def props(_: Request) -> Response:
        return loading() if srv.loading else _json_file("llamacpp", "props.json")

    async def metrics(_: Request) -> Response:
        if srv.loading:
            return loading()
        if not srv.metrics:
            message = "This server does not support metrics endpoint."
            error = {"code": 501, "message": message, "type": "not_supported_error"}
            return JSONResponse({"error": error}, status_code=501)
        return Response(recorded("llamacpp", "metrics.txt"), media_type=PROMETHEUS_TEXT)

    async def models(_: Request) -> Response:
        return _json_file("llamacpp", "models.json")  # answered while loading, too

    return [
        Route("/health", health),
        Route("/props", props),
        Route("/metrics", metrics),
        Route("/v1/models", models),
        Route("/models", models),
        _tokenize(srv, "/tokenize", ("content",), "tokenize.json"),
    ]


def _llama_cpp_python(srv: FakeServer) -> list[Route]:
    async def models(_: Request) -> Response:
        return _json_file("llama-cpp-python", "models.json")

    return [
        Route("/v1/models", models),
        _tokenize(srv, "/extras/tokenize", ("input",), "tokenize.json"),
        _tokenize(srv, "/extras/tokenize/count", ("input",), "tokenize_count.json"),
    ]


def _ollama(srv: FakeServer) -> list[Route]:
    async def root(_: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def version(_: Request) -> Response:
        return _json_file("ollama", "version.json")

    async def tags(_: Request) -> Response:
        return _json_file("ollama", "tags.json")

    async def models(_: Request) -> Response:
        if not srv.openai_models:
            return PlainTextResponse("404 page not found", status_code=404)
        return _json_file("ollama", "models.json")

    return [
        Route("/", root),
        Route("/api/version", version),
        Route("/api/tags", tags),
        Route("/v1/models", models),
    ]


def _openai(srv: FakeServer) -> list[Route]:
    async def models(_: Request) -> Response:
        return JSONResponse(
            {"object": "list", "data": [{"id": "gpt-x", "object": "model", "owned_by": "acme"}]}
        )

    return [Route("/v1/models", models)]


_ROUTES = {
    "vllm": _vllm,
    "tgi": _tgi,
    "llamacpp": _llamacpp,
    "llama-cpp-python": _llama_cpp_python,
    "ollama": _ollama,
    "openai": _openai,
}
KINDS = tuple(_ROUTES)

# The models each fake lists, and the token count its tokenize answer holds.
MODELS = {
    "vllm": ["meta-llama/Llama-3.1-8B-Instruct"],
    "tgi": ["meta-llama/Llama-3.1-8B-Instruct"],
    "llamacpp": ["../models/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf"],
    "llama-cpp-python": ["smollm2-135m-instruct"],
    "ollama": ["llama3.2:latest", "all-minilm:latest"],
    "openai": ["gpt-x"],
}
TOKENS = {"vllm": 6, "tgi": 6, "llamacpp": 5, "llama-cpp-python": 5}


def fake_server(kind: str) -> FakeServer:
    srv = FakeServer(kind)
    srv.app = Starlette(routes=_ROUTES[kind](srv))
    return srv


class _Switchable(httpx.AsyncBaseTransport):
    """The fake's ASGI app, or a refused connection while the fake is `down`."""

    def __init__(self, srv: FakeServer) -> None:
        assert srv.app is not None
        self._srv = srv
        self._inner = httpx.ASGITransport(app=srv.app)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._srv.down:
            raise httpx.ConnectError("connection refused", request=request)
        return await self._inner.handle_async_request(request)


class FakeClient:
    """get_json / get_text / post_json against fake servers, by host name:
    `http://<name>/...` goes to `servers[name]`."""

    def __init__(self, servers: dict[str, FakeServer]) -> None:
        self._clients = {
            name: httpx.AsyncClient(transport=_Switchable(srv), base_url=f"http://{name}")
            for name, srv in servers.items()
        }

    def _client(self, url: str) -> httpx.AsyncClient:
        return self._clients[httpx.URL(url).host]

    async def _send(
        self, method: str, url: str, timeout_s: float, body: object = None
    ) -> httpx.Response:
        client = self._client(url)
        if method == "POST":
            resp = await client.post(url, json=body, timeout=timeout_s)
        else:
            resp = await client.get(url, timeout=timeout_s)
        if resp.status_code != 200:
            raise ConnectionError(f"{method} {url} answered {resp.status_code}")
        return resp

    async def get_json(self, url: str, timeout_s: float) -> object:
        return (await self._send("GET", url, timeout_s)).json()

    async def get_text(self, url: str, timeout_s: float) -> str:
        return (await self._send("GET", url, timeout_s)).text

    async def post_json(self, url: str, body: object, timeout_s: float) -> object:
        return (await self._send("POST", url, timeout_s, body)).json()

    async def aclose(self) -> None:
        for c in self._clients.values():
            await c.aclose()


class GetOnlyClient:
    """A getter without post_json (what the proxy passes until its client has one)."""

    def __init__(self, inner: FakeClient) -> None:
        self._inner = inner

    async def get_json(self, url: str, timeout_s: float) -> object:
        return await self._inner.get_json(url, timeout_s)

    async def get_text(self, url: str, timeout_s: float) -> str:
        return await self._inner.get_text(url, timeout_s)
