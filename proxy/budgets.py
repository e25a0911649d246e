"""Energy and carbon budgets per key: joules and/or grams CO2eq per hour, day or month.

What a tenant used in the current period is read from the request store (every request
counted, whatever its status: metering/store `tenant_usage`), so it holds across
restarts and, on PostgreSQL, across a fleet of proxies. The read runs off the event loop
every `REFRESH_S`; between reads, this process's own finished requests are added as they
end. The check on the request path is a dictionary lookup.

Past a hard budget a request is refused with 429 `energy_budget_exceeded` and
`Retry-After` (the seconds to the period's end); a soft budget only says so
(`x-energy-budget-exceeded: true`) and logs once a period. Requests in flight are charged
when they end, so a tenant may overshoot by what its requests in flight at that moment
use, plus, in a fleet, what the other proxies let through before the next read.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from proxy.asgi import RawHeaders, Send, send_error
from proxy.errors import BudgetExceeded

log = logging.getLogger("energy_proxy.budgets")

PERIODS = ("hour", "day", "month")
REFRESH_S = 5.0


@dataclass(frozen=True, slots=True)
class Budget:
    joules: float | None = None
    co2eq_g: float | None = None
    per: str = "day"
    soft: bool = False


def parse_budget(value: Any) -> Budget:
    """`joules=3.6e6,co2eq_g=120,per=day[,soft]` or a table with those keys. Raises
    ValueError saying what is wrong."""
    if isinstance(value, Budget):
        return value
    fields: dict[str, Any] = {}
    if isinstance(value, str):
        for part in (p.strip() for p in value.split(",") if p.strip()):
            name, sep, v = part.partition("=")
            fields[name.strip()] = v.strip() if sep else True
    elif isinstance(value, Mapping):
        fields = dict(value)
    else:
        raise ValueError("a budget is joules=N,co2eq_g=N,per=hour|day|month[,soft]")
    unknown = set(fields) - {"joules", "co2eq_g", "per", "soft"}
    if unknown:
        raise ValueError(f"a budget takes joules, co2eq_g, per, soft; not {sorted(unknown)}")
    per = str(fields.get("per", "day"))
    if per not in PERIODS:
        raise ValueError(f"a budget's period is hour, day or month; not {per!r}")
    limits = {k: _limit(k, fields.get(k)) for k in ("joules", "co2eq_g")}
    if limits["joules"] is None and limits["co2eq_g"] is None:
        raise ValueError("a budget needs joules=N or co2eq_g=N (or both)")
    soft = fields.get("soft", False)
    if isinstance(soft, str):
        soft = soft.lower() in ("1", "true", "yes", "soft")
    return Budget(limits["joules"], limits["co2eq_g"], per, bool(soft))


def _limit(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):  # `joules` alone, or `joules = true`: not a number
        raise ValueError(f"a budget's {name} is a number: {name}=N")
    try:
        n = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"a budget's {name} is a number; not {value!r}") from None
    if not math.isfinite(n) or n <= 0:
        raise ValueError(f"a budget's {name} is a positive number; not {value!r}")
    return n


def period_bounds_s(per: str, now_s: float) -> tuple[float, float]:
    """The UTC period (hour, day or month) holding `now_s`: (start, end), unix seconds."""
    t = datetime.fromtimestamp(now_s, UTC)
    if per == "hour":
        start = t.replace(minute=0, second=0, microsecond=0)
        return start.timestamp(), start.timestamp() + 3600.0
    if per == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.timestamp(), start.timestamp() + 86400.0
    start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    days = calendar.monthrange(t.year, t.month)[1]
    return start.timestamp(), start.timestamp() + days * 86400.0


@dataclass(slots=True)
class Use:
    """A tenant's use in its current period."""

    start_s: float = 0.0
    end_s: float = 0.0
    joules: float = 0.0
    grams: float = 0.0
    warned: bool = False


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the budget says of a tenant's next request."""

    budget: Budget
    use: Use

    @property
    def exceeded(self) -> bool:
        b, u = self.budget, self.use
        return (b.joules is not None and u.joules >= b.joules) or (
            b.co2eq_g is not None and u.grams >= b.co2eq_g
        )

    def retry_after_s(self, now_s: float) -> int:
        return max(1, math.ceil(self.use.end_s - now_s))

    def headers(self) -> list[tuple[bytes, bytes]]:
        b, u = self.budget, self.use
        out = []
        if b.joules is not None:
            left = _plain(max(0.0, b.joules - u.joules))
            out.append((b"x-energy-budget-remaining-joules", left))
        if b.co2eq_g is not None:
            left = _plain(max(0.0, b.co2eq_g - u.grams))
            out.append((b"x-energy-budget-remaining-grams", left))
        out.append((b"x-energy-budget-period", b.per.encode()))
        if self.exceeded:
            out.append((b"x-energy-budget-exceeded", b"true"))
        return out


