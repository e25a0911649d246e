"""Headless Chromium for the live page's tests and bench/page.py: Debian's `chromium`
(scripts/install-test-tools.sh installs it), driven by playwright, nothing downloaded."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# Headless, and quiet towards the network: without the background-networking flags,
# Chromium calls Google's hosts at every start (refused on a closed network, slow).
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",  # as root, and in containers without user namespaces
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def chromium_path() -> str:
    """$CHROMIUM, else `chromium` or `chromium-browser` on PATH; a clear error if none."""
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and (found := shutil.which(candidate)):
            return found
    raise RuntimeError(
        "no Chromium found: the live page's tests need Debian's 'chromium' package "
        "(bash scripts/install-test-tools.sh installs it) or $CHROMIUM set to a binary"
    )


@contextmanager
def chromium() -> Iterator[Any]:
    """A playwright Browser on the system's Chromium, closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium_path(), args=CHROMIUM_ARGS, chromium_sandbox=False
        )
        try:
            yield browser
        finally:
            browser.close()
