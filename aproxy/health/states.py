"""The rise/fall state machine of backend health checks: pure, stdlib (and aproxy.core) only.

Per check target (a backend's address and checked TCP port), a state and a streak of equal results:

    state       result    counts toward        becomes      when the streak reaches
    ---------   -------   ------------------   ----------   -----------------------
    unknown     success   -                    healthy      1 (readiness vouched; one answer confirms)
    unknown     failure   failures             unhealthy    fall
    healthy     success   -                    healthy      (stays; a failure streak is broken)
    healthy     failure   failures             unhealthy    fall
    unhealthy   success   successes            healthy      rise
    unhealthy   failure   -                    unhealthy    (stays; a success streak is broken)

A new target starts ``unknown`` and carries traffic (its endpoint is ready: readiness vouched for it); only
observed failures drain it. A result unlike the previous one starts a new streak of 1, so a flapping backend
(success, failure, success, ...) never changes state when ``fall`` and ``rise`` are above 1. Only
``unhealthy`` means weight 0.

Time comes from the caller (an injected clock): each transition records when it happened, so the prober, the
logs and the tests can say how long a backend has been in its state.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from aproxy.core.verdicts import CheckTarget


class Health(enum.StrEnum):
    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class Result(enum.StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"


class Threshold(enum.Enum):
    ONE = "one"
    FALL = "fall"
    RISE = "rise"


# The table above, as data: (state, result) -> (next state, streak length needed); None: no transition.
TRANSITIONS: Final[dict[tuple[Health, Result], tuple[Health, Threshold] | None]] = {
    (Health.UNKNOWN, Result.SUCCESS): (Health.HEALTHY, Threshold.ONE),
    (Health.UNKNOWN, Result.FAILURE): (Health.UNHEALTHY, Threshold.FALL),
    (Health.HEALTHY, Result.SUCCESS): None,
    (Health.HEALTHY, Result.FAILURE): (Health.UNHEALTHY, Threshold.FALL),
    (Health.UNHEALTHY, Result.SUCCESS): (Health.HEALTHY, Threshold.RISE),
    (Health.UNHEALTHY, Result.FAILURE): None,
}


class ThresholdError(ValueError):
    """``fall`` or ``rise`` below 1."""


@dataclass(frozen=True, slots=True)
class Transition:
    """A target changed state at ``at`` (the caller's clock), because of ``reason`` (the last result's)."""

    target: CheckTarget
    before: Health
    after: Health
    at: float
    reason: str


@dataclass(slots=True)
class _Track:
    state: Health
    since: float
    last: Result | None = None
    streak: int = 0


class HealthBook:
    """The state of every target checked: ``record`` results, get transitions."""

    __slots__ = ("_limits", "_tracks")

    def __init__(self, *, fall: int, rise: int) -> None:
        if fall < 1 or rise < 1:
            raise ThresholdError(f"fall ({fall}) and rise ({rise}) must be >= 1")
        self._limits = {Threshold.ONE: 1, Threshold.FALL: fall, Threshold.RISE: rise}
        self._tracks: dict[CheckTarget, _Track] = {}

    def record(self, target: CheckTarget, result: Result, now: float, reason: str = "") -> Transition | None:
        """One check's result; the transition it causes, if any. An unseen target starts unknown."""
        track = self._tracks.get(target)
        if track is None:
            track = self._tracks[target] = _Track(Health.UNKNOWN, now)
        if track.last is result:
            track.streak += 1
        else:
            track.last, track.streak = result, 1
        rule = TRANSITIONS[(track.state, result)]
        if rule is None or track.streak < self._limits[rule[1]]:
            return None
        before = track.state
        track.state, track.since, track.streak = rule[0], now, 0
        # The streak starts over in the new state: its own thresholds count from here.
        track.last = None
        return Transition(target, before, rule[0], now, reason or result.value)

    def state(self, target: CheckTarget) -> Health:
        track = self._tracks.get(target)
        return track.state if track is not None else Health.UNKNOWN

    def since(self, target: CheckTarget) -> float | None:
        track = self._tracks.get(target)
        return track.since if track is not None else None

    def forget(self, target: CheckTarget) -> None:
        """The target is no longer checked: if it comes back, it starts unknown."""
        self._tracks.pop(target, None)

    def counts(self) -> dict[Health, int]:
        counts = dict.fromkeys(Health, 0)
        for track in self._tracks.values():
            counts[track.state] += 1
        return counts

    def __len__(self) -> int:
        return len(self._tracks)
