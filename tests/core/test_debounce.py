"""The sync scheduler's rules, driven by a fake clock through a small discrete-event simulation."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aproxy.core.debounce import SchedulerUsageError, SyncScheduler

# One sync attempt: (duration, ok). Attempts beyond the scripted ones take DEFAULT_ATTEMPT.
Attempt = tuple[float, bool]
DEFAULT_ATTEMPT: Attempt = (0.5, True)


@dataclass
class Run:
    start: float
    finish: float
    ok: bool


@dataclass
class Simulation:
    """What a driver did: the syncs it ran and the scheduler's view checked against a reference model."""

    runs: list[Run] = field(default_factory=list)
    pending_checks: int = 0


def simulate(
    scheduler: SyncScheduler, requests: Sequence[float], attempts: Sequence[Attempt], horizon: float
) -> Simulation:
    """Drive ``scheduler`` like the daemon's loop would, with the clock jumping from event to event.

    At equal times a request is handled before a sync starts (the start then covers it). Along the way the
    scheduler's ``pending_since`` is compared with a reference: the oldest request that no successful sync
    started after it has confirmed.
    """
    sim = Simulation()
    queue = sorted(requests)
    scripted = list(attempts)
    # Reference model: [request time, covered by the running attempt?]
    unconfirmed: list[list[float | bool]] = []
    now = 0.0
    running: Run | None = None

    def check_pending() -> None:
        expected = min((float(r[0]) for r in unconfirmed), default=None)
        assert scheduler.pending_since == expected
        sim.pending_checks += 1

    while True:
        next_request = queue[0] if queue else None
        if running is not None:
            assert scheduler.next_wakeup(now) is None, "no wakeup while a sync runs"
            assert not scheduler.due(now)
            if next_request is not None and next_request < running.finish:
                now = queue.pop(0)
                scheduler.request(now)
                unconfirmed.append([now, False])
            else:
                now = running.finish
                scheduler.finished(now, running.ok)
                if running.ok:
                    unconfirmed = [r for r in unconfirmed if not r[1]]
                else:
                    for r in unconfirmed:
                        r[1] = False
                sim.runs.append(running)
                running = None
            check_pending()
            continue
        wake = scheduler.next_wakeup(now)
        if next_request is not None and (wake is None or next_request <= wake):
            if next_request > now:
                assert not scheduler.due(now), "due before the wakeup it announced"
            now = queue.pop(0)
            scheduler.request(now)
            unconfirmed.append([now, False])
        elif wake is not None and wake <= horizon:
            now = wake
            assert scheduler.due(now)
            scheduler.started(now)
            for r in unconfirmed:
                r[1] = True
            duration, ok = scripted.pop(0) if scripted else DEFAULT_ATTEMPT
            running = Run(start=now, finish=now + duration, ok=ok)
        else:
            return sim
        check_pending()


