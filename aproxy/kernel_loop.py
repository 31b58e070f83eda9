"""The kernel loop: the daemon's one owner of kernel changes, and when it syncs, audits and checks drains.

One loop runs the ``Syncer``'s passes one at a time, never overlapping:

- sync, when the ``SyncScheduler`` says one is due (a change was queued, the periodic sync, a retry). The
  first one is ``Syncer.start``: adopt the kernel's owned state, plan the whole cluster; the others are
  incremental. Nothing is requested before the tracker has both initial lists: until then ``changed()`` (the
  intake's nudge) only wakes the loop, so nothing is applied before the cluster is fully known.
- audit, every ``audit_period`` once the initial sync is done;
- drain check, every ``drain_check_period`` while anything drains.

A due sync always goes first. An audit and a round of drain checks run in slices (``Syncer.audit_slice``,
``drain_slice``), one slice a pass, the next one due after any due sync: at 10,000 services a whole audit
reads the kernel for seconds. A slice does not start when it would still be running as the next sync falls
due (core/slice_fit.py judges that from the recent slices of the same step), except right after a sync, so
a due sync waits for no slice in the common case and for at most one otherwise. Audit slices are also
spaced out, so that a round takes at most ``AUDIT_SHARE`` of the loop's time (a drain check's next slice is
due at once: drains must keep up with the endpoints removed).

A failed sync is retried after the ``RetryPolicy``'s backoff (aproxy/core/backoff.py: 1 s, 2 s, 4 s, ... at
most 30 s by default), fed to the scheduler as its retry interval; the backoff starts over after a success.
A pass that could not reach the kernel at all (``BackendError``, ``OSError``) makes the next sync a full one
(``start`` again), because the changes it had taken from the tracker were lost with it. An audit or a drain
check that leaves services to retry asks for a sync, which retries them with that backoff.

The loop reports into what it is given (``LoopStats``, the duration observers) and knows nothing of
Prometheus, the sources or the web server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

from aproxy.backends.base import BackendError
from aproxy.core.backoff import Backoff, RetryPolicy
from aproxy.core.changes import ChangeTracker
from aproxy.core.debounce import SyncScheduler
from aproxy.core.latency import ProgrammingLatency
from aproxy.core.model import ServiceKey
from aproxy.core.slice_fit import SliceDurations, may_start
from aproxy.startup_gc import StartupCollection
from aproxy.syncer import Syncer, SyncReport

log = logging.getLogger(__name__)

PassKind = Literal["sync", "audit", "drain"]

# The share of the kernel loop's time an audit round may take: its slices are spaced out accordingly. The
# audit guards against drift nobody should cause; changes and drains must not wait behind it.
AUDIT_SHARE: Final = 0.25

# A pass that could not be attempted at all: nothing per operation to report, retry the whole thing.
_WHOLESALE_FAILURES: Final = (BackendError, OSError)


@dataclass(slots=True)
class LoopStats:
    """What the kernel loop records beyond the syncer's counters (the loop writes, metrics read)."""

    last_sync_wall: float | None = None
    last_queued_wall: float | None = None
    failures: Counter[str] = field(default_factory=Counter)
    retry_delay: float = 0.0


@dataclass(frozen=True, slots=True)
class LoopSettings:
    """The loop's periods (seconds) and the backoff of a failed sync."""

    audit_period: float
    drain_check_period: float
    retry: RetryPolicy


class DurationObserver(Protocol):
    """Where a pass's duration goes (a Prometheus histogram, in the daemon)."""

    def observe(self, amount: float) -> None: ...


