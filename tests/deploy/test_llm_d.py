"""deploy/k8s/llm-d/: the proxy as a sidecar in an llm-d InferencePool, whose router (the
endpoint picker, EPP) scores each pod on the proxy's energy gauge.

Checked without a cluster: every field the EndpointPickerConfig and the InferencePool use is
one the router's published source names (tests/deploy/llm_d_reference.yaml, each section
with its repository, path and commit), every plugin reference resolves, the pool targets the
proxy's port, the sidecar's command line parses with the real `serve` parser, and the series
the EPP reads are on a real proxy's /metrics in front of a stand-in vLLM.

Two of these wait on work in progress in the proxy, the flag --pass-backend-metrics and the
gauge energy_proxy_backend_marginal_joules_per_token: until each lands, the tests that need
it fail and say so (PENDING below).
"""

from __future__ import annotations

import copy
import functools
import re
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.settings import Settings
from tests.conftest import serve_proxy
from tests.deploy.deploy_files import (
    K8S,
    PROXY_IMAGE,
    PROXY_PORT,
    ROOT,
    SERVE_FLAGS,
    check_serve_args,
)
from tests.support.fakes.openai_backend import FakeState, make_fake_backend
from tests.support.servers import ServerThread

LLM_D = K8S / "llm-d"
REFERENCE = Path(__file__).with_name("llm_d_reference.yaml")
# A real vLLM's /metrics, recorded (its queue, running and KV-cache gauges among others).
VLLM_METRICS = ROOT / "tests" / "support" / "fakes" / "recorded" / "vllm" / "metrics.txt"
ENERGY_GAUGE = "energy_proxy_backend_marginal_joules_per_token"
PASS_FLAG = "--pass-backend-metrics"
PENDING = "being added to the proxy right now; this test passes once it lands"
MANIFESTS = {"model-server.yaml", "inferencepool.yaml", "epp-config.yaml"}
HEX40 = re.compile(r"[0-9a-f]{40}")

# --- reading the files --------------------------------------------------------------------


@functools.cache
def reference() -> dict[str, Any]:
    ref = yaml.safe_load(REFERENCE.read_text(encoding="utf-8"))
    assert isinstance(ref, dict)
    return ref


def llm_d_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name in sorted(MANIFESTS):
        docs.extend(d for d in yaml.safe_load_all((LLM_D / name).read_text(encoding="utf-8")) if d)
    return docs


def one(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in llm_d_docs() if d["kind"] == kind]
    return doc


def epp_config() -> dict[str, Any]:
    """The EndpointPickerConfig, as the EPP reads it from the ConfigMap's file."""
    (text,) = one("ConfigMap")["data"].values()
    cfg = yaml.safe_load(text)
    assert isinstance(cfg, dict)
    return cfg


def pod() -> dict[str, Any]:
    template: dict[str, Any] = one("Deployment")["spec"]["template"]
    return template


def container(name: str) -> dict[str, Any]:
    (c,) = [c for c in pod()["spec"]["containers"] if c["name"] == name]
    assert isinstance(c, dict)
    return c


def arg_after(args: list[str], flag: str) -> str:
    return str(args[args.index(flag) + 1])