SCENARIOS = [
    pytest.param(dict(min_interval=1.0), [5.0], [], 100.0, [5.0], id="first-request-runs-immediately"),
    pytest.param(
        dict(min_interval=2.0), [0.0, 0.5], [(0.1, True)], 100.0, [0.0, 2.0], id="second-within-min-waits"
    ),
    pytest.param(
        dict(min_interval=1.0), [0.0, 3.0], [], 100.0, [0.0, 3.0], id="request-after-min-runs-at-once"
    ),
    pytest.param(dict(min_interval=1.0), [7.0] * 1000, [], 100.0, [7.0], id="burst-of-1000-is-one-sync"),
    pytest.param(
        dict(min_interval=1.0),
        [0.0] + [0.1 + i * 0.0008 for i in range(1000)],
        [(0.05, True)],
        100.0,
        [0.0, 1.0],
        id="burst-within-min-interval-one-follow-up",
    ),
    pytest.param(
        dict(min_interval=1.0, max_interval=10.0),
        [0.0],
        [(1.0, True)] * 4,
        35.0,
        [0.0, 11.0, 22.0, 33.0],
        id="periodic-every-max-interval-after-finish",
    ),
    pytest.param(
        dict(min_interval=1.0, max_interval=5.0),
        [0.0],
        [(8.0, True)],
        14.0,
        [0.0, 13.0],
        id="long-sync-not-rerun-at-once",
    ),
    pytest.param(
        dict(min_interval=1.0, max_interval=0.0), [0.0], [], 1000.0, [0.0], id="max-interval-zero-disables"
    ),
    pytest.param(
        dict(min_interval=1.0, max_interval=5.0), [], [], 100.0, [], id="no-periodic-before-first-sync"
    ),
    pytest.param(
        dict(min_interval=1.0, retry_interval=5.0),
        [0.0],
        [(0.5, False)],
        100.0,
        [0.0, 5.5],
        id="failure-retries-after-retry-interval",
    ),
    pytest.param(
        dict(min_interval=3.0, retry_interval=1.0),
        [0.0],
        [(0.5, False)],
        100.0,
        [0.0, 3.0],
        id="retry-respects-min",
    ),
    pytest.param(
        dict(min_interval=1.0, retry_interval=10.0),
        [0.0, 2.0],
        [(0.5, False)],
        100.0,
        [0.0, 2.0],
        id="request-sooner-than-retry-wins",
    ),
    pytest.param(
        dict(min_interval=1.0, retry_interval=2.0),
        [0.0],
        [(0.5, False), (0.5, False), (0.5, True)],
        100.0,
        [0.0, 2.5, 5.0],
        id="retries-until-success-then-stops",
    ),
    pytest.param(
        dict(min_interval=1.0),
        [0.0, 0.5, 1.0, 1.5],
        [(2.0, True)],
        100.0,
        [0.0, 2.0],
        id="requests-during-sync-one-follow-up-at-finish",
    ),
    pytest.param(
        dict(min_interval=3.0),
        [0.0, 0.2],
        [(1.0, True)],
        100.0,
        [0.0, 3.0],
        id="follow-up-still-waits-for-min",
    ),
]


@pytest.mark.parametrize(("config", "requests", "attempts", "horizon", "expected_starts"), SCENARIOS)
def test_sync_starts(
    config: dict[str, float],
    requests: list[float],
    attempts: list[Attempt],
    horizon: float,
    expected_starts: list[float],
) -> None:
    sim = simulate(SyncScheduler(**config), requests, attempts, horizon)
    assert [run.start for run in sim.runs] == pytest.approx(expected_starts)


# ("request" | "started", now) or ("finished", now, ok)
Step = tuple[str, float] | tuple[str, float, bool]


def _pending_after(steps: Sequence[Step]) -> SyncScheduler:
    scheduler = SyncScheduler(min_interval=1.0, max_interval=10.0, retry_interval=1.0)
    for step in steps:
        if step[0] == "request":
            scheduler.request(step[1])
        elif step[0] == "started":
            scheduler.started(step[1])
        else:
            assert len(step) == 3
            scheduler.finished(step[1], step[2])
    return scheduler


PENDING = [
    pytest.param([], None, None, id="nothing-requested-nothing-pending"),
    pytest.param([("request", 1.0), ("request", 2.0)], 1.0, None, id="oldest-request-counts"),
    pytest.param([("request", 1.0), ("started", 1.0)], 1.0, None, id="running-sync-not-yet-confirmed"),
    pytest.param(
        [("request", 1.0), ("started", 1.0), ("finished", 2.0, True)], None, 2.0, id="success-clears"
    ),
    pytest.param(
        [("request", 1.0), ("started", 1.0), ("finished", 2.0, False), ("request", 3.0)],
        1.0,
        None,
        id="failure-keeps-oldest",
    ),
    pytest.param(
        [("request", 1.0), ("started", 1.0), ("request", 1.5), ("finished", 2.0, True)],
        1.5,
        2.0,
        id="request-during-sync-survives-its-success",
    ),
    pytest.param(
        [
            ("request", 1.0),
            ("started", 1.0),
            ("finished", 2.0, False),
            ("started", 3.0),
            ("finished", 4.0, True),
        ],
        None,
        4.0,
        id="retry-success-confirms-failed-requests",
    ),
    pytest.param(
        [
            ("request", 1.0),
            ("started", 1.0),
            ("finished", 2.0, True),
            ("started", 12.0),
            ("finished", 13.0, False),
        ],
        None,
        2.0,
        id="failed-periodic-sync-leaves-nothing-pending",
    ),
]


