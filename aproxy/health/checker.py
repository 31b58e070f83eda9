"""The daemon's health-check task: when to check which backend, and what a verdict change sets off.

- Targets: the ``HealthView``'s (every TCP real server the syncer translated, one check per distinct address
  and checked port however many virtual servers share it), re-read when the view's generation changes. With
  scope ``used``, only those whose address carried connections within ``used_window`` (the IPVS destination
  counters of the dumps aproxy already makes: ``UsageSource``) plus any that are unhealthy.
- Schedule: a new target's first check is at a uniformly random point of its interval, so checks are spread
  over the interval; each next one is an interval later with +-10% jitter, counted from when it was due (not
  from when it ran: lateness does not accumulate). A timer wheel of 5 ms slots, one timer: no task, heap item
  or timer handle per check; a slot starts once it has ended, so a check is never early and at most one slot
  late by design.
- Budget: at most ``concurrency`` checks in flight, and at most ``max_rate`` started per second: when the
  targets need more (sum of 1/interval), every interval is stretched by the same ratio (never a burst);
  ``stats.stretch_ratio`` says by how much.
- Verdicts: results go to the ``HealthBook`` (the rise/fall state machine); a transition to or from
  ``unhealthy`` goes to the view, and the services it names are handed to ``changed`` (the daemon marks them
  dirty in the tracker and nudges the kernel loop). Each transition is logged once, with the services and the
  reason. The kernel is never touched from here.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Final, Protocol

from aproxy.core.model import IPAddress, ServiceKey
from aproxy.core.verdicts import CheckTarget, HealthView
from aproxy.health.config import HealthCheckSettings
from aproxy.health.prober import ERROR, OK, Prober
from aproxy.health.states import Health, HealthBook, Result, Transition

log = logging.getLogger(__name__)

JITTER: Final = 0.1  # each next check: one interval +- 10%
# How long the checker sleeps at most: new targets (a sync translated new endpoints) are seen this soon.
_POLL: Final = 0.5
_USED_REFRESH: Final = 10.0  # scope "used": how often the used addresses are re-read
# The wheel's slot: checks falling due within one slot start in one wake-up: 5,000 checks/s cost 200
# wake-ups, not 5,000 (each a timer and a task switch), for at most this much lateness.
_TICK: Final = 0.005
_LOGGED_SERVICES: Final = 10


class UsageSource(Protocol):
    """Which backend addresses carried this node's connections recently (the IPVS backend's dumps)."""

    def used_addresses(self, since: float) -> Collection[IPAddress]:
        """Addresses seen with connections at a dump at or after ``since`` (``time.monotonic()``)."""
        ...


class DurationObserver(Protocol):
    def observe(self, amount: float) -> None: ...


# The check duration histogram's upper bounds (seconds): a check on a LAN answers in well under a
# millisecond, a timeout is seconds: 0.1 ms x 2^k, up to ~3.3 s.
DURATION_BOUNDS: Final = tuple(0.0001 * 2**k for k in range(16))


@dataclass(slots=True)
class DurationCounts:
    """A histogram of check durations (``counts[i]``: at most ``DURATION_BOUNDS[i]``, the last: above all).

    Kept here and exported at scrape time rather than observed into prometheus_client's ``Histogram``, whose
    ``observe`` takes a lock per bucket and per sum: 0.7 us a check against 0.2 us, at 5,000 checks a second
    (bench/health.py). The checker and the scrape run on the same event loop: no lock is needed.
    """

    counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BOUNDS) + 1))
    total: float = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect.bisect_left(DURATION_BOUNDS, amount)] += 1
        self.total += amount


@dataclass(slots=True)
class HealthStats:
    """What the checker counts (the checker writes, metrics read)."""

    checks: Counter[str] = field(default_factory=Counter)  # by result (aproxy.health.prober.RESULTS)
    transitions: Counter[str] = field(default_factory=Counter)  # by new state
    stretch_ratio: float = 1.0
    targets: int = 0
    durations: DurationCounts = field(default_factory=DurationCounts)


class _Entry:
    """One checked target: where to connect, how often, when next. The prober's key for its checks."""

    __slots__ = ("due", "inflight", "interval", "live", "sockaddr", "target")

    def __init__(self, target: CheckTarget, interval: float, due: float) -> None:
        self.target = target
        self.sockaddr = (str(target.address), target.port)
        self.interval = interval
        self.due = due
        self.inflight = False
        self.live = True  # False once the target is no longer checked: its wheel slot is skipped


