"""A clock the test steps by hand: `clock.t_s = 1.5`, and every reader sees 1.5."""

from __future__ import annotations


class StepClock:
    def __init__(self, t_s: float = 0.0) -> None:
        self.t_s = t_s

    def __call__(self) -> float:
        return self.t_s
