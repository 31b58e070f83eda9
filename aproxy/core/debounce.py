"""When to sync: a bounded-frequency scheduler in the style of kube-proxy's ``BoundedFrequencyRunner``.

The scheduler only decides *when*; it never runs, sleeps or reads a clock. Every method takes ``now``:
monotonic seconds from whatever clock the caller uses (``loop.time()`` in the daemon, plain numbers in tests),
so the whole policy is testable with a fake clock and no sleeps.

Rules (all times are starts of syncs unless said otherwise):

- ``request(now)`` says "something changed". With no sync before, the next sync is due at once; otherwise at
  ``last_start + min_interval``. Any number of requests before that start coalesce into that one sync.
- A request made while a sync runs is not covered by it (the sync took its inputs at its start): it makes
  exactly one more sync due, at ``max(finish, last_start + min_interval)``.
- A failed sync (``finished(now, ok=False)``) makes a retry due at ``finish + retry_interval``; a request that
  comes sooner wins, still respecting ``min_interval``. The requests the failed sync covered stay pending
  until a sync succeeds.
- ``max_interval`` (``None`` or 0 disables it): a sync is due ``max_interval`` after the previous sync
  *finished*, with or without requests (the periodic audit). Counting from the finish, not the start, keeps a
  sync that runs longer than ``max_interval`` from being followed by another at once. There is no periodic
  sync before the first one: the daemon requests the first sync once its sources are initialized, and a sync
  before that must not run.
- Two syncs never start closer than ``min_interval``; syncs never overlap. (Burst is 1, kube-proxy's default.)

Driving it from asyncio takes about fifteen lines (the daemon owns this loop; ``wake`` is an ``asyncio.Event``
that the intake sets after each ``scheduler.request(loop.time())``)::

    async def sync_loop(scheduler: SyncScheduler, wake: asyncio.Event, sync: Callable[[], Awaitable[bool]]):
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            if scheduler.due(now):
                scheduler.started(now)
                ok = await sync()  # returns False on failure (exceptions handled inside, logged)
                scheduler.finished(loop.time(), ok)
                continue
            # No await between clear() and wait(): a request cannot slip in unnoticed.
            wake.clear()
            try:
                async with asyncio.timeout_at(scheduler.next_wakeup(now)):
                    await wake.wait()
            except TimeoutError:
                pass

``pending_since`` and ``last_success`` feed ``/healthz`` (unhealthy when a request has waited longer than
``2 x max_interval`` without a successful sync) and the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class SchedulerUsageError(RuntimeError):
    """The driver called the scheduler out of order (``started`` twice, ``finished`` without ``started``)."""


def _earliest(*times: float | None) -> float | None:
    present = [t for t in times if t is not None]
    return min(present) if present else None


@dataclass(slots=True)
class SyncScheduler:
    """Decides when the next sync starts. See the module docstring for the rules and the driver loop."""

    min_interval: float
    max_interval: float | None = None
    retry_interval: float = 1.0

    _running: bool = field(default=False, init=False)
    _last_start: float | None = field(default=None, init=False)
    _last_finish: float | None = field(default=None, init=False)
    _last_success: float | None = field(default=None, init=False)
    # Oldest request not covered by any started sync (None: no such request).
    _queued_since: float | None = field(default=None, init=False)
    # Oldest request covered by the running sync, or by failed syncs since the last success.
    _unconfirmed_since: float | None = field(default=None, init=False)
    _retry_at: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.min_interval < 0:
            raise ValueError(f"min_interval must be >= 0, got {self.min_interval}")
        if self.retry_interval < 0:
            raise ValueError(f"retry_interval must be >= 0, got {self.retry_interval}")
        if self.max_interval == 0:
            self.max_interval = None
        if self.max_interval is not None and self.max_interval < self.min_interval:
            raise ValueError(
                f"max_interval ({self.max_interval}) must be >= min_interval ({self.min_interval}), or 0/None"
            )

    # -- events from the driver ---------------------------------------------------------------------------

    def request(self, now: float) -> None:
        """Something changed: a sync must start at or after ``now``."""
        if self._queued_since is None:
            self._queued_since = now

    def started(self, now: float) -> None:
        """A sync starts now; it covers every request made before this call."""
        if self._running:
            raise SchedulerUsageError("started() called while a sync is running")
        self._running = True
        self._last_start = now
        self._retry_at = None
        self._unconfirmed_since = _earliest(self._unconfirmed_since, self._queued_since)
        self._queued_since = None

    def finished(self, now: float, ok: bool) -> None:
        """The sync started last ended now, successfully or not."""
        if not self._running:
            raise SchedulerUsageError("finished() called without a running sync")
        self._running = False
        self._last_finish = now
        if ok:
            self._last_success = now
            self._unconfirmed_since = None
            self._retry_at = None
        else:
            self._retry_at = now + self.retry_interval

    # -- questions from the driver ------------------------------------------------------------------------

    def next_wakeup(self, now: float) -> float | None:
        """Absolute time the next sync is due (``now`` if overdue); ``None``: nothing due until a request.

        While a sync runs this is ``None`` too: the driver is the one running it and asks again afterwards.
        """
        due_at = self._next_due()
        return None if due_at is None else max(due_at, now)

    def due(self, now: float) -> bool:
        """Whether a sync should start now."""
        due_at = self._next_due()
        return due_at is not None and now >= due_at

    # -- introspection for /healthz and metrics -----------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._running

    @property
    def pending_since(self) -> float | None:
        """When the oldest request not yet confirmed by a successful sync was made (``None``: all synced)."""
        return _earliest(self._unconfirmed_since, self._queued_since)

    @property
    def last_success(self) -> float | None:
        """When the last successful sync finished."""
        return self._last_success

    @property
    def last_start(self) -> float | None:
        return self._last_start

    # -- internals ----------------------------------------------------------------------------------------

    def _next_due(self) -> float | None:
        if self._running:
            return None
        if self._last_start is None:
            # Never synced: only a request triggers the first sync, and then at once.
            return self._queued_since
        periodic = None
        if self.max_interval is not None and self._last_finish is not None:
            periodic = self._last_finish + self.max_interval
        # A request is due when made; the min_interval clamp below does the waiting.
        wanted = _earliest(self._queued_since, self._retry_at, periodic)
        if wanted is None:
            return None
        return max(wanted, self._last_start + self.min_interval)