def plugins(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Declared plugins by name (a plugin without one is named after its type)."""
    out: dict[str, dict[str, Any]] = {}
    for spec in cfg["plugins"]:
        name = spec.get("name") or spec["type"]
        assert name not in out, f"plugin name {name} declared twice"
        out[name] = spec
    return out


def of_type(cfg: dict[str, Any], plugin_type: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [p for p in cfg["plugins"] if p["type"] == plugin_type]
    (spec,) = found
    return spec


def pod_engine(cfg: dict[str, Any]) -> dict[str, Any]:
    """The core-metrics-extractor engine config the model-server pods select by label."""
    params = of_type(cfg, "core-metrics-extractor")["parameters"]
    name = pod()["metadata"]["labels"].get(params["engineLabelKey"], params["defaultEngine"])
    (engine,) = [e for e in params["engineConfigs"] if e["name"] == name]
    assert isinstance(engine, dict)
    return engine


def unknown_fields(value: Any, schema: Any, path: str) -> list[str]:
    """Paths in `value` the reference `schema` does not name (llm_d_reference.yaml's
    notation: None a scalar, "any" free-form, a mapping its keys, a list its items)."""
    if schema == "any":
        return []
    if schema is None:
        return [f"{path}: a scalar in the reference"] if isinstance(value, dict | list) else []
    if isinstance(schema, list):
        if not isinstance(value, list):
            return [f"{path}: a list in the reference"]
        return [
            e for i, v in enumerate(value) for e in unknown_fields(v, schema[0], f"{path}[{i}]")
        ]
    if not isinstance(value, dict):
        return [f"{path}: a mapping in the reference"]
    out: list[str] = []
    for key, sub in value.items():
        if key in schema:
            out.extend(unknown_fields(sub, schema[key], f"{path}.{key}"))
        else:
            out.append(f"{path}.{key}")
    return out


def config_problems(cfg: dict[str, Any]) -> list[str]:
    """Every field of the EndpointPickerConfig, plugin parameters included, checked."""
    ref = reference()
    problems = unknown_fields(cfg, ref["endpoint_picker_config"]["fields"], "config")
    for i, spec in enumerate(cfg.get("plugins", [])):
        known = ref["plugin_types"].get(spec.get("type"))
        if known is None:
            problems.append(f"config.plugins[{i}].type: {spec.get('type')!r} is no plugin type")
        else:
            where = f"config.plugins[{i}].parameters"
            problems += unknown_fields(spec.get("parameters") or {}, known["parameters"], where)
    return problems


_SPEC = re.compile(r"\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*(?:\{(.*)\})?\s*")
_LABEL = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^",}\s]+))')


def parse_metric_spec(spec: str) -> tuple[str, dict[str, str]]:
    """A router metric spec (a PromQL instant selector, label values quoted or not) as
    (metric name, labels it must carry). Equality matchers only, as the router keeps."""
    match = _SPEC.fullmatch(spec)
    assert match, f"not a metric spec: {spec!r}"
    body = match.group(2) or ""
    assert "~" not in body and "!=" not in body, f"{spec}: only label=value is read"
    return match.group(1), {k: q or u for k, q, u in _LABEL.findall(body)}


def metric_specs(engine: dict[str, Any]) -> list[str]:
    specs = [v for k, v in engine.items() if k.endswith("Spec") and v]
    return specs + [c["metricSpec"] for c in engine.get("customMetrics", [])]


# --- the files, against the router's reference ----------------------------------------


def test_every_document_parses_and_the_kustomization_lists_them() -> None:
    files = {p.name for p in LLM_D.glob("*.yaml")} - {"kustomization.yaml"}
    assert files == MANIFESTS
    kustomization = yaml.safe_load((LLM_D / "kustomization.yaml").read_text(encoding="utf-8"))
    assert set(kustomization["resources"]) == MANIFESTS
    docs = llm_d_docs()
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Deployment", "InferencePool"]
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"], doc["kind"]
    assert epp_config()["kind"] == "EndpointPickerConfig"


def test_the_reference_names_where_each_part_was_read() -> None:
    ref = reference()
    sections = [ref["endpoint_picker_config"], ref["inference_pool"], *ref["plugin_types"].values()]
    for section in sections:
        source = section["source"]
        assert source["repo"].count("/") == 1 and source["path"], source
        assert HEX40.fullmatch(source["commit"]), source


def test_epp_config_uses_only_fields_the_router_names() -> None:
    cfg = epp_config()
    ref = reference()["endpoint_picker_config"]
    assert cfg["apiVersion"] in ref["api_versions"]
    assert cfg["kind"] == ref["kind"]
    assert config_problems(cfg) == []


def test_the_field_check_catches_invented_fields() -> None:
    """The check above is not vacuous: fields the router does not have are reported."""
    cfg = copy.deepcopy(epp_config())
    energy = plugins(cfg)["energy-scorer"]
    energy["parameters"]["algorithm"]["direction"] = "lower_is_better"  # an early proposal's
    cfg["schedulingProfiles"][0]["plugins"][0]["weigth"] = 1
    cfg["plugins"].append({"type": "energy-scorer"})
    extractor = of_type(cfg, "core-metrics-extractor")["parameters"]["engineConfigs"][0]
    extractor["customMetrics"][0]["optional"] = True  # not in the recorded factory
    problems = config_problems(cfg)
    assert len(problems) == 4, problems
    assert any(p.endswith("algorithm.direction") for p in problems)
    assert any(p.endswith("plugins[0].weigth") for p in problems)
    assert any("'energy-scorer' is no plugin type" in p for p in problems)
    assert any(p.endswith("customMetrics[0].optional") for p in problems)


def test_every_plugin_ref_names_a_declared_plugin() -> None:
    cfg = epp_config()
    declared = plugins(cfg)
    refs = [p["pluginRef"] for prof in cfg["schedulingProfiles"] for p in prof["plugins"]]
    for source in cfg["dataLayer"]["sources"]:
        refs += [source["pluginRef"], *(e["pluginRef"] for e in source["extractors"])]
    missing = [r for r in refs if r not in declared]
    assert missing == [], f"pluginRefs to no declared plugin: {missing}"
    (profile,) = cfg["schedulingProfiles"]
    types = [declared[p["pluginRef"]]["type"] for p in profile["plugins"]]
    assert types.count("max-score-picker") == 1, "one picker"
    assert {"queue-scorer", "kv-cache-utilization-scorer", "endpoint-attribute-scorer"} <= set(
        types
    )
    for p in profile["plugins"]:
        if declared[p["pluginRef"]]["type"].endswith("-scorer"):
            assert p["weight"] > 0, p


def test_energy_scorer_reads_the_proxy_gauge_through_the_pods_engine() -> None:
    """Gauge -> extractor attribute -> scorer: the chain the router follows, end to end."""
    cfg = epp_config()
    engine = pod_engine(cfg)
    scorer = plugins(cfg)["energy-scorer"]
    assert scorer["type"] == "endpoint-attribute-scorer"
    algorithm = scorer["parameters"]["algorithm"]
    allowed = reference()["plugin_types"]["endpoint-attribute-scorer"]["algorithm_types"]
    assert algorithm["type"] in allowed
    assert algorithm["type"] == "linear_lower_is_better", "fewer joules per token is better"
    (custom,) = [
        c
        for c in engine["customMetrics"]
        if c["attributeKey"] == scorer["parameters"]["attributeKey"]
    ]
    name, labels = parse_metric_spec(custom["metricSpec"])
    assert name == ENERGY_GAUGE
    assert set(labels) <= {"backend", "model"}
    backend_name = arg_after(container("energy-proxy")["args"], "--backend").split("=", 1)[0]
    assert labels.get("backend") == backend_name, "the sidecar's own name for vLLM"
    # The queue and KV-cache scorers read this engine too: it must read vLLM as the
    # router's built-in `vllm` engine does.
    builtin = reference()["plugin_types"]["core-metrics-extractor"]["builtin_vllm"]
    assert {k: engine.get(k) for k in builtin} == builtin


def test_metric_spec_parser_reads_the_routers_own_examples() -> None:
    # Specs from the router's built-in engine configs and its extractor README.
    assert parse_metric_spec("vllm:num_requests_waiting") == ("vllm:num_requests_waiting", {})
    assert parse_metric_spec("nv_trt_llm_request_metrics{request_type=waiting}") == (
        "nv_trt_llm_request_metrics",
        {"request_type": "waiting"},
    )
    assert parse_metric_spec('m{a="x", b=y}') == ("m", {"a": "x", "b": "y"})
    with pytest.raises(AssertionError):
        parse_metric_spec('m{a=~"x.*"}')


def test_metrics_source_scrapes_the_pool_port_at_the_proxy_metrics_path() -> None:
    source = of_type(epp_config(), "metrics-data-source").get("parameters") or {}
    # No `port`: the source scrapes each endpoint on its own (the pool's target) port.
    assert "port" not in source
    assert source.get("path", "/metrics") == "/metrics"
    assert source.get("scheme", "http") == "http"


def test_inference_pool_uses_only_fields_the_api_names() -> None:
    pool = one("InferencePool")
    ref = reference()["inference_pool"]
    assert pool["apiVersion"] in ref["api_versions"]
    assert unknown_fields(pool, ref["fields"], "pool") == []
    # The v1alpha2 pool's spellings are not v1 fields, and the check says so.
    old = copy.deepcopy(pool)
    old["spec"]["targetPortNumber"] = old["spec"].pop("targetPorts")[0]["number"]
    old["spec"]["extensionRef"] = old["spec"].pop("endpointPickerRef")
    assert unknown_fields(old, ref["fields"], "pool") == [
        "pool.spec.targetPortNumber",
        "pool.spec.extensionRef",
    ]
    picker = pool["spec"]["endpointPickerRef"]
    assert picker.get("failureMode", "FailClose") in ref["failure_modes"]
    assert picker.get("kind", "Service") != "Service" or "port" in picker, "a Service needs port"


def test_pool_targets_the_proxy_port_of_the_model_server_pods() -> None:
    spec = one("InferencePool")["spec"]
    (target,) = spec["targetPorts"]
    proxy_ports = [p["containerPort"] for p in container("energy-proxy")["ports"]]
    assert target["number"] == PROXY_PORT
    assert proxy_ports == [target["number"]]
    assert target["number"] != int(arg_after(container("vllm")["args"], "--port"))
    labels = pod()["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    selector = one("Deployment")["spec"]["selector"]["matchLabels"]
    assert spec["selector"]["matchLabels"] == selector


# --- the pod ------------------------------------------------------------------------------


def test_sidecar_command_line_parses_with_the_real_serve_parser() -> None:
    proxy = container("energy-proxy")
    assert proxy["command"] == ["energy-proxy"], "the whole command line, not the entrypoint's"
    args = [str(a) for a in proxy["args"]]
    assert args[0] == "serve"
    assert PASS_FLAG in args
    assert PASS_FLAG in SERVE_FLAGS, f"{PASS_FLAG} is not a flag of energy-proxy serve: {PENDING}"
    flags = check_serve_args(args[1:], "llm-d energy-proxy")
    assert flags["host"] == "0.0.0.0"
    assert flags["port"] == PROXY_PORT
    vllm_port = arg_after(container("vllm")["args"], "--port")
    assert flags["backend"] == [f"vllm=http://127.0.0.1:{vllm_port}"]
    assert flags["power_source"] == "nvml"
    assert flags["pass_backend_metrics"] is True


def test_sidecar_reads_the_gpu_through_nvml_one_pod_per_node() -> None:
    vllm, proxy = container("vllm"), container("energy-proxy")
    assert vllm["image"].startswith("vllm/vllm-openai")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert proxy["image"] == f"{PROXY_IMAGE}:{version}"
    assert arg_after(vllm["args"], "--host") == "127.0.0.1", "nothing bypasses the meter"
    assert "nvidia.com/gpu" in vllm["resources"]["limits"]
    assert "nvidia.com/gpu" not in proxy["resources"].get("limits", {})
    env = {e["name"]: e.get("value") for e in proxy["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "utility"
    # NVML shows the proxy every GPU of its node: two pods on one node would count each
    # other's energy, so the scheduler must keep them apart.
    (term,) = pod()["spec"]["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= pod()["metadata"]["labels"].items()
    # The request store is on a volume (the root file system is read-only).
    db = Path(env["ENERGY_PROXY_DB"])
    mounts = {m["mountPath"] for m in proxy["volumeMounts"]}
    assert str(db.parent) in mounts and proxy["securityContext"]["readOnlyRootFilesystem"]


# --- the real proxy, configured as the sidecar -----------------------------------------


def with_recorded_vllm_metrics(app: ASGIApp) -> ASGIApp:
    """The fake backend, answering /metrics with a real vLLM's recorded text."""
    text = VLLM_METRICS.read_text(encoding="utf-8")

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/metrics":
            response = Response(text, media_type="text/plain; version=0.0.4")
            await response(scope, receive, send)
            return
        await app(scope, receive, send)

    return wrapped


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real proxy on a socket, as model-server.yaml runs it (its backend name, and the
    pass-through once Settings has it), in front of a stand-in vLLM; one answer served."""
    args = [str(a) for a in container("energy-proxy")["args"]]
    name = arg_after(args, "--backend").split("=", 1)[0]
    model = "meta-llama/Llama-3.1-8B-Instruct"  # the recorded vLLM's model
    backend_app, _ = make_fake_backend(FakeState(models=[model]))
    overrides: dict[str, Any] = {}
    if "pass_backend_metrics" in Settings.model_fields:
        overrides["pass_backend_metrics"] = PASS_FLAG in args
    tmp = tmp_path_factory.mktemp("llm-d-proxy")
    with ServerThread(with_recorded_vllm_metrics(backend_app)) as backend_url:
        backends = [f"{name}={backend_url}"]
        with serve_proxy(tmp, backend_url, backends=backends, **overrides) as url:
            deadline = time.monotonic() + 10
            while httpx.get(url + "/readyz").status_code != 200:
                assert time.monotonic() < deadline, "the proxy never became ready"
                time.sleep(0.05)
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            answer = httpx.post(url + "/v1/chat/completions", json=body, timeout=10)
            assert answer.status_code == 200, answer.text
            yield url


def missing_on_metrics(url: str, specs: list[str], timeout_s: float = 5.0) -> list[str]:
    """The specs no sample of the proxy's /metrics satisfies (name, and the spec's labels
    among its own), as the router's extractor matches them; polled for up to timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = httpx.get(url + "/metrics").text
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
        missing = [
            spec
            for spec in specs
            if not any(
                s.name == name and labels.items() <= s.labels.items()
                for name, labels in [parse_metric_spec(spec)]
                for s in samples
            )
        ]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.1)


