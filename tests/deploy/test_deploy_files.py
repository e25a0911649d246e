"""The deployment files in deploy/: parsed and cross-checked without a cluster or a daemon.

Dockerfile, docker-compose.yml, the Kubernetes manifests and the systemd unit each name the
proxy's port, flags, probe paths and config files. These tests hold them to the code: every
flag is one `energy-proxy serve` accepts, every TOML file loads as settings, every port
agrees with the one the proxy listens on, and every probe path answers 200 on the real app
in front of a fake backend. `docker`, `kubectl` and `systemd-analyze` are used only where
installed, in tests of their own; the core checks never need them.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from proxy.settings import Settings, load_settings
from tests.conftest import serve_proxy
from tests.deploy.deploy_files import (
    DB_DIR,
    DEPLOY,
    DOCKERFILE,
    DRAIN_S,
    K8S,
    PROXY_IMAGE,
    PROXY_PORT,
    ROOT,
    SYSTEMD_CONFIG,
    UNIT,
    bind_mounts,
    check_serve_args,
    compose,
    compose_env,
    configmap_toml,
    container,
    container_port,
    dockerfile,
    exec_form,
    exec_start,
    healthcheck_cmd,
    interpolate,
    k8s,
    k8s_docs,
    pod_spec,
    seconds,
    service,
    settings_for,
    unit_entries,
    unit_values,
)
from tests.support.fakes.openai_backend import make_fake_backend
from tests.support.servers import ServerThread

# --- the real app, for the probe paths ----------------------------------------------------


@pytest.fixture(scope="module")
def running_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real proxy on a socket, in front of the fake backend on another socket."""
    backend_app, _ = make_fake_backend()
    tmp_path = tmp_path_factory.mktemp("proxy")
    with ServerThread(backend_app) as backend_url, serve_proxy(tmp_path, backend_url) as url:
        yield url


def get_when_ready(url: str, timeout_s: float = 10.0) -> httpx.Response:
    """GET until 200 (readiness waits for the backend's model list), bounded."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = httpx.get(url, timeout=5.0)
        if response.status_code == 200 or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


def probe_paths() -> set[str]:
    """Every HTTP path a deployment file asks of the proxy."""
    proxy = container("energy-proxy")
    paths = {proxy[p]["httpGet"]["path"] for p in ("livenessProbe", "readinessProbe")}
    paths |= {e["path"] for e in k8s("ServiceMonitor")["spec"]["endpoints"]}
    paths |= set(re.findall(r"'(/[a-z]+)'", " ".join(healthcheck_cmd())))
    return paths


def test_probe_paths_answer_200_on_the_real_app(running_proxy: str) -> None:
    paths = probe_paths()
    assert {"/healthz", "/readyz", "/metrics"} <= paths
    for path in sorted(paths):
        response = get_when_ready(running_proxy + path)
        assert response.status_code == 200, f"{path}: {response.status_code} {response.text}"
    metrics = httpx.get(running_proxy + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "energy_proxy_" in metrics.text


def test_liveness_is_healthz_and_readiness_is_readyz() -> None:
    proxy = container("energy-proxy")
    assert proxy["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # HEALTHCHECK marks the container unhealthy (Swarm replaces it): liveness, not readiness.
    assert any("/healthz" in part for part in healthcheck_cmd())
    assert not any("/readyz" in part for part in healthcheck_cmd())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_healthcheck(port: int) -> int:
    cmd = healthcheck_cmd()
    assert cmd[0] == "python", "the slim image has python, not curl"
    env = {**os.environ, "ENERGY_PROXY_PORT": str(port)}
    done = subprocess.run(
        [sys.executable, *cmd[1:]], env=env, capture_output=True, timeout=30, check=False
    )
    return done.returncode


def test_dockerfile_healthcheck_command_works(running_proxy: str) -> None:
    """The HEALTHCHECK's own command, run here: passes on the proxy, fails without one."""
    port = int(running_proxy.rsplit(":", 1)[1])
    assert run_healthcheck(port) == 0
    assert run_healthcheck(free_port()) != 0


