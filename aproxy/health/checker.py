"""The daemon's health-check task: when to check which backend, and what a verdict change sets off.

- Targets: the ``HealthView``'s (every TCP real server the syncer translated, one check per distinct address
  and checked port however many virtual servers share it), re-read when the view's generation changes. With
  scope ``used``, only those whose address carried connections within ``used_window`` (the IPVS destination
  counters of the dumps aproxy already makes: ``UsageSource``) plus any that are unhealthy.
- Schedule: a new target's first check is at a uniformly random point of its interval, so checks are spread
  over the interval; each next one is an interval later with +-10% jitter, counted from when it was due (not
  from when it ran: lateness does not accumulate). One heap, one timer: no task per target.
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
import heapq
import itertools
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
# Checks falling due within this of each other start in one wake-up: 5,000 checks/s cost 200 wake-ups, not
# 5,000 (each a timer and a task switch), for at most this much lateness.
_TICK: Final = 0.005
_LOGGED_SERVICES: Final = 10


class UsageSource(Protocol):
    """Which backend addresses carried this node's connections recently (the IPVS backend's dumps)."""

    def used_addresses(self, since: float) -> Collection[IPAddress]:
        """Addresses seen with connections at a dump at or after ``since`` (``time.monotonic()``)."""
        ...


class DurationObserver(Protocol):
    def observe(self, amount: float) -> None: ...


@dataclass(slots=True)
class HealthStats:
    """What the checker counts (the checker writes, metrics read)."""

    checks: Counter[str] = field(default_factory=Counter)  # by result (aproxy.health.prober.RESULTS)
    transitions: Counter[str] = field(default_factory=Counter)  # by new state
    stretch_ratio: float = 1.0
    targets: int = 0


@dataclass(slots=True)
class _Entry:
    sockaddr: tuple[str, int]
    interval: float
    due: float
    inflight: bool = False


class HealthChecker:
    """``run()`` once, in the daemon's TaskGroup."""

    def __init__(
        self,
        settings: HealthCheckSettings,
        view: HealthView,
        changed: Callable[[frozenset[ServiceKey]], None],
        *,
        usage: UsageSource | None = None,
        duration: DurationObserver | None = None,
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
        self._duration = duration
        self._lateness = lateness
        self._rng = rng or random.Random()
        self._entries: dict[CheckTarget, _Entry] = {}
        self._heap: list[tuple[float, int, CheckTarget]] = []
        self._seq = itertools.count()
        self._generation = -1
        self._next_refresh = 0.0
        self._wake = asyncio.Event()
        self._prober: Prober | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self) -> None:
        """Check, forever (until cancelled)."""
        loop = self._loop = asyncio.get_running_loop()
        prober = self._prober = Prober(self.settings.timeout)
        try:
            while True:
                now = loop.time()
                if self.view.generation != self._generation or now >= self._next_refresh:
                    self._refresh(now)
                self._start_due(prober, now)
                deadline = now + _POLL
                if self._heap and prober.inflight < self.settings.concurrency:
                    deadline = max(min(deadline, self._heap[0][0]), now + _TICK)
                self._wake.clear()
                try:
                    async with asyncio.timeout_at(deadline):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            prober.close()

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
            del self._entries[target]
            self.book.forget(target)
        for target, interval in targets.items():
            effective = interval * stretch
            entry = self._entries.get(target)
            if entry is not None:
                entry.interval = effective
                continue
            due = now + self._rng.uniform(0.0, effective)  # spread over the interval
            self._entries[target] = _Entry((str(target.address), target.port), effective, due)
            heapq.heappush(self._heap, (due, next(self._seq), target))
        if len(self._heap) > 2 * len(self._entries) + 64:
            # Stale heap items (removed targets) pile up under churn: rebuild from the live entries.
            self._heap = [(e.due, next(self._seq), t) for t, e in self._entries.items()]
            heapq.heapify(self._heap)

    def _start_due(self, prober: Prober, now: float) -> None:
        heap, entries, limit = self._heap, self._entries, self.settings.concurrency
        while heap and heap[0][0] <= now and prober.inflight < limit:
            due, _, target = heapq.heappop(heap)
            entry = entries.get(target)
            if entry is None or entry.due != due:
                continue  # removed, or rescheduled: a stale item
            following = due + entry.interval * (1.0 + self._rng.uniform(-JITTER, JITTER))
            if following <= now:
                following = now + entry.interval * self._rng.uniform(0.5, 1.0)  # far behind: spread again
            entry.due = following
            heapq.heappush(heap, (following, next(self._seq), target))
            if entry.inflight:
                continue  # the previous check of this target has not ended (timeout >= interval)
            if self._lateness is not None:
                self._lateness.observe(now - due)
            entry.inflight = True
            prober.start(target, entry.sockaddr, self._done)

    # --- results -------------------------------------------------------------------------------------------

    def _done(self, target: CheckTarget, result: str, seconds: float) -> None:
        self.stats.checks[result] += 1
        if self._duration is not None:
            self._duration.observe(seconds)
        if self._prober is not None and self._prober.inflight == self.settings.concurrency - 1:
            self._wake.set()  # a slot is free and the loop may be waiting for one
        entry = self._entries.get(target)
        if entry is None:
            return  # no longer checked: its endpoint went away while the check ran
        entry.inflight = False
        if result == ERROR:
            return  # the node's own trouble (no descriptors, ports, buffers): not the backend's
        assert self._loop is not None
        outcome = Result.SUCCESS if result == OK else Result.FAILURE
        transition = self.book.record(target, outcome, self._loop.time(), result)
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
