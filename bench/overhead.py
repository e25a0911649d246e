"""What the proxy costs: added latency and throughput ratio of proxy vs. direct.

    python -m bench.overhead [--duration 10] [--rounds 2] [--proxy-cmd "..."]
                             [--upstream aiohttp | --compare-upstreams [aiohttp,httpx]]
                             [--direct-vs-direct]

Starts tests/support/fakes/fast_backend.py and the proxy on free 127.0.0.1 ports, then for
each case (non-streaming / streaming x concurrency 1 / 64) loads the backend directly and
through the proxy, alternating in the same run, and prints one table. The machine is shared
and small, so only numbers taken side by side mean anything: read the ratios, not the
absolutes.

Aggregation: each target runs --rounds times per case, in alternating order (direct, proxy,
then proxy, direct, ...) so slow drift hits both alike; by default the best run of each is
kept (lowest p50, lowest p99, highest req/s, independently), because noise on a shared
machine only ever makes a run slower. --aggregate median keeps the median instead.

It never asserts on time: the targets are printed next to the numbers, nothing fails on them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from bench.loadgen import BODY_PLAIN, BODY_STREAM, LoadGen, Result, aggregate, pick_loadgen
from tests.support.fakenvml import H100_LATENCY, build_fake_nvml, fake_nvml_env, write_script
from tests.support.paths import REPO_ROOT

HOST = "127.0.0.1"
BENCH_DIR = Path(__file__).resolve().parent
FAST_BACKEND = REPO_ROOT / "tests" / "support" / "fakes" / "fast_backend.py"
CHAT_PATH = "/v1/chat/completions"
# Printed next to the numbers, never enforced.
TARGET_ADDED_P50_MS = 2.0  # at c=1, where latency is the proxy's own and not queueing
TARGET_RATIO_C64 = 0.7
DEFAULT_UPSTREAMS = "aiohttp,httpx"


# ---------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    label: str
    popen: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def start(label: str, cmd: list[str], workdir: Path, env: dict[str, str] | None = None) -> Proc:
    """Start a child in its own session, so it (and anything it forks) can be stopped by its
    process-group id, and so Ctrl-C reaches us first and we stop it in order."""
    log = workdir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', label)}.log"
    with log.open("wb") as fh:
        popen = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    return Proc(label, popen, log)


def stop(proc: Proc, grace_s: float = 5.0) -> None:
    if proc.popen.poll() is not None:
        return
    _signal_group(proc.popen.pid, signal.SIGTERM)
    try:
        proc.popen.wait(grace_s)
    except subprocess.TimeoutExpired:
        _signal_group(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait(grace_s)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(pgid, sig)


def http_get_status(url: str, timeout_s: float = 1.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0


def wait_until_up(proc: Proc, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            die(
                f"{proc.label} exited with {proc.popen.returncode} before answering {url}:\n"
                f"{proc.log_tail()}"
            )
        if http_get_status(url) == 200:
            return
        time.sleep(0.1)
    die(f"{proc.label} did not answer 200 on {url} within {timeout_s:.0f}s:\n{proc.log_tail()}")


def post(url: str, body: str, timeout_s: float = 10.0) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url, data=body.encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def check_answers(label: str, base_url: str, proc: Proc | None) -> None:
    """A proxy that answers fast with an error would look great: refuse to measure it."""
    for body, must_contain in ((BODY_PLAIN, b'"choices"'), (BODY_STREAM, b"data: [DONE]")):
        try:
            status, data = post(base_url + CHAT_PATH, body)
        except OSError as e:
            status, data = 0, str(e).encode()
        if status != 200 or must_contain not in data:
            tail = f"\n--- {proc.label} log ---\n{proc.log_tail()}" if proc else ""
            die(
                f"{label}: POST {CHAT_PATH} ({'stream' if 'stream' in body else 'plain'}) "
                f"gave {status}: {data[:500]!r}{tail}"
            )


def die(message: str) -> NoReturn:
    raise SystemExit(f"overhead.py: {message}")


# ---------------------------------------------------------------------------- the proxy


def proxy_command(
    template: str | None, backend: str, upstream: str | None, workdir: Path
) -> list[str]:
    """The proxy's command line, "{port}" still to fill in; --proxy-cmd may use {host}
    {port} {backend} {python} {workdir}."""
    if template is None:
        exe = Path(sys.executable).parent / "energy-proxy"
        found = str(exe) if exe.exists() else shutil.which("energy-proxy")
        if found is None:
            die(f"{exe} not found: install the project (pip install -e .) or pass --proxy-cmd")
        cmd = [
            found,
            "serve",
            "--host",
            HOST,
            "--port",
            "{port}",
            "--backend",
            backend,
            "--power-source",
            "constant:100",
        ]
    else:
        cmd = shlex.split(
            template.format(
                host=HOST, port="{port}", backend=backend, python=sys.executable, workdir=workdir
            )
        )
    if upstream:
        cmd += ["--upstream-client", upstream]
    return cmd


@dataclass(frozen=True)
class Target:
    label: str
    base_url: str


def start_proxies(
    args: argparse.Namespace, backend_url: str, workdir: Path, procs: list[Proc]
) -> list[Target]:
    if args.direct_vs_direct:
        # Harness self-check: the "proxy" is the backend itself, so the ratio must be ~1.0.
        return [Target("direct(again)", backend_url)]
    launches: list[tuple[str, list[str], dict[str, str], str]] = []
    if args.compare_upstreams:
        for upstream in (u.strip() for u in args.compare_upstreams.split(",") if u.strip()):
            cmd = proxy_command(args.proxy_cmd, backend_url, upstream, workdir)
            launches.append((f"proxy[{upstream}]", cmd, {}, "/healthz"))
    else:
        for name in (t.strip() for t in args.compare.split(",") if t.strip()):
            launches.append(comparison_target(name, args, backend_url, workdir))
    targets = []
    for label, cmd_template, extra_env, health in launches:
        port = free_port()
        cmd = [c.replace("{port}", str(port)) for c in cmd_template]
        if cmd_template[:1] == ["nginx"]:
            cmd = nginx_command(workdir, port, backend_url)
        print(f"  {label}: {shlex.join(cmd)}", file=sys.stderr)
        # Keep the benchmark's request records out of the user's real store (INTERFACE:
        # every flag reads ENERGY_PROXY_<FLAG>); an env var cannot break an older CLI.
        env = {"ENERGY_PROXY_DB": str(workdir / f"{label}.sqlite"), **extra_env}
        procs.append(start(label, cmd, workdir, env))
        targets.append((Target(label, f"http://{HOST}:{port}"), health))
    for proc, (target, health) in zip(procs[-len(targets) :], targets, strict=True):
        wait_until_up(proc, target.base_url + health, args.startup_timeout)
        check_answers(target.label, target.base_url, proc)
    return [t for t, _ in targets]


# ---------------------------------------------------------------------------- comparisons


def comparison_target(
    name: str, args: argparse.Namespace, backend_url: str, workdir: Path
) -> tuple[str, list[str], dict[str, str], str]:
    """(label, command with "{port}", environment, health path) of one --compare entry."""
    if name == "proxy":
        return (
            "proxy",
            proxy_command(args.proxy_cmd, backend_url, args.upstream, workdir),
            {},
            "/healthz",
        )
    if name.startswith("proxy-with:"):
        # The same proxy with extra flags (`proxy-with:--journal off`): what one costs.
        extra = shlex.split(name.partition(":")[2])
        cmd = proxy_command(args.proxy_cmd, backend_url, args.upstream, workdir)
        return f"proxy[{' '.join(extra)}]", [*cmd, *extra], {}, "/healthz"
    if name == "proxy-nvml":
        # The same proxy, measuring a fake GPU as slow to read as an H100 (through the real
        # nvidia-ml-py): the cost of metering a real GPU, not of a constant.
        env = fake_h100_env(workdir)
        cmd = proxy_command(args.proxy_cmd, backend_url, args.upstream, workdir)
        cmd = [*cmd[: cmd.index("--power-source")], "--power-source", "nvml"]
        return "proxy-nvml", cmd, env, "/healthz"
    if name.startswith(("ref:", "ref-nvml:")):
        kind, _, ref = name.partition(":")
        tree = git_worktree(ref, workdir)
        nvml = kind == "ref-nvml"
        source = "nvml" if nvml else "constant:100"
        # The checkout's own packages come first on the path (the child runs in `workdir`,
        # where no package lies): `python -m proxy.cli` is that commit's command line.
        cmd = [sys.executable, "-m", "proxy.cli", "serve", "--host", HOST, "--port", "{port}",
               "--backend", backend_url, "--power-source", source]  # fmt: skip
        env = {**(fake_h100_env(workdir) if nvml else {}), "PYTHONPATH": str(tree)}
        return f"proxy{'-nvml' if nvml else ''}@{ref}", cmd, env, "/healthz"
    if name == "nginx":
        if shutil.which("nginx") is None:
            die("nginx not found: apt-get install -y nginx-light (or nginx)")
        return "nginx", ["nginx"], {}, "/healthz"
    if name == "litellm":
        exe = args.litellm or shutil.which("litellm")
        if exe is None or not Path(exe).exists():
            die("litellm not found: bash bench/setup_litellm.sh, then --litellm <its path>")
        config = workdir / "litellm.yaml"
        config.write_text(
            "model_list:\n  - model_name: fake-model\n    litellm_params:\n"
            f"      model: openai/fake-model\n      api_base: {backend_url}/v1\n"
            "      api_key: unused\n"
        )
        # No master key: wrk sends none, and this is a local benchmark on 127.0.0.1.
        env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
               "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
               "DISABLE_SCHEMA_UPDATE": "True"}  # fmt: skip
        cmd = [exe, "--config", str(config), "--host", HOST, "--port", "{port}",
               "--num_workers", "1"]  # fmt: skip
        return "litellm", cmd, env, "/health/liveliness"
    die(
        "--compare takes proxy, proxy-nvml, proxy-with:FLAGS, nginx, litellm, ref:GITREF; "
        f"not {name!r}"
    )


def fake_h100_env(workdir: Path) -> dict[str, str]:
    """LD_LIBRARY_PATH and FAKE_NVML_SCRIPT for the fake libnvidia-ml with H100 latencies."""
    lib_dir = build_fake_nvml(workdir / "fakenvml")
    script = workdir / "h100.script"
    write_script(
        script,
        "device 0 name=FakeH100 energy_mj=0 energy_rate_mw=300000 counter_period_ms=100 "
        f"power_mw=300000 instant_mw=300000 {H100_LATENCY}\n",
    )
    env = fake_nvml_env(lib_dir, script)
    return {k: env[k] for k in ("LD_LIBRARY_PATH", "FAKE_NVML_SCRIPT")}


def git_worktree(ref: str, workdir: Path) -> Path:
    """The project at `ref`, checked out beside the benchmark (removed with its workdir)."""
    tree = workdir / f"ref-{re.sub(r'[^A-Za-z0-9_.-]', '_', ref)}"
    if tree.exists():  # ref:X and ref-nvml:X share one checkout
        return tree
    done = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", str(tree), ref],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        die(f"git worktree add {ref} failed: {done.stderr.strip()}")
    return tree


def nginx_command(workdir: Path, port: int, backend_url: str) -> list[str]:
    """nginx as a plain reverse proxy on one worker (as the proxy runs on one process):
    keep-alive to the backend, no buffering (streams pass as they come)."""
    root = workdir / "nginx"
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (root / d).mkdir(parents=True, exist_ok=True)
    backend = backend_url.removeprefix("http://")
    conf = root / "nginx.conf"
    conf.write_text(
        f"daemon off;\nworker_processes 1;\npid {root}/nginx.pid;\n"
        f"error_log {root}/error.log warn;\nevents {{ worker_connections 1024; }}\n"
        "http {\n  access_log off;\n"
        f"  client_body_temp_path {root}/body; proxy_temp_path {root}/proxy;\n"
        f"  fastcgi_temp_path {root}/fastcgi; uwsgi_temp_path {root}/uwsgi;\n"
        f"  scgi_temp_path {root}/scgi;\n"
        f"  upstream backend {{ server {backend}; keepalive 128; }}\n"
        f"  server {{\n    listen {HOST}:{port};\n"
        "    location = /healthz { return 200 'ok'; }\n"
        "    location / {\n      proxy_pass http://backend;\n      proxy_http_version 1.1;\n"
        '      proxy_set_header Connection "";\n      proxy_buffering off;\n    }\n  }\n}\n'
    )
    return [shutil.which("nginx") or "nginx", "-c", str(conf), "-p", str(root)]


# ---------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Case:
    stream: bool
    concurrency: int

    @property
    def name(self) -> str:
        return "stream" if self.stream else "plain"


def measure_case(
    case: Case, direct: Target, others: list[Target], load: LoadGen, args: argparse.Namespace
) -> dict[str, Result]:
    """Run every target --rounds times, alternating order each round; aggregate per target."""
    targets = [direct, *others]
    if args.warmup > 0:
        for t in targets:
            load.run(t.base_url + CHAT_PATH, case.stream, case.concurrency, args.warmup)
    runs: dict[str, list[Result]] = {t.label: [] for t in targets}
    for rnd in range(args.rounds):
        for t in targets if rnd % 2 == 0 else targets[::-1]:
            r = load.run(t.base_url + CHAT_PATH, case.stream, case.concurrency, args.duration)
            runs[t.label].append(r)
            print(
                f"  {case.name:6} c={case.concurrency:<3} {t.label:16} round {rnd + 1}/"
                f"{args.rounds}: {r.rps:9.0f} req/s  p50 {r.p50_ms:7.2f} ms  "
                f"p99 {r.p99_ms:7.2f} ms  errors {r.errors}",
                file=sys.stderr,
            )
    return {label: aggregate(rs, args.aggregate) for label, rs in runs.items()}


# ---------------------------------------------------------------------------- report

_HEADER = (
    f"{'case':6} {'c':>3}  {'via':16} {'direct p50':>10} {'p99':>7}  {'proxy p50':>9} "
    f"{'p99':>7}  {'added p50':>9} {'p99':>7}  {'direct r/s':>10} {'proxy r/s':>9} "
    f"{'ratio':>6} {'err':>4}  targets"
)


def target_notes(case: Case, direct: Result, proxied: Result) -> str:
    notes = []
    if case.concurrency == 1:
        added = proxied.p50_ms - direct.p50_ms
        ok = "ok" if added < TARGET_ADDED_P50_MS else "MISS"
        notes.append(f"added p50 < {TARGET_ADDED_P50_MS:g} ms: {ok}")
    if case.concurrency == 64:
        ok = "ok" if proxied.rps >= TARGET_RATIO_C64 * direct.rps else "MISS"
        notes.append(f"ratio >= {TARGET_RATIO_C64:g}x: {ok}")
    return "; ".join(notes)


def format_row(case: Case, label: str, direct: Result, proxied: Result) -> str:
    ratio = proxied.rps / direct.rps if direct.rps else float("nan")
    return (
        f"{case.name:6} {case.concurrency:>3}  {label:16} {direct.p50_ms:10.2f} "
        f"{direct.p99_ms:7.2f}  {proxied.p50_ms:9.2f} {proxied.p99_ms:7.2f}  "
        f"{proxied.p50_ms - direct.p50_ms:+9.2f} {proxied.p99_ms - direct.p99_ms:+7.2f}  "
        f"{direct.rps:10.0f} {proxied.rps:9.0f} {ratio:5.2f}x {proxied.errors:4}  "
        f"{target_notes(case, direct, proxied)}"
    )


@dataclass(frozen=True)
class Row:
    case: Case
    label: str
    direct: Result
    proxied: Result


def print_report(rows: list[Row], load: LoadGen, args: argparse.Namespace) -> None:
    print()
    print(
        f"load generator: {load.name}; {args.duration}s per run, {args.rounds} rounds per "
        f"target, {args.aggregate} of rounds; fake backend {args.tokens} tokens, "
        f"{args.token_delay_ms:g} ms/token; {os.cpu_count()} CPUs (shared: read ratios)"
    )
    print(
        "latencies in ms; added = proxy - direct; ratio = proxy req/s / direct req/s; "
        "err = failed proxy requests (non-2xx, socket errors)"
    )
    print(_HEADER)
    for row in rows:
        print(format_row(row.case, row.label, row.direct, row.proxied))
    if args.token_delay_ms == 0:
        # The fake answers ~100k req/s here, so at c=64 the ratio is the proxy's raw capacity
        # against a backend no LLM server matches; say so next to the MISS.
        print(
            "note: with --token-delay-ms 0 the c=64 ratio is proxy capacity vs. an instant "
            "backend; --token-delay-ms 1 gives a backend-bound ratio (16 ms per answer)"
        )
    if any(row.proxied.errors for row in rows):
        print("warning: some requests through the proxy failed; its numbers flatter it")
    if any(row.direct.errors for row in rows):
        print("warning: some requests to the backend directly failed")


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--duration", type=int, default=10, help="seconds per load run (default 10)")
    p.add_argument("--rounds", type=int, default=2, help="runs per target per case (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="unrecorded seconds per target/case")
    p.add_argument("--aggregate", choices=("best", "median"), default="best")
    p.add_argument("--concurrency", default="1,64", help="comma list (default 1,64)")
    p.add_argument("--modes", default="plain,stream", help="comma list of plain,stream")
    p.add_argument(
        "--proxy-cmd",
        help="command template; placeholders {host} {port} {backend} "
        "{python} {workdir}. Default: <venv>/bin/energy-proxy serve ...",
    )
    p.add_argument("--upstream", help="pass --upstream-client VALUE to the proxy")
    p.add_argument(
        "--compare",
        default="proxy",
        metavar="LIST",
        help="what to put beside direct: proxy (constant:100), proxy-nvml (a fake GPU with "
        "H100 read latencies), nginx, litellm, ref:GITREF / ref-nvml:GITREF (this proxy at "
        "another commit), proxy-with:FLAGS (this proxy with extra flags); default proxy",
    )
    p.add_argument("--litellm", help="the litellm executable (bench/setup_litellm.sh)")
    p.add_argument(
        "--compare-upstreams",
        nargs="?",
        const=DEFAULT_UPSTREAMS,
        metavar="LIST",
        help=f"one proxy per upstream client, side by side (default {DEFAULT_UPSTREAMS})",
    )
    p.add_argument(
        "--direct-vs-direct",
        action="store_true",
        help="self-check of the harness: 'proxy' is the backend again, ratio ~1.0",
    )
    p.add_argument(
        "--python-loadgen",
        action="store_true",
        help="use the aiohttp fallback even when wrk is installed",
    )
    p.add_argument("--tokens", type=int, default=16, help="fake backend tokens per answer")
    p.add_argument("--token-delay-ms", type=float, default=0.0, help="fake backend ms/token")
    p.add_argument("--startup-timeout", type=float, default=30.0)
    a = p.parse_args(argv)
    if a.upstream and a.compare_upstreams:
        p.error("--upstream and --compare-upstreams are exclusive")
    if a.duration < 1 or a.rounds < 1:
        p.error("--duration and --rounds must be >= 1")
    return a


def cases_from(args: argparse.Namespace) -> list[Case]:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(modes) - {"plain", "stream"}:
        die(f"--modes takes plain,stream, not {args.modes!r}")
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    return [Case(m == "stream", c) for m in modes for c in levels]


def run(args: argparse.Namespace, workdir: Path, procs: list[Proc]) -> None:
    cases = cases_from(args)
    load = pick_loadgen(workdir, args.python_loadgen)

    backend_port = free_port()
    backend_url = f"http://{HOST}:{backend_port}"
    print(f"starting fake backend on {backend_url}", file=sys.stderr)
    backend = start(
        "fake-backend",
        [
            sys.executable,
            str(FAST_BACKEND),
            "--host",
            HOST,
            "--port",
            str(backend_port),
            "--tokens",
            str(args.tokens),
            "--token-delay-ms",
            str(args.token_delay_ms),
        ],
        workdir,
    )
    procs.append(backend)
    wait_until_up(backend, backend_url + "/v1/models", args.startup_timeout)
    direct = Target("direct", backend_url)
    check_answers("fake backend", backend_url, backend)

    others = start_proxies(args, backend_url, workdir, procs)
    runs_per_case = (1 + len(others)) * (args.rounds * args.duration + args.warmup)
    print(
        f"load generator: {load.name}; about {len(cases) * runs_per_case}s of load", file=sys.stderr
    )

    rows: list[Row] = []
    for case in cases:
        results = measure_case(case, direct, others, load, args)
        rows += [Row(case, t.label, results[direct.label], results[t.label]) for t in others]
    print_report(rows, load, args)


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through `finally`, so children are stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    # Even when started with SIGINT ignored (a background job), Ctrl-C must stop children.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    procs: list[Proc] = []
    try:
        with tempfile.TemporaryDirectory(prefix="energy-proxy-bench-") as tmp:
            try:
                run(args, Path(tmp), procs)
            finally:
                for proc in reversed(procs):  # proxies first, then the backend they use
                    stop(proc)
                # ref:GITREF checkouts lived in the temporary directory: forget them.
                subprocess.run(
                    ["git", "-C", str(REPO_ROOT), "worktree", "prune"],
                    capture_output=True, check=False,
                )  # fmt: skip
    except KeyboardInterrupt:
        print("\ninterrupted; stopped every process started", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
