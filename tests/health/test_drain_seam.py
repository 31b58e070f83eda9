"""Verdicts reach the kernel only through the ordinary path: tracker (dirty) -> translation -> planner.

The Syncer on the memory backend, with a HealthView: a backend turning unhealthy marks exactly the services
that use it dirty, and the next sync is one weight-0 UpdateRealServer per virtual server that has it; its
recovery is the same in reverse; a backend whose endpoint is also removed drains and is deleted like any
removed endpoint.
"""

from __future__ import annotations

import asyncio
from ipaddress import ip_address

from aproxy.backends.memory import MemoryBackend
from aproxy.core.changes import ChangeTracker
from aproxy.core.drain import DrainClock
from aproxy.core.model import (
    DeleteRealServer,
    L4Protocol,
    RealServer,
    RealServerKey,
    UpdateRealServer,
    VirtualServerKey,
)
from aproxy.core.translate import TranslationContext
from aproxy.core.verdicts import HealthView
from aproxy.syncer import Syncer
from tests.core import k8s

CTX = TranslationContext(node_name="node-a", node_addresses=frozenset({ip_address("192.0.2.10")}))
A, B, C = "10.244.1.5", "10.244.1.6", "10.244.1.7"
WEB = VirtualServerKey(L4Protocol.TCP, ip_address("10.96.0.1"), 80)
WEB_NODEPORT = VirtualServerKey(L4Protocol.TCP, ip_address("192.0.2.10"), 30080)
API = VirtualServerKey(L4Protocol.TCP, ip_address("10.96.0.2"), 80)


def target(address: str) -> RealServerKey:
    return RealServerKey(ip_address(address), 8080)


def setup() -> tuple[ChangeTracker, HealthView, Syncer, MemoryBackend]:
    tracker = ChangeTracker()
    tracker.upsert_service(k8s.service(type_="NodePort", ports=[k8s.port(node_port=30080)]))
    tracker.upsert_slice(k8s.endpoint_slice(endpoints=[k8s.endpoint(A), k8s.endpoint(B)]))
    tracker.upsert_service(k8s.service("api", cluster_ips="10.96.0.2"))
    tracker.upsert_slice(k8s.endpoint_slice("api", endpoints=[k8s.endpoint(B), k8s.endpoint(C)]))
    tracker.mark_listed("services")
    tracker.mark_listed("endpointslices")
    view = HealthView()
    backend = MemoryBackend()
    syncer = Syncer(tracker, CTX, backend, DrainClock(grace_period=0.0), health=view)
    asyncio.run(syncer.start())
    return tracker, view, syncer, backend


def verdict(tracker: ChangeTracker, view: HealthView, address: str, unhealthy: bool) -> None:
    """What the checker does on a transition (aproxy.app wires it so)."""
    tracker.mark_dirty(view.set_unhealthy(target(address), unhealthy))


def test_every_checked_backend_is_a_target_once() -> None:
    _, view, _, _ = setup()
    # B serves two services (and web has two virtual servers): still one check.
    assert view.targets(2.0) == {target(A): 2.0, target(B): 2.0, target(C): 2.0}


def test_unhealthy_is_one_weight_0_update_per_virtual_server_and_only_its_services() -> None:
    tracker, view, syncer, backend = setup()
    verdict(tracker, view, A, True)
    assert tracker.dirty_count == 1  # only web uses A
    report = asyncio.run(syncer.sync())
    drained = RealServer(ip_address(A), 8080, 0)
    assert {r.operation for r in report.results} == {
        UpdateRealServer(WEB, drained),
        UpdateRealServer(WEB_NODEPORT, drained),
    }
    assert backend.dump_sync().weight(WEB, target(A)) == 0
    assert backend.dump_sync().weight(WEB, target(B)) == 1
    # Not a drain of a removed endpoint: the drain pass never deletes it.
    assert asyncio.run(syncer.drain()).results == ()
    assert backend.dump_sync().weight(WEB, target(A)) == 0

    verdict(tracker, view, A, False)
    report = asyncio.run(syncer.sync())
    restored = RealServer(ip_address(A), 8080, 1)
    assert {r.operation for r in report.results} == {
        UpdateRealServer(WEB, restored),
        UpdateRealServer(WEB_NODEPORT, restored),
    }


def test_a_shared_backend_marks_both_services() -> None:
    tracker, view, syncer, backend = setup()
    verdict(tracker, view, B, True)
    assert tracker.dirty_count == 2
    report = asyncio.run(syncer.sync())
    assert {r.operation.virtual for r in report.results if isinstance(r.operation, UpdateRealServer)} == {
        WEB,
        WEB_NODEPORT,
        API,
    }
    assert len(report.results) == 3
    assert backend.dump_sync().weight(API, target(B)) == 0


def test_all_unhealthy_fails_open_restoring_the_weights() -> None:
    tracker, view, syncer, backend = setup()
    verdict(tracker, view, B, True)
    asyncio.run(syncer.sync())
    verdict(tracker, view, C, True)  # api: B and C both unhealthy -> fail open, both back at weight 1
    report = asyncio.run(syncer.sync())
    assert {r.operation for r in report.results} == {
        UpdateRealServer(API, RealServer(ip_address(B), 8080, 1))
    }
    assert view.failing_open_count == 1
    assert backend.dump_sync().weight(API, target(C)) == 1


def test_an_unhealthy_backend_whose_endpoint_goes_drains_and_is_deleted_as_usual() -> None:
    tracker, view, syncer, _ = setup()
    verdict(tracker, view, A, True)
    asyncio.run(syncer.sync())
    tracker.upsert_slice(k8s.endpoint_slice(endpoints=[k8s.endpoint(B)]))
    report = asyncio.run(syncer.sync())
    assert report.results == ()  # already at weight 0: the planner just waits for the drain to finish
    assert set(syncer.planner.draining()) == {(WEB, target(A)), (WEB_NODEPORT, target(A))}
    assert target(A) not in view.targets(2.0)
    drained = asyncio.run(syncer.drain())
    assert {r.operation for r in drained.results} == {
        DeleteRealServer(WEB, target(A)),
        DeleteRealServer(WEB_NODEPORT, target(A)),
    }


def test_a_restart_keeps_the_verdicts_weights() -> None:
    tracker, view, syncer, backend = setup()
    verdict(tracker, view, A, True)
    asyncio.run(syncer.sync())
    again = Syncer(tracker, CTX, backend, health=view)
    assert asyncio.run(again.start()).results == ()
