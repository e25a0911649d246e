"""Attribution of measured energy to concurrent requests, by virtual time.

One `Channel` per power source (later: per source and device group). Each reading of the
source advances the channel by the energy drawn since the previous reading, `dE`:

- if requests are in flight with total weight `W > 0`, the accumulator grows by
  `dE / W` (joules per unit of weight) and `dE` counts as attributed;
- otherwise `dE` is idle energy: counted, never attributed, never lost.

A request holding weight `w` from accumulator value `A0` to `A1` is owed `w * (A1 - A0)`.
Starting, finishing, changing a weight and recording a reading are all O(1), whatever
the number of requests in flight. Conservation, the invariant the tests check:

    sum of all requests' shares + untracked_j + idle_j == measured_j   (up to float rounding)

`untracked_j` is what the tickets marked `untracked` were owed: the meter's account of the
work a backend ran that the proxy did not send (metering/accounting/untracked.py), a member
weighed like the requests it stands for, so its energy is not the metered requests'. Per
channel, `attributed_j` (to requests) + `untracked_j` + `idle_j` == `measured_j`.

A second accumulator does the same for the energy above the idle draw (`dynamic`), with
`dE - idle_power_w * dt` in place of `dE`.

A channel may also have a fixed cost, `fixed_w` (the cost model's F, attribution.py's
`model` mode): the power of running steps at all, shared equally by the members that run
(`eq` = 1; a request held waiting has 0). Each interval then splits in two, in proportion
to `fixed_w` and the members' total weight (their own work, in watts): the first part
equally among the runners (a second pair of accumulators, per runner), the second by
weight. With `fixed_w` = 0 (the default) the channel is the plain weighted split above.

Sensitivities (the band, metering/accounting/band.py). In `model` mode a member's weight
is its own work, priced by the cost model's coefficients: `prefill` weight (c_prefill x
its prompt tokens) or decode weight (c_decode), and the fixed cost `fixed_w` (F). How a
request's dynamic joules would move if a coefficient were off is, to first order, the
derivative of its share by the coefficient's logarithm; per interval of dynamic energy
dE, total T = F + W, runners R, prefill weight P of W:

    d share / d ln F  = dE (e F/(R T) - e F^2/(R T^2) - w F/T^2)
    d share / d ln cp = dE (wp/T - e F P/(R T^2) - w P/T^2)
    d share / d ln cd = dE (wd/T - e F D/(R T^2) - w D/T^2)      (D = W - P)

for a member of weight w = wp + wd and equal part e. Six more accumulators of dE over
powers of T make each O(1) like the shares themselves; the three sum to zero (scaling
every coefficient changes no split).

The accumulator is reset to zero whenever the channel empties, so it stays small and
`A1 - A0` keeps its precision under normal traffic. Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

WEIGHT_EPSILON = 1e-9


@dataclass(slots=True)
class Channel:
    """Accounting for one power source.

    All energies in joules; `acc_j_per_w` is joules per unit of request weight,
    `eq_acc_j` joules per runner (the equal share of the fixed cost).
    """

    name: str
    acc_j_per_w: float = 0.0
    dyn_acc_j_per_w: float = 0.0
    eq_acc_j: float = 0.0
    eq_dyn_acc_j: float = 0.0
    weight: float = 0.0
    runners: float = 0.0  # members that share the fixed cost (eq = 1)
    fixed_w: float = 0.0  # the fixed cost model's F, watts (0: a plain weighted split)
    members: int = 0
    prefill_weight: float = 0.0  # the part of `weight` that is prefill work (sensitivities)
    # Sensitivity accumulators (dynamic joules; see the module's docstring): dE F^2/(R T^2),
    # dE F/T^2, dE F P/(R T^2), dE P/T^2, dE F D/(R T^2), dE D/T^2.
    sens_acc: list[float] = field(default_factory=lambda: [0.0] * 6)
    # The part of `weight` and `runners` held by untracked tickets (work the proxy did not
    # send), to tell their energy apart from the requests'.
    untracked_weight: float = 0.0
    untracked_runners: float = 0.0
    measured_j: float = 0.0
    dynamic_j: float = 0.0  # measured minus the idle draw, whoever was in flight
    attributed_j: float = 0.0  # to the proxy's requests
    untracked_j: float = 0.0  # to work the backend ran that the proxy did not send
    idle_j: float = 0.0
    last_energy_j: float | None = None
    last_t_s: float | None = None

    def record(self, energy_j: float, t_s: float, idle_power_w: float) -> float:
        """Advance to a new cumulative reading. Returns the energy drawn since the last one.

        A counter that went backwards (sensor reset) is taken as a new origin: the
        interval contributes nothing rather than a negative amount.
        """
        if self.last_energy_j is None or self.last_t_s is None:
            self.last_energy_j, self.last_t_s = energy_j, t_s
            return 0.0
        delta_j = energy_j - self.last_energy_j
        dt_s = t_s - self.last_t_s
        self.last_energy_j, self.last_t_s = energy_j, t_s
        if delta_j < 0.0:
            delta_j = 0.0
        if dt_s < 0.0:
            dt_s = 0.0
        self.measured_j += delta_j
        dyn_j = delta_j - idle_power_w * dt_s
        self.dynamic_j += dyn_j
        # Weights are >= 0 (a request the queue model holds waiting weighs 0); a total
        # left at float rounding residue by joins and leaves is no weight at all.
        fixed = self.fixed_w if self.runners > 0.5 else 0.0
        total = self.weight + fixed
        if self.members > 0 and total > WEIGHT_EPSILON:
            if fixed > 0.0:
                part = fixed / total / self.runners
                self.eq_acc_j += delta_j * part
                self.eq_dyn_acc_j += dyn_j * part
            self.acc_j_per_w += delta_j / total
            self.dyn_acc_j_per_w += dyn_j / total
            self._sensitivities(dyn_j, fixed, total)
            untracked_j = delta_j * self._untracked_fraction(fixed, total)
            self.untracked_j += untracked_j
            self.attributed_j += delta_j - untracked_j
        else:
            self.idle_j += delta_j
        return delta_j

    def _sensitivities(self, dyn_j: float, fixed: float, total: float) -> None:
        """Advance the six sensitivity accumulators by one interval's dynamic energy."""
        acc = self.sens_acc
        per_t2 = dyn_j / (total * total)
        prefill = self.prefill_weight
        decode = self.weight - prefill
        if fixed > 0.0:
            per_runner = fixed * per_t2 / self.runners
            acc[0] += fixed * per_runner
            acc[1] += fixed * per_t2
            acc[2] += prefill * per_runner
            acc[4] += decode * per_runner
        acc[3] += prefill * per_t2
        acc[5] += decode * per_t2

    def _untracked_fraction(self, fixed: float, total: float) -> float:
        """The part of an interval the untracked members are owed: their weight, and their
        runners' equal parts of the fixed cost, over the whole."""
        if self.untracked_weight <= 0.0 and self.untracked_runners <= 0.0:
            return 0.0
        part = self.untracked_weight
        if fixed > 0.0:
            part += fixed * self.untracked_runners / self.runners
        return min(1.0, max(0.0, part / total))

    def join(
        self, weight: float, eq: float = 0.0, untracked: bool = False, prefill: bool = False
    ) -> tuple[float, float, float, float]:
        """Add a member of `weight` (and `eq` 1 if it shares the fixed cost; `untracked`
        if it stands for work the proxy did not send; `prefill` if its weight is prefill
        work); returns its starting accumulator values."""
        self.members += 1
        self.weight += weight
        self.runners += eq
        if prefill:
            self.prefill_weight += weight
        if untracked:
            self.untracked_weight += weight
            self.untracked_runners += eq
        return self.acc_j_per_w, self.dyn_acc_j_per_w, self.eq_acc_j, self.eq_dyn_acc_j

    def leave(
        self, weight: float, eq: float = 0.0, untracked: bool = False, prefill: bool = False
    ) -> None:
        self.members -= 1
        if self.members <= 0:
            # Nobody holds a start value any more: rebase, which also keeps precision.
            self.members = 0
            self.weight = 0.0
            self.runners = 0.0
            self.prefill_weight = 0.0
            self.sens_acc = [0.0] * 6
            self.untracked_weight = 0.0
            self.untracked_runners = 0.0
            self.acc_j_per_w = 0.0
            self.dyn_acc_j_per_w = 0.0
            self.eq_acc_j = 0.0
            self.eq_dyn_acc_j = 0.0
        else:
            self.weight -= weight
            self.runners -= eq
            if prefill:
                self.prefill_weight = max(0.0, self.prefill_weight - weight)
            if untracked:
                self.untracked_weight -= weight
                self.untracked_runners -= eq

    def change(
        self, d_weight: float, d_eq: float, untracked: bool = False, d_prefill: float = 0.0
    ) -> None:
        """A member's weight changed by `d_weight` (its prefill part by `d_prefill`) and
        its equal share by `d_eq`."""
        self.weight += d_weight
        self.runners += d_eq
        if d_prefill:
            self.prefill_weight = max(0.0, self.prefill_weight + d_prefill)
        if untracked:
            self.untracked_weight += d_weight
            self.untracked_runners += d_eq


