"""Network programming latency, the pure part: trigger times in, latencies out of the passes that programmed
them, failures carried over."""

from __future__ import annotations

from typing import Any

import pytest

from aproxy.core.latency import (
    MAX_PENDING_PER_SERVICE,
    TRIGGER_ANNOTATION,
    ProgrammingLatency,
    service_key,
    slice_service,
    trigger_time,
)
from aproxy.core.model import ServiceKey

WEB = ServiceKey("shop", "web")
API = ServiceKey("shop", "api")


def raw_slice(annotation: object = None, **metadata: Any) -> dict[str, Any]:
    labels = {"kubernetes.io/service-name": "web"}
    meta: dict[str, Any] = {"name": "web-abc", "namespace": "shop", "labels": labels}
    if annotation is not None:
        meta["annotations"] = {TRIGGER_ANNOTATION: annotation}
    return {"metadata": {**meta, **metadata}}


@pytest.mark.parametrize(
    ("annotation", "expected"),
    [
        ("2024-01-02T03:04:05Z", 1704164645.0),
        ("2024-01-02T03:04:05.123456789Z", 1704164645.123456),  # RFC 3339 nanoseconds, cut to microseconds
        ("2024-01-02T05:04:05+02:00", 1704164645.0),
        ("2024-01-02T03:04:05", None),  # no zone: not RFC 3339, and not guessed
        ("yesterday", None),
        (17, None),
        (None, None),
    ],
)
def test_trigger_time(annotation: object, expected: float | None) -> None:
    assert trigger_time(raw_slice(annotation)) == expected


def test_service_key() -> None:
    assert service_key({"metadata": {"namespace": "shop", "name": "web"}}) == WEB
    assert service_key({"metadata": {"namespace": "shop"}}) is None
    assert service_key({"metadata": ["not", "a", "mapping"]}) is None
    assert service_key({}) is None


def test_slice_service() -> None:
    assert slice_service(raw_slice()) == WEB
    assert slice_service(raw_slice(labels={})) is None
    assert slice_service(raw_slice(namespace="")) is None
    assert slice_service({"metadata": "nonsense"}) is None


def test_a_pass_observes_what_it_took_and_later_changes_wait_for_the_next() -> None:
    latency = ProgrammingLatency(started=100.0)
    latency.record(WEB, 101.0)
    latency.record(API, 102.0)
    taken = latency.take()
    latency.record(WEB, 103.5)  # arrives while the pass runs
    assert sorted(latency.settle(taken, failed=(), now=104.0)) == [2.0, 3.0]
    assert latency.pending == 1
    assert latency.settle(latency.take(), failed=(), now=105.0) == [1.5]
    assert latency.pending == 0


def test_a_failed_service_keeps_its_changes_for_the_retry() -> None:
    latency = ProgrammingLatency(started=0.0)
    latency.record(WEB, 1.0)
    latency.record(API, 2.0)
    assert latency.settle(latency.take(), failed={WEB}, now=3.0) == [1.0]
    assert latency.settle(latency.take(), failed=(), now=10.0) == [9.0]  # counted from the first trigger


def test_a_pass_that_reached_nothing_keeps_everything() -> None:
    latency = ProgrammingLatency(started=0.0)
    latency.record(WEB, 1.0)
    latency.abandon(latency.take())
    assert latency.settle(latency.take(), failed=(), now=4.0) == [3.0]


def test_triggers_before_the_process_started_are_not_counted() -> None:
    latency = ProgrammingLatency(started=100.0)
    latency.record(WEB, 99.0)  # an object of the initial list, changed long ago
    assert latency.pending == 0


def test_the_same_trigger_counts_once_and_a_failing_service_holds_a_bounded_number() -> None:
    latency = ProgrammingLatency(started=0.0)
    latency.record(WEB, 1.0)
    latency.record(WEB, 1.0)  # the same slice version seen twice (a relist)
    assert latency.pending == 1
    for k in range(2 * MAX_PENDING_PER_SERVICE):
        latency.record(API, 2.0 + k)
    assert latency.pending == 1 + MAX_PENDING_PER_SERVICE


def test_clock_skew_never_gives_a_negative_latency() -> None:
    latency = ProgrammingLatency(started=0.0)
    latency.record(WEB, 10.0)  # the controller's clock is ahead of this node's
    assert latency.settle(latency.take(), failed=(), now=9.0) == [0.0]
