"""The async side of each backend kind: fetch with the getter, read with backends/kinds.py.

`adapter_for("tgi").count_tokens(getter, "http://host:8080", model, text)` and the like.
Nothing here is on the request path; every call has a short timeout of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backends.fetch import JsonGetter, JsonPoster
from backends.kinds import Kind, kind_named, token_count
from backends.own_metrics import OwnMetrics, parse_own_metrics

DEFAULT_TIMEOUT_S = 5.0


class ModelListError(Exception):
    """The backend's model list could not be read; the message says why."""


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


@dataclass(frozen=True, slots=True)
class Adapter:
    kind: Kind

    @property
    def name(self) -> str:
        return self.kind.name

    async def check_health(
        self, getter: JsonGetter, backend_url: str, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> str | None:
        """None when healthy, else what is wrong. Kinds without a health endpoint are
        healthy here: for them, reading the model list is the check."""
        check = self.kind.health
        if check is None:
            return None
        url = backend_url + check.path
        try:
            if check.json:
                doc: object = await getter.get_json(url, timeout_s)
            else:
                doc = await getter.get_text(url, timeout_s)
        except Exception as exc:  # down, loading (503), or no such endpoint
            return f"health check failed: {_reason(exc)}"
        return check.problem(doc)

    async def list_models(
        self, getter: JsonGetter, backend_url: str, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> list[dict[str, Any]]:
        """The backend's models as OpenAI list entries (each with an `id`).

        Raises ModelListError when no listing the kind offers could be read.
        """
        problem = ""
        for path, read in self.kind.models:
            try:
                doc = await getter.get_json(backend_url + path, timeout_s)
            except Exception as exc:  # try the next listing, if the kind has one
                problem = f"GET {path} failed: {_reason(exc)}"
                continue
            models = read(doc)
            if models is not None:
                return models
            problem = f"GET {path} did not return a model list"
        raise ModelListError(problem)

    async def count_tokens(
        self,
        poster: JsonPoster,
        backend_url: str,
        model: str,
        text: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> int | None:
        """How many tokens the backend's own tokenizer makes of `text`; None where the
        kind has no tokenize endpoint, or on any failure. Never raises.

        Plain text only: chat templates and special tokens a chat request adds are not
        counted, so a prompt counted this way is a slight undercount.
        """
        tokenizer = self.kind.tokenizer
        if tokenizer is None:
            return None
        try:
            doc = await poster.post_json(
                backend_url + tokenizer.path, tokenizer.body(model, text), timeout_s
            )
        except Exception:  # an estimate that failed is no estimate; the caller goes on
            return None
        return token_count(doc)

    async def own_metrics(
        self, getter: JsonGetter, backend_url: str, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> OwnMetrics | None:
        """The backend's own figures from its Prometheus endpoint; None where the kind has
        none or it cannot be read."""
        names = self.kind.metrics
        if names is None:
            return None
        try:
            text = await getter.get_text(backend_url + self.kind.metrics_path, timeout_s)
        except Exception:  # no /metrics (llama-server without --metrics), or down
            return None
        return parse_own_metrics(text, names)


def adapter_for(kind: str) -> Adapter:
    """The adapter of a kind name (`KIND_NAMES`); ValueError for any other name."""
    return Adapter(kind_named(kind))