@dataclass(slots=True)
class Share:
    """One request's position in one channel."""

    channel: Channel
    weight: float
    start_acc: float
    start_dyn_acc: float
    eq: float = 0.0
    start_eq_acc: float = 0.0
    start_eq_dyn_acc: float = 0.0
    owed_j: float = 0.0
    owed_dynamic_j: float = 0.0
    prefill: bool = False  # its weight is prefill work (the sensitivities' split of it)
    start_sens: list[float] = field(default_factory=lambda: [0.0] * 6)
    # How its dynamic joules move per unit of ln F, ln c_prefill, ln c_decode (so far).
    sens_j: list[float] = field(default_factory=lambda: [0.0] * 3)
    start_channel_dyn_j: float = 0.0  # the channel's dynamic joules when it joined

    def owed_now(self) -> tuple[float, float]:
        """What it is owed up to the channel's last reading, (joules, dynamic joules),
        without settling: a read that changes nothing (for gauges)."""
        ch = self.channel
        owed_j = self.owed_j + self.weight * (ch.acc_j_per_w - self.start_acc)
        owed_dyn_j = self.owed_dynamic_j + self.weight * (ch.dyn_acc_j_per_w - self.start_dyn_acc)
        if self.eq:
            owed_j += self.eq * (ch.eq_acc_j - self.start_eq_acc)
            owed_dyn_j += self.eq * (ch.eq_dyn_acc_j - self.start_eq_dyn_acc)
        return owed_j, owed_dyn_j

    def settle(self) -> None:
        """Move what has accrued since the start values into `owed_j` (on weight change)."""
        ch = self.channel
        self._settle_sensitivities(ch)
        self.owed_j += self.weight * (ch.acc_j_per_w - self.start_acc)
        self.owed_dynamic_j += self.weight * (ch.dyn_acc_j_per_w - self.start_dyn_acc)
        if self.eq:
            self.owed_j += self.eq * (ch.eq_acc_j - self.start_eq_acc)
            self.owed_dynamic_j += self.eq * (ch.eq_dyn_acc_j - self.start_eq_dyn_acc)
        self.start_acc = ch.acc_j_per_w
        self.start_dyn_acc = ch.dyn_acc_j_per_w
        self.start_eq_acc = ch.eq_acc_j
        self.start_eq_dyn_acc = ch.eq_dyn_acc_j

    def _settle_sensitivities(self, ch: Channel) -> None:
        """Add what the intervals since the start values did to its sensitivities (the
        module's docstring), before the start values move (copied in place: no
        allocation on the request path)."""
        acc, start, w, e = ch.sens_acc, self.start_sens, self.weight, self.eq
        if w or e:
            a0, a1, a2, a3, a4, a5 = acc
            s0, s1, s2, s3, s4, s5 = start
            d_acc = ch.dyn_acc_j_per_w - self.start_dyn_acc
            wp = w if self.prefill else 0.0
            sens = self.sens_j
            d_eq = ch.eq_dyn_acc_j - self.start_eq_dyn_acc
            sens[0] += e * (d_eq - (a0 - s0)) - w * (a1 - s1)
            sens[1] += wp * d_acc - e * (a2 - s2) - w * (a3 - s3)
            sens[2] += (w - wp) * d_acc - e * (a4 - s4) - w * (a5 - s5)
        start[:] = acc


