"""When a draining TCP real server may finally be deleted: the graceful-termination decision, without I/O.

A removed TCP real server is set to weight 0 (no new connections) and kept until its connections are gone or a
grace period has passed, whichever comes first (kube-router bounds the wait, kube-proxy does not; an unbounded
wait lets one stuck long-lived connection pin a dead endpoint forever).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from aproxy.core.model import RealServerKey, VirtualServerKey

DEFAULT_GRACE_PERIOD = 15 * 60.0

DrainKey = tuple[VirtualServerKey, RealServerKey]


@dataclass(slots=True)
class DrainClock:
    """Remembers since when each real server has been draining; decides whether its drain is over."""

    grace_period: float = DEFAULT_GRACE_PERIOD
    _since: dict[DrainKey, float] = field(default_factory=dict)

    def observe(self, draining: Iterable[DrainKey], now: float) -> None:
        """The real servers draining now; the ones no longer draining (restored, deleted) are forgotten."""
        current = set(draining)
        for key in self._since.keys() - current:
            del self._since[key]
        for key in current:
            self._since.setdefault(key, now)

    def done(self, key: DrainKey, active: int, inactive: int, now: float) -> bool:
        """Delete now: no connection is left, or the grace period is over."""
        if active == 0 and inactive == 0:
            return True
        since = self._since.get(key)
        return since is not None and now - since >= self.grace_period

    def since(self, key: DrainKey) -> float | None:
        return self._since.get(key)