# --- ports ------------------------------------------------------------------------------


def test_ports_agree_everywhere(tmp_path: Path) -> None:
    assert PROXY_PORT == 8080
    # Dockerfile
    exposed = [p.split("/")[0] for rest in dockerfile("EXPOSE") for p in rest.split()]
    assert exposed == [str(PROXY_PORT)]
    # compose: the published port's container side, and the port the proxy runs with
    proxy_svc = service("energy-proxy")
    published = [interpolate(str(p)).rsplit(":", 1)[-1].split("/")[0] for p in proxy_svc["ports"]]
    assert published == [str(PROXY_PORT)]
    assert compose_settings().port == PROXY_PORT
    # Kubernetes: containerPort, the probes' ports, the Service's targetPort
    proxy = container("energy-proxy")
    assert [p["containerPort"] for p in proxy["ports"]] == [PROXY_PORT]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container_port(proxy, proxy[probe]["httpGet"]["port"]) == PROXY_PORT
    (svc_port,) = k8s("Service")["spec"]["ports"]
    assert container_port(proxy, svc_port["targetPort"]) == PROXY_PORT
    assert k8s_settings(tmp_path).port == PROXY_PORT
    # systemd
    assert systemd_settings().port == PROXY_PORT


def test_prometheus_scrapes_the_compose_proxy() -> None:
    """deploy/prometheus/prometheus.yml (written alongside) targets the compose service."""
    path = DEPLOY / "prometheus" / "prometheus.yml"
    assert path.is_file(), f"{path} is missing"
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    targets = {
        t
        for job in doc.get("scrape_configs", [])
        for sc in job.get("static_configs", [])
        for t in sc.get("targets", [])
    }
    assert f"energy-proxy:{PROXY_PORT}" in targets
    assert "energy-proxy" in compose()["services"]


# --- Dockerfile -------------------------------------------------------------------------


def test_dockerfile_base_entrypoint_and_user() -> None:
    (base,) = dockerfile("FROM")
    assert base.split()[0] == "python:3.11-slim"
    (entrypoint,) = dockerfile("ENTRYPOINT")
    argv = exec_form(entrypoint)
    assert argv[:2] == ["energy-proxy", "serve"]
    flags = check_serve_args(argv[2:], "Dockerfile ENTRYPOINT")
    assert flags.get("host") == "0.0.0.0"  # reachable from outside the container
    assert not dockerfile("CMD"), "a CMD would be appended to the entrypoint's flags"
    users = dockerfile("USER")
    assert users, "the image must not run as root"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_dockerfile_copies_only_what_the_package_needs() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    sources: list[str] = []
    for rest in dockerfile("COPY"):
        parts = exec_form(rest) if rest.startswith("[") else rest.split()
        assert not any(p.startswith("--from") for p in parts)
        sources.extend(p for p in parts[:-1] if not p.startswith("--"))
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    allowed = {"pyproject.toml", "README.md", "proxy/", "backends/", "metering/"}
    assert set(sources) <= allowed, set(sources) - allowed
    # ...and everything `pip install .` reads: the metadata, the readme, every package.
    assert {"pyproject.toml", pyproject["project"]["readme"]} <= set(sources)
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.rstrip("*") + "/" in sources


def test_dockerfile_installs_the_proxy_without_the_demo_extra() -> None:
    runs = " ".join(dockerfile("RUN"))
    assert re.search(r"pip install\b[^&]*\s\.(\s|$)", runs), "the project is pip-installed"
    assert "[demo]" not in runs and "llama" not in runs
    assert "apt-get" not in runs, "the proxy needs no compiler or system package"


