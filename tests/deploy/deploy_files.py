"""What tests/deploy/test_deploy_files.py reads the deployment files with: where they are,
and small parsers (Dockerfile instructions, compose services, Kubernetes documents, the
systemd unit's entries), each checked against what `energy-proxy serve` accepts."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.cli.main import build_parser
from proxy.settings import Settings, load_settings
from tests.support.paths import REPO_ROOT

ROOT = REPO_ROOT
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
UNIT = DEPLOY / "systemd" / "energy-proxy.service"
SYSTEMD_CONFIG = DEPLOY / "systemd" / "config.toml"

PROXY_PORT = Settings.model_fields["port"].default  # 8080, the proxy's default
PROXY_IMAGE = "energy-proxy"
DB_DIR = "/var/lib/energy-proxy"
# proxy/cli/main.py runs uvicorn with timeout_graceful_shutdown=30: in-flight requests drain for
# up to 30 s, then the request store flushes. Every stop timeout must leave room for both.
DRAIN_S = 30


# --- parsing helpers --------------------------------------------------------------------


def serve_parser() -> argparse.ArgumentParser:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub: argparse.ArgumentParser = action.choices["serve"]
            return sub
    raise AssertionError("energy-proxy has no `serve` command")


SERVE_FLAGS = frozenset(s for a in serve_parser()._actions for s in a.option_strings)


def check_serve_args(args: list[str], where: str) -> dict[str, Any]:
    """Every `--flag` in args is a real flag of `energy-proxy serve`, spelled out in full
    (argparse would accept a prefix), and the whole list parses. Returns the given flags."""
    for arg in args:
        if arg.startswith("-"):
            flag = arg.split("=", 1)[0]
            assert flag in SERVE_FLAGS, f"{where}: {flag} is not a flag of energy-proxy serve"
    try:
        ns = serve_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"{where}: `energy-proxy serve {shlex.join(args)}` does not parse")
    return vars(ns)


def settings_for(args: list[str], where: str, config: Path | None = None) -> Settings:
    """The settings `energy-proxy serve ARGS` would run with; `--config` points at `config`
    (the repository's copy of the file the deployment mounts)."""
    flags = check_serve_args(args, where)
    if "config" in flags:
        assert config is not None, f"{where}: --config {flags['config']} has no local copy"
        flags["config"] = str(config)
    return load_settings(flags, {})


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` and `${VAR}` as they expand with VAR unset."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines, also inside a continuation
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical = pending + stripped
        pending = ""
        instruction, _, rest = logical.partition(" ")
        out.append((instruction.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continuation line"
    return out


def dockerfile(instruction: str) -> list[str]:
    return [rest for instr, rest in dockerfile_instructions() if instr == instruction]


def exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), rest
    return value


def healthcheck_cmd() -> list[str]:
    (rest,) = dockerfile("HEALTHCHECK")
    _, sep, cmd = rest.partition("CMD ")
    assert sep, "HEALTHCHECK has no CMD"
    return exec_form(cmd)


def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def service(name: str) -> dict[str, Any]:
    svc = compose()["services"][name]
    assert isinstance(svc, dict)
    return svc


def compose_env(svc: dict[str, Any]) -> dict[str, str | None]:
    """A service's environment; None for a name passed through from the host."""
    env = svc.get("environment") or {}
    if isinstance(env, dict):
        return {k: None if v is None else str(v) for k, v in env.items()}
    out: dict[str, str | None] = {}
    for item in env:
        name, sep, value = str(item).partition("=")
        out[name] = value if sep else None
    return out


def bind_mounts(svc: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) of a service's bind mounts (relative host paths)."""
    out = []
    for vol in svc.get("volumes", []):
        src, dst = str(vol).split(":")[:2]
        if src.startswith((".", "/")):
            out.append((src, dst))
    return out


def k8s_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs.extend(d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d)
    return docs


def k8s(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in k8s_docs() if d["kind"] == kind]
    return doc


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = k8s("Deployment")["spec"]["template"]["spec"]
    return spec


def container(name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in pod_spec()["containers"] if c["name"] == name]
    (c,) = found
    return c


def container_port(c: dict[str, Any], port: int | str) -> int:
    """A port number, or a named port resolved against the container's ports."""
    if isinstance(port, int):
        return port
    (p,) = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == port]
    return int(p)


def configmap_toml(tmp_path: Path) -> Path:
    """The proxy container's --config file, written out from the ConfigMap it mounts."""
    args = container("energy-proxy")["args"]
    config_path = Path(args[args.index("--config") + 1])
    (mount,) = [
        m
        for m in container("energy-proxy")["volumeMounts"]
        if Path(m["mountPath"]) == config_path.parent
    ]
    (volume,) = [v for v in pod_spec()["volumes"] if v["name"] == mount["name"]]
    cm = k8s("ConfigMap")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    local = tmp_path / config_path.name
    local.write_text(cm["data"][config_path.name], encoding="utf-8")
    return local


def unit_entries() -> dict[str, list[tuple[str, str]]]:
    """The unit's [Section] -> (key, value) in order, repeated keys kept (DeviceAllow=...)."""
    out: dict[str, list[tuple[str, str]]] = {}
    section = ""
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        if stripped.startswith("["):
            section = stripped.strip("[]")
            out.setdefault(section, [])
            continue
        key, sep, value = stripped.partition("=")
        assert sep and section, f"{UNIT.name}: cannot read {line!r}"
        out[section].append((key.strip(), value.strip()))
    return out


def unit_values(section: str, key: str) -> list[str]:
    return [v for k, v in unit_entries().get(section, []) if k == key]


def exec_start() -> list[str]:
    (line,) = unit_values("Service", "ExecStart")
    return shlex.split(line)


def seconds(value: str) -> float:
    """`45s`, `1m30s`, `45` (Docker, compose and systemd durations) in seconds."""
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", value)
    assert parts, f"cannot read duration {value!r}"
    return sum(float(n) * units[u] for n, u in parts)
