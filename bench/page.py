"""The live page's weight and first render, in headless Chromium; and its screenshot.

Starts the bundled CPU backend and the proxy (or uses `--url` of a running proxy), sends
the demo's prompts (`energy-proxy demo`'s six, streamed and not), then loads `/` a few
times in Debian's Chromium (playwright, nothing downloaded) and prints, per load: the
bytes transferred, first contentful paint, and the time until the page shows live data
(its event stream's first event rendered). `--screenshot PATH` saves the page as it looks
after the prompts (the README's picture: docs/live-page.png).

    python -m bench.page --loads 5 --screenshot docs/live-page.png
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from openai import OpenAI

from backends.local.launch import llama_cpp_python_server, proxy_server
from proxy.cli.demo import DEMO_PROMPTS
from tests.support.browser import chromium

LIVE = "() => document.getElementById('conn').textContent === 'live'"


def send_demo_prompts(url: str, rounds: int, max_tokens: int) -> int:
    sent = 0
    with OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300) as client:
        model = client.models.list().data[0].id
        for _ in range(rounds):
            for category, prompt, stream in DEMO_PROMPTS:
                kwargs: dict[str, Any] = {
                    "model": model,
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens,
                    "extra_headers": {"x-prompt-category": category},
                }
                if stream:
                    with client.chat.completions.create(stream=True, **kwargs) as events:
                        for _chunk in events:
                            pass
                else:
                    client.chat.completions.create(**kwargs)
                sent += 1
    return sent


def measure_load(browser: Any, url: str) -> dict[str, float]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    transferred: list[int] = []

    def on_finished(request: Any) -> None:
        if "/v1/energy/events" in request.url:
            return  # the stream never finishes: not part of the page's weight
        sizes = request.sizes()
        transferred.append(sizes["responseBodySize"] + sizes["responseHeadersSize"])

    page.on("requestfinished", on_finished)
    t0 = time.perf_counter()
    page.goto(url + "/", wait_until="commit")
    page.wait_for_function(LIVE, timeout=30_000)
    live_ms = (time.perf_counter() - t0) * 1000.0
    page.wait_for_load_state("load")
    page.wait_for_timeout(500)  # the summary and the labels
    fcp = page.evaluate(
        "() => (performance.getEntriesByName('first-contentful-paint')[0] || {}).startTime"
    )
    context.close()
    return {"bytes": float(sum(transferred)), "fcp_ms": float(fcp or "nan"), "live_ms": live_ms}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="a running proxy (default: start one)")
    ap.add_argument("--rounds", type=int, default=1, help="times the demo's prompts are sent")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--loads", type=int, default=5)
    ap.add_argument("--screenshot", type=Path, default=None)
    args = ap.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="energy-proxy-page-"))
    with ExitStack() as stack:
        url = args.url
        if url is None:
            backend = stack.enter_context(llama_cpp_python_server(log_path=logs / "backend.log"))
            url = stack.enter_context(
                proxy_server(
                    backend.url,
                    extra_args=["--db", str(logs / "requests.db")],
                    log_path=logs / "proxy.log",
                )
            ).url
        browser = stack.enter_context(chromium())
        watcher = browser.new_context(viewport={"width": 1400, "height": 1000})
        shot = watcher.new_page()
        shot.goto(url + "/")
        shot.wait_for_function(LIVE, timeout=30_000)
        sent = send_demo_prompts(url, args.rounds, args.max_tokens)
        print(f"sent {sent} prompts through {url}; the page watched them arrive")
        shot.wait_for_timeout(3000)  # the summary refresh, the labels, a few power samples
        if args.screenshot is not None:
            shot.screenshot(path=str(args.screenshot), full_page=True)
            print(f"screenshot: {args.screenshot}")
        watcher.close()
        loads = [measure_load(browser, url) for _ in range(args.loads)]
    print(f"{'load':>4}  {'bytes':>8}  {'first paint ms':>14}  {'live data ms':>12}")
    for i, m in enumerate(loads, 1):
        print(f"{i:>4}  {m['bytes']:>8.0f}  {m['fcp_ms']:>14.1f}  {m['live_ms']:>12.1f}")
    for key, name in (("fcp_ms", "first paint"), ("live_ms", "live data")):
        values = [m[key] for m in loads]
        print(f"{name}: median {statistics.median(values):.1f} ms, max {max(values):.1f} ms")
    print(f"weight: {max(m['bytes'] for m in loads):.0f} bytes at most (budget 100,000)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
