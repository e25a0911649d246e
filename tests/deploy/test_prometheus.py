"""Our Prometheus config and rules, checked by Prometheus itself.

promtool validates the config and the rules, and unit-tests the rules' arithmetic and the
alerts on synthetic series. Then a real Prometheus (on 127.0.0.1, scraping every second)
scrapes a proxy in front of the fake backend: the recording rules must equal what the
proxy's own /metrics say, and every dashboard query must run.

`prometheus` and `promtool` must be on PATH (scripts/install-test-tools.sh installs them);
without them these tests fail rather than skip, so CI cannot pass by not running them.
"""

from __future__ import annotations

import math
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from metering.sources.constant import ConstantSource
from proxy.app import create_app
from tests.conftest import proxy_settings
from tests.deploy.promql import (
    COMPOSE_FILE,
    DASHBOARD_FILES,
    PROMETHEUS_CONFIG,
    PROMETHEUS_DIR,
    RULES_FILE,
    dashboard_exprs,
    known_series,
    label_names,
    load_dashboard,
    load_rules,
    load_yaml,
    metric_names,
    parse_label_values,
    recording_rules,
    to_promql,
    variable_query,
)
from tests.support.fakes.openai_backend import make_fake_backend
from tests.support.servers import ServerThread

JOB = "energy-proxy"
MEAN_J = "model_category:energy_proxy_request_energy_joules:mean5m"
PER_TOKEN_J = "model_category:energy_proxy_joules_per_token:mean5m"
MEAN_CO2 = "model_category:energy_proxy_request_co2eq_grams:mean5m"
POWER = "instance_source_scope:energy_proxy_energy_joules:rate5m"
# Requests sent through the proxy per category once Prometheus sees each series:
# (count, max_tokens). The fake backend answers at most 5 completion tokens.
MEASURED = {"code": (4, 5), "math": (2, 2)}
REL_TOL = 1e-6


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"`{name}` is not on PATH: the deploy tests need Prometheus 2.x "
            "(`prometheus` and `promtool`). Run scripts/install-test-tools.sh "
            "(Debian/Ubuntu: apt-get install prometheus).",
            pytrace=False,
        )
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], capture_output=True, text=True, timeout=120, check=False
    )


def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, f"{proc.args}:\n{proc.stdout}\n{proc.stderr}"


# --- promtool -----------------------------------------------------------------------------


def test_promtool_check_config() -> None:
    # Also loads the rule files the config names (rules/*.yml, relative to the config).
    proc = run_promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert_ok(proc)
    assert "1 rule files found" in proc.stdout


def test_promtool_check_rules() -> None:
    assert_ok(run_promtool("check", "rules", str(RULES_FILE)))


def test_config_scrapes_the_proxy() -> None:
    cfg = load_yaml(PROMETHEUS_CONFIG)
    assert cfg["rule_files"] == ["rules/*.yml"]
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == JOB]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["energy-proxy:8080"]


def test_compose_mounts_the_config_directory() -> None:
    # rule_files are relative to the config file: the whole directory must be mounted.
    prometheus = load_yaml(COMPOSE_FILE)["services"]["prometheus"]
    flags = [a for a in prometheus.get("command", []) if a.startswith("--config.file=")]
    config_dir = flags[0].split("=", 1)[1].rsplit("/", 1)[0] if flags else "/etc/prometheus"
    mounts = {}
    for v in prometheus["volumes"]:
        source, target = v.split(":")[:2]
        mounts[(COMPOSE_FILE.parent / source).resolve()] = target.rstrip("/")
    assert mounts.get(PROMETHEUS_DIR.resolve()) == config_dir


def test_rules_use_only_known_metrics_and_labels() -> None:
    known = {**known_series(), "up": frozenset({"instance", "job"})}
    names = [r.get("record") or r["alert"] for r in load_rules()]
    assert len(names) == len(set(names))
    for rule in load_rules():
        name = rule.get("record") or rule["alert"]
        used = metric_names(rule["expr"])
        assert used and used <= known.keys(), f"{name}: {sorted(used - known.keys())}"
        labels = frozenset().union(*(known[n] for n in used))
        assert label_names(rule["expr"]) <= labels, name
        if "alert" in rule:
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
            assert {"summary", "description"} <= rule["annotations"].keys(), name


