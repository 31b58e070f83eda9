"""The syncer knows which addresses are endpoints on this node (the hairpin set's filter): refcounted over
services, and up to date before the backend sees a pass's operations or the start-up dump."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from ipaddress import ip_address

from aproxy.backends.base import OperationResult
from aproxy.backends.memory import MemoryBackend
from aproxy.core.changes import ChangeTracker
from aproxy.core.model import IPAddress, Operation
from aproxy.core.state import IPVSState
from aproxy.core.translate import TranslationContext
from aproxy.syncer import Syncer
from tests.core.k8s import endpoint, endpoint_slice, port, service

CTX = TranslationContext("node-a", frozenset({ip_address("192.0.2.10")}))
POD = ip_address("10.244.1.5")  # on node-a
OTHER = ip_address("10.244.1.6")  # on node-a
REMOTE = ip_address("10.244.2.5")  # on node-b


class LocalityRecordingBackend(MemoryBackend):
    """The in-memory kernel, noting which of the watched addresses the syncer called local when the backend
    was asked to dump and to apply (what the IPVS backend's hairpin set filters with at those moments)."""

    def __init__(self, watched: Sequence[IPAddress]) -> None:
        super().__init__()
        self.syncer: Syncer | None = None
        self.watched = watched
        self.seen: list[tuple[str, frozenset[IPAddress]]] = []

    def _note(self, when: str) -> None:
        assert self.syncer is not None
        self.seen.append((when, frozenset(a for a in self.watched if self.syncer.is_local_endpoint(a))))

    async def dump(self) -> IPVSState:
        self._note("dump")
        return await super().dump()

    async def apply(self, operations: Sequence[Operation]) -> list[OperationResult]:
        self._note("apply")
        return await super().apply(operations)


def web(*endpoints: tuple[IPAddress, str]) -> list[dict[str, object]]:
    return slices("web", *endpoints)


def slices(name: str, *endpoints: tuple[IPAddress, str]) -> list[dict[str, object]]:
    return [
        service(name, cluster_ips=f"10.96.0.{len(name)}", ports=[port("http", 80)]),
        endpoint_slice(name, endpoints=[endpoint(str(a), ready=True, node=node) for a, node in endpoints]),
    ]


def started(backend: LocalityRecordingBackend, *objects: dict[str, object]) -> tuple[ChangeTracker, Syncer]:
    tracker = ChangeTracker()
    feed(tracker, objects)
    tracker.mark_listed("services")
    tracker.mark_listed("endpointslices")
    syncer = Syncer(tracker, CTX, backend)
    backend.syncer = syncer
    asyncio.run(syncer.start())
    return tracker, syncer


def feed(tracker: ChangeTracker, objects: Sequence[dict[str, object]]) -> None:
    for obj in objects:
        (tracker.upsert_service if obj["kind"] == "Service" else tracker.upsert_slice)(obj)


def test_start_knows_the_local_endpoints_before_the_dump() -> None:
    backend = LocalityRecordingBackend([POD, REMOTE])

    started(backend, *web((POD, "node-a"), (REMOTE, "node-b")))

    assert backend.seen[0] == ("dump", frozenset({POD}))


def test_a_sync_updates_them_before_the_backend_applies_its_operations() -> None:
    backend = LocalityRecordingBackend([POD, OTHER, REMOTE])
    tracker, syncer = started(backend, *web((POD, "node-a")))
    backend.seen.clear()

    feed(tracker, web((POD, "node-a"), (OTHER, "node-a"), (REMOTE, "node-b")))
    asyncio.run(syncer.sync())

    assert backend.seen[0] == ("apply", frozenset({POD, OTHER}))


def test_an_address_backing_two_services_stays_local_until_both_let_it_go() -> None:
    backend = LocalityRecordingBackend([POD])
    tracker, syncer = started(backend, *web((POD, "node-a")), *slices("api", (POD, "node-a")))

    tracker.delete_service("default", "web")
    tracker.delete_slice("default", "web-ipv4")
    asyncio.run(syncer.sync())
    after_one = syncer.is_local_endpoint(POD)
    feed(tracker, slices("api", (REMOTE, "node-b")))
    asyncio.run(syncer.sync())

    assert after_one
    assert not syncer.is_local_endpoint(POD)
    assert not syncer.is_local_endpoint(REMOTE)


class HairpinBackend(MemoryBackend):
    """A backend with a hairpin set to filter (``LocalEndpointFilter``), like the IPVS backend's."""

    def __init__(self) -> None:
        super().__init__()
        self.is_local: Callable[[IPAddress], bool] | None = None

    def set_local_endpoints(self, is_local: Callable[[IPAddress], bool]) -> None:
        self.is_local = is_local


def test_the_syncer_hands_its_filter_to_a_backend_that_keeps_a_hairpin_set() -> None:
    # Every user of a Syncer gets the filter (the daemon, `aproxy sync`, bench/kernel.py, the kernel tests).
    backend = HairpinBackend()
    tracker = ChangeTracker()
    feed(tracker, web((POD, "node-a"), (REMOTE, "node-b")))
    tracker.mark_listed("services")
    tracker.mark_listed("endpointslices")
    asyncio.run(Syncer(tracker, CTX, backend).start())

    assert backend.is_local is not None
    assert backend.is_local(POD)
    assert not backend.is_local(REMOTE)