class HealthChecker:
    """``run()`` once, in the daemon's TaskGroup."""

    def __init__(
        self,
        settings: HealthCheckSettings,
        view: HealthView,
        changed: Callable[[frozenset[ServiceKey]], None],
        *,
        usage: UsageSource | None = None,
        lateness: DurationObserver | None = None,
        rng: random.Random | None = None,
        stats: HealthStats | None = None,
    ) -> None:
        self.settings = settings
        self.view = view
        self.book = HealthBook(fall=settings.fall, rise=settings.rise)
        self.stats = stats if stats is not None else HealthStats()
        self._changed = changed
        # Scope "used" without one (the dry-run backend): every target is checked.
        self.usage = usage
        self._lateness = lateness
        self._rng = rng or random.Random()
        self._random = self._rng.random
        self._entries: dict[CheckTarget, _Entry] = {}
        # The timer wheel: slot n holds the entries due in [n * _TICK, (n + 1) * _TICK); _slots is a heap of
        # the slot numbers in use.
        self._wheel: dict[int, list[_Entry]] = {}
        self._slots: list[int] = []
        self._generation = -1
        self._next_refresh = 0.0
        self._prober: Prober[_Entry] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.Handle | None = None
        self._stopped: asyncio.Future[None] | None = None

    async def run(self) -> None:
        """Check, forever (until cancelled); an error in a wake-up ends it (raised here)."""
        loop = self._loop = asyncio.get_running_loop()
        self._prober = Prober[_Entry](self.settings.timeout)
        self._stopped = loop.create_future()
        # The wake-ups are timer callbacks, not a coroutine awaiting a timeout: a wake-up starts a whole slot
        # of checks, and a coroutine's timeout context, event and future per wake-up cost more than the
        # checks' own bookkeeping (bench/health.py).
        self._timer = loop.call_soon(self._tick)
        try:
            await self._stopped
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self._prober.close()

    def _tick(self) -> None:
        assert self._loop is not None and self._prober is not None and self._stopped is not None
        self._timer = None
        try:
            now = self._loop.time()
            if self.view.generation != self._generation or now >= self._next_refresh:
                self._refresh(now)
            self._start_due(self._prober, now)
            deadline = now + _POLL  # new targets (the view's generation) are seen this soon
            if self._slots and self._prober.inflight < self.settings.concurrency:
                # When the first slot in use has ended (never before now: a float's rounding at a slot's
                # edge must not spin the loop). At the concurrency limit, a check's end wakes it instead.
                deadline = max(min(deadline, (self._slots[0] + 1) * _TICK), now + _TICK / 10)
            self._timer = self._loop.call_at(deadline, self._tick)
        except Exception as exc:  # a bug: handed to run(), which raises it into the daemon's TaskGroup
            if not self._stopped.done():
                self._stopped.set_exception(exc)

    def _wake_now(self) -> None:
        """Start the next wake-up at once (a check slot freed up while the loop waited for one)."""
        if self._timer is not None and self._loop is not None:
            self._timer.cancel()
            self._timer = self._loop.call_soon(self._tick)

    # --- scheduling ----------------------------------------------------------------------------------------

    def _refresh(self, now: float) -> None:
        self._generation = self.view.generation
        self._next_refresh = now + _USED_REFRESH
        targets = self.view.targets(self.settings.interval)
        if self.settings.scope == "used" and self.usage is not None:
            used = self.usage.used_addresses(time.monotonic() - self.settings.used_window)
            targets = {t: i for t, i in targets.items() if t.address in used or self.view.is_unhealthy(t)}
        need = sum(1.0 / interval for interval in targets.values())
        stretch = max(1.0, need / self.settings.max_rate)
        self.stats.stretch_ratio = stretch
        self.stats.targets = len(targets)
        for target in [t for t in self._entries if t not in targets]:
            self._entries.pop(target).live = False
            self.book.forget(target)
        for target, interval in targets.items():
            effective = interval * stretch
            entry = self._entries.get(target)
            if entry is not None:
                entry.interval = effective
                continue
            # A new target's first check: at a random point of its interval, so checks are spread over it.
            entry = self._entries[target] = _Entry(target, effective, now + self._rng.uniform(0.0, effective))
            self._file(entry)

    def _file(self, entry: _Entry) -> None:
        slot = int(entry.due / _TICK)
        entries = self._wheel.get(slot)
        if entries is None:
            self._wheel[slot] = [entry]
            heapq.heappush(self._slots, slot)
        else:
            entries.append(entry)

    def _start_due(self, prober: Prober[_Entry], now: float) -> None:
        """Start the checks of every slot that has ended (never early; at most one tick late, by design)."""
        wheel, slots, limit, random_ = self._wheel, self._slots, self.settings.concurrency, self._random
        current = int(now / _TICK)
        while slots and slots[0] < current:
            entries = wheel[slots[0]]
            while entries:
                if prober.inflight >= limit:
                    return  # the rest of the slot waits for a check to end
                entry = entries.pop()
                if not entry.live:
                    continue  # no longer checked: dropped here, its one slot
                due = entry.due
                following = due + entry.interval * (1.0 + JITTER * (2.0 * random_() - 1.0))
                if following <= now:
                    following = now + entry.interval * (0.5 + 0.5 * random_())  # far behind: spread again
                entry.due = following
                self._file(entry)
                if entry.inflight:
                    continue  # the previous check of this target has not ended (timeout >= interval)
                if self._lateness is not None:
                    self._lateness.observe(now - due)
                entry.inflight = True
                prober.start(entry, entry.sockaddr, self._done)
            del wheel[heapq.heappop(slots)]

    # --- results -------------------------------------------------------------------------------------------

    def _done(self, entry: _Entry, result: str, seconds: float) -> None:
        stats = self.stats
        stats.checks[result] += 1
        stats.durations.observe(seconds)
        if self._prober is not None and self._prober.inflight == self.settings.concurrency - 1:
            self._wake_now()  # a slot is free and the loop may be waiting for one
        entry.inflight = False
        if not entry.live or result == ERROR:
            # No longer checked (its endpoint went away while the check ran), or the node's own trouble (no
            # descriptors, ports, buffers): nothing to say about the backend.
            return
        assert self._loop is not None
        outcome = Result.SUCCESS if result == OK else Result.FAILURE
        transition = self.book.record(entry.target, outcome, self._loop.time(), result)
        if transition is not None:
            self._transition(transition)

    def _transition(self, transition: Transition) -> None:
        self.stats.transitions[transition.after.value] += 1
        target = transition.target
        services: frozenset[ServiceKey] = frozenset()
        if transition.after is Health.UNHEALTHY:
            services = self.view.set_unhealthy(target, True)
        elif transition.before is Health.UNHEALTHY:
            services = self.view.set_unhealthy(target, False)
        names = sorted(str(service) for service in (services or self.view.services_of(target)))
        fields = {
            "backend": str(target),
            "from": transition.before.value,
            "to": transition.after.value,
            "reason": transition.reason,
            "services": ",".join(names[:_LOGGED_SERVICES]) + (",..." if names[_LOGGED_SERVICES:] else ""),
        }
        if transition.after is Health.UNHEALTHY:
            log.warning("backend unhealthy: draining it (weight 0)", extra=fields)
        elif transition.before is Health.UNHEALTHY:
            log.info("backend healthy again: weight restored", extra=fields)
        else:
            log.debug("backend healthy", extra=fields)
        if services:
            self._changed(services)
