"""The Grafana dashboards and provisioning, checked without Grafana: both dashboards load
on first import (no `${DS_...}` inputs), every panel queries Prometheus through the
datasource variable, and every query names only metrics the proxy exports or our
recording rules define. test_prometheus.py runs every query on a real Prometheus."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from tests.deploy.promql import (
    BUILTIN_VARIABLES,
    COMPOSE_FILE,
    DASHBOARD_FILES,
    GRAFANA_DIR,
    dashboard_exprs,
    grafana_variables,
    known_series,
    label_names,
    load_dashboard,
    load_yaml,
    metric_names,
    panels,
    parse_label_values,
    proxy_series,
    variable_query,
)

# Where deploy/docker-compose.yml mounts our directories in the Grafana container.
PROVISIONING_MOUNT = "/etc/grafana/provisioning"
DASHBOARDS_MOUNT = "/var/lib/grafana/dashboards"
DATASOURCE_UID = "prometheus"
# A panel's datasource: the dashboard's datasource variable (or the provisioned uid).
PANEL_DATASOURCE_UIDS = {"${datasource}", DATASOURCE_UID}
EXPECTED_VARIABLES = {"datasource", "model", "category", "backend"}

DASHBOARDS = pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in panels(dashboard) if p.get("type") != "row"]


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}


@DASHBOARDS
def test_dashboard_imports_as_is(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    # Exported-for-sharing dashboards ask for their datasource on import; ours must not.
    assert "${DS_" not in text and "__inputs" not in text
    d = load_dashboard(path)
    assert d["schemaVersion"] >= 36
    assert d["uid"] and len(d["uid"]) <= 40
    assert d["title"]
    assert d.get("id") is None  # Grafana assigns the numeric id on import
    assert "energy-proxy" in d["tags"]


def test_dashboards_have_distinct_uids_and_titles() -> None:
    docs = [load_dashboard(p) for p in DASHBOARD_FILES]
    assert len({d["uid"] for d in docs}) == len(docs)
    assert len({d["title"] for d in docs}) == len(docs)


@DASHBOARDS
def test_panel_ids_unique_and_grid_laid_out(path: Path) -> None:
    d = load_dashboard(path)
    all_panels = list(panels(d))
    ids = [p["id"] for p in all_panels]
    assert all(isinstance(i, int) for i in ids)
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}: {sorted(ids)}"
    cells: dict[tuple[int, int], str] = {}
    for p in all_panels:
        pos = p["gridPos"]
        x, y, w, h = pos["x"], pos["y"], pos["w"], pos["h"]
        assert all(isinstance(v, int) for v in (x, y, w, h)), p["title"]
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= 24, p["title"]
        # No two panels overlap on Grafana's 24-column grid.
        for cx in range(x, x + w):
            for cy in range(y, y + h):
                other = cells.setdefault((cx, cy), p["title"])
                assert other == p["title"], f"{p['title']!r} overlaps {other!r}"


@DASHBOARDS
def test_every_panel_has_datasource_and_targets(path: Path) -> None:
    d = load_dashboard(path)
    qp = query_panels(d)
    assert qp
    for p in qp:
        title = p.get("title")
        assert title, f"panel {p['id']} has no title"
        assert p["datasource"]["type"] == "prometheus", title
        assert p["datasource"]["uid"] in PANEL_DATASOURCE_UIDS, title
        targets = p.get("targets")
        assert targets, f"{title}: no targets"
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), title
        for t in targets:
            assert t["expr"].strip(), f"{title}: empty expr"
            assert t.get("datasource", p["datasource"]) == p["datasource"], title


def test_exprs_use_only_known_metrics_and_labels() -> None:
    known = known_series()
    seen: set[str] = set()
    for file, title, expr in dashboard_exprs():
        names = metric_names(expr)
        assert names, f"{file} / {title}: no metric in {expr!r}"
        unknown = names - known.keys()
        assert not unknown, f"{file} / {title}: unknown metrics {sorted(unknown)} in {expr!r}"
        # A label must exist on at least one of the metrics the expression reads.
        labels = frozenset().union(*(known[n] for n in names))
        bad = label_names(expr) - labels
        assert not bad, f"{file} / {title}: unknown labels {sorted(bad)} in {expr!r}"
        seen |= names
    # The dashboards show the proxy's core measurements.
    for name in (
        "energy_proxy_power_watts",
        "energy_proxy_energy_joules_total",
        "energy_proxy_request_energy_joules_sum",
        "energy_proxy_request_energy_joules_count",
        "energy_proxy_tokens_total",
        "energy_proxy_request_co2eq_grams_sum",
        "energy_proxy_carbon_intensity_grams_per_kwh",
        "energy_proxy_power_source_up",
        "energy_proxy_inflight_requests",
        "energy_proxy_backend_inflight_requests",
    ):
        assert name in seen, f"no dashboard panel shows {name}"


def test_scanner_finds_metrics_not_functions_or_labels() -> None:
    expr = (
        'sum by (model, le) (rate(energy_proxy_request_energy_joules_bucket{model=~"$model"}'
        "[$__rate_interval])) / 3.6e6 * on (instance) group_left max by (instance)"
        " (model_category:energy_proxy_joules_per_token:mean5m) or vector(0)"
    )
    assert metric_names(expr) == {
        "energy_proxy_request_energy_joules_bucket",
        "model_category:energy_proxy_joules_per_token:mean5m",
    }
    assert label_names(expr) == {"model", "le", "instance"}


@DASHBOARDS
def test_variables(path: Path) -> None:
    d = load_dashboard(path)
    vs = variables(d)
    assert vs.keys() >= EXPECTED_VARIABLES
    ds = vs["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    assert ds["current"]["value"] == DATASOURCE_UID
    series = proxy_series()
    for name, v in vs.items():
        if v["type"] != "query":
            continue
        assert v["datasource"]["uid"] in PANEL_DATASOURCE_UIDS, name
        selector, label = parse_label_values(variable_query(v))
        metrics = metric_names(selector)
        assert len(metrics) == 1 and metrics <= series.keys(), f"${name}: {selector}"
        (metric,) = metrics
        assert label in series[metric], f"${name}: {metric} has no label {label!r}"
        assert label_names(selector) <= series[metric], f"${name}: {selector}"
        # A multi-value variable inside =~ needs a regex All value.
        if v.get("includeAll"):
            assert v.get("allValue") == ".*", name


@DASHBOARDS
def test_used_variables_are_defined(path: Path) -> None:
    d = load_dashboard(path)
    defined = variables(d).keys() | BUILTIN_VARIABLES.keys()
    for p in query_panels(d):
        for t in p["targets"]:
            undefined = grafana_variables(t["expr"]) - defined
            assert not undefined, f"{p['title']}: undefined {sorted(undefined)}"
    for name, v in variables(d).items():
        if v["type"] == "query":
            assert grafana_variables(variable_query(v)) <= defined, name


def test_datasource_provisioning() -> None:
    doc = load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")
    assert doc["apiVersion"] == 1
    (ds,) = doc["datasources"]
    assert ds["type"] == "prometheus"
    assert ds["uid"] == DATASOURCE_UID
    assert ds["url"] == "http://prometheus:9090"
    assert ds["access"] == "proxy"
    assert ds["isDefault"] is True


def test_dashboard_provisioning_points_at_the_mounted_dashboards() -> None:
    doc = load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "energy-proxy.yml")
    assert doc["apiVersion"] == 1
    (provider,) = doc["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == DASHBOARDS_MOUNT
    # The provider loads every JSON file of the mounted directory: ours are there.
    found = sorted(p.name for p in (GRAFANA_DIR / "dashboards").glob("*.json"))
    assert found == sorted(p.name for p in DASHBOARD_FILES)


def compose_mounts(service: str) -> dict[Path, str]:
    """Host directory (resolved) -> container path, for one service's bind mounts."""
    compose = load_yaml(COMPOSE_FILE)
    out: dict[Path, str] = {}
    for volume in compose["services"][service].get("volumes", []):
        if isinstance(volume, dict):
            source, target = volume.get("source", ""), volume["target"]
        else:
            source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            out[(COMPOSE_FILE.parent / source).resolve()] = str(PurePosixPath(target))
    return out


def test_compose_mounts_grafana_files_where_provisioning_expects_them() -> None:
    mounts = compose_mounts("grafana")
    assert mounts.get((GRAFANA_DIR / "provisioning").resolve()) == PROVISIONING_MOUNT
    assert mounts.get((GRAFANA_DIR / "dashboards").resolve()) == DASHBOARDS_MOUNT
