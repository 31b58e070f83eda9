"""The rise/fall state machine against its transition table, on a fake clock."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from aproxy.core.model import RealServerKey
from aproxy.health.states import (
    TRANSITIONS,
    Health,
    HealthBook,
    Result,
    Threshold,
    ThresholdError,
    Transition,
)

T = RealServerKey(ip_address("10.244.1.5"), 8080)
OK, FAIL = Result.SUCCESS, Result.FAILURE


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def tick(self, seconds: float = 2.0) -> float:
        self.now += seconds
        return self.now


def run(book: HealthBook, clock: Clock, results: str) -> list[Transition]:
    """Feed "s" (success) / "f" (failure) results, one per tick; the transitions they cause."""
    transitions = []
    for letter in results:
        transition = book.record(T, OK if letter == "s" else FAIL, clock.tick())
        if transition is not None:
            transitions.append(transition)
    return transitions


def test_the_table_is_the_documented_one() -> None:
    assert TRANSITIONS == {
        (Health.UNKNOWN, OK): (Health.HEALTHY, Threshold.ONE),
        (Health.UNKNOWN, FAIL): (Health.UNHEALTHY, Threshold.FALL),
        (Health.HEALTHY, OK): None,
        (Health.HEALTHY, FAIL): (Health.UNHEALTHY, Threshold.FALL),
        (Health.UNHEALTHY, OK): (Health.HEALTHY, Threshold.RISE),
        (Health.UNHEALTHY, FAIL): None,
    }
    # Every (state, result) pair has a row: no input is left undefined.
    assert set(TRANSITIONS) == {(state, result) for state in Health for result in Result}


def test_a_new_target_starts_unknown() -> None:
    book = HealthBook(fall=3, rise=2)
    assert book.state(T) is Health.UNKNOWN
    assert book.since(T) is None


def test_unknown_becomes_healthy_on_one_success() -> None:
    book, clock = HealthBook(fall=3, rise=2), Clock()
    (transition,) = run(book, clock, "s")
    assert (transition.before, transition.after, transition.at) == (Health.UNKNOWN, Health.HEALTHY, 102.0)
    assert book.state(T) is Health.HEALTHY


def test_fall_consecutive_failures_make_a_target_unhealthy() -> None:
    book, clock = HealthBook(fall=3, rise=2), Clock()
    run(book, clock, "s")
    assert run(book, clock, "ff") == []
    assert book.state(T) is Health.HEALTHY  # two failures of three: still serving
    (transition,) = [t for t in [book.record(T, FAIL, clock.tick(), "refused")] if t]
    assert (transition.before, transition.after) == (Health.HEALTHY, Health.UNHEALTHY)
    assert transition.reason == "refused"
    assert book.since(T) == clock.now


def test_unknown_falls_straight_to_unhealthy() -> None:
    book, clock = HealthBook(fall=2, rise=2), Clock()
    (transition,) = run(book, clock, "ff")
    assert (transition.before, transition.after) == (Health.UNKNOWN, Health.UNHEALTHY)


def test_rise_consecutive_successes_make_it_healthy_again() -> None:
    book, clock = HealthBook(fall=3, rise=2), Clock()
    run(book, clock, "fff")
    assert book.state(T) is Health.UNHEALTHY
    assert run(book, clock, "s") == []
    assert book.state(T) is Health.UNHEALTHY
    (transition,) = run(book, clock, "s")
    assert (transition.before, transition.after) == (Health.UNHEALTHY, Health.HEALTHY)


def test_flapping_never_changes_state() -> None:
    book, clock = HealthBook(fall=3, rise=2), Clock()
    run(book, clock, "s")
    assert run(book, clock, "ffsffsffsffs") == []
    assert book.state(T) is Health.HEALTHY
    run(book, clock, "fff")
    assert run(book, clock, "sfsfsfsf") == []
    assert book.state(T) is Health.UNHEALTHY


def test_streaks_start_over_after_a_transition() -> None:
    # The failures that made it unhealthy do not count toward anything after: it takes `fall` new ones.
    book, clock = HealthBook(fall=2, rise=3), Clock()
    assert [t.after for t in run(book, clock, "ffsssff")] == [
        Health.UNHEALTHY,
        Health.HEALTHY,
        Health.UNHEALTHY,
    ]


def test_forget_makes_a_returning_target_unknown() -> None:
    book, clock = HealthBook(fall=1, rise=5), Clock()
    run(book, clock, "f")
    book.forget(T)
    assert book.state(T) is Health.UNKNOWN
    assert len(book) == 0
    (transition,) = run(book, clock, "s")
    assert transition.after is Health.HEALTHY


def test_counts() -> None:
    book, clock = HealthBook(fall=1, rise=1), Clock()
    run(book, clock, "f")
    other = RealServerKey(ip_address("10.244.1.6"), 8080)
    book.record(other, OK, clock.tick())
    assert book.counts() == {Health.UNKNOWN: 0, Health.HEALTHY: 1, Health.UNHEALTHY: 1}


@pytest.mark.parametrize(("fall", "rise"), [(0, 1), (1, 0), (-3, 2)])
def test_thresholds_below_one_are_refused(fall: int, rise: int) -> None:
    with pytest.raises(ThresholdError, match="must be >= 1"):
        HealthBook(fall=fall, rise=rise)
