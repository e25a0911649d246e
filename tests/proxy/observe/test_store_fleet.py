"""The request store as users meet it, through `energy-proxy serve` processes: two proxies
sharing one PostgreSQL, PostgreSQL restarting under traffic, a disk that refuses writes,
and the summary's window. Clients are the real `openai` client and plain HTTP."""

from __future__ import annotations

import resource
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backends.local.launch import ChildServer, free_port, proxy_server
from tests.support.paths import REPO_ROOT
from tests.support.pg import PostgresServer
from tests.support.polling import wait_until

REPO = REPO_ROOT
MODEL = "fake-model"
MESSAGES = [{"role": "user", "content": "how much energy does this take"}]


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"{name}{labels} not in /metrics")


def store_status(url: str) -> dict[str, object]:
    doc = httpx.get(f"{url}/readyz", timeout=10).json()
    st: dict[str, object] = doc["store"]
    return st


@contextmanager
def proxies(backend: str, db: str, tmp_path: Path, n: int, *args: str) -> Iterator[list[str]]:
    with ExitStack() as stack:
        urls = []
        for i in range(n):
            server = proxy_server(
                f"fake={backend}",
                extra_args=["--power-source", "constant:100", "--db", db, *args],
                log_path=tmp_path / f"proxy{i}.log",
            )
            stack.enter_context(server)
            urls.append(server.url)
        yield urls


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_two_proxies_share_one_postgresql(fake_server: str, pg_url: str, tmp_path: Path) -> None:
    with proxies(fake_server, pg_url, tmp_path, 2) as (a, b):
        assert store_status(a)["kind"] == "postgresql" and store_status(a)["ok"] is True
        assert "@" in str(store_status(a)["where"])
        with client(a) as ca, client(b) as cb:
            plain = ca.chat.completions.with_raw_response.create(
                model=MODEL, messages=MESSAGES, max_tokens=4
            )
            plain_id = plain.headers["x-energy-request-id"]
            with cb.chat.completions.with_streaming_response.create(
                model=MODEL, messages=MESSAGES, max_tokens=6, stream=True
            ) as streamed:
                stream_id = streamed.headers["x-energy-request-id"]
                for _ in streamed.iter_lines():
                    pass
            for i in range(4):
                ca.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2 + i)
        # Answered by one, found through the other (once its batch is written: the
        # writer's linger, 0.2 s), as the client was told.
        told = plain.parse().model_extra["energy"]  # type: ignore[index]

        def found(url: str, request_id: str) -> httpx.Response | None:
            r = httpx.get(f"{url}/v1/energy/requests/{request_id}", timeout=10)
            return r if r.status_code == 200 else None

        wait_until(lambda: found(b, plain_id) is not None, timeout_s=10)
        assert found(b, plain_id).json() == told  # type: ignore[union-attr]
        wait_until(lambda: found(a, stream_id) is not None, timeout_s=10)
        assert found(a, stream_id).json()["completion_tokens"] == 6  # type: ignore[union-attr]
        # One summary for the fleet, from either proxy.
        for url in (a, b):
            doc = httpx.get(f"{url}/v1/energy/summary", timeout=10).json()
            assert [(r["model"], r["count"]) for r in doc["rows"]] == [(MODEL, 6)]
            assert doc["window"] == "7d" and doc["since"].endswith(":00:00Z")
        day = httpx.get(f"{b}/v1/energy/summary", params={"window": "24h"}, timeout=10).json()
        assert day["window"] == "24h" and sum(r["count"] for r in day["rows"]) == 6
        future = httpx.get(
            f"{b}/v1/energy/summary", params={"since": str(time.time() + 7200)}, timeout=10
        ).json()
        assert sum(r["count"] for r in future["rows"]) == 6  # clamped to the current hour
        bad = httpx.get(f"{a}/v1/energy/summary", params={"window": "a while"}, timeout=10)
        assert bad.status_code == 400 and "not a duration" in bad.json()["error"]["message"]
        label = httpx.get(f"{b}/v1/energy/label/{MODEL}.svg", params={"window": "all"}, timeout=10)
        assert label.status_code == 200 and "<svg" in label.text and "6 requests" in label.text