def test_dockerfile_request_store_is_a_volume() -> None:
    env = " ".join(dockerfile("ENV"))
    assert f"ENERGY_PROXY_DB={DB_DIR}/requests.db" in env
    volumes = [v for rest in dockerfile("VOLUME") for v in exec_form(rest)]
    assert volumes == [DB_DIR]


# --- docker compose ---------------------------------------------------------------------


def compose_settings() -> Settings:
    (entrypoint,) = dockerfile("ENTRYPOINT")
    command = [interpolate(str(a)) for a in service("energy-proxy")["command"]]
    return settings_for(exec_form(entrypoint)[2:] + command, "compose energy-proxy")


def nvidia_devices(svc: dict[str, Any]) -> list[dict[str, Any]]:
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    return [d for d in devices if d.get("driver") == "nvidia"]


def test_compose_services_and_images() -> None:
    services = compose()["services"]
    assert set(services) == {"vllm", "energy-proxy", "prometheus", "grafana"}
    for name, svc in services.items():
        assert str(svc.get("image", "")).strip(), f"compose {name}: no image"
    assert services["vllm"]["image"].startswith("vllm/vllm-openai")
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["grafana"]["image"].startswith("grafana/grafana")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert services["energy-proxy"]["image"] == f"{PROXY_IMAGE}:{version}"


