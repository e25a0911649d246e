"""The live page: one HTML file with its style and script inline, served as it is.

No build step and nothing fetched from elsewhere. The Content-Security-Policy allows only
that inline script and style (by their SHA-256), requests to this origin, and images from
it or made by the page (the labels, fetched with the key and shown as blob: URLs); so even a
value that escaped the page's own escaping could not run.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from importlib import resources

_INLINE = re.compile(rb"<(script|style)>(.*?)</\1>", re.S)


def _sha256(source: bytes) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source).digest()).decode() + "'"


@dataclass(frozen=True, slots=True)
class LivePage:
    html: bytes
    csp: str

    @classmethod
    def load(cls) -> LivePage:
        html = resources.files("proxy.live").joinpath("page.html").read_bytes()
        hashes: dict[bytes, list[str]] = {b"script": [], b"style": []}
        for m in _INLINE.finditer(html):
            hashes[m.group(1)].append(_sha256(m.group(2)))
        if not hashes[b"script"] or not hashes[b"style"]:
            raise RuntimeError("proxy/live/page.html lost its inline script or style")
        csp = "; ".join(
            [
                "default-src 'none'",
                "script-src " + " ".join(hashes[b"script"]),
                "style-src " + " ".join(hashes[b"style"]),
                "img-src 'self' blob: data:",
                "connect-src 'self'",
                "base-uri 'none'",
                "form-action 'none'",
                "frame-ancestors 'none'",
            ]
        )
        return cls(html, csp)

    def headers(self) -> dict[str, str]:
        return {
            "content-security-policy": self.csp,
            "x-content-type-options": "nosniff",
            "referrer-policy": "no-referrer",
            "cache-control": "no-cache",
        }
