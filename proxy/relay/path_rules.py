"""Which of the backend's paths the proxy passes through unmetered. Pure.

By default the backend's OpenAI-style APIs and its harmless utilities; not its admin
endpoints (`/invocations`, LoRA loading, sleep, profiling, cache resets), which a
deployment opens by naming them (`--passthrough PATTERN`, shell-style `*`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

DEFAULT_PASSTHROUGH = (
    "/v1/*",
    "/v2/*",
    "/tokenize",
    "/detokenize",
    "/health",
    "/ping",
    "/version",
    "/load",
)
# Admin endpoints under the default patterns: refused unless named.
DEFAULT_REFUSED = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")


@dataclass(frozen=True, slots=True)
class PathRules:
    """Which paths pass. The configured patterns first, in order (`!PATTERN` refuses),
    then the default refusals, then the default patterns; the first match decides."""

    configured: tuple[str, ...] = ()

    def allows(self, path: str) -> bool:
        if not plain_path(path):
            return False
        for pattern in self.configured:
            refuse = pattern.startswith("!")
            if fnmatchcase(path, pattern[1:] if refuse else pattern):
                return not refuse
        if any(fnmatchcase(path, p) for p in DEFAULT_REFUSED):
            return False
        return any(fnmatchcase(path, p) for p in DEFAULT_PASSTHROUGH)


def plain_path(path: str) -> bool:
    """A path with no `.` or `..` segment and no empty one (a trailing `/` aside): the
    HTTP clients and servers on the way normalise those (`/v1/../invocations` is
    `/invocations` at the backend), so no pattern may match a path that is another one
    there."""
    if not path.startswith("/"):
        return False
    segments = path[1:].split("/")
    if segments[-1] == "":
        segments.pop()  # a trailing slash
    return all(seg not in ("", ".", "..") for seg in segments)


def check_patterns(patterns: Sequence[str]) -> list[str]:
    """Patterns as configured; each must be a path pattern (`/...`, or `!/...`)."""
    out = []
    for p in patterns:
        p = p.strip()
        if not p.removeprefix("!").startswith("/"):
            raise ValueError(f"--passthrough {p!r}: a path pattern starts with / (or !/)")
        out.append(p)
    return out