def test_compose_builds_the_proxy_from_the_dockerfile() -> None:
    build = service("energy-proxy")["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE


def test_compose_vllm_serves_the_model_on_the_gpu() -> None:
    vllm = service("vllm")
    command = [str(a) for a in vllm["command"]]
    model = command[command.index("--model") + 1]
    assert model.startswith("${MODEL:-") and interpolate(model), "MODEL, with a default"
    assert command[command.index("--port") + 1] == "8000"
    assert "ports" not in vllm, "clients reach vLLM only through the proxy"
    assert nvidia_devices(vllm)
    assert vllm["healthcheck"]["test"]
    assert any(dst == "/root/.cache/huggingface" for dst in _volume_targets(vllm))


def _volume_targets(svc: dict[str, Any]) -> list[str]:
    return [str(v).split(":")[1] for v in svc.get("volumes", [])]


def test_compose_proxy_fronts_vllm_with_nvml() -> None:
    proxy = service("energy-proxy")
    settings = compose_settings()
    (backend,) = settings.backends
    # http://vllm:8000: a compose service, at the port vLLM serves on
    host, port = backend.url.removeprefix("http://").split(":")
    assert host in compose()["services"]
    vllm_cmd = [str(a) for a in service(host)["command"]]
    assert port == vllm_cmd[vllm_cmd.index("--port") + 1]
    assert settings.power_source == "nvml"
    (gpus,) = nvidia_devices(proxy)
    assert "utility" in gpus["capabilities"], "NVML is the driver's `utility` capability"
    assert proxy["depends_on"][host]["condition"] == "service_healthy"
    assert DB_DIR in _volume_targets(proxy)


def test_compose_passes_secrets_through_from_the_host() -> None:
    env = compose_env(service("energy-proxy"))
    assert env.get("ELECTRICITYMAPS_API_KEY", "missing") is None, "passed through, not set"
    assert "ENERGY_PROXY_CARBON_ZONE" in env
    assert compose_env(service("vllm")).get("HF_TOKEN", "missing") is None


def test_compose_mounted_paths_exist() -> None:
    """The Prometheus and Grafana files are written alongside (deploy/prometheus, grafana)."""
    mounts = {dst: src for svc in compose()["services"].values() for src, dst in bind_mounts(svc)}
    assert mounts["/etc/prometheus"] == "./prometheus"
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    assert mounts["/var/lib/grafana/dashboards"] == "./grafana/dashboards"
    for src in mounts.values():
        assert (DEPLOY / src).exists(), f"compose mounts {src}, missing under deploy/"
    assert (DEPLOY / "prometheus" / "prometheus.yml").is_file()
    named = {
        str(v).split(":")[0]
        for svc in compose()["services"].values()
        for v in svc.get("volumes", [])
        if not str(v).startswith((".", "/"))
    }
    assert named <= set(compose().get("volumes") or {}), "named volumes are declared"


# --- Kubernetes -------------------------------------------------------------------------


def k8s_settings(tmp_path: Path) -> Settings:
    args = container("energy-proxy")["args"]
    return settings_for(["--host", "0.0.0.0", *args], "k8s energy-proxy", configmap_toml(tmp_path))


def test_k8s_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    assert kustomization["kind"] == "Kustomization"
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    assert files == {"deployment.yaml", "service.yaml", "servicemonitor.yaml", "configmap.yaml"}
    kinds = sorted(d["kind"] for d in k8s_docs())
    assert kinds == ["ConfigMap", "Deployment", "Service", "ServiceMonitor"]
    for doc in k8s_docs():
        assert doc["apiVersion"] and doc["metadata"]["name"]


def test_k8s_labels_connect_deployment_service_and_servicemonitor() -> None:
    deployment = k8s("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    svc = k8s("Service")
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    monitor = k8s("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    svc_port_names = {p["name"] for p in svc["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http"]
    assert svc_port_names == {"http"}


def test_k8s_service_exposes_the_proxy_not_vllm() -> None:
    vllm = container("vllm")
    vllm_port = int(vllm["args"][vllm["args"].index("--port") + 1])
    (port,) = k8s("Service")["spec"]["ports"]
    assert port["name"] == "http"
    target = port["targetPort"]
    assert target in {p["name"] for p in container("energy-proxy")["ports"]} or target == PROXY_PORT
    assert vllm_port not in (port["port"], target)
    # vLLM listens on the pod's loopback and publishes no port: only the sidecar reaches it.
    assert vllm["args"][vllm["args"].index("--host") + 1] == "127.0.0.1"
    assert not vllm.get("ports")


def test_k8s_sidecar_fronts_vllm_with_nvml(tmp_path: Path) -> None:
    settings = k8s_settings(tmp_path)
    (backend,) = settings.backends
    vllm_args = container("vllm")["args"]
    assert backend.name == "vllm"
    assert backend.url == f"http://127.0.0.1:{vllm_args[vllm_args.index('--port') + 1]}"
    assert settings.power_source == "nvml"
    # The GPU is vLLM's; the proxy reads it through NVML without an allocation of its own
    # (see the comment at the top of deployment.yaml).
    assert "nvidia.com/gpu" in container("vllm")["resources"]["limits"]
    proxy = container("energy-proxy")
    assert "nvidia.com/gpu" not in proxy["resources"].get("limits", {})
    env = {e["name"]: e for e in proxy["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"]["value"] == "utility"


def test_k8s_images_and_resources() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for c in pod_spec()["containers"]:
        assert str(c.get("image", "")).strip(), f"container {c['name']}: no image"
        assert c["resources"]["requests"], f"container {c['name']}: no resource requests"
    assert container("vllm")["image"].startswith("vllm/vllm-openai")
    assert container("energy-proxy")["image"] == f"{PROXY_IMAGE}:{version}"


def test_k8s_secret_and_storage(tmp_path: Path) -> None:
    proxy = container("energy-proxy")
    env = {e["name"]: e for e in proxy["env"]}
    key = env["ELECTRICITYMAPS_API_KEY"]
    assert "value" not in key, "the key comes from a Secret, never the manifest"
    assert key["valueFrom"]["secretKeyRef"]["optional"] is True
    # The request store is on a mounted volume (the root file system is read-only).
    db = env["ENERGY_PROXY_DB"]["value"]
    mounts = {m["mountPath"]: m["name"] for m in proxy["volumeMounts"]}
    assert str(Path(db).parent) in mounts
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    data = volumes[mounts[str(Path(db).parent)]]
    assert "emptyDir" in data or "persistentVolumeClaim" in data
    assert proxy["securityContext"]["runAsNonRoot"] is True
    configmap_toml(tmp_path)  # the --config file is the mounted ConfigMap's key


# --- systemd ----------------------------------------------------------------------------


def systemd_settings() -> Settings:
    argv = exec_start()
    return settings_for(argv[2:], "systemd ExecStart", SYSTEMD_CONFIG)


def test_systemd_unit_parses_and_runs_energy_proxy_serve() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    assert {"Unit", "Service", "Install"} <= set(parser.sections())
    argv = exec_start()
    assert argv[0] == "/opt/energy-proxy/.venv/bin/energy-proxy"
    assert argv[1] == "serve"
    assert argv[argv.index("--config") + 1] == "/etc/energy-proxy/config.toml"
    systemd_settings()


def test_systemd_unit_runs_unprivileged_with_state_and_secrets() -> None:
    service_ = dict(unit_entries()["Service"])
    assert service_.get("DynamicUser") == "yes" or service_.get("User") not in (None, "root")
    assert service_["StateDirectory"] == "energy-proxy"
    env = dict(v.split("=", 1) for v in unit_values("Service", "Environment"))
    assert env["ENERGY_PROXY_DB"] == f"{DB_DIR}/requests.db"  # StateDirectory's path
    assert "ELECTRICITYMAPS_API_KEY" not in env, "the key belongs in the env file"
    assert unit_values("Service", "EnvironmentFile") == ["-/etc/energy-proxy/env"]
    assert service_["Restart"] == "on-failure"
    assert service_["KillSignal"] == "SIGTERM"
    assert service_["NoNewPrivileges"] == "yes"
    assert service_["ProtectSystem"] == "strict"
    assert service_.get("ProcSubset") != "pid", "cpu-estimate reads /proc/stat"
    assert service_.get("PrivateDevices") != "yes", "NVML needs /dev/nvidia*"
    allowed = unit_values("Service", "DeviceAllow")
    assert any("nvidia" in d for d in allowed)
    assert unit_entries()["Install"] == [("WantedBy", "multi-user.target")]


def test_stop_timeouts_leave_room_to_drain_and_flush() -> None:
    (timeout,) = unit_values("Service", "TimeoutStopSec")
    assert seconds(timeout) > DRAIN_S
    assert seconds(service("energy-proxy")["stop_grace_period"]) > DRAIN_S
    assert pod_spec()["terminationGracePeriodSeconds"] > DRAIN_S


# --- TOML configs -----------------------------------------------------------------------


def test_every_toml_config_loads_as_settings(tmp_path: Path) -> None:
    """Keys must be settings: an unknown or misspelt key fails here, not at start-up."""
    for path in (configmap_toml(tmp_path), SYSTEMD_CONFIG):
        settings = load_settings({"config": str(path)}, {})
        assert settings.port == PROXY_PORT
        assert settings.carbon_zone is None, f"{path.name}: a zone needs the API key"
    (backend,) = load_settings({"config": str(SYSTEMD_CONFIG)}, {}).backends
    assert backend.url == "http://127.0.0.1:8000"


# --- optional: the real tools, where installed --------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (the checks above cover the files without it)")
    return path


def test_kubectl_kustomize_builds() -> None:
    kubectl = _tool("kubectl")
    done = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(done.stdout) if d)
    assert kinds == ["ConfigMap", "Deployment", "Service", "ServiceMonitor"]


def test_systemd_analyze_verify() -> None:
    analyze = _tool("systemd-analyze")
    done = subprocess.run(
        [analyze, "verify", str(UNIT)], capture_output=True, text=True, timeout=60, check=False
    )
    # The venv is not installed here; any other complaint is a real one.
    problems = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if line.strip() and "/opt/energy-proxy/.venv/bin/energy-proxy" not in line
    ]
    assert not problems, problems