def _series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    inner = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def _rule_tests(rules_path: Path) -> dict[str, Any]:
    """promtool unit tests: exact values of the recording rules on linear counters, and
    when each alert fires."""
    host = {"instance": "gpu-1:8080", "job": JOB}
    chat = {**host, "model": "m", "category": "code", "backend": "vllm"}
    embed = {**host, "model": "e", "category": "other", "backend": "vllm"}
    per_min = [  # counters rising linearly, per minute
        _series("energy_proxy_request_energy_joules_sum", chat, "0+60x10"),  # 10 J/request
        _series("energy_proxy_request_energy_joules_count", chat, "0+6x10"),
        _series("energy_proxy_tokens_total", {**chat, "type": "completion"}, "0+120x10"),
        _series("energy_proxy_tokens_total", {**chat, "type": "prompt"}, "0+600x10"),
        _series("energy_proxy_request_co2eq_grams_sum", chat, "0+3x10"),  # 0.5 g/request
        _series("energy_proxy_request_co2eq_grams_count", chat, "0+6x10"),
        # Embeddings complete no token: joules per prompt token.
        _series("energy_proxy_request_energy_joules_sum", embed, "0+12x10"),
        _series("energy_proxy_request_energy_joules_count", embed, "0+6x10"),
        _series("energy_proxy_tokens_total", {**embed, "type": "prompt"}, "0+48x10"),
        _series("energy_proxy_request_co2eq_grams_sum", embed, "0+0.6x10"),
        _series("energy_proxy_request_co2eq_grams_count", embed, "0+6x10"),
        # 180 W attributed + 60 W idle on one GPU.
        _series(
            "energy_proxy_energy_joules_total",
            {**host, "source": "nvml:0", "scope": "attributed"},
            "0+10800x10",
        ),
        _series(
            "energy_proxy_energy_joules_total",
            {**host, "source": "nvml:0", "scope": "idle"},
            "0+3600x10",
        ),
        _series(
            "energy_proxy_carbon_intensity_grams_per_kwh",
            {**host, "zone": "DE", "source": "static"},
            "450x10",
        ),
    ]

    def check(expr: str, *samples: tuple[float, dict[str, str]]) -> dict[str, Any]:
        """`expr` at 10m equals each value for each label set. promtool compares floats
        exactly, so both sides are compared in round micro-units."""
        return {
            "expr": f"round(({expr}) * 1e6)",
            "eval_time": "10m",
            "exp_samples": [
                {
                    "labels": "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}",
                    "value": round(value * 1e6),
                }
                for value, labels in samples
            ],
        }

    code = {"model": "m", "category": "code"}
    other = {"model": "e", "category": "other"}
    gpu = {"instance": "gpu-1:8080", "source": "nvml:0"}
    recording = {
        "interval": "1m",
        "input_series": per_min,
        "promql_expr_test": [
            check(MEAN_J, (10, code), (2, other)),
            check(PER_TOKEN_J, (0.5, code), (0.25, other)),
            check(MEAN_CO2, (0.5, code), (0.1, other)),
            check(
                "model_category:energy_proxy_request_co2eq_grams:rate5m * 60",
                (3, code),
                (0.6, other),
            ),
            check("model_category:energy_proxy_requests:rate5m * 60", (6, code), (6, other)),
            check(POWER, (180, {**gpu, "scope": "attributed"}), (60, {**gpu, "scope": "idle"})),
            # 240 W = 240 J/s at 450 g/kWh: 240 / 3.6e6 * 450 g/s = 0.03 g/s = 108 g/h.
            check(
                "instance:energy_proxy_co2eq_grams:rate5m * 3600",
                (108, {"instance": "gpu-1:8080"}),
            ),
        ],
    }

    def firing(name: str, eval_time: str, *alerts: dict[str, str]) -> dict[str, Any]:
        return {
            "alertname": name,
            "eval_time": eval_time,
            "exp_alerts": [{"exp_labels": a} for a in alerts],
        }

    power_up = {**host, "source": "nvml:0", "method": "nvml-counter"}
    fallback = {**host, "zone": "DE", "source": "fallback"}
    alerts = {
        "interval": "1m",
        "input_series": [
            _series("up", host, "1 1 0x200"),
            _series("energy_proxy_power_source_up", power_up, "1 0x200"),
            _series("energy_proxy_carbon_intensity_grams_per_kwh", fallback, "480x200"),
            _series(
                "energy_proxy_carbon_intensity_age_seconds", {**host, "zone": "DE"}, "7000+60x200"
            ),
            # vllm runs 3 requests, only 1 came through the proxy; tgi matches the proxy.
            _series("energy_proxy_backend_inflight_requests", {**host, "backend": "vllm"}, "3x200"),
            _series("energy_proxy_inflight_requests", {**host, "backend": "vllm"}, "1x200"),
            _series("energy_proxy_backend_inflight_requests", {**host, "backend": "tgi"}, "2x200"),
            _series("energy_proxy_inflight_requests", {**host, "backend": "tgi"}, "2x200"),
            # PostgreSQL away from 1m to 12m; records dropped from 8m to 12m.
            _series("energy_proxy_store_up", {**host, "kind": "postgresql"}, "1 0x10 1x200"),
            _series("energy_proxy_store_dropped_records_total", host, "0x7 0+50x4 200x200"),
        ],
        "alert_rule_test": [
            # down from 2m, for 1m
            firing("EnergyProxyDown", "2m"),
            firing("EnergyProxyDown", "3m", {**host, "severity": "critical"}),
            firing("EnergyProxyAbsent", "10m"),
            # degraded from 1m, for 2m
            firing("EnergyProxyPowerSourceDegraded", "2m"),
            firing("EnergyProxyPowerSourceDegraded", "3m", {**power_up, "severity": "warning"}),
            firing("EnergyProxyCarbonIntensityNotLive", "119m"),
            firing(
                "EnergyProxyCarbonIntensityNotLive", "121m", {**fallback, "severity": "warning"}
            ),
            # older than 7200 s from 4m (7240 s), for 5m
            firing("EnergyProxyCarbonIntensityStale", "8m"),
            firing(
                "EnergyProxyCarbonIntensityStale",
                "9m",
                {**host, "zone": "DE", "severity": "warning"},
            ),
            firing("EnergyProxyStoreFailing", "5m"),
            firing(
                "EnergyProxyStoreFailing",
                "6m",
                {**host, "kind": "postgresql", "severity": "warning"},
            ),
            firing("EnergyProxyStoreFailing", "13m"),
            firing("EnergyProxyStoreDroppingRecords", "7m"),
            firing("EnergyProxyStoreDroppingRecords", "9m", {**host, "severity": "warning"}),
            firing("EnergyProxyStoreDroppingRecords", "25m"),
            firing("EnergyProxyBackendBypassed", "14m"),
            firing(
                "EnergyProxyBackendBypassed",
                "16m",
                {**host, "backend": "vllm", "severity": "warning"},
            ),
        ],
    }
    absent = {
        "interval": "1m",
        "input_series": [],
        "alert_rule_test": [
            firing("EnergyProxyAbsent", "4m"),
            firing("EnergyProxyAbsent", "6m", {"job": JOB, "severity": "warning"}),
        ],
    }
    return {
        "rule_files": [str(rules_path)],
        "evaluation_interval": "1m",
        "tests": [recording, alerts, absent],
    }


