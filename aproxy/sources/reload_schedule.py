"""When the file source re-reads its manifests: after a quiet settle period, retried with backoff.

A pure state machine on a caller's clock (seconds, any monotonic base), so that a test can drive it with a
fake clock and the file source only has to sleep for ``due_in``:

- ``changed(now)``: a file event. The read waits until no event has arrived for ``settle_period`` seconds,
  so a file written in place (truncated, then written slowly) is read once it is whole, not half-way.
- ``started()`` / ``applied()``: a read began / its content was fed to the sink. An event that arrived
  while the read ran keeps the change pending: the read may have seen the file before that write.
- ``failed(now, transient=True)``: the read could not open a file (too many open files, a file replaced
  while listed): retried after the ``RetryPolicy``'s backoff even if no event comes. ``transient=False``
  (the content does not parse): the next event is waited for, since reading it again would fail again.
- ``pending_since``: the oldest change not yet applied; None when the sink has the files' current content.
  The daemon's ``/healthz`` fails when it is older than twice the sync period.
"""

from __future__ import annotations

from aproxy.core.backoff import Backoff, RetryPolicy

DEFAULT_SETTLE_PERIOD = 1.0


class ReloadSchedule:
    """See the module docstring. ``due_in(now)``: seconds until the next read (0: now; None: no read is
    needed until the next event)."""

    __slots__ = (
        "_backoff",
        "_change_during_read",
        "_last_change",
        "_reading",
        "_retry_at",
        "pending_since",
        "settle_period",
    )

    def __init__(
        self, settle_period: float = DEFAULT_SETTLE_PERIOD, retry: RetryPolicy | None = None
    ) -> None:
        self.settle_period = settle_period
        self._backoff = Backoff(retry or RetryPolicy())
        self.pending_since: float | None = None
        self._last_change: float | None = None  # None: nothing to read until the next event
        self._retry_at: float | None = None
        self._reading = False
        self._change_during_read: float | None = None

    @property
    def failures(self) -> int:
        """Consecutive failed reads."""
        return self._backoff.failures

    def start(self, now: float) -> None:
        """The source starts: read at once (nothing to settle: no event has been seen yet)."""
        self.pending_since = now
        self._last_change = now - self.settle_period

    def changed(self, now: float) -> None:
        if self.pending_since is None:
            self.pending_since = now
        if self._reading and self._change_during_read is None:
            self._change_during_read = now
        self._last_change = now

    def due_in(self, now: float) -> float | None:
        if self._last_change is None:
            return None
        at = self._last_change + self.settle_period
        if self._retry_at is not None:
            at = max(at, self._retry_at)
        return max(0.0, at - now)

    def started(self) -> None:
        """A read begins: it answers every event so far (those after it keep their change pending)."""
        self._reading = True
        self._change_during_read = None
        self._last_change = None

    def applied(self) -> None:
        """The read succeeded and was fed."""
        self._backoff.succeeded()
        self._retry_at = None
        self._finish(still_pending=self._change_during_read)

    def failed(self, now: float, *, transient: bool) -> float | None:
        """The read failed; the retry delay when ``transient`` (else None: wait for the next event)."""
        delay = self._retry_at = None
        if transient:
            delay = self._backoff.failed()
            self._retry_at = now + delay
            if self._last_change is None:
                self._last_change = now - self.settle_period
        self._finish(still_pending=self.pending_since)
        return delay

    def _finish(self, still_pending: float | None) -> None:
        self._reading = False
        self.pending_since = still_pending
        self._change_during_read = None
