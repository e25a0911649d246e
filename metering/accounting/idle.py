"""Idle power: a fixed figure from config, or learnt from power seen while nothing is in flight."""

from __future__ import annotations

from collections import deque


class IdlePower:
    """The idle draw of one source, watts.

    With `fixed_w` set, that is the answer. Otherwise (`--idle-watts auto`) it is a low
    percentile of the power samples taken while no request was in flight, over a window
    of the most recent `window` samples (20 Hz x 1200 = the last minute of idle time).
    A low percentile rather than the mean, so that background blips while "idle" do not
    raise the baseline. Until any idle sample exists, the lowest power seen so far is used.
    """

    def __init__(
        self, fixed_w: float | None = None, *, percentile: float = 0.1, window: int = 1200
    ) -> None:
        if fixed_w is not None and fixed_w < 0.0:
            raise ValueError("idle watts must be >= 0")
        self.fixed_w = fixed_w
        self._percentile = percentile
        self._samples_w: deque[float] = deque(maxlen=window)
        self._min_seen_w: float | None = None
        self._cached_w: float | None = None
        self._since_cache = 0

    def observe(self, power_w: float, idle: bool) -> None:
        """Offer a power sample; `idle` says whether nothing was in flight around it."""
        if self.fixed_w is not None:
            return
        if self._min_seen_w is None or power_w < self._min_seen_w:
            self._min_seen_w = power_w
        if idle:
            self._samples_w.append(power_w)
            self._since_cache += 1
            # Recompute the percentile every 20 samples, not every sample: O(n log n) sort.
            if self._cached_w is None or self._since_cache >= 20:
                self._cached_w = None

    @property
    def watts(self) -> float:
        if self.fixed_w is not None:
            return self.fixed_w
        if not self._samples_w:
            return self._min_seen_w or 0.0
        if self._cached_w is None:
            ordered = sorted(self._samples_w)
            self._cached_w = ordered[int(self._percentile * (len(ordered) - 1))]
            self._since_cache = 0
        return self._cached_w

    @property
    def learnt(self) -> bool:
        """True when the figure rests on idle samples (or is fixed), not a first guess."""
        return self.fixed_w is not None or bool(self._samples_w)
