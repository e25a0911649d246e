"""Telling a backend's kind: pure decisions over recorded answers, then over fake servers."""

from __future__ import annotations

import pytest

from backends.detect import Probes, decide_kind, detect_kind, probe
from tests.support.fakes.kind_servers import (
    KINDS,
    FakeClient,
    FakeServer,
    recorded,
    recorded_json,
)

GENERIC_MODELS = {"object": "list", "data": [{"id": "x", "object": "model", "owned_by": "acme"}]}

# What each kind answers to the probes, from the recorded shapes (None: 404 or similar).
RECORDED_PROBES = {
    "vllm": Probes(
        metrics=recorded("vllm", "metrics.txt"), models=recorded_json("vllm", "models.json")
    ),
    "tgi": Probes(
        metrics=recorded("tgi", "metrics.txt"),
        info=recorded_json("tgi", "info.json"),
        models=recorded_json("tgi", "models.json"),
    ),
    "llamacpp": Probes(
        metrics=recorded("llamacpp", "metrics.txt"),
        props=recorded_json("llamacpp", "props.json"),
        models=recorded_json("llamacpp", "models.json"),
    ),
    "llama-cpp-python": Probes(models=recorded_json("llama-cpp-python", "models.json")),
    "ollama": Probes(
        api_version=recorded_json("ollama", "version.json"),
        models=recorded_json("ollama", "models.json"),
    ),
    "openai": Probes(models=GENERIC_MODELS),
}


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_is_told_from_its_recorded_answers(kind: str) -> None:
    assert decide_kind(RECORDED_PROBES[kind]) == kind


@pytest.mark.parametrize(
    ("probes", "kind"),
    [
        # vLLM with its metrics out of reach: the model list's owner still tells.
        (Probes(models=recorded_json("vllm", "models.json")), "vllm"),
        # llama-server while it loads a model: only its model list answers.
        (Probes(models=recorded_json("llamacpp", "models.json")), "llamacpp"),
        # llama-server without --metrics, /props answering.
        (Probes(props=recorded_json("llamacpp", "props.json"), models=GENERIC_MODELS), "llamacpp"),
        # Behind a gateway that rewrites model lists, the metrics still tell.
        (Probes(metrics=recorded("tgi", "metrics.txt"), models=GENERIC_MODELS), "tgi"),
        (Probes(metrics=recorded("llamacpp", "metrics.txt"), models=GENERIC_MODELS), "llamacpp"),
        # An Ollama before /v1/models (0.1.x).
        (Probes(api_version=recorded_json("ollama", "version.json")), "ollama"),
        # TEI's /info has a model_id but is not TGI's; TGI 0.x's had no router field.
        (
            Probes(info={"model_id": "BAAI/bge", "version": "1.5.0"}, models=GENERIC_MODELS),
            "openai",
        ),
        (Probes(info={"model_id": "bigscience/bloom", "max_total_tokens": 2048}), "tgi"),
        # Owners that disagree tell nothing by themselves.
        (
            Probes(
                models={
                    "object": "list",
                    "data": [{"id": "a", "owned_by": "me"}, {"id": "b", "owned_by": "vllm"}],
                }
            ),
            "openai",
        ),
    ],
)
def test_partial_answers(probes: Probes, kind: str) -> None:
    assert decide_kind(probes) == kind


@pytest.mark.parametrize(
    "probes",
    [
        Probes(),  # down: nothing answered
        Probes(metrics="<html>not metrics</html>", models={"detail": "Not Found"}),
        Probes(info=["not", "a", "dict"], props="text", api_version={"version": 3}),
    ],
)
def test_nothing_recognisable_leaves_the_kind_open(probes: Probes) -> None:
    assert decide_kind(probes) is None


def test_vllm_metrics_outrank_a_model_owner() -> None:
    # The order is fixed: a server exporting vLLM's series is vLLM, whatever its list says.
    p = Probes(metrics=recorded("vllm", "metrics.txt"), models=GENERIC_MODELS)
    assert decide_kind(p) == "vllm"


# --- over fake servers ---------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_detect_kind_over_a_fake_server(kind: str, client: FakeClient) -> None:
    assert await detect_kind(client, f"http://{kind}") == kind


async def test_a_down_server_is_undetermined(
    client: FakeClient, servers: dict[str, FakeServer]
) -> None:
    servers["tgi"].down = True
    p = await probe(client, "http://tgi")
    assert not p.answered
    assert await detect_kind(client, "http://tgi") is None


async def test_llamacpp_is_told_while_it_loads(
    client: FakeClient, servers: dict[str, FakeServer]
) -> None:
    servers["llamacpp"].loading = True
    p = await probe(client, "http://llamacpp")
    assert p.props is None and p.metrics is None  # 503 while loading
    assert decide_kind(p) == "llamacpp"


async def test_llamacpp_without_metrics(client: FakeClient, servers: dict[str, FakeServer]) -> None:
    servers["llamacpp"].metrics = False
    assert await detect_kind(client, "http://llamacpp") == "llamacpp"