def test_a_postgresql_restart_under_traffic_loses_no_answered_request(
    fake_server: str, tmp_path: Path
) -> None:
    pg = PostgresServer()
    answered: list[str] = []
    errors: list[str] = []
    stop = threading.Event()
    with pg as db, proxies(fake_server, db, tmp_path, 2) as (a, b):

        def send(url: str) -> None:
            with httpx.Client(base_url=url, timeout=30) as c:
                while not stop.is_set():
                    r = c.post(
                        "/v1/chat/completions",
                        json={"model": MODEL, "messages": MESSAGES, "max_tokens": 3},
                    )
                    if r.status_code == 200:
                        answered.append(r.headers["x-energy-request-id"])
                    else:
                        errors.append(f"{r.status_code} {r.text[:200]}")
                    time.sleep(0.005)

        senders = [threading.Thread(target=send, args=(u,)) for u in (a, b)]
        for t in senders:
            t.start()
        try:
            wait_until(lambda: len(answered) >= 50)
            pg.stop()
            during = len(answered)
            wait_until(lambda: store_status(a)["ok"] is False and store_status(b)["ok"] is False)
            wait_until(lambda: len(answered) >= during + 100)  # still answering, all 200
            ready = httpx.get(f"{a}/readyz", timeout=10)
            assert ready.status_code == 200  # the store never makes the proxy unready
            st = ready.json()["store"]
            assert "is PostgreSQL running" in st["error"] or "connection" in st["error"]
            assert st["queued"] > 0
            assert metric(a, "energy_proxy_store_up", kind="postgresql") == 0.0
            pg.start()
            wait_until(lambda: store_status(a)["ok"] is True and store_status(b)["ok"] is True)
        finally:
            stop.set()
            for t in senders:
                t.join(timeout=60)
        assert not errors
        wait_until(lambda: store_status(a)["queued"] == 0 and store_status(b)["queued"] == 0)
        for url in (a, b):
            assert metric(url, "energy_proxy_store_dropped_records_total") == 0.0
            assert metric(url, "energy_proxy_store_up", kind="postgresql") == 1.0
        with httpx.Client(base_url=a, timeout=10) as c:
            missing = [i for i in answered if c.get(f"/v1/energy/requests/{i}").status_code != 200]
        assert not missing, f"{len(missing)} of {len(answered)} answered requests not found"
        doc = httpx.get(f"{b}/v1/energy/summary", params={"window": "all"}, timeout=10).json()
        assert sum(r["count"] for r in doc["rows"]) == len(answered)


def test_a_disk_that_refuses_writes_costs_records_never_answers(
    fake_server: str, tmp_path: Path
) -> None:
    """The proxy's files may not grow past 200 kB (RLIMIT_FSIZE: writes fail as on a full
    disk). Every request is still answered; /readyz and the metrics say what the store
    lost; once writes are possible again the store catches up."""
    port = free_port()
    wrapper = textwrap.dedent(
        """
        import resource, sys
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
        from proxy.cli.main import main
        sys.exit(main(sys.argv[1:]))
        """
    )
    argv = [
        sys.executable, "-c", wrapper, "serve", "--host", "127.0.0.1", "--port", str(port),
        "--backend", f"fake={fake_server}", "--power-source", "constant:100",
        "--db", str(tmp_path / "requests.db"), "--db-queue-records", "50",
        "--log-level", "warning",
    ]  # fmt: skip
    server = ChildServer(
        argv, port, "/readyz", name="energy-proxy", log_path=tmp_path / "proxy.log",
        start_timeout_s=60,
    )  # fmt: skip
    with server:
        url = server.url
        ids = []
        with httpx.Client(base_url=url, timeout=30) as c:
            for _ in range(600):
                r = c.post(
                    "/v1/chat/completions",
                    json={"model": MODEL, "messages": MESSAGES, "max_tokens": 3},
                )
                assert r.status_code == 200, r.text
                ids.append(r.headers["x-energy-request-id"])
        wait_until(lambda: store_status(url)["ok"] is False)
        st = store_status(url)
        assert "disk I/O error" in str(st["error"]) and st["queued"] == 50
        dropped = metric(url, "energy_proxy_store_dropped_records_total")
        assert dropped > 0
        assert metric(url, "energy_proxy_store_up", kind="sqlite") == 0.0

        def found() -> set[str]:
            with httpx.Client(base_url=url, timeout=10) as c:
                return {i for i in ids if c.get(f"/v1/energy/requests/{i}").status_code == 200}

        # Stored before the disk refused, or waiting in the queue: found meanwhile. (When
        # the queue is full, the newest are the ones dropped.)
        before = found()
        assert len(before) + dropped == len(ids)
        assert server.proc is not None
        resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        wait_until(lambda: store_status(url)["ok"] is True and store_status(url)["queued"] == 0)
        assert metric(url, "energy_proxy_store_up", kind="sqlite") == 1.0
        assert found() == before  # the queue was written: nothing it held was lost
        assert metric(url, "energy_proxy_store_dropped_records_total") == dropped
    log = (tmp_path / "proxy.log").read_text()
    assert "records dropped" in log and "writing again" in log


@pytest.mark.parametrize("flag", ["--db-max-mb", "--summary-window"])
def test_bad_store_flags_are_clear_errors(flag: str, tmp_path: Path) -> None:
    import subprocess

    value = {"--db-max-mb": "0.5", "--summary-window": "forever"}[flag]
    done = subprocess.run(
        [
            sys.executable, "-m", "proxy.cli", "serve", "--backend", "http://127.0.0.1:9",
            "--power-source", "constant:1", "--db", str(tmp_path / "r.db"), flag, value,
        ],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 2
    assert flag in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
