"""`energy_proxy_tenant_budget_used_ratio`: each budgeted key's use of its budget in the
current period (1 = spent), by `kind` (joules, co2eq)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from proxy.budgets import BudgetBook


class BudgetUse(Collector):
    def __init__(self, book: BudgetBook) -> None:
        self.book = book

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily(
            "energy_proxy_tenant_budget_used_ratio",
            "A key's use of its energy or carbon budget in the current period (1: spent).",
            labels=("tenant", "kind"),
        )
        for tenant in self.book.budgets:
            verdict = self.book.check(tenant)
            if verdict is None:
                continue
            b, u = verdict.budget, verdict.use
            if b.joules is not None:
                g.add_metric([tenant, "joules"], u.joules / b.joules)
            if b.co2eq_g is not None:
                g.add_metric([tenant, "co2eq"], u.grams / b.co2eq_g)
        yield g