def test_energy_series_the_router_reads_are_on_the_proxy_metrics(sidecar: str) -> None:
    specs = [s for s in metric_specs(pod_engine(epp_config())) if s.startswith("energy_proxy_")]
    assert specs, "the EPP config reads no energy_proxy_ series"
    missing = missing_on_metrics(sidecar, specs)
    assert missing == [], f"not on the proxy's /metrics: {missing} ({ENERGY_GAUGE}: {PENDING})"


def test_vllm_series_pass_through_to_the_proxy_metrics(sidecar: str) -> None:
    """The queue and KV-cache scorers read vLLM's series from the pool's port, the proxy's."""
    recorded = {s.name for f in text_string_to_metric_families(VLLM_METRICS.read_text())
                for s in f.samples}  # fmt: skip
    engine = pod_engine(epp_config())
    specs = [s for s in metric_specs(engine) if parse_metric_spec(s)[0] in recorded]
    read_by_scorers = {engine["queuedRequestsSpec"], engine["kvUsageSpec"]}
    assert read_by_scorers <= set(specs), "the recorded vLLM has what the scorers read"
    missing = missing_on_metrics(sidecar, specs)
    assert missing == [], (
        f"vLLM's series not on the proxy's /metrics: {missing} ({PASS_FLAG}: {PENDING})"
    )


def test_probe_paths_and_metrics_path_answer_on_the_real_proxy(sidecar: str) -> None:
    proxy = container("energy-proxy")
    paths = {proxy[p]["httpGet"]["path"] for p in ("livenessProbe", "readinessProbe")}
    paths.add((of_type(epp_config(), "metrics-data-source").get("parameters") or {})["path"])
    assert paths == {"/healthz", "/readyz", "/metrics"}
    for path in sorted(paths):
        response = httpx.get(sidecar + path)
        assert response.status_code == 200, f"{path}: {response.status_code}"
