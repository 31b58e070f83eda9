"""kube-proxy's sync metrics through the daemon: kubeproxy_network_programming_duration_seconds (a slice's
trigger stamp or a Service's arrival to the end of the sync that programmed it; nothing for the initial list)
and kubeproxy_sync_proxy_rules_no_local_endpoints_total."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from aproxy.app import Daemon
from aproxy.backends.memory import MemoryBackend
from aproxy.core.latency import TRIGGER_ANNOTATION
from tests.core.k8s import port, service
from tests.test_app import (
    STEP,
    ScriptedSource,
    api_service,
    metrics,
    run,
    running,
    settings,
    slice_of,
    synced,
    until,
    web_service,
)

METRIC = "kubeproxy_network_programming_duration_seconds"
AGO = 0.5


def stamped(raw: dict[str, Any], seconds_ago: float) -> dict[str, Any]:
    """The slice as the EndpointSlice controller writes it: with the time its cause happened."""
    stamp = datetime.fromtimestamp(time.time() - seconds_ago, UTC).isoformat().replace("+00:00", "Z")
    raw["metadata"].setdefault("annotations", {})[TRIGGER_ANNOTATION] = stamp
    return raw


def observed(samples: dict[Any, float]) -> tuple[float, float]:
    """(count, sum) of the histogram."""
    return samples[(f"{METRIC}_count", frozenset())], samples[(f"{METRIC}_sum", frozenset())]


def test_each_change_is_observed_from_its_trigger_to_the_sync_that_programmed_it() -> None:
    source = ScriptedSource()
    daemon = Daemon(settings(min_sync_period=0), source=source, backend=MemoryBackend())

    async def scenario() -> list[tuple[float, float]]:
        seen = []
        async with running(daemon):
            # The initial list: a slice changed an hour ago says nothing about aproxy.
            await synced(daemon, source, web_service(), stamped(slice_of("web", "10.244.1.5"), 3600))
            seen.append(observed(await metrics(daemon)))
            # A change caused half a second ago, by then after the process started (earlier ones are not
            # counted, as kube-proxy does not count them).
            await asyncio.sleep(max(0.0, daemon.latency.started + AGO + 0.05 - time.time()))
            passes = daemon.stats.last_sync_wall
            source.feed(stamped(slice_of("web", "10.244.1.5", "10.244.1.6"), AGO))
            await until(daemon, lambda: daemon.stats.last_sync_wall != passes)
            seen.append(observed(await metrics(daemon)))
            passes = daemon.stats.last_sync_wall
            source.feed(api_service())  # a Service: from its arrival
            await until(daemon, lambda: daemon.stats.last_sync_wall != passes)
            seen.append(observed(await metrics(daemon)))
        return seen

    initial, after_slice, after_service = run(scenario())
    assert initial == (0.0, 0.0)
    count, total = after_slice
    assert count == 1
    assert AGO <= total < AGO + STEP
    count, total_after = after_service
    assert count == 2
    assert 0.0 <= total_after - total < STEP


def test_services_without_local_endpoints_are_a_gauge_by_traffic_policy() -> None:
    # kube-proxy's kubeproxy_sync_proxy_rules_no_local_endpoints_total: a NodePort service with policy Local
    # and its only endpoint on another node counts for "external"; moving the endpoint here clears it.
    source = ScriptedSource()
    daemon = Daemon(settings(min_sync_period=0), source=source, backend=MemoryBackend())
    local = service(
        "edge", type_="NodePort", ports=[port("http", 80, node_port=30080)], external_policy="Local"
    )
    elsewhere = slice_of("edge", "10.244.2.5")
    elsewhere["endpoints"][0]["nodeName"] = "node-b"
    here = slice_of("edge", "10.244.1.5")
    here["endpoints"][0]["nodeName"] = "node-a"
    name = "kubeproxy_sync_proxy_rules_no_local_endpoints_total"

    async def scenario() -> tuple[float, float, float]:
        async with running(daemon):
            await synced(daemon, source, local, elsewhere)
            before = await metrics(daemon)
            passes = daemon.stats.last_sync_wall
            source.feed(here)
            await until(daemon, lambda: daemon.stats.last_sync_wall != passes)
            after = await metrics(daemon)
        return (
            before[(name, frozenset({("traffic_policy", "external")}))],
            before[(name, frozenset({("traffic_policy", "internal")}))],
            after[(name, frozenset({("traffic_policy", "external")}))],
        )

    assert run(scenario()) == (1.0, 0.0, 0.0)
