"""What the deploy tests share: the proxy's metric names and labels (docs/INTERFACE.md), our
recording rules, the dashboards' queries, and a small PromQL scanner that finds the metric
and label names an expression uses. The scanner is deliberately simple (no full parser):
a real Prometheus parses every expression in test_prometheus.py."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.support.paths import REPO_ROOT

ROOT = REPO_ROOT
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES_FILE = PROMETHEUS_DIR / "rules" / "energy-proxy.rules.yml"
GRAFANA_DIR = DEPLOY / "grafana"
DASHBOARD_FILES = (
    GRAFANA_DIR / "dashboards" / "energy-proxy-fleet.json",
    GRAFANA_DIR / "dashboards" / "energy-proxy-models.json",
)
COMPOSE_FILE = DEPLOY / "docker-compose.yml"

_SCRAPE_LABELS = frozenset({"instance", "job"})
_PER_REQUEST = ("model", "category", "backend")

# The proxy's metrics (docs/INTERFACE.md plus the two gauges the proxy adds): name -> labels.
COUNTERS: dict[str, tuple[str, ...]] = {
    "energy_proxy_requests_total": (*_PER_REQUEST, "status"),
    "energy_proxy_tokens_total": (*_PER_REQUEST, "type"),
    "energy_proxy_energy_joules_total": ("source", "scope"),
    "energy_proxy_store_dropped_records_total": (),
}
HISTOGRAMS: dict[str, tuple[str, ...]] = {
    "energy_proxy_request_energy_joules": _PER_REQUEST,
    "energy_proxy_request_co2eq_grams": _PER_REQUEST,
    "energy_proxy_request_duration_seconds": _PER_REQUEST,
}
GAUGES: dict[str, tuple[str, ...]] = {
    "energy_proxy_power_watts": ("source",),
    "energy_proxy_power_source_up": ("source", "method"),
    "energy_proxy_carbon_intensity_grams_per_kwh": ("zone", "source"),
    "energy_proxy_carbon_intensity_age_seconds": ("zone",),
    "energy_proxy_inflight_requests": ("backend",),
    "energy_proxy_backend_inflight_requests": ("backend",),
    "energy_proxy_store_up": ("kind",),
}


def proxy_series() -> dict[str, frozenset[str]]:
    """Every series name the proxy exports -> its labels, scrape labels included."""
    out: dict[str, frozenset[str]] = {}
    for name, labels in {**COUNTERS, **GAUGES}.items():
        out[name] = frozenset(labels) | _SCRAPE_LABELS
    for name, labels in HISTOGRAMS.items():
        out[f"{name}_sum"] = out[f"{name}_count"] = frozenset(labels) | _SCRAPE_LABELS
        out[f"{name}_bucket"] = frozenset(labels) | _SCRAPE_LABELS | {"le"}
    return out


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_rules() -> list[dict[str, Any]]:
    """Every rule (recording and alerting) of our rules file, in order."""
    doc = load_yaml(RULES_FILE)
    return [rule for group in doc["groups"] for rule in group["rules"]]


def recording_rules() -> dict[str, frozenset[str]]:
    """Recording rule name -> its labels. Our names follow level:metric:operations with
    the level naming the kept labels joined by `_` (model_category -> model, category)."""
    out: dict[str, frozenset[str]] = {}
    for rule in load_rules():
        if "record" in rule:
            level = rule["record"].split(":")[0]
            out[rule["record"]] = frozenset(level.split("_"))
    return out


def known_series() -> dict[str, frozenset[str]]:
    """What a dashboard may query: the proxy's series and our recording rules."""
    return {**proxy_series(), **recording_rules()}


def load_dashboard(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        doc: dict[str, Any] = json.load(f)
    return doc


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels of collapsed rows included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def variable_query(variable: dict[str, Any]) -> str:
    """A query variable's query, whether Grafana stored it as a string or an object."""
    query = variable.get("query", "")
    if isinstance(query, dict):
        return str(query.get("query", ""))
    return str(query)


def dashboard_exprs() -> Iterator[tuple[str, str, str]]:
    """(dashboard file name, panel title, expr) for every target of both dashboards."""
    for path in DASHBOARD_FILES:
        for panel in panels(load_dashboard(path)):
            for target in panel.get("targets", []):
                yield path.name, str(panel.get("title")), str(target.get("expr", ""))


# --- A minimal PromQL scanner ------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_TOKEN = re.compile(
    r"(?P<num>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:ms|[smhdwy])*)"
    r"|(?P<id>[A-Za-z_:][A-Za-z0-9_:]*)(?P<call>\s*\()?"
)
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
    | {"group_left", "group_right", "inf", "nan", "start", "end"}
)
GRAFANA_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_LABEL_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")


def _without_strings(expr: str) -> str:
    return _STRING.sub('""', GRAFANA_VARIABLE.sub("", expr))


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (not functions, keywords or label names)."""
    text = _without_strings(expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names: set[str] = set()
    for m in _TOKEN.finditer(text):
        name = m.group("id")
        if name and not m.group("call") and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def label_names(expr: str) -> set[str]:
    """Labels an expression matches on or groups by."""
    text = _without_strings(expr)
    out: set[str] = set()
    for block in _MATCHERS.findall(text):
        out.update(_LABEL_MATCHER.findall(block))
    for group in _GROUPING.findall(text):
        out.update(x.strip() for x in group.split(",") if x.strip())
    return out


def grafana_variables(text: str) -> set[str]:
    """Names of the Grafana variables (`$name`, `${name}`) used in `text`."""
    return {a or b for a, b in GRAFANA_VARIABLE.findall(text)}


# Grafana's built-in interval variables, and what to put in their place to run a query
# on a Prometheus that scrapes every second.
BUILTIN_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}


def to_promql(expr: str, value: str = ".*") -> str:
    """`expr` as Prometheus would get it from Grafana: built-ins replaced by durations and
    every other variable by `value` (the dashboards' All value is `.*`)."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        return BUILTIN_VARIABLES.get(name, value)

    return GRAFANA_VARIABLE.sub(sub, expr)


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<selector>.+?)\s*,\s*(?P<label>\w+)\s*\)\s*$")


def parse_label_values(query: str) -> tuple[str, str]:
    """(series selector, label) of a `label_values(selector, label)` variable query."""
    m = _LABEL_VALUES.match(query)
    if m is None:
        raise ValueError(f"not a label_values(selector, label) query: {query!r}")
    return m.group("selector"), m.group("label")