class KernelLoop:
    """``run(syncer)`` once; ``changed`` is the intake's nudge; the attributes are for health and metrics."""

    def __init__(
        self,
        tracker: ChangeTracker,
        scheduler: SyncScheduler,
        settings: LoopSettings,
        *,
        stats: LoopStats,
        sync_duration: DurationObserver,
        audit_duration: DurationObserver,
        collection: StartupCollection,
        latency: ProgrammingLatency | None = None,
        programming_duration: DurationObserver | None = None,
    ) -> None:
        self._tracker = tracker
        self._scheduler = scheduler
        self._settings = settings
        self.stats = stats
        self.backoff = Backoff(settings.retry)
        self.syncer: Syncer | None = None
        self.initial_sync_done = False
        self._sync_duration = sync_duration
        # Network programming latency: the changes a sync pass takes, observed when it has programmed them.
        self._latency = latency if latency is not None else ProgrammingLatency(time.time())
        self._programming_duration = programming_duration
        self._audit_duration = audit_duration
        self._collection = collection
        self._wake = asyncio.Event()
        self._pass_done = asyncio.Event()
        self._needs_full = True  # the next sync is Syncer.start: the first one, or after a wholesale failure
        self._next_audit: float | None = None
        self._next_drain: float | None = None
        self._audit_spent = 0.0  # the audit round so far: its slices' durations
        self._slices = SliceDurations()
        # When the last pass, a sync, ended (None: the last pass was not a sync): a slice that starts right
        # then may start whatever it is expected to take.
        self._sync_ended: float | None = None

    async def run(self, syncer: Syncer) -> None:
        """Run the passes, forever (until cancelled)."""
        self.syncer = syncer
        passes: dict[PassKind, Callable[[Syncer, float], Awaitable[None]]] = {
            "sync": self._sync_pass,
            "audit": self._audit_pass,
            "drain": self._drain_pass,
        }
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            kind = self._due(now)
            if kind is not None:
                step = self._step(kind)  # taken before the pass: the pass moves the round on
                began = time.perf_counter()
                await passes[kind](syncer, now)
                seconds = time.perf_counter() - began
                # Every pass, timed: what a due change may have waited for (bench/e2e.py reads these).
                log.debug("pass", extra={"kind": kind, "step": step, "seconds": round(seconds, 4)})
                if kind != "sync":
                    self._slices.record(step, seconds)
                self._sync_ended = loop.time() if kind == "sync" else None
                self._after_pass(syncer, loop.time())
                continue
            # No await between clear() and wait(): a change cannot slip in unnoticed.
            self._wake.clear()
            try:
                async with asyncio.timeout_at(self._next_deadline(now)):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def changed(self) -> None:
        """The tracker changed (or a list completed): wake the loop; ask for a sync once both are listed."""
        # Before both lists are complete nothing is requested: no sync may run, and /healthz must not count
        # the time spent listing as a change waiting for a sync.
        if self._tracker.initialized:
            self._request()
        self._wake.set()

    async def next_pass(self) -> None:
        """Return after the next pass (sync, audit or drain check) has finished."""
        await self._pass_done.wait()

    def _due(self, now: float) -> PassKind | None:
        # Syncs first: an audit or a drain check never makes a due sync wait for more than one pass.
        if self._tracker.initialized and self._scheduler.due(now):
            return "sync"
        if self._needs_full:
            return None  # the full pass that is due anyway does what an audit or a drain check would
        sync_at = self._sync_at(now)
        for kind, at in self._slices_due():
            if now >= at and self._fits(kind, now, sync_at):
                return kind
        return None

    def _next_deadline(self, now: float) -> float | None:
        sync_at = self._sync_at(now)
        # A slice that would not fit before the next sync waits for it: the sync's time is the deadline.
        # Judged at the slice's time, or now if that has passed (judged at a past time, a slice that does
        # not fit now would look due, and the loop would spin until the sync).
        starts = [] if self._needs_full else [(kind, max(at, now)) for kind, at in self._slices_due()]
        others = [at for kind, at in starts if self._fits(kind, at, sync_at)]
        times = [t for t in (sync_at, *others) if t is not None]
        return min(times) if times else None

    def _sync_at(self, now: float) -> float | None:
        return self._scheduler.next_wakeup(now) if self._tracker.initialized else None

    def _slices_due(self) -> list[tuple[PassKind, float]]:
        """The audit's and the drain check's next slices, with when each is due (audit first)."""
        due: list[tuple[PassKind, float]] = []
        if self._next_audit is not None:
            due.append(("audit", self._next_audit))
        if self._next_drain is not None:
            due.append(("drain", self._next_drain))
        return due

    def _fits(self, kind: PassKind, at: float, sync_at: float | None) -> bool:
        # A step never seen yet is expected to take a whole period: after a sync, or with none due soon.
        expected = self._slices.expected(self._step(kind), unseen=self._scheduler.min_interval)
        return may_start(at, expected, sync_at, sync_ended=self._sync_ended)

    def _step(self, kind: PassKind) -> str:
        if kind == "audit" and self.syncer is not None:
            return f"audit: {self.syncer.audit_step}"
        return kind

    async def _sync_pass(self, syncer: Syncer, now: float) -> None:
        full = self._needs_full
        kind = "start" if full else "sync"
        self._scheduler.started(now)
        began = time.perf_counter()
        taken = self._latency.take()  # the pass takes every dirty service, so every pending change
        report: SyncReport | None = None
        try:
            report = await (syncer.start() if full else syncer.sync())
        except _WHOLESALE_FAILURES as exc:
            self._needs_full = True
            log.error(
                "sync could not reach the kernel; the next sync is a full one", extra={"error": str(exc)}
            )
        else:
            self._needs_full = False
        self._sync_duration.observe(time.perf_counter() - began)
        self._observe_programming(taken, report)
        ok = report is not None and report.ok
        if ok:
            self.backoff.succeeded()
            self.stats.retry_delay = 0.0
            self.stats.last_sync_wall = time.time()
        else:
            self.stats.failures[kind] += 1
            self.stats.retry_delay = self.backoff.failed()
            self._scheduler.retry_interval = self.stats.retry_delay
        self._scheduler.finished(asyncio.get_running_loop().time(), ok)
        if report is not None:
            _log_report(report, self.stats.retry_delay)
            if full and not self.initial_sync_done:
                self._initial_sync_finished(report)

    def _observe_programming(self, taken: dict[ServiceKey, list[float]], report: SyncReport | None) -> None:
        if report is None:
            self._latency.abandon(taken)  # nothing reached the kernel: the next (full) sync programs them
            return
        durations = self._latency.settle(taken, report.failed_services, time.time())
        if self._programming_duration is not None:
            for duration in durations:
                self._programming_duration.observe(duration)

    def _initial_sync_finished(self, report: SyncReport) -> None:
        self.initial_sync_done = True
        self._next_audit = asyncio.get_running_loop().time() + self._settings.audit_period
        self._collection.settle()  # the tracker's objects now live as long as the process
        log.info(
            "initial sync done",
            extra={
                "services": report.services,
                "operations": len(report.results),
                "failed": len(report.failures),
            },
        )

    async def _audit_pass(self, syncer: Syncer, now: float) -> None:
        loop = asyncio.get_running_loop()
        began = time.perf_counter()
        report: SyncReport | None = None
        try:
            report = await syncer.audit_slice()
        except _WHOLESALE_FAILURES as exc:
            log.error("audit could not read the kernel", extra={"error": str(exc)})
            syncer.abandon_audit()
        spent = time.perf_counter() - began
        self._audit_spent += spent
        if syncer.auditing:
            # The next slice after a rest (and after any sync that is due): an audit round takes at most
            # AUDIT_SHARE of the loop's time, however long its reads are (at 10,000 services in the guest
            # they add up to 100-200 s: the round then takes 7-13 minutes).
            self._next_audit = loop.time() + spent * (1 - AUDIT_SHARE) / AUDIT_SHARE
        else:
            self._audit_duration.observe(self._audit_spent)  # the round's time in the kernel loop
            self._audit_spent = 0.0
            self._next_audit = loop.time() + self._settings.audit_period
        self._after_repair("audit", syncer, report)

    async def _drain_pass(self, syncer: Syncer, now: float) -> None:
        report: SyncReport | None = None
        try:
            report = await syncer.drain_slice()
        except _WHOLESALE_FAILURES as exc:
            log.error("drain check could not reach the kernel", extra={"error": str(exc)})
            syncer.abandon_drain()
        # The round's next slice at once (after any sync that is due); else re-armed by _after_pass while
        # anything still drains.
        self._next_drain = asyncio.get_running_loop().time() if syncer.draining_round else None
        self._after_repair("drain", syncer, report)

    def _after_repair(self, kind: str, syncer: Syncer, report: SyncReport | None) -> None:
        if report is not None:
            # An audit's repairs and a drain check's deletions are kernel changes like a sync's: logged alike.
            _log_report(report, self.stats.retry_delay)
            if report.ok:
                return
        self.stats.failures[kind] += 1
        if syncer.pending_retries:
            self._request()  # the services it failed for are retried by the sync loop, with its backoff

    def _after_pass(self, syncer: Syncer, now: float) -> None:
        if self._next_drain is None and syncer.started and next(syncer.planner.draining(), None) is not None:
            self._next_drain = now + self._settings.drain_check_period
        done, self._pass_done = self._pass_done, asyncio.Event()
        done.set()

    def _request(self) -> None:
        self._scheduler.request(asyncio.get_running_loop().time())
        self.stats.last_queued_wall = time.time()
        self._wake.set()


def _log_report(report: SyncReport, retry_delay: float) -> None:
    fields = {
        "kind": report.kind,
        "services": report.services,
        "operations": len(report.results),
        "failed": len(report.failures),
    }
    if not report.ok:
        failed = sorted(f"{key.namespace}/{key.name}" for key in report.failed_services)
        log.warning(
            "sync failed; retrying",
            extra={**fields, "failed_services": ",".join(failed[:10]), "retry_in": round(retry_delay, 3)},
        )
    elif report.results:
        log.info("synced", extra=fields)
    else:
        log.debug("synced", extra=fields)