def test_promtool_rule_unit_tests(tmp_path: Path) -> None:
    # promtool compares annotations too; their templates are checked by `check rules`,
    # so the unit tests run on a copy without them.
    doc = load_yaml(RULES_FILE)
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(doc, sort_keys=False))
    tests = tmp_path / "tests.yml"
    tests.write_text(yaml.safe_dump(_rule_tests(rules), sort_keys=False))
    assert_ok(run_promtool("test", "rules", str(tests)))


# --- a real Prometheus in front of a real proxy ---------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll until `cond` holds: a bound on waiting, not a speed assertion."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.2)


@dataclass
class Stack:
    proxy: httpx.Client
    prometheus: httpx.Client
    target: str  # the proxy's host:port, Prometheus' `instance` label

    def query(self, promql: str) -> dict[str, Any]:
        r = self.prometheus.get("/api/v1/query", params={"query": promql})
        body: dict[str, Any] = r.json()
        assert r.status_code == 200 and body["status"] == "success", (promql, body)
        data: dict[str, Any] = body["data"]
        return data

    def vector(self, promql: str) -> dict[tuple[tuple[str, str], ...], float]:
        """An instant vector: sorted label pairs (no __name__) -> value."""
        data = self.query(promql)
        assert data["resultType"] == "vector", promql
        return {
            tuple(sorted((k, v) for k, v in s["metric"].items() if k != "__name__")): float(
                s["value"][1]
            )
            for s in data["result"]
        }

    def proxy_metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The proxy's /metrics: (sample name, sorted labels) -> value."""
        text = self.proxy.get("/metrics").text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }

    def chat(self, category: str, max_tokens: int) -> float:
        r = self.proxy.post(
            "/v1/chat/completions",
            json={
                "model": "fake-model",
                "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": f"a {category} question"}],
            },
            headers={"x-prompt-category": category},
        )
        assert r.status_code == 200, r.text
        # The body's figure: the header is rounded to four significant digits.
        return float(r.json()["energy"]["joules"])