@pytest.mark.parametrize(("steps", "pending_since", "last_success"), PENDING)
def test_pending_since_and_last_success(
    steps: list[tuple[str, float] | tuple[str, float, bool]],
    pending_since: float | None,
    last_success: float | None,
) -> None:
    scheduler = _pending_after(steps)
    assert scheduler.pending_since == pending_since
    assert scheduler.last_success == last_success


@pytest.mark.parametrize(
    "steps",
    [
        pytest.param([("started", 0.0), ("started", 1.0)], id="started-twice"),
        pytest.param([("finished", 0.0, True)], id="finished-without-started"),
    ],
)
def test_out_of_order_driver_calls_raise(steps: list[Step]) -> None:
    with pytest.raises(SchedulerUsageError):
        _pending_after(steps)


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(dict(min_interval=-1.0), id="negative-min"),
        pytest.param(dict(min_interval=1.0, retry_interval=-1.0), id="negative-retry"),
        pytest.param(dict(min_interval=5.0, max_interval=1.0), id="max-below-min"),
    ],
)
def test_invalid_intervals_rejected(config: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SyncScheduler(**config)


def test_next_wakeup_never_in_the_past() -> None:
    scheduler = SyncScheduler(min_interval=1.0)
    scheduler.request(3.0)
    assert scheduler.next_wakeup(10.0) == 10.0
    assert scheduler.due(10.0)


# -- property: random timelines ------------------------------------------------------------------------------

# Half-second steps keep every time exactly representable, so comparisons need no tolerance.
halves = st.integers(min_value=0, max_value=12).map(lambda n: n / 2)


@st.composite
def timelines(draw: st.DrawFn) -> tuple[SyncScheduler, list[float], list[Attempt]]:
    min_interval = draw(halves)
    retry_interval = draw(halves)
    max_interval = draw(
        st.none() | st.integers(min_value=0, max_value=20).map(lambda n: min_interval + n / 2)
    )
    scheduler = SyncScheduler(
        min_interval=min_interval, max_interval=max_interval, retry_interval=retry_interval
    )
    requests = draw(st.lists(st.integers(min_value=0, max_value=120).map(lambda n: n / 2), max_size=40))
    attempts = draw(st.lists(st.tuples(halves, st.booleans()), max_size=15))
    return scheduler, requests, attempts


@settings(max_examples=300, deadline=None)
@given(timelines())
def test_random_timelines_keep_the_bounds(timeline: tuple[SyncScheduler, list[float], list[Attempt]]) -> None:
    scheduler, requests, attempts = timeline
    # Long enough for every scripted failure to be retried and every request confirmed.
    step = 6 + scheduler.min_interval + scheduler.retry_interval
    horizon = max(requests, default=0.0) + (len(attempts) + 2) * step
    sim = simulate(scheduler, requests, attempts, horizon)
    runs = sim.runs

    for previous, current in itertools.pairwise(runs):
        assert current.start - previous.start >= scheduler.min_interval
        assert current.start >= previous.finish
        if not previous.ok:
            assert current.start <= max(
                previous.finish + scheduler.retry_interval, previous.start + scheduler.min_interval
            )
        if scheduler.max_interval is not None:
            assert current.start <= previous.finish + scheduler.max_interval

    for request in requests:
        # The first sync starting at or after the request, no later than min_interval after the sync before it
        # (or when the sync running at the time of the request finishes).
        before = [run for run in runs if run.start <= request]
        after = [run for run in runs if run.start >= request]
        assert after, f"request at {request} never synced"
        bound = request
        if before:
            last = before[-1]
            bound = max(
                bound, last.start + scheduler.min_interval, last.finish if last.finish > request else bound
            )
        assert min(run.start for run in after) <= bound

    assert scheduler.pending_since is None, "a request was left unsynced"
    assert sim.pending_checks >= len(requests)
