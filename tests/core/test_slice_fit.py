"""When an audit or drain slice may start: only if it ends before the next due sync, or right after a sync."""

from __future__ import annotations

import pytest

from aproxy.core.slice_fit import SliceDurations, may_start


def test_a_step_never_seen_is_expected_to_take_what_the_caller_says() -> None:
    assert SliceDurations().expected("drain", unseen=1.0) == 1.0


def test_the_expected_duration_is_the_longest_of_the_recent_slices_of_that_step() -> None:
    durations = SliceDurations(recent=3)
    for seconds in (0.9, 0.1, 0.2):
        durations.record("audit:real servers", seconds)
    durations.record("drain", 0.05)
    assert durations.expected("audit:real servers", unseen=1.0) == 0.9
    assert durations.expected("drain", unseen=1.0) == 0.05
    durations.record("audit:real servers", 0.3)  # the 0.9 s slice is no longer among the last three
    assert durations.expected("audit:real servers", unseen=1.0) == 0.3


def test_a_negative_duration_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        SliceDurations().record("drain", -0.1)


@pytest.mark.parametrize(
    ("at", "expected", "sync_due", "sync_ended", "allowed"),
    [
        (10.0, 0.2, None, None, True),  # no sync due until a change comes
        (10.0, 0.2, 10.3, None, True),  # ends before the sync is due
        (10.0, 0.2, 10.2, None, True),  # ends just as it is due
        (10.0, 0.2, 10.1, None, False),  # would hold the sync up
        (10.0, 0.0, 10.0, None, True),  # nothing to wait for
        (10.0, 2.0, 11.0, 9.995, True),  # right after a sync: progress, however long
        # Late in the gap after a sync (the loop idle since): it must fit like any other.
        (10.9, 0.5, 11.0, 10.0, False),
    ],
)
def test_a_slice_starts_only_if_it_ends_before_the_next_due_sync(
    at: float, expected: float, sync_due: float | None, sync_ended: float | None, allowed: bool
) -> None:
    assert may_start(at, expected, sync_due, sync_ended=sync_ended) is allowed