def prometheus_config(target: str, path: Path) -> None:
    """Our config, scraping `target` every second, with our rules (absolute paths)."""
    cfg = load_yaml(PROMETHEUS_CONFIG)
    cfg["global"].update(
        {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    )
    cfg["rule_files"] = [str(PROMETHEUS_DIR / f) for f in cfg["rule_files"]]
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == JOB]
    job["static_configs"] = [{"targets": [target]}]
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus = tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    backend, _ = make_fake_backend()
    sources = [ConstantSource(100.0, start_s=time.monotonic())]
    with ServerThread(backend) as backend_url:
        app = create_app(proxy_settings(tmp, backends=[f"fake={backend_url}"]), sources=sources)
        with ServerThread(app) as proxy_url:
            target = proxy_url.removeprefix("http://")
            prometheus_config(target, tmp / "prometheus.yml")
            port = free_port()
            log = tmp / "prometheus.log"
            with log.open("w") as log_file:
                proc = subprocess.Popen(
                    [
                        prometheus,
                        f"--config.file={tmp / 'prometheus.yml'}",
                        f"--storage.tsdb.path={tmp / 'data'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                        "--log.level=warn",
                    ],
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            try:
                # trust_env=False: never through an HTTP proxy from the environment.
                with (
                    httpx.Client(base_url=proxy_url, trust_env=False, timeout=30) as pc,
                    httpx.Client(
                        base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=30
                    ) as qc,
                ):

                    def ready() -> bool:
                        if proc.poll() is not None:
                            pytest.fail(f"prometheus exited:\n{log.read_text()[-3000:]}")
                        try:
                            return qc.get("/-/ready").status_code == 200
                        except httpx.TransportError:
                            return False

                    wait_for(ready, 60, "Prometheus to be ready")
                    yield Stack(proxy=pc, prometheus=qc, target=target)
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _labels(**kv: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kv.items()))