def _plain(x: float) -> bytes:
    """A header number in plain decimal, to the milli-unit (never an exponent)."""
    return (f"{x:.3f}".rstrip("0").rstrip(".") or "0").encode()


class OverBudget(Exception):
    """A request of a key whose hard budget is spent (raised to answer 429)."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__("energy budget spent")
        self.verdict = verdict


@dataclass
class BudgetBook:
    """Each budgeted tenant's use. `usage` reads the store (blocking: called in a
    thread); `clock` gives unix seconds."""

    budgets: dict[str, Budget]
    # {tenant: since_s} -> {tenant: (joules, grams)}: RequestStore.tenants_usage
    usage: Callable[[dict[str, float]], dict[str, tuple[float, float]]]
    clock: Callable[[], float] = time.time
    refresh_s: float = REFRESH_S
    uses: dict[str, Use] = field(default_factory=dict)

    def check(self, tenant: str) -> Verdict | None:
        """The budget's word on `tenant`'s next request; None where it has none."""
        budget = self.budgets.get(tenant)
        if budget is None:
            return None
        use = self._use(tenant, budget)
        verdict = Verdict(budget, use)
        if verdict.exceeded and budget.soft and not use.warned:
            use.warned = True
            log.warning("tenant %s is over its soft energy budget for this %s", tenant, budget.per)
        return verdict

    def _use(self, tenant: str, budget: Budget) -> Use:
        now_s = self.clock()
        use = self.uses.get(tenant)
        if use is None or now_s >= use.end_s:
            # A new period (or the first look): nothing used yet that this process knows
            # of; the next read brings what the store has.
            start_s, end_s = period_bounds_s(budget.per, now_s)
            use = self.uses[tenant] = Use(start_s, end_s)
        return use

    def report(self, tenant: str | None) -> list[dict[str, Any]]:
        """Each budget's state for the API and the live page: `tenant`'s own (None:
        every key's, for admins)."""
        out = []
        for name in sorted(self.budgets):
            if tenant is not None and name != tenant:
                continue
            verdict = self.check(name)
            assert verdict is not None
            b, u = verdict.budget, verdict.use
            entry: dict[str, Any] = {
                "tenant": name,
                "per": b.per,
                "period_start": u.start_s,
                "period_end": u.end_s,
                "soft": b.soft,
                "exceeded": verdict.exceeded,
            }
            for kind, limit, used in (
                ("joules", b.joules, u.joules),
                ("co2eq_g", b.co2eq_g, u.grams),
            ):
                if limit is not None:
                    entry[kind] = {
                        "limit": limit,
                        "used": used,
                        "remaining": max(0.0, limit - used),
                    }
            out.append(entry)
        return out

    def charge(self, tenant: str, joules: float, grams: float) -> None:
        """A request of `tenant` ended: its energy, until the next read has it."""
        budget = self.budgets.get(tenant)
        if budget is None:
            return
        use = self._use(tenant, budget)
        use.joules += joules if math.isfinite(joules) else 0.0
        use.grams += grams if math.isfinite(grams) else 0.0

    def finished(self, event: Any) -> None:
        """An observer (proxy/observe/finished.py)."""
        if event.tenant:
            self.charge(event.tenant, event.report.energy_j, event.report.co2eq_g)

    async def refresh(self) -> None:
        """Every tenant's use read from the store again, in one call, in a thread."""
        uses = {t: self._use(t, b) for t, b in self.budgets.items()}
        since = {t: u.start_s for t, u in uses.items()}
        try:
            read = await asyncio.to_thread(self.usage, since)
        except Exception as e:  # a store that cannot be read keeps the last figures
            log.warning("budgets: the store could not be read: %s", e)
            return
        for tenant, use in uses.items():
            if self.uses.get(tenant) is use and tenant in read:
                use.joules, use.grams = read[tenant]

    async def run(self) -> None:
        """Forever (cancel to stop): refresh every `refresh_s`."""
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.refresh()


async def refuse_over_budget(
    send: Send, verdict: Verdict, headers: RawHeaders, now_s: float
) -> None:
    """429 `energy_budget_exceeded`, OpenAI-shaped, with Retry-After: the seconds to the
    period's end."""
    retry_s = verdict.retry_after_s(now_s)
    b = verdict.budget
    what = " and ".join(
        f"{limit:g} {unit}"
        for limit, unit in ((b.joules, "J"), (b.co2eq_g, "gCO2eq"))
        if limit is not None
    )
    exc = BudgetExceeded(
        f"this key's energy budget ({what} per {b.per}) is spent; it renews in {retry_s} s"
    )
    await send_error(
        send, exc, [*headers, *verdict.headers(), (b"retry-after", str(retry_s).encode())]
    )
