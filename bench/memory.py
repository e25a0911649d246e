"""What large bodies and answers cost the proxy in memory and stalls, against an earlier
commit in the same run.

    python -m bench.memory [--compare proxy,ref:GITREF] [--bodies 10] [--messages 300000]
                           [--answer-mb 200]

Two cases against the fast stand-in backend (tests/support/fakes/fast_backend.py):
- `bodies`: N concurrent chat requests, each a body of M short messages (the shape that
  parses into the most objects per byte);
- `answer`: one embeddings request answered with a JSON list of about A MB (usage last),
  with `/healthz` asked every 20 ms meanwhile (the longest it waits: a stall).

For each: the proxy's peak resident memory above its level before the case (VmHWM, reset
through /proc/PID/clear_refs), as a multiple of the bytes in flight, and its CPU seconds.
Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bench.overhead import (
    HOST,
    Proc,
    comparison_target,
    free_port,
    start,
    stop,
    wait_until_up,
)
from tests.support.paths import REPO_ROOT

MIB = 1024 * 1024


def status_kb(pid: int, field: str) -> int:
    """A field of /proc/PID/status in kB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, clock ticks


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _post(url: str, body: bytes, timeout_s: float = 300.0) -> int:
    req = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        n = 0
        while chunk := resp.read(1 << 20):
            n += len(chunk)
        return n


def chat_body(messages: int) -> bytes:
    msgs = [{"role": "user", "content": f"message {i:07d}"} for i in range(messages)]
    return json.dumps({"model": "fake-model", "messages": msgs}).encode()


class HealthWatch(threading.Thread):
    """Asks /healthz every 20 ms until stopped; keeps the longest answer time."""

    def __init__(self, base_url: str) -> None:
        super().__init__(daemon=True)
        self.url = base_url + "/healthz"
        self.worst_s = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            t0 = time.perf_counter()
            # A failed answer counts by its time: a stall is what is measured.
            with contextlib.suppress(OSError):
                urllib.request.urlopen(self.url, timeout=30).read()
            self.worst_s = max(self.worst_s, time.perf_counter() - t0)
            time.sleep(0.02)


def measure(pid: int, base_url: str, work: object) -> tuple[float, float, float]:
    """(peak MiB above the level before, CPU seconds, worst /healthz seconds) of `work`."""
    time.sleep(0.5)
    _reset_peak(pid)
    before_kb = status_kb(pid, "VmRSS")
    cpu0 = _cpu_s(pid)
    watch = HealthWatch(base_url)
    watch.start()
    work()  # type: ignore[operator]
    watch.done.set()
    watch.join()
    peak_kb = status_kb(pid, "VmHWM")
    return (peak_kb - before_kb) / 1024, _cpu_s(pid) - cpu0, watch.worst_s


def run_case(label: str, case: str, proc: Proc, base_url: str, args: argparse.Namespace) -> None:
    """One case against a proxy started for it alone (memory freed by an earlier case
    would hide this one's peak)."""
    pid = proc.popen.pid
    if case == "bodies":
        body = chat_body(args.messages)
        chat_url = base_url + "/v1/chat/completions"

        def bodies() -> None:
            with concurrent.futures.ThreadPoolExecutor(args.bodies) as pool:
                list(pool.map(lambda _: _post(chat_url, body), range(args.bodies)))

        peak, cpu, worst = measure(pid, base_url, bodies)
        sent_mib = args.bodies * len(body) / MIB
        what = f"bodies  {args.bodies} x {len(body) / MIB:.1f} MiB"
        print(_row(label, what, peak, peak / sent_mib, cpu, worst), flush=True)
        return
    answer_bytes = [0]

    def answer() -> None:
        answer_bytes[0] = _post(base_url + "/v1/embeddings", b'{"model":"fake-model","input":"x"}')

    peak, cpu, worst = measure(pid, base_url, answer)
    got = answer_bytes[0] / MIB
    print(_row(label, f"answer  1 x {got:.0f} MiB", peak, peak / got, cpu, worst), flush=True)


def _row(label: str, what: str, peak: float, ratio: float, cpu: float, worst: float) -> str:
    return (
        f"{label:22s} {what:26s} peak +{peak:6.0f} MiB = {ratio:4.1f}x the bytes; "
        f"CPU {cpu:5.2f} s; /healthz worst {worst * 1e3:5.0f} ms"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--compare", default="proxy", help="proxy and/or ref:GITREF, comma-separated")
    p.add_argument("--bodies", type=int, default=10)
    p.add_argument("--messages", type=int, default=300_000)
    p.add_argument("--answer-mb", type=float, default=200.0)
    p.add_argument("--startup-timeout", type=float, default=60.0)
    p.add_argument("--proxy-cmd", default=None)
    p.add_argument("--upstream", default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        backend = start(
            "backend",
            [sys.executable, str(REPO_ROOT / "tests/support/fakes/fast_backend.py"),
             "--port", str(port), "--embeddings-bytes", str(int(args.answer_mb * 1e6))],
            workdir,
        )  # fmt: skip
        backend_url = f"http://{HOST}:{port}"
        procs = [backend]
        try:
            wait_until_up(backend, backend_url + "/health", args.startup_timeout)
            print(
                f"{args.bodies} concurrent bodies of {args.messages} messages; one answer of "
                f"{args.answer_mb:.0f} MB. Peak RSS above the level before each case."
            )
            names = [n.strip() for n in args.compare.split(",") if n.strip()]
            for case in ("bodies", "answer"):
                for name in names:
                    label, cmd, env, health = comparison_target(name, args, backend_url, workdir)
                    proxy_port = free_port()
                    cmd = [c.replace("{port}", str(proxy_port)) for c in cmd]
                    env = {"ENERGY_PROXY_DB": str(workdir / f"{len(procs)}.sqlite"), **env}
                    proc = start(label, cmd, workdir, env)
                    procs.append(proc)
                    base_url = f"http://{HOST}:{proxy_port}"
                    wait_until_up(proc, base_url + health, args.startup_timeout)
                    run_case(label, case, proc, base_url, args)
                    stop(proc)
        finally:
            for proc in reversed(procs):
                stop(proc)


if __name__ == "__main__":
    main()