def test_recording_rules_match_the_proxys_metrics(stack: Stack) -> None:
    # rate() cannot count a series' first sample as an increase (there is no earlier one),
    # so the same requests go twice: once to create the series, and once Prometheus has
    # scraped them, to be measured. The rules then cover exactly the second round. (Equal
    # rounds also make rate()'s extrapolation identical for every series of the ratios
    # as soon as Prometheus has scraped the second round: no waiting for it to fade.)
    for category, (count, max_tokens) in MEASURED.items():
        for _ in range(count):
            stack.chat(category, max_tokens)
    first_round = {
        _labels(backend="fake", category=c, endpoint="chat", instance=stack.target, job=JOB,
                model="fake-model"): n
        for c, (n, _) in MEASURED.items()
    }
    wait_for(
        lambda: stack.vector("energy_proxy_request_energy_joules_count") == first_round,
        60,
        "Prometheus to scrape the first round",
    )
    before = stack.proxy_metrics()
    headers: dict[str, list[float]] = {c: [] for c in MEASURED}
    for category, (count, max_tokens) in MEASURED.items():
        for _ in range(count):
            headers[category].append(stack.chat(category, max_tokens))
    after = stack.proxy_metrics()

    expected: dict[str, dict[tuple[tuple[str, str], ...], float]] = {
        MEAN_J: {},
        PER_TOKEN_J: {},
        MEAN_CO2: {},
    }
    for category, (count, max_tokens) in MEASURED.items():
        hist = _labels(backend="fake", category=category, endpoint="chat", model="fake-model")
        tokens = _labels(backend="fake", category=category, endpoint="chat", model="fake-model",
                         type="completion")

        def delta(name: str, labels: tuple[tuple[str, str], ...] = hist) -> float:
            return after[(name, labels)] - before[(name, labels)]

        assert delta("energy_proxy_request_energy_joules_count") == count
        joules = delta("energy_proxy_request_energy_joules_sum")
        assert delta("energy_proxy_tokens_total", tokens) == count * max_tokens
        # The histogram holds exactly what the responses told the client.
        assert math.isclose(joules, sum(headers[category]), rel_tol=1e-9)
        key = _labels(category=category, model="fake-model")
        expected[MEAN_J][key] = joules / count
        expected[PER_TOKEN_J][key] = joules / (count * max_tokens)
        expected[MEAN_CO2][key] = delta("energy_proxy_request_co2eq_grams_sum") / count
    assert all(v > 0 for e in expected.values() for v in e.values())

    got: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}

    def rules_agree() -> bool:
        for rule in expected:
            got[rule] = stack.vector(rule)
        return all(
            got[rule].keys() == want.keys()
            and all(math.isclose(got[rule][k], v, rel_tol=REL_TOL) for k, v in want.items())
            for rule, want in expected.items()
        )

    # Each rule settles once Prometheus has scraped the final counts and evaluated.
    deadline = time.monotonic() + 90
    while not rules_agree() and time.monotonic() < deadline:
        time.sleep(0.5)
    flat_got = {(rule, k): v for rule, series in got.items() for k, v in series.items()}
    flat_want = {(rule, k): v for rule, series in expected.items() for k, v in series.items()}
    assert flat_got == pytest.approx(flat_want, rel=REL_TOL)


def test_power_rule_splits_attributed_untracked_and_idle(stack: Stack) -> None:
    got: dict[tuple[tuple[str, str], ...], float] = {}

    def every_scope() -> bool:
        got.update(stack.vector(POWER))
        return {dict(k).get("scope") for k in got} == {"attributed", "untracked", "idle"}

    wait_for(every_scope, 60, f"{POWER} for every scope")
    for labels, watts in got.items():
        assert dict(labels)["source"] == "constant" and dict(labels)["instance"] == stack.target
        assert watts >= 0
    assert sum(got.values()) > 0


def test_every_dashboard_query_runs(stack: Stack) -> None:
    exprs = list(dashboard_exprs())
    assert exprs
    for file, title, expr in exprs:
        data = stack.query(to_promql(expr))
        assert data["resultType"] in {"vector", "matrix", "scalar"}, (file, title)


def test_dashboard_variables_list_the_proxys_labels(stack: Stack) -> None:
    # Once scraped, every variable offers the value the test proxy exports.
    wait_for(
        lambda: bool(stack.vector('energy_proxy_requests_total{model="fake-model"}')),
        60,
        "a request to be scraped",
    )
    expected = {
        "instance": stack.target,
        "backend": "fake",
        "model": "fake-model",
        "category": next(iter(MEASURED)),
    }
    for path in DASHBOARD_FILES:
        for v in load_dashboard(path)["templating"]["list"]:
            if v["type"] != "query":
                continue
            selector, label = parse_label_values(variable_query(v))
            values = {
                dict(k).get(label)
                for k in stack.vector(f"count by ({label}) ({to_promql(selector)})")
            }
            assert expected[v["name"]] in values, (path.name, v["name"], values)


def test_recording_rules_are_known_to_prometheus(stack: Stack) -> None:
    r = stack.prometheus.get("/api/v1/rules")
    assert r.status_code == 200
    groups = r.json()["data"]["groups"]
    loaded = {rule["name"] for g in groups for rule in g["rules"]}
    assert set(recording_rules()) <= loaded
    assert {rule["alert"] for rule in load_rules() if "alert" in rule} <= loaded
    assert all(rule["health"] != "err" for g in groups for rule in g["rules"]), groups
