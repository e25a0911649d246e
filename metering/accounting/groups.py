"""Device groups: which power sources a backend's requests draw from. Pure.

A backend runs on some GPUs (tensor parallel: several); its requests share those GPUs'
energy and nobody else's. Host-wide sources (CPU/DRAM, whole-system figures) are shared
by every request in flight on the host, whatever its backend.

- A backend with `gpus = [..]` in the config is bound to those GPU indices.
- A backend without `gpus` shares the GPUs no backend claims (with one backend and
  `--power-source auto`, that is every GPU NVML sees).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from metering.sources.base import PowerSource


def gpu_index(source: PowerSource) -> int | None:
    idx = getattr(source, "gpu_index", None)
    return idx if isinstance(idx, int) else None


def bind_channels(
    sources: Sequence[PowerSource], backend_gpus: Mapping[str, Sequence[int] | None]
) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """Source names per backend, and warnings about GPU indices no source measures."""
    host = [s.name for s in sources if s.domain != "gpu"]
    gpus = [(gpu_index(s), s.name) for s in sources if s.domain == "gpu"]
    claimed = {i for wanted in backend_gpus.values() if wanted for i in wanted}
    known = {i for i, _ in gpus if i is not None}
    warnings: list[str] = []
    out: dict[str, tuple[str, ...]] = {}
    for backend, wanted in backend_gpus.items():
        if wanted is None:
            mine = [name for i, name in gpus if i not in claimed]
        else:
            missing = sorted(set(wanted) - known)
            if missing:
                warnings.append(
                    f"backend {backend}: GPU {missing} not among the measured GPUs "
                    f"{sorted(known) or 'none'}; its GPU energy is not measured"
                )
            mine = [name for i, name in gpus if i in wanted]
        out[backend] = tuple(host + mine)
    return out, warnings


def gpu_share(channels: Sequence[str], sources: Sequence[PowerSource]) -> float:
    """The fraction of the host's measured GPUs that `channels` cover (1.0 without GPUs)."""
    all_gpus = [s.name for s in sources if s.domain == "gpu"]
    if not all_gpus:
        return 1.0
    return sum(1 for n in all_gpus if n in channels) / len(all_gpus)


def time_channel(channels: Sequence[str], sources: Sequence[PowerSource]) -> str:
    """The name of the time channel of a group: backends on the same GPUs share one."""
    gpus = [s.name for s in sources if s.domain == "gpu" and s.name in channels]
    return "time:" + ("+".join(gpus) if gpus else "host")
