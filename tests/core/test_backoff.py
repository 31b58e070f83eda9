from __future__ import annotations

import pytest
from tenacity import RetryCallState, Retrying, wait_exponential_jitter

from aproxy.core.backoff import Backoff, RetryPolicy


def no_jitter(low: float, high: float) -> float:
    return low


def full_jitter(low: float, high: float) -> float:
    return high


def test_delay_doubles_from_initial_until_the_cap() -> None:
    policy = RetryPolicy(initial=1.0, cap=30.0, jitter=1.0)
    assert [policy.delay(n, no_jitter) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_jitter_is_added_before_the_cap() -> None:
    policy = RetryPolicy(initial=1.0, cap=4.5, jitter=1.0)
    assert [policy.delay(n, full_jitter) for n in (1, 2, 3)] == [2.0, 3.0, 4.5]


def test_a_huge_attempt_number_is_the_cap_not_an_overflow() -> None:
    assert RetryPolicy(initial=0.5, cap=30.0).delay(10_000, no_jitter) == 30.0


@pytest.mark.parametrize("attempt", [1, 2, 3, 5, 9])
def test_same_numbers_as_tenacity_wait_exponential_jitter(attempt: int) -> None:
    # The formula was tenacity's before it moved here: the kernel loop's and the watch's delays are unchanged.
    policy = RetryPolicy(initial=0.5, cap=20.0, jitter=0.0)
    state = RetryCallState(Retrying(), None, (), {})
    state.attempt_number = attempt
    expected = wait_exponential_jitter(multiplier=0.5, max=20.0, jitter=0.0)(state)
    assert policy.delay(attempt) == expected


def test_random_jitter_stays_within_its_range() -> None:
    policy = RetryPolicy(initial=1.0, cap=100.0, jitter=0.5)
    delays = {policy.delay(2) for _ in range(200)}
    assert all(2.0 <= d <= 2.5 for d in delays)
    assert len(delays) > 1


@pytest.mark.parametrize(
    "policy",
    [RetryPolicy(initial=0), RetryPolicy(initial=2, cap=1), RetryPolicy(jitter=-1)],
    ids=["zero-initial", "cap-below-initial", "negative-jitter"],
)
def test_unusable_policies_say_so(policy: RetryPolicy) -> None:
    assert policy.problems() == ["retry backoff: need initial > 0, cap >= initial and jitter >= 0"]


def test_backoff_counts_consecutive_failures_and_starts_over_after_a_success() -> None:
    backoff = Backoff(RetryPolicy(initial=1.0, cap=30.0, jitter=0.0))
    assert [backoff.failed() for _ in range(3)] == [1.0, 2.0, 4.0]
    assert backoff.failures == 3
    backoff.succeeded()
    assert backoff.failures == 0
    assert backoff.failed() == 1.0
