"""The garbage collector around aproxy's initial state: rarer collections while it is built, a freeze after.

Until the initial sync is done, the collector's young generation is collected every ``STARTUP_GC_THRESHOLD``
allocations instead of every 700 (the default): the initial list builds about a million long-lived objects at
10k services, and the default thresholds walk them again and again as they pile up (about 30% of the time to
the first desired state, bench/watch.py (c)). Collections still run, so a long API outage at start-up piles up
no garbage. Once the initial state is built it lives as long as the process, so it is frozen out of the
collector's sight: otherwise every full collection walks it all (pauses of several ms at 10k services).
"""

from __future__ import annotations

import gc
from typing import Final

STARTUP_GC_THRESHOLD: Final = 100_000


class StartupCollection:
    """``begin`` at start; ``settle`` once the initial state is built (``end``: restore, without a freeze)."""

    def __init__(self) -> None:
        self._saved: tuple[int, int, int] | None = None

    def begin(self) -> None:
        if self._saved is None:
            self._saved = gc.get_threshold()
            gc.set_threshold(STARTUP_GC_THRESHOLD, *self._saved[1:])

    def settle(self) -> None:
        """The initial state is built: collect once, freeze what survives, restore the thresholds."""
        gc.collect()
        gc.freeze()
        self.end()

    def end(self) -> None:
        if self._saved is not None:
            gc.set_threshold(*self._saved)
            self._saved = None
