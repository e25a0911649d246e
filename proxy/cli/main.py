"""`energy-proxy serve | demo | doctor | bench`: the command line of docs/INTERFACE.md."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

S = argparse.SUPPRESS  # only flags the user gave reach the settings (flag > env > file)


def _serve_flags(p: argparse.ArgumentParser) -> None:
    from metering.categories.classifier import DEFAULT_CATEGORIES

    p.add_argument("--host", default=S, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=S, help="port to listen on (default 8080)")
    p.add_argument("--config", default=S, help="TOML config file (default: none)")
    p.add_argument(
        "--backend",
        action="append",
        default=S,
        metavar="URL|NAME=URL",
        help="an OpenAI-compatible backend; repeat for several, routed by model name (default: "
        "none; at least one here, in --config or in ENERGY_PROXY_BACKENDS)",
    )
    p.add_argument(
        "--power-source",
        default=S,
        metavar="SPEC",
        help="auto, nvml[:0,1], rapl, cpu-estimate[:tdp=W], constant:W, trace:PATH, A+B "
        "(default auto: NVML GPUs, plus RAPL or else the CPU estimate)",
    )
    p.add_argument("--sample-hz", type=float, default=S, help="sampling rate (default 20)")
    p.add_argument(
        "--idle-watts", default=S, help="'auto' (learn it) or a fixed draw in W (default auto)"
    )
    p.add_argument(
        "--carbon-intensity",
        type=float,
        default=S,
        metavar="G_PER_KWH",
        help="static grid intensity, gCO2eq/kWh (default 480, world average 2023, Ember)",
    )
    p.add_argument(
        "--carbon-zone",
        default=S,
        metavar="ZONE",
        help="Electricity Maps zone for live intensity (needs ELECTRICITYMAPS_API_KEY; default: "
        "none, the static --carbon-intensity)",
    )
    p.add_argument(
        "--carbon-lat", type=float, default=S, metavar="DEG", help="or a latitude (default: none)"
    )
    p.add_argument(
        "--carbon-lon", type=float, default=S, metavar="DEG", help="and a longitude (default: none)"
    )
    p.add_argument(
        "--electricitymaps-url",
        default=S,
        metavar="URL",
        help="Electricity Maps API base (default https://api.electricitymaps.com)",
    )
    p.add_argument(
        "--carbon-refresh-s",
        type=float,
        default=S,
        metavar="S",
        help="seconds between intensity fetches (default 3600, the API's update period)",
    )
    p.add_argument(
        "--embodied-kgco2eq",
        type=float,
        default=S,
        metavar="KG",
        help="embodied emissions of the host, kgCO2eq (default: from the hardware measured, "
        "318 a GPU; none without a GPU)",
    )
    p.add_argument(
        "--lifespan-years",
        type=float,
        default=S,
        metavar="YEARS",
        help="expected life of the host for SCI's embodied share (default 4)",
    )
    p.add_argument(
        "--db",
        default=S,
        metavar="PATH|URL",
        help="request store: a SQLite file (default $XDG_STATE_HOME/energy-proxy/requests.db) "
        "or postgresql://USER[:PASSWORD]@HOST[:PORT]/DB, one store for a fleet of proxies",
    )
    p.add_argument(
        "--retention-days",
        type=int,
        default=S,
        metavar="N",
        help="drop request records older than N days (default 30; 0 keeps them forever)",
    )
    p.add_argument(
        "--db-max-mb",
        type=float,
        default=S,
        metavar="N",
        help="the request store's size limit, its write-ahead log included: past it the "
        "oldest records are dropped, the "
        "summaries keep counting them (default 1024, or half of what the disk has for the "
        "store if less, never less than it takes)",
    )
    p.add_argument(
        "--db-queue-records",
        type=int,
        default=S,
        metavar="N",
        help="answered requests held in memory while the store cannot write (default 100000); "
        "beyond that they are dropped and counted",
    )
    p.add_argument(
        "--budget",
        default=S,
        metavar="SPEC",
        help="every key's energy/carbon budget unless its [[keys]] table sets one: "
        "joules=N,co2eq_g=N,per=hour|day|month[,soft]; past it 429 energy_budget_exceeded "
        "(soft: a header only) (default: none)",
    )
    p.add_argument(
        "--budget-refresh-s",
        type=float,
        default=S,
        metavar="S",
        help="how often each budgeted key's use is read from the store, where a fleet's "
        "other proxies' requests show (default 5)",
    )
    p.add_argument(
        "--otlp-endpoint",
        default=S,
        metavar="URL",
        help="send a span per request (GenAI names, the energy under energy_proxy.*) and the "
        "request metrics to this OpenTelemetry collector, OTLP/HTTP "
        "(http://127.0.0.1:4318); needs pip install 'energy-proxy[otel]' (default: off, "
        "or where OTEL_EXPORTER_OTLP_ENDPOINT says)",
    )
    p.add_argument(
        "--journal",
        default=S,
        metavar="PATH|auto|off",
        help="each record handed to the operating system before its energy is told, so a "
        "killed proxy loses none (written at the next start): auto puts it beside the "
        "database (default auto)",
    )
    p.add_argument(
        "--summary-window",
        default=S,
        metavar="DURATION",
        help="default time window of /v1/energy/summary and the labels: 24h, 7d, ... or all "
        "(default 7d)",
    )
    p.add_argument(
        "--attribution",
        choices=("model", "queue", "tokens", "equal"),
        default=S,
        help="how energy is split among concurrent requests (default model: the backend's "
        "cost model fitted on this host)",
    )
    p.add_argument(
        "--pue",
        type=float,
        default=S,
        help="power usage effectiveness of the data centre, >= 1.0 (default 1.0: none counted)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=S,
        metavar="N",
        help="the largest request body accepted; larger ones get 413 (default 16777216, 16 MiB)",
    )
    p.add_argument(
        "--backend-timeout",
        type=float,
        default=S,
        metavar="S",
        help="seconds without a byte from the backend before 504 (default 600)",
    )
    p.add_argument(
        "--api-key",
        action="append",
        default=S,
        help="an admin key clients must send (repeatable; prefer --key-hash: flags show in ps; "
        "default: none, no key needed)",
    )
    p.add_argument(
        "--key-hash",
        action="append",
        default=S,
        metavar="NAME:SHA256[:admin]",
        help="a tenant's key by its hash (energy-proxy hash-key); repeatable (default: none)",
    )
    p.add_argument(
        "--protect-metrics", action="store_true", default=S, help="/metrics needs an admin key"
    )
    p.add_argument(
        "--metrics-listen",
        default=S,
        metavar="HOST:PORT",
        help="serve /metrics there instead (default: on the main port)",
    )
    p.add_argument(
        "--client-timeout",
        type=float,
        default=S,
        metavar="S",
        help="seconds a client may take to send its body or leave an answer unread (default 60)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=S,
        metavar="S",
        help="seconds a connection may take to send a request's line and headers; then 408 "
        "and closed (default 30)",
    )
    p.add_argument(
        "--categories",
        default=S,
        help="comma-separated prompt categories (default: " + ",".join(DEFAULT_CATEGORIES) + ")",
    )
    p.add_argument(
        "--passthrough",
        action="append",
        default=S,
        metavar="PATTERN",
        help="a backend path passed through unmetered beyond the defaults (/invocations; "
        "!PATTERN refuses one); repeatable",
    )
    p.add_argument(
        "--upstream-client",
        choices=("aiohttp", "httpx"),
        default=S,
        help="HTTP client towards backends (default aiohttp, chosen by bench/overhead.py)",
    )
    p.add_argument(
        "--backend-metrics-s",
        type=float,
        default=S,
        metavar="S",
        help="seconds between reads of the backends' own /metrics (default 5)",
    )
    p.add_argument(
        "--backend-metrics-fast-s",
        type=float,
        default=S,
        metavar="S",
        help="... while requests may be waiting at a backend (default 0.25)",
    )
    p.add_argument(
        "--log-level",
        default=S,
        choices=("debug", "info", "warning", "error"),
        help="the log's threshold (default info)",
    )
    p.add_argument(
        "--request-log",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="one JSON line per finished request on standard error: id, model, backend, "
        "category, status, joules, duration, tokens, never the prompt (default on)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="energy-proxy",
        description="OpenAI-compatible proxy that reports each answer's energy and CO2eq.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the proxy in front of one or more backends")
    _serve_flags(serve)
    from proxy.cli.routing_flags import routing_flags

    routing_flags(serve)
    demo = sub.add_parser(
        "demo", help="start a bundled CPU backend and the proxy, send prompts, print a table"
    )
    demo.add_argument(
        "--backend",
        default=None,
        metavar="URL",
        help="use a running backend (default: start the bundled CPU backend)",
    )
    demo.add_argument("--model", default=None, help="model name (default: the backend's first)")
    demo.add_argument("--port", type=int, default=0, help="proxy port (default: a free one)")
    demo.add_argument(
        "--power-source", default="auto", metavar="SPEC", help="as serve's (default auto)"
    )
    demo.add_argument(
        "--max-tokens", type=int, default=48, help="tokens each answer may have (default 48)"
    )
    demo.add_argument(
        "--keep",
        action="store_true",
        help="keep the proxy (and the backend) up after the prompts, until Ctrl-C: "
        "for the live page and your own requests",
    )
    hk = sub.add_parser(
        "hash-key",
        help="print the SHA-256 of an API key (read from standard input), for --key-hash",
    )
    hk.add_argument("--name", default="tenant", help="the tenant the key is for (default tenant)")
    hk.add_argument("--admin", action="store_true", help="mark it an admin key")
    hk.add_argument("--new", action="store_true", help="make a new random key and print it too")
    doctor = sub.add_parser(
        "doctor",
        help="what this host can measure: each power source, what its reads cost, and "
        "what the proxy will do with it",
    )
    doctor.add_argument(
        "--power-source", default="auto", metavar="SPEC", help="the sources to check (default auto)"
    )
    doctor.add_argument("--json", dest="json_out", action="store_true", help="print JSON")
    doctor.add_argument(
        "--calls", type=int, default=100, help="how many times each call is timed (default 100)"
    )
    doctor.add_argument(
        "--proxy",
        dest="proxy_url",
        metavar="URL",
        help="also show what a running proxy's split rests on: each backend's cost model, "
        "queue capacity and timings (from its /readyz; default: none)",
    )
    bench = sub.add_parser(
        "bench",
        help="run a prompt set through the proxy and report energy per model and category",
    )
    _bench_flags(bench)
    return parser


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}")
        return value

    return parse


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _bench_flags(p: argparse.ArgumentParser) -> None:
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--proxy", metavar="URL", help="a running energy-proxy (default http://127.0.0.1:8080)"
    )
    target.add_argument(
        "--backend",
        metavar="URL",
        help="start `energy-proxy serve --backend URL` for the run, and stop it at the end "
        "(default: use the running --proxy)",
    )
    p.add_argument("--models", metavar="A,B", help="models to run (default: all the proxy lists)")
    p.add_argument(
        "--prompts",
        default="builtin:v1",
        metavar="builtin:v1|FILE.jsonl",
        help="the prompt set (default builtin:v1)",
    )
    p.add_argument(
        "--per-category",
        type=_count(1),
        metavar="N",
        help="only the first N prompts of each (default: all)",
    )
    p.add_argument(
        "--warmup",
        type=_count(0),
        default=1,
        metavar="N",
        help="uncounted requests per model (default 1)",
    )
    p.add_argument(
        "--repetitions",
        type=_count(1),
        default=3,
        metavar="N",
        help="passes over the set (default 3)",
    )
    p.add_argument(
        "--concurrency",
        type=_count(1),
        default=1,
        metavar="N",
        help="requests in flight (default 1)",
    )
    p.add_argument(
        "--idle-s",
        type=_seconds,
        default=10.0,
        metavar="S",
        help="idle power baseline before each model, seconds (0: none; default 10)",
    )
    p.add_argument(
        "--pause-s",
        type=_seconds,
        default=10.0,
        metavar="S",
        help="pause between models so the hardware cools, seconds (default 10)",
    )
    p.add_argument(
        "--max-tokens",
        type=_count(1),
        metavar="N",
        help="override every prompt's max_tokens (default: each prompt's own)",
    )
    p.add_argument(
        "--timeout-s",
        type=_seconds,
        default=600.0,
        metavar="S",
        help="per request, without a byte from the proxy (default 600)",
    )
    p.add_argument(
        "--power-source",
        metavar="SPEC",
        help="with --backend: the started proxy's source (default auto)",
    )
    p.add_argument("--sweep", action="store_true", help="sweep concurrency and recommend settings")
    p.add_argument(
        "--slo-ttft-ms", type=float, metavar="MS", help="time-to-first-token SLO (default: none)"
    )
    p.add_argument(
        "--slo-tpot-ms", type=float, metavar="MS", help="time-per-output-token SLO (default: none)"
    )
    p.add_argument(
        "--out", metavar="DIR", help="output directory (default ./bench-results/<timestamp>)"
    )


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    # Request lines are already JSON; other lines get a short prefix.
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("energy_proxy")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def serve(args: dict[str, Any]) -> int:
    import uvicorn

    from metering.sources.base import SourceUnavailable
    from metering.store import StoreError
    from proxy.app import create_app
    from proxy.http_guard import HEAD_LIMIT_BYTES
    from proxy.observe.request_log import RequestLog
    from proxy.observe.startup import startup_line
    from proxy.server import ProxyServer
    from proxy.settings import ConfigError, load_settings

    try:
        settings = load_settings(args, os.environ)
        if not settings.backends:
            raise ConfigError(
                "no backend: give --backend URL (or NAME=URL), or set one in --config"
            )
        setup_logging(settings.log_level)
        app = create_app(settings, request_log=RequestLog() if settings.request_log else None)
        logging.getLogger("energy_proxy").info("%s", startup_line(app.figures()))
    except (ConfigError, ValueError, OSError, SourceUnavailable, StoreError) as exc:
        print(f"energy-proxy: {exc}", file=sys.stderr)
        return 2
    loop = "uvloop" if _has("uvloop") else "asyncio"
    # The parser with the limits an unfinished head needs (proxy/http_guard.py); h11,
    # where httptools is missing, bounds a head itself.
    http: Any = "h11"
    if _has("httptools"):
        from proxy.http_guard import connection_cap, guarded_protocol, raise_file_limit

        files = raise_file_limit()
        cap = connection_cap(files)
        http = guarded_protocol(cap, settings.header_timeout)
        logging.getLogger("energy_proxy").info(
            "energy-proxy: accepting at most %d connections (open files: %d; one more is "
            "answered 503)", cap, files,
        )  # fmt: skip
    # Everything built so far lives as long as the process: keep the garbage collector from
    # scanning it again. A full pass over it holds the GIL for milliseconds, a stall of the
    # event loop (bench/store.py measures the loop's stalls).
    gc.collect()
    gc.freeze()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop=loop,
        http=http,
        access_log=False,
        proxy_headers=False,  # no client address is used; saves a middleware per request
        log_level=settings.log_level,
        lifespan="on",
        timeout_graceful_shutdown=30,
        h11_max_incomplete_event_size=HEAD_LIMIT_BYTES,
    )
    server = ProxyServer(config, on_shutdown=app.close_live_streams)
    # uvicorn raises Ctrl-C again once it has shut down cleanly: that is the normal end.
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    # As uvicorn.run: a server that never started (its port taken, say) exits 3.
    return 0 if server.started else 3


def hash_key_command(name: str, admin: bool, new: bool) -> int:
    """`energy-proxy hash-key`: the key comes on standard input (never the command line,
    which other users see in `ps`), or is made with --new."""
    from proxy.auth import hash_key, make_key, new_key

    if new:
        key = new_key()
        print(f"key (give it to the tenant; it is not stored anywhere): {key}", file=sys.stderr)
    else:
        key = sys.stdin.readline().strip()
        if not key:
            print(
                "energy-proxy hash-key: give the key on standard input, or --new", file=sys.stderr
            )
            return 2
    digest = hash_key(key)
    try:
        make_key(name, digest, admin=admin)
    except ValueError as exc:
        print(f"energy-proxy hash-key: {exc}", file=sys.stderr)
        return 2
    spec = f"{name}:{digest}" + (":admin" if admin else "")
    print(spec)
    toml = f'[[keys]]\nname = "{name}"\nsha256 = "{digest}"' + ("\nadmin = true" if admin else "")
    print(f"# --key-hash {spec}\n# or in the config file:\n{toml}", file=sys.stderr)
    return 0


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    args = {k: v for k, v in vars(ns).items() if k != "command"}
    if ns.command == "serve":
        return serve(args)
    if ns.command == "demo":
        from proxy.cli.demo import run_demo

        return run_demo(**args)
    if ns.command == "hash-key":
        return hash_key_command(**args)
    if ns.command == "doctor":
        from proxy.cli.doctor import run_doctor

        return run_doctor(**args)
    if ns.command == "bench":
        from proxy.cli.bench.command import run_bench_command
        from proxy.cli.bench.common import BenchOptions

        return run_bench_command(BenchOptions(**args))
    parser.error(f"unknown command {ns.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
