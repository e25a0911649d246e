"""`serve`'s routing flags: which backend serving a model takes a request (docs/routing.md)."""

from __future__ import annotations

import argparse

from backends.choice import POLICIES

S = argparse.SUPPRESS  # only flags the user gave reach the settings (flag > env > file)


def routing_flags(p: argparse.ArgumentParser) -> None:
    """Routing among backends that serve the same model (docs/routing.md)."""
    p.add_argument(
        "--route",
        choices=POLICIES,
        default=S,
        help="which backend serving a model takes a request (default first; per model: the "
        "config file's [routes] table)",
    )
    p.add_argument(
        "--route-explore",
        type=float,
        default=S,
        metavar="SHARE",
        help="share of requests energy and carbon routing send elsewhere to keep every "
        "backend's figure fresh (default 0.05)",
    )
    p.add_argument(
        "--route-max-waiting",
        type=int,
        default=S,
        metavar="N",
        help="requests that may wait at a backend while another has room (default 0)",
    )
    p.add_argument(
        "--pass-backend-metrics",
        action="store_true",
        default=S,
        help="/metrics carries the backend's own series too (one backend: a sidecar)",
    )
