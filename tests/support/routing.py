"""Several stand-in GPU backends serving one model behind one proxy, in real time: each a
batching engine simulator on its own socket (it reads as a vLLM) with its own simulated
GPU (its own `gpus` index, so its energy is measured apart) and, optionally, its own grid
zone or intensity. Used by tests/proxy/relay/test_routing_e2e.py and bench/routing.py."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from proxy.app import EnergyProxyApp, create_app
from tests.conftest import proxy_settings
from tests.support.fakes.batching_backend import (
    MODEL,
    SimState,
    SimulatedGpu,
    make_batching_backend,
)
from tests.support.fakes.batching_engine import EngineConfig
from tests.support.servers import ServerThread

__all__ = ["MODEL", "Fleet", "Site", "costlier"]


@dataclass(frozen=True)
class Site:
    """One backend: its engine, and where its power comes from (an Electricity Maps zone,
    or a static gCO2eq/kWh; neither: the proxy's)."""

    name: str
    config: EngineConfig = field(default_factory=EngineConfig)
    zone: str | None = None
    intensity: float | None = None
    gauges: bool = True
    max_running: int | None = None  # told to the proxy (its config's max_running)

    def entry(self, url: str, gpu: int) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "url": url, "kind": "vllm", "gpus": [gpu]}
        if self.zone is not None:
            out["carbon_zone"] = self.zone
        if self.intensity is not None:
            out["carbon_intensity"] = self.intensity
        if self.max_running is not None:
            out["max_running"] = self.max_running
        return out


def costlier(config: EngineConfig, factor: float) -> EngineConfig:
    """The same engine drawing `factor` times the energy for the same work (an older GPU,
    a worse power limit): every term of its steps' cost, the same time."""
    c = config.cost
    cost = replace(
        c,
        fixed_j=c.fixed_j * factor,
        prefill_j_per_token=c.prefill_j_per_token * factor,
        decode_j_per_seq=c.decode_j_per_seq * factor,
        kv_j_per_token=c.kv_j_per_token * factor,
    )
    return replace(config, cost=cost)


class Fleet:
    """`with Fleet(tmp_path, sites, route="energy") as fleet:` the backends and the proxy
    on real sockets; `fleet.proxy_url`, `fleet.stop(name)`, `fleet.dynamic_j()`."""

    def __init__(self, tmp_path: Path, sites: Sequence[Site], **overrides: Any) -> None:
        self.sites = list(sites)
        self._tmp_path = tmp_path
        self._overrides = overrides
        self._stack = contextlib.ExitStack()
        self.states: dict[str, SimState] = {}
        self.backend_urls: dict[str, str] = {}
        self._servers: dict[str, ServerThread] = {}
        self.app: EnergyProxyApp | None = None
        self.proxy_url = ""

    def __enter__(self) -> Fleet:
        try:
            entries, sources = [], []
            for gpu, site in enumerate(self.sites):
                app, state = make_batching_backend(site.config, gauges=site.gauges)
                server = ServerThread(app)
                url = self._stack.enter_context(server)
                self._servers[site.name] = server
                self.states[site.name] = state
                self.backend_urls[site.name] = url
                entries.append(site.entry(url, gpu))
                sources.append(SimulatedGpu(state, name=f"sim-gpu{gpu}", gpu_index=gpu))
            idle_w = sum(s.config.cost.idle_w for s in self.sites) / len(self.sites)
            self._overrides.setdefault("idle_watts", idle_w)
            settings = proxy_settings(self._tmp_path, backends=entries, **self._overrides)
            self.app = create_app(settings, sources=sources)
            self.proxy_url = self._stack.enter_context(ServerThread(self.app))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def stop(self, name: str) -> None:
        """Stop one backend's server now (it refuses connections from then on)."""
        self._servers[name].__exit__(None, None, None)

    def dynamic_j(self) -> dict[str, float]:
        """Each backend's GPU energy above idle so far, as its engine drew it."""
        return {n: st.engine.dynamic_j_at(st.now()) for n, st in self.states.items()}
