"""Health checks for the one-shot commands (``aproxy plan``/``sync --health-checks``): judge every target now.

Each target is checked up to ``fall`` times in rounds (a round waits for all its answers; at most
``concurrency`` in flight); a target that answers once is healthy and not checked again, so a healthy
cluster costs one round. What ends unhealthy is what the daemon would drain after ``fall`` failed checks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence

from aproxy.core.verdicts import CheckTarget
from aproxy.health.config import HealthCheckSettings
from aproxy.health.prober import ERROR, OK, Prober
from aproxy.health.states import Health, HealthBook, Result


async def judge_once(
    targets: Collection[CheckTarget], settings: HealthCheckSettings
) -> frozenset[CheckTarget]:
    """The targets that failed ``settings.fall`` checks in a row (a node-side error counts as no answer)."""
    book = HealthBook(fall=settings.fall, rise=settings.rise)
    prober = Prober[CheckTarget](settings.timeout)
    loop = asyncio.get_running_loop()
    pending = list(targets)
    try:
        for _ in range(settings.fall):
            if not pending:
                break
            for target, result in (await _round(prober, pending, settings.concurrency)).items():
                if result != ERROR:
                    outcome = Result.SUCCESS if result == OK else Result.FAILURE
                    book.record(target, outcome, loop.time(), result)
            pending = [t for t in pending if book.state(t) is Health.UNKNOWN]
    finally:
        prober.close()
    return frozenset(t for t in targets if book.state(t) is Health.UNHEALTHY)


async def _round(
    prober: Prober[CheckTarget], targets: Sequence[CheckTarget], concurrency: int
) -> dict[CheckTarget, str]:
    """One check of each target; their results."""
    results: dict[CheckTarget, str] = {}
    slot = asyncio.Event()
    finished = asyncio.Event()

    def done(target: CheckTarget, result: str, _seconds: float) -> None:
        results[target] = result
        slot.set()
        if len(results) == len(targets):
            finished.set()

    for target in targets:
        while prober.inflight >= concurrency:
            slot.clear()
            await slot.wait()
        prober.start(target, (str(target.address), target.port), done)
    await finished.wait()
    return results
