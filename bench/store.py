"""The request store at scale: write rate, bytes per record, summary and lookup latency, and
the event loop's longest stall while the store writes. SQLite and PostgreSQL side by side.

    python -m bench.store [--stores sqlite,postgresql] [--sizes 10000,1000000,10000000]
                          [--api-max 1000000] [--rate 5000] [--seconds 10] [--out FILE]

For each store and size, a fresh database is filled with records spread over the last 30
days (3 models x 6 categories x 2 backends x 2 tenants):
- up to `--api-max` records through the store's own API (`RequestStore.add` from an asyncio
  loop, as the proxy adds them), as fast as the store takes them: records/s, and the loop's
  longest stall meanwhile;
- above it, generated in the database by SQL (the same columns, rollups built from them),
  which the issue allows for 10 M.
Then, on that database:
- bytes per record: the SQLite file after a checkpoint, or PostgreSQL's tables and indexes,
  divided by the records;
- summary latency (`RequestStore.summary`, the 7-day default window and `all`), p50 and max
  of 30 calls; lookup latency (`RequestStore.get` of stored ids), p50 and p99 of 300;
- sustained writing: `--rate` records/s added from the loop for `--seconds`, 1 ms ticks;
  the loop's lateness (p99, max), and whether the writer kept up (nothing left queued a
  second after).

PostgreSQL is a private server from Debian's package (tests/support/pg.py), with its default
durability (fsync on). Targets (issue 14), printed beside: summary <= 10 ms at 10 M,
<= 300 bytes a record on SQLite, >= 5,000 records/s with no stall over 2 ms.
Nothing is asserted; the numbers go to the README.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from metering.accounting.report import EnergyReport, Tokens
from metering.carbon.intensity import Intensity
from metering.carbon.sci import embodied_for_host, sci_g
from metering.store import RequestRecord, RequestStore

MODELS = ("llama-3.1-8b-instruct", "qwen2.5-7b-instruct", "mistral-7b-instruct")
CATEGORIES = ("chat", "code", "summarize", "translate", "math", "other")
BACKENDS = ("vllm-0", "vllm-1")
TENANTS = ("", "team-a")
SPAN_S = 30 * 86_400.0
TARGET_SUMMARY_MS = 10.0
TARGET_BYTES = 300.0
TARGET_RATE = 5000.0
TARGET_STALL_MS = 2.0
STORE_MB = 100_000.0  # the bench measures the store, not its size limit
BASIS = "cost-v1 fitted; queue capacity learnt; timings proxy"  # as the meter writes it
EMBODIED_BASIS = embodied_for_host(8, None, 4.0).basis  # an 8-GPU host's default
ROUTE = "first/only"  # one backend serving each model, as most hosts run


def record(i: int, now_s: float, n: int, rng: random.Random) -> RequestRecord:
    """The i-th of n records, finished over the 30 days before `now_s`, as the relay makes
    them (a live carbon figure, GPU and CPU joules, the cost model's split and its band)."""
    joules = rng.uniform(5.0, 400.0)
    co2 = joules / 3.6e6 * 350.0
    embodied = rng.uniform(1e-5, 1e-4)
    report = EnergyReport(
        request_id=f"req-{rng.getrandbits(96):024x}",
        model=MODELS[i % 3],
        category=CATEGORIES[(i // 3) % 6],
        duration_s=rng.uniform(0.2, 20.0),
        tokens=Tokens(rng.randint(20, 2000), rng.randint(1, 800), "backend"),
        energy_j=joules,
        gpu_j=joules * 0.9,
        cpu_j=joules * 0.1,
        dynamic_j=joules * 0.6,
        method="nvml-counter,rapl",
        intensity=Intensity(350.0, "electricitymaps", "DE", rng.uniform(0, 3600)),
        co2eq_g=co2,
        embodied_g=embodied,
        sci_g=sci_g(co2, embodied),
        attribution="model",
        band_rel=rng.uniform(0.05, 0.45),
        basis=BASIS,
        embodied_basis=EMBODIED_BASIS,
    )
    return RequestRecord.from_report(
        report,
        backend=BACKENDS[(i // 18) % 2],
        status=200 if i % 50 else 499,
        finished_at=now_s - SPAN_S + SPAN_S * i / n,
        tenant=TENANTS[(i // 36) % 2],
        route=ROUTE,
    )


class Stalls:
    """The event loop's lateness: a task asks for 1 ms sleeps and records how late each
    wake-up is (any stall of the loop's thread, such as the writer holding the GIL)."""

    def __init__(self) -> None:
        self.late_ms: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            self.late_ms.append((time.perf_counter() - t) * 1000.0 - 1.0)

    def __enter__(self) -> Stalls:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()

    def p99_ms(self) -> float:
        return _pct(self.late_ms, 0.99)

    def max_ms(self) -> float:
        return max(self.late_ms, default=0.0)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


async def fill_by_api(store: RequestStore, n: int, now_s: float) -> dict[str, float]:
    """Add n records as fast as the store writes them (the queue kept under 50 k)."""
    rng = random.Random(n)
    with Stalls() as stalls:
        t0 = time.perf_counter()
        i = 0
        while i < n:
            if store.queued > 50_000:
                await asyncio.sleep(0.005)
                continue
            for _ in range(min(200, n - i)):
                store.add(record(i, now_s, n, rng))
                i += 1
            await asyncio.sleep(0)
        await asyncio.to_thread(store.flush, 3600.0)
        elapsed = time.perf_counter() - t0
    return {
        "records_per_s": n / elapsed,
        "fill_s": elapsed,
        "fill_stall_p99_ms": stalls.p99_ms(),
        "fill_stall_max_ms": stalls.max_ms(),
    }


class _NoStore:
    """The producer's own cost: records made and handed to nothing."""

    queued = 0
    dropped = 0

    def add(self, record: RequestRecord) -> None:
        pass

    def flush(self, timeout_s: float) -> bool:
        return True


async def sustained(
    store: RequestStore | _NoStore, rate: float, seconds: float, now_s: float
) -> dict[str, Any]:
    """`rate` records/s added from the loop in 1 ms ticks, as a busy proxy adds them."""
    rng = random.Random(7)
    n = int(rate * seconds)
    with Stalls() as stalls:
        t0 = time.perf_counter()
        added = 0
        while added < n:
            due = min(n, int((time.perf_counter() - t0) * rate))
            while added < due:
                store.add(record(added, now_s, n, rng))
                added += 1
            await asyncio.sleep(0.001)
        elapsed = time.perf_counter() - t0
        queued_at_end = store.queued
        await asyncio.to_thread(store.flush, 30.0)
        caught_up_s = time.perf_counter() - t0 - elapsed
    return {
        "offered_per_s": n / elapsed,
        "stall_p99_ms": stalls.p99_ms(),
        "stall_p999_ms": _pct(stalls.late_ms, 0.999),
        "stall_max_ms": stalls.max_ms(),
        "stalls_over_2ms": sum(x > TARGET_STALL_MS for x in stalls.late_ms),
        "ticks": len(stalls.late_ms),
        "queued_at_end": queued_at_end,
        "caught_up_s": caught_up_s,
        "kept_up": store.queued == 0 and caught_up_s < 1.0,
        "dropped": store.dropped,
    }


def timed_ms(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000.0)
    return out


# --- generating records in the database --------------------------------------------------


def _labels(store: RequestStore, now_s: float) -> None:
    """Every label the generated records use, written once through the API."""
    rng = random.Random(1)
    for i in range(72):
        store.add(record(i, now_s, 72, rng))
    store.flush(60)


def _case(expr: str, ids: list[int]) -> str:
    return "CASE " + expr + " " + " ".join(f"WHEN {k} THEN {v}" for k, v in enumerate(ids)) + " END"


def _label_ids(fetch: Callable[[str, tuple[str, ...]], dict[str, int]]) -> dict[str, Any]:
    return {
        "model": [fetch("model", MODELS)[m] for m in MODELS],
        "category": [fetch("category", CATEGORIES)[c] for c in CATEGORIES],
        "backend": [fetch("backend", BACKENDS)[b] for b in BACKENDS],
        "tenant": [fetch("tenant", TENANTS)[t] for t in TENANTS],
        "fixed": fetch(
            "fixed",
            (
                "backend",
                "nvml-counter,rapl",
                "model",
                "electricitymaps",
                "DE",
                BASIS,
                "chat",
                EMBODIED_BASIS,
                ROUTE,
            ),
        ),
    }


def _select_columns(ids: dict[str, Any], i: str, n: int, now_ms: int, rid: str, rand: str) -> str:
    """The SELECT list of generated records, in COLUMNS order (SQL shared by both DBs)."""
    f = ids["fixed"]
    span_ms = int(SPAN_S * 1000)
    return f"""
        {rid},
        {now_ms - span_ms} + ({i} * {span_ms}) / {n},
        {_case(f"{i} % 3", ids["model"])}, {_case(f"{i} % 3", ids["model"])},
        {_case(f"({i} / 18) % 2", ids["backend"])}, {_case(f"({i} / 3) % 6", ids["category"])},
        {_case(f"({i} / 36) % 2", ids["tenant"])},
        CASE WHEN {i} % 50 = 0 THEN 499 ELSE 200 END,
        0.2 + ({rand} % 20000) / 1000.0, 20 + {rand} % 1980, 1 + {rand} % 800, {f["backend"]},
        5.0 + ({rand} % 395000) / 1000.0, 4.5 + ({rand} % 355000) / 1000.0,
        0.5 + ({rand} % 39000) / 1000.0, 3.0 + ({rand} % 237000) / 1000.0,
        {f["nvml-counter,rapl"]}, {f["model"]}, 350.0, {f["electricitymaps"]}, {f["DE"]},
        ({rand} % 3600000) / 1000.0, (5.0 + ({rand} % 395000) / 1000.0) * 350.0 / 3600000.0,
        ({rand} % 100000) / 1000000000.0, NULL, 0.05 + ({rand} % 400) / 1000.0, {f[BASIS]},
        {f["chat"]}, NULL, {f[EMBODIED_BASIS]}, {f[ROUTE]}
    """


def generate_sqlite(store: RequestStore, n: int, now_s: float) -> float:
    from metering.store.columns import COLUMNS
    from metering.store.sqlite_schema import rebuild_rollups

    _labels(store, now_s)
    path = store.where
    t0 = time.perf_counter()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA cache_size = -262144")

    def fetch(_: str, texts: tuple[str, ...]) -> dict[str, int]:
        marks = ",".join("?" for _ in texts)
        return dict(conn.execute(f"SELECT text, id FROM labels WHERE text IN ({marks})", texts))

    ids = _label_ids(fetch)
    cols = _select_columns(ids, "i", n, int(now_s * 1000), "randomblob(12)", "abs(random())")
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("DELETE FROM records")
    conn.execute("DROP INDEX records_rid")  # built once at the end: sorted, not record by record
    conn.execute(
        f"""
        INSERT INTO records ({", ".join(COLUMNS)})
        WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < {n - 1})
        SELECT {cols} FROM s
        """
    )
    conn.execute("CREATE UNIQUE INDEX records_rid ON records (rid)")
    rebuild_rollups(conn)
    conn.execute("COMMIT")
    conn.close()
    return time.perf_counter() - t0


def generate_postgres(store: RequestStore, url: str, n: int, now_s: float) -> float:
    import psycopg

    from metering.store.columns import COLUMNS
    from metering.store.postgres_schema import SCHEMA

    _labels(store, now_s)
    t0 = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:

        def fetch(_: str, texts: tuple[str, ...]) -> dict[str, int]:
            rows = conn.execute(
                f"SELECT text, id FROM {SCHEMA}.labels WHERE text = ANY(%s)", (list(texts),)
            ).fetchall()
            return dict(rows)

        ids = _label_ids(fetch)
        rand = "(('x' || substr(md5(i::text), 1, 8))::bit(32)::bigint)"
        cols = _select_columns(
            ids, "i", n, int(now_s * 1000), "substring(sha256(int8send(i)) from 1 for 12)", rand
        )
        conn.execute(f"TRUNCATE {SCHEMA}.records, {SCHEMA}.rollups, {SCHEMA}.rollups_daily")
        chunk = 1_000_000
        for start in range(0, n, chunk):
            conn.execute(
                f"INSERT INTO {SCHEMA}.records ({', '.join(COLUMNS)}) "
                f"SELECT {cols} FROM generate_series({start}, {min(n, start + chunk) - 1}) i"
            )
        conn.execute(
            f"""
            INSERT INTO {SCHEMA}.rollups (hour, model, category, backend, tenant, count, joules,
                                          co2eq_g, token_joules, tokens)
            SELECT finished_ms / 3600000, model_group, category, backend, tenant, count(*),
                   sum(joules), sum(co2eq_g), sum(CASE WHEN n > 0 THEN joules ELSE 0 END), sum(n)
            FROM (SELECT *, CASE WHEN completion_tokens > 0 THEN completion_tokens
                                 ELSE COALESCE(prompt_tokens, 0) END AS n
                  FROM {SCHEMA}.records WHERE status = 200) s
            GROUP BY 1, 2, 3, 4, 5
            """
        )
        conn.execute(
            f"""
            INSERT INTO {SCHEMA}.rollups_daily
            SELECT hour / 24, model, category, backend, tenant, sum(count), sum(joules),
                   sum(co2eq_g), sum(token_joules), sum(tokens)
            FROM {SCHEMA}.rollups GROUP BY 1, 2, 3, 4, 5
            """
        )
        conn.execute(f"VACUUM ANALYZE {SCHEMA}.records")
    return time.perf_counter() - t0


# --- sizes on disk -------------------------------------------------------------------------


def bytes_sqlite(path: str) -> int:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return os.path.getsize(path)


def bytes_postgres(url: str) -> int:
    import psycopg

    from metering.store.postgres_schema import SCHEMA

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"VACUUM {SCHEMA}.records")
        row = conn.execute(
            f"SELECT pg_total_relation_size('{SCHEMA}.records') "
            f"+ pg_total_relation_size('{SCHEMA}.labels') "
            f"+ pg_total_relation_size('{SCHEMA}.rollups')"
        ).fetchone()
    return int(row[0]) if row else 0


# --- one case ------------------------------------------------------------------------------


@contextmanager
def database(kind: str, tmp: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield str(tmp / f"bench-{time.monotonic_ns()}.db")
        return
    from tests.support.pg import PostgresServer

    with PostgresServer(fsync=True) as url:
        yield url


async def case(kind: str, n: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    now_s = time.time()
    out: dict[str, Any] = {"store": kind, "records": n}
    with database(kind, tmp) as db:
        store = RequestStore.open(db, max_mb=STORE_MB)
        try:
            if n <= args.api_max:
                out["filled"] = "api"
                out.update(await fill_by_api(store, n, now_s))
            else:
                out["filled"] = "sql"
                gen = generate_sqlite if kind == "sqlite" else None
                out["fill_s"] = (
                    await asyncio.to_thread(gen, store, n, now_s)
                    if gen
                    else await asyncio.to_thread(generate_postgres, store, db, n, now_s)
                )
            stored = await asyncio.to_thread(store.count)
            out["stored"] = stored
            size = bytes_sqlite(db) if kind == "sqlite" else bytes_postgres(db)
            out["bytes_per_record"] = size / max(1, stored)
            week = now_s - 7 * 86_400
            out["summary_7d_ms"] = timed_ms(lambda: store.summary(since_s=week), 30)
            out["summary_all_ms"] = timed_ms(lambda: store.summary(), 30)
            rows = store.summary()
            out["summary_rows"] = len(rows)
            out["summary_count"] = sum(r["count"] for r in rows)
            sample = _sample_ids(kind, db, 300)
            out["get_ms"] = timed_ms(lambda: [store.get(i) for i in sample], 1)[0] / max(
                1, len(sample)
            )
            out["sustained"] = await sustained(store, args.rate, args.seconds, now_s)
        finally:
            store.close()
    for k in ("summary_7d_ms", "summary_all_ms"):
        xs = out[k]
        out[k] = {"p50": statistics.median(xs), "max": max(xs)}
    return out


def _sample_ids(kind: str, db: str, k: int) -> list[str]:
    from metering.store.records import id_of

    if kind == "sqlite":
        conn = sqlite3.connect(db)
        rows = conn.execute(f"SELECT rid FROM records ORDER BY random() LIMIT {k}").fetchall()
        conn.close()
    else:
        import psycopg

        from metering.store.postgres_schema import SCHEMA

        with psycopg.connect(db) as conn:
            rows = conn.execute(
                f"SELECT rid FROM {SCHEMA}.records TABLESAMPLE SYSTEM (1) LIMIT {k}"
            ).fetchall()
    return [id_of(bytes(r[0])) for r in rows]


def report(results: list[dict[str, Any]]) -> str:
    lines = [
        "store       records  filled  rec/s   stall max  B/record  summary 7d/all p50 (max) ms"
        "   get ms  sustained: stall p99/max ms, ticks > 2 ms  kept up",
    ]
    for r in results:
        if r["store"] == "none":
            s = r["sustained"]
            lines.append(
                f"(no store)                                                                "
                f"                {s['stall_p99_ms']:5.2f} / {s['stall_max_ms']:5.2f}, "
                f"{s['stalls_over_2ms']:3d}"
            )
            continue
        s = r["sustained"]
        rate = f"{r['records_per_s']:7.0f}" if "records_per_s" in r else "      -"
        stall = f"{r['fill_stall_max_ms']:6.2f}" if "fill_stall_max_ms" in r else "     -"
        lines.append(
            f"{r['store']:<10} {r['records']:>9,}  {r['filled']:<5} {rate}   {stall}   "
            f"{r['bytes_per_record']:7.1f}   "
            f"{r['summary_7d_ms']['p50']:6.2f} / {r['summary_all_ms']['p50']:6.2f} "
            f"({max(r['summary_7d_ms']['max'], r['summary_all_ms']['max']):6.2f})   "
            f"{r['get_ms']:6.3f}   {s['stall_p99_ms']:5.2f} / {s['stall_max_ms']:5.2f}, "
            f"{s['stalls_over_2ms']:3d}           {'yes' if s['kept_up'] else 'NO'}"
        )
    lines.append(
        f"targets: summary <= {TARGET_SUMMARY_MS} ms at 10 M; <= {TARGET_BYTES:.0f} B/record "
        f"(SQLite); >= {TARGET_RATE:.0f} records/s with no stall over {TARGET_STALL_MS} ms"
    )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    # As `energy-proxy serve` does once started: what exists now is never scanned by the
    # garbage collector again (a full pass over it stalled the loop for ~6 ms here).
    gc.collect()
    gc.freeze()
    base = await sustained(_NoStore(), args.rate, args.seconds, time.time())
    print(
        f"the loop with no store, {args.rate:.0f} records/s made: stall p99 "
        f"{base['stall_p99_ms']:.2f} ms, p99.9 {base['stall_p999_ms']:.2f} ms, max "
        f"{base['stall_max_ms']:.2f} ms, {base['stalls_over_2ms']} of {base['ticks']} ticks over "
        f"{TARGET_STALL_MS} ms",
        file=sys.stderr,
    )
    results.append({"store": "none", "sustained": base})
    with tempfile.TemporaryDirectory(prefix="energy-proxy-bench-store-") as tmp:
        for kind in args.stores:
            for n in args.sizes:
                print(f"{kind} {n:,} ...", file=sys.stderr, flush=True)
                results.append(await case(kind, n, args, Path(tmp)))
                print(report(results[-1:]).splitlines()[1], file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--stores", default="sqlite,postgresql", type=lambda s: s.split(","))
    p.add_argument(
        "--sizes", default="10000,1000000,10000000", type=lambda s: [int(x) for x in s.split(",")]
    )
    p.add_argument("--api-max", type=int, default=1_000_000)
    p.add_argument("--rate", type=float, default=TARGET_RATE)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = p.parse_args(argv)
    bad = set(args.stores) - {"sqlite", "postgresql"}
    if bad:
        p.error(f"unknown store(s): {sorted(bad)}")
    results = asyncio.run(main_async(args))
    print(report(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