@dataclass(slots=True)
class Ticket:
    """A request in flight: its shares of every channel it draws from."""

    shares: list[Share] = field(default_factory=list)
    finished: bool = False
    # The channel names it was opened in (None: all), for the sampler's boundary reads.
    names: tuple[str, ...] | None = None
    # It stands for work the backend runs that the proxy did not send (the channels'
    # `untracked_j`), not for a request.
    untracked: bool = False


@dataclass(frozen=True, slots=True)
class SourceShare:
    """What one request owes one source, joules."""

    name: str
    energy_j: float
    dynamic_j: float
    # How its dynamic joules would move per unit of ln F, ln c_prefill and ln c_decode
    # (the cost model's coefficients; `model` mode), to first order: the band's input.
    sensitivity_j: tuple[float, float, float] = (0.0, 0.0, 0.0)
    # The dynamic joules the channel drew while it was open, whoever they went to: what a
    # wrong idea of who ran beside it could move its share within.
    exposure_j: float = 0.0


class Ledger:
    """Channels by source name, and the tickets of requests in flight."""

    def __init__(self, source_names: Iterable[str]) -> None:
        self.channels: dict[str, Channel] = {n: Channel(n) for n in source_names}
        if not self.channels:
            raise ValueError("a ledger needs at least one power source")
        self._all = list(self.channels.values())

    def record(self, name: str, energy_j: float, t_s: float, idle_power_w: float = 0.0) -> float:
        """Feed one cumulative reading of source `name`; returns joules since the last one."""
        return self.channels[name].record(energy_j, t_s, idle_power_w)

    def start(
        self,
        weight: float = 1.0,
        names: Iterable[str] | None = None,
        eq: float = 0.0,
        *,
        untracked: bool = False,
        prefill: bool = False,
    ) -> Ticket:
        """Open a request in the given channels (all of them by default); `eq` 1 when it
        shares the channels' fixed cost (it runs), or the number of runners it stands for.
        `untracked`: it stands for work the proxy did not send (its energy is the
        channels' `untracked_j`, not `attributed_j`); `prefill`: its weight is prefill
        work (the sensitivities).

        The caller records a reading of each source *before* starting, so energy drawn
        up to this instant goes to whoever was in flight before.
        """
        if weight < 0.0:
            raise ValueError("a request's weight must not be negative")
        chans = self._all if names is None else [self.channels[n] for n in names]
        ticket = Ticket(untracked=untracked)
        for ch in chans:
            acc, dyn, eq_acc, eq_dyn = ch.join(weight, eq, untracked, prefill)
            share = Share(ch, weight, acc, dyn, eq, eq_acc, eq_dyn, prefill=prefill)
            share.start_sens = ch.sens_acc.copy()
            share.start_channel_dyn_j = ch.dynamic_j
            ticket.shares.append(share)
        return ticket

    def reweigh(
        self, ticket: Ticket, weight: float, eq: float | None = None, prefill: bool = False
    ) -> None:
        """Change a request's weight (and, given, whether it shares the fixed cost) from
        now on; `prefill`: the new weight is prefill work."""
        if weight < 0.0:
            raise ValueError("a request's weight must not be negative")
        if ticket.finished:
            return
        for share in ticket.shares:
            share.settle()
            d_eq = 0.0 if eq is None else eq - share.eq
            d_prefill = (weight if prefill else 0.0) - (share.weight if share.prefill else 0.0)
            share.channel.change(weight - share.weight, d_eq, ticket.untracked, d_prefill)
            share.weight = weight
            share.prefill = prefill
            if eq is not None:
                share.eq = eq

    def exchange(self, a: Ticket, b: Ticket) -> None:
        """Swap what two requests in flight are owed so far, in the channels both are in
        (one took the other's place: metering/accounting/attribution.py, `ran_instead`). Weights
        stay as they are; the sum owed, and so conservation, is unchanged."""
        if a is b or a.finished or b.finished or a.untracked != b.untracked:
            return  # (the untracked account never takes a request's place)
        theirs = {s.channel.name: s for s in b.shares}
        for mine in a.shares:
            other = theirs.get(mine.channel.name)
            if other is None:
                continue
            mine.settle()
            other.settle()
            mine.owed_j, other.owed_j = other.owed_j, mine.owed_j
            mine.owed_dynamic_j, other.owed_dynamic_j = other.owed_dynamic_j, mine.owed_dynamic_j
            mine.sens_j, other.sens_j = other.sens_j, mine.sens_j

    def finish(self, ticket: Ticket) -> list[SourceShare]:
        """Close a request and return what it owes each source.

        The caller records a reading of each source *before* finishing. Finishing twice
        returns the same shares and changes nothing.
        """
        if not ticket.finished:
            for share in ticket.shares:
                share.settle()
                share.channel.leave(share.weight, share.eq, ticket.untracked, share.prefill)
            ticket.finished = True
        return [
            SourceShare(
                s.channel.name,
                s.owed_j,
                s.owed_dynamic_j,
                (s.sens_j[0], s.sens_j[1], s.sens_j[2]),
                s.channel.dynamic_j - s.start_channel_dyn_j,
            )
            for s in ticket.shares
        ]

    @staticmethod
    def owed(ticket: Ticket) -> list[SourceShare]:
        """What a ticket is owed so far (up to each channel's last reading), without
        closing or settling it: a read only."""
        return [SourceShare(s.channel.name, *s.owed_now()) for s in ticket.shares]

    @property
    def inflight(self) -> int:
        return max(ch.members for ch in self._all)
