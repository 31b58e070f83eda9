"""The sync loop hands the service sets their changes: per pass only what changed, everything at start and
audit (core/datapath.py decides the entries; a backend with sets keeps them)."""

from __future__ import annotations

import asyncio
from ipaddress import ip_address

from aproxy.backends.memory import MemoryBackend
from aproxy.core.changes import ChangeTracker
from aproxy.core.datapath import SetDelta, SetEntry, SetKind
from aproxy.core.model import L4Protocol
from aproxy.core.translate import TranslationContext
from aproxy.syncer import Syncer
from tests.core.k8s import endpoint, endpoint_slice, port, service

CTX = TranslationContext("node-a", frozenset({ip_address("192.0.2.10")}))
NODE_PORT = SetEntry(SetKind.NODE_PORT, None, L4Protocol.TCP, 30080)
CLUSTER = SetEntry(SetKind.CLUSTER_IP, ip_address("10.96.0.1"), L4Protocol.TCP, 80)


class SetKeepingBackend(MemoryBackend):
    """The in-memory kernel, plus a record of what the sync loop sent to the sets."""

    def __init__(self) -> None:
        super().__init__()
        self.deltas: list[SetDelta] = []
        self.resyncs: list[frozenset[SetEntry]] = []

    async def update_services(self, delta: SetDelta) -> None:
        self.deltas.append(delta)

    async def resync_services(self, entries: frozenset[SetEntry]) -> None:
        self.resyncs.append(entries)


def test_start_resyncs_everything_then_each_pass_sends_only_its_change() -> None:
    tracker = ChangeTracker()
    tracker.upsert_service(service(type_="NodePort", ports=[port("http", 80, node_port=30080)]))
    tracker.upsert_slice(endpoint_slice())
    tracker.mark_listed("services")
    tracker.mark_listed("endpointslices")
    backend = SetKeepingBackend()
    syncer = Syncer(tracker, CTX, backend)

    asyncio.run(syncer.start())
    assert backend.resyncs == [frozenset({NODE_PORT, CLUSTER})]

    tracker.upsert_slice(endpoint_slice(endpoints=[endpoint("10.244.1.9", ready=True, node="node-a")]))
    asyncio.run(syncer.sync())
    assert backend.deltas == []  # endpoints are not the service sets' business

    tracker.upsert_service(service(type_="NodePort", ports=[port("http", 80, node_port=30081)]))
    asyncio.run(syncer.sync())
    assert backend.deltas == [
        SetDelta((SetEntry(SetKind.NODE_PORT, None, L4Protocol.TCP, 30081),), (NODE_PORT,))
    ]

    tracker.delete_service("default", "web")
    asyncio.run(syncer.sync())
    asyncio.run(syncer.audit())
    assert backend.resyncs[-1] == frozenset()


def test_a_backend_without_sets_gets_no_set_calls() -> None:
    tracker = ChangeTracker()
    tracker.mark_listed("services")
    tracker.mark_listed("endpointslices")

    report = asyncio.run(Syncer(tracker, CTX, MemoryBackend()).start())

    assert report.ok
