"""Whether a slice of an audit or a drain check may start now: not when a due sync would wait behind it.

The kernel loop runs one pass at a time. A sync that falls due while a slice runs waits for the slice's
end, and every change it carries is late by that much. With ``--min-sync-period`` 1 s and slices of
0.04-0.9 s (10,000 services in the user-mode Linux guest) that wait was most of the latency above the period.
So a slice starts only if it is expected to end before the next sync is due. What a slice takes is judged
from the last few slices of the same step (``SliceDurations``: the longest of them, because a late sync
costs every change it carries, and an early rest costs only a later slice).

Right after a sync a slice may always start: that is the longest quiet stretch the loop gets, and a step
that takes longer than the whole period must still make progress (one slice per sync at least). A step
never seen before is expected to take a whole sync period (the caller's ``unseen``): it starts right after a
sync, or when no sync is due within a period (an audit round's first outline at 10,000 services took 1.3 s,
started half-way between two syncs).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Final

# How many recent slices of a step the estimate looks at: enough to cover the spread within a step
# (the drain slices' reads vary with the connections they count), few enough to follow a change of load.
RECENT: Final = 8
# How soon after a sync's end a slice counts as starting right after it (the loop asks at once; a slice due
# later in the gap must fit before the next sync like any other, or it could start just before one).
RIGHT_AFTER: Final = 0.01


@dataclass(slots=True)
class SliceDurations:
    """The recent durations (seconds) of each step; ``expected(step)`` is the longest of them."""

    recent: int = RECENT
    _seen: dict[str, deque[float]] = field(default_factory=dict)

    def record(self, step: str, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a duration cannot be negative, got {seconds}")
        durations = self._seen.get(step)
        if durations is None:
            durations = self._seen[step] = deque(maxlen=self.recent)
        durations.append(seconds)

    def expected(self, step: str, unseen: float) -> float:
        """How long the next slice of ``step`` is expected to take (``unseen`` for a step never seen)."""
        durations = self._seen.get(step)
        return max(durations) if durations else unseen


def may_start(at: float, expected: float, sync_due: float | None, *, sync_ended: float | None) -> bool:
    """Whether a slice expected to take ``expected`` s may start at ``at``, the next sync being due at
    ``sync_due`` (``None``: none is due until a change comes); ``sync_ended``: when the loop's last pass, a
    sync, ended (``None``: the last pass was not a sync)."""
    right_after = sync_ended is not None and at - sync_ended <= RIGHT_AFTER
    return right_after or sync_due is None or at + expected <= sync_due
