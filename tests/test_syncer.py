"""The Syncer end to end on the memory backend: tracker intake -> translate -> plan -> apply -> record.

The property test is the foundation's main promise: whatever sequence of Service and EndpointSlice adds,
updates and deletes arrives, syncing incrementally yields exactly the state a from-scratch translation of the
final objects yields.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Sequence
from errno import EADDRNOTAVAIL, EEXIST, EIO, ENOENT, ESRCH
from ipaddress import ip_address
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aproxy.backends.base import BackendError, OperationResult, RealServerConnections
from aproxy.backends.memory import MemoryBackend, Read
from aproxy.core.changes import ChangeTracker
from aproxy.core.drain import DrainClock
from aproxy.core.model import (
    AddRealServer,
    AddVirtualServer,
    BindAddress,
    DeleteRealServer,
    DeleteVirtualServer,
    L4Protocol,
    Operation,
    RealServer,
    RealServerKey,
    UnbindAddress,
    VirtualServerKey,
    VirtualServerSpec,
)
from aproxy.core.objects import ServiceInfo, SliceInfo, parse_service, parse_slice
from aproxy.core.state import IPVSState
from aproxy.core.translate import TranslationContext, translate_all
from aproxy.syncer import Syncer
from tests.core.k8s import endpoint, endpoint_slice, port, service, slice_port

CTX = TranslationContext(node_name="node-a", node_addresses=frozenset({ip_address("192.0.2.10")}))
T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def upsert(tracker: ChangeTracker, obj: dict[str, Any]) -> None:
    (tracker.upsert_service if obj["kind"] == "Service" else tracker.upsert_slice)(obj)


def listed_tracker(*objects: dict[str, Any]) -> ChangeTracker:
    tracker = ChangeTracker()
    for obj in objects:
        upsert(tracker, obj)
    tracker.mark_listed("services")
    tracker.mark_listed("endpointslices")
    return tracker


async def started(
    *objects: dict[str, Any],
    backend: MemoryBackend | None = None,
    drain_clock: DrainClock | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[ChangeTracker, MemoryBackend, Syncer]:
    """A Syncer started on ``objects`` (listed) over ``backend`` (a fresh memory backend by default)."""
    tracker = listed_tracker(*objects)
    backend = MemoryBackend() if backend is None else backend
    syncer = Syncer(tracker, CTX, backend, drain_clock=drain_clock, clock=clock)
    await syncer.start()
    return tracker, backend, syncer


def from_scratch(services: list[dict[str, Any]], slices: list[dict[str, Any]]) -> IPVSState:
    parsed_services = [info for raw in services if isinstance(info := parse_service(raw), ServiceInfo)]
    parsed_slices = [part for raw in slices if isinstance(part := parse_slice(raw), SliceInfo)]
    states, _ = translate_all(parsed_services, parsed_slices, CTX)
    return IPVSState.from_services(states.values())


def web(rv: str = "1", **kwargs: Any) -> dict[str, Any]:
    return service("web", cluster_ips="10.96.0.1", ports=[port("http", 80)], resource_version=rv, **kwargs)


def web_slice(*addresses: str, rv: str = "1", protocol: str | None = None) -> dict[str, Any]:
    return endpoint_slice(
        "web",
        endpoints=[endpoint(a) for a in addresses],
        ports=[slice_port("http", 8080, protocol)],
        resource_version=rv,
    )


VIRTUAL = VirtualServerKey(L4Protocol.TCP, ip_address("10.96.0.1"), 80)


def real(address: str) -> RealServerKey:
    return RealServerKey(ip_address(address), 8080)


# --- the property ------------------------------------------------------------------------------------------

NAMES = ["a", "b", "c"]
SLICE_NAMES = ["s1", "s2"]
# A small space on purpose: slices share endpoints, addresses move between families, IPs get reused. Each
# service has addresses of its own (the API server allocates cluster IPs uniquely); two services contending
# for one virtual server key are the planner's contested-keys property, where the current owner keeps the key.
service_objects = st.builds(
    lambda name, family, ext, proto, affinity, local, rv: service(
        name,
        cluster_ips={"v4": f"10.96.0.{NAMES.index(name) + 1}", "v6": f"fd00::{NAMES.index(name) + 1}"}.get(
            family, "not-an-ip"
        ),
        ports=[port("http", 80, proto), port("dns", 53, "UDP")],
        external_ips=[f"203.0.113.{NAMES.index(name) + 1}"] if ext else None,
        affinity=affinity,
        external_policy="Local" if local else None,
        resource_version=str(rv),
    ),
    st.sampled_from(NAMES),
    st.sampled_from(["v4", "v6", "bad"]),
    st.booleans(),
    st.sampled_from([None, "TCP", "SCTP"]),
    st.sampled_from([None, True, 60]),
    st.booleans(),
    st.just(0),
)
slice_objects = st.builds(
    lambda svc, name, addresses, ready, node, family, rv: endpoint_slice(
        svc,
        name=f"{svc}-{name}",
        address_type=family,
        endpoints=[endpoint(a, ready=ready, node=node) for a in addresses],
        ports=[slice_port("http", 8080), slice_port("dns", 5353, "UDP")],
        resource_version=str(rv),
    ),
    st.sampled_from(NAMES),
    st.sampled_from(SLICE_NAMES),
    st.lists(st.sampled_from(["10.244.0.1", "10.244.0.2", "10.244.1.1", "999.1.1.1"]), max_size=3),
    st.sampled_from([None, True, False]),
    st.sampled_from([None, "node-a", "node-b"]),
    st.sampled_from(["IPv4", "IPv6"]),
    st.just(0),
)
events = st.lists(
    st.one_of(
        st.tuples(st.just("upsert"), service_objects),
        st.tuples(st.just("upsert"), slice_objects),
        st.tuples(st.just("delete-service"), st.sampled_from(NAMES)),
        st.tuples(st.just("delete-slice"), st.sampled_from([f"{n}-{s}" for n in NAMES for s in SLICE_NAMES])),
        st.tuples(st.just("sync"), st.none()),
    ),
    max_size=30,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events)
def test_incremental_syncs_reach_the_from_scratch_state(steps: list[tuple[str, Any]]) -> None:
    async def scenario() -> None:
        tracker, backend, syncer = await started(drain_clock=DrainClock(grace_period=0))
        services: dict[str, dict[str, Any]] = {}
        slices: dict[str, dict[str, Any]] = {}
        for version, (action, value) in enumerate(steps, start=1):
            if action == "upsert":
                # As the API server does: every write gets a new resourceVersion.
                value = {**value, "metadata": {**value["metadata"], "resourceVersion": str(version)}}
            if action == "upsert" and value["kind"] == "Service":
                services[value["metadata"]["name"]] = value
                tracker.upsert_service(value)
            elif action == "upsert":
                slices[value["metadata"]["name"]] = value
                tracker.upsert_slice(value)
            elif action == "delete-service":
                services.pop(value, None)
                tracker.delete_service("default", value)
            elif action == "delete-slice":
                slices.pop(value, None)
                tracker.delete_slice("default", value)
            else:
                report = await syncer.sync()
                assert report.ok, report.failures
        report = await syncer.sync()
        assert report.ok, report.failures
        await syncer.drain()

        assert backend.rejected == {}
        assert backend.dump_sync() == from_scratch(list(services.values()), list(slices.values()))
        # Replaying every object unchanged marks nothing dirty and costs nothing.
        for obj in [*services.values(), *slices.values()]:
            upsert(tracker, obj)
        assert (await syncer.sync()).results == ()

    run(scenario())


# --- one behaviour each ------------------------------------------------------------------------------------


def test_start_programs_everything_and_a_restart_programs_nothing() -> None:
    async def scenario() -> None:
        tracker = listed_tracker(web(), web_slice("10.244.0.1", "10.244.0.2"))
        backend = MemoryBackend()
        first = await Syncer(tracker, CTX, backend).start()
        second = await Syncer(
            listed_tracker(web(), web_slice("10.244.0.1", "10.244.0.2")), CTX, backend
        ).start()

        assert [r.operation.name for r in first.results] == [
            "bind_address",
            "add_virtual_server",
            "add_real_server",
            "add_real_server",
        ]
        assert second.results == ()

    run(scenario())


def test_one_endpoint_change_costs_the_same_at_10_and_at_10000_services() -> None:
    async def change_one(count: int) -> list[str]:
        objects: list[dict[str, Any]] = []
        for i in range(count):
            ip = f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}"
            objects.append(service(f"s{i}", cluster_ips=ip, ports=[port("http", 80)]))
            objects.append(endpoint_slice(f"s{i}", endpoints=[endpoint("10.244.0.1")], ports=[slice_port()]))
        tracker = listed_tracker(*objects)
        syncer = Syncer(tracker, CTX, MemoryBackend())
        await syncer.start()
        tracker.upsert_slice(
            endpoint_slice(
                "s5", endpoints=[endpoint("10.244.0.1"), endpoint("10.244.0.9")], ports=[slice_port()]
            )
        )
        report = await syncer.sync()
        return [f"{r.operation.name} {r.operation}" for r in report.results]

    small, large = run(change_one(10)), run(change_one(10_000))

    assert small == large
    assert len(small) == 1 and small[0].startswith("add_real_server")


def test_a_failed_service_is_retried_and_does_not_block_others() -> None:
    async def scenario() -> None:
        other = service("other", cluster_ips="10.96.0.2", ports=[port("http", 80)])
        other_slice = endpoint_slice("other", endpoints=[endpoint("10.244.0.5")], ports=[slice_port()])
        tracker = listed_tracker(web(), web_slice("10.244.0.1"), other, other_slice)
        backend = MemoryBackend()
        backend.inject_failure(lambda op: isinstance(op, AddRealServer) and op.virtual == VIRTUAL, errno=EIO)
        syncer = Syncer(tracker, CTX, backend)

        first = await syncer.start()

        assert [r.errno for r in first.failures] == [EIO]
        assert {str(s) for s in first.failed_services} == {"default/web"}
        assert backend.dump_sync().real_servers(VirtualServerKey(L4Protocol.TCP, ip_address("10.96.0.2"), 80))

        retry = await syncer.sync()

        assert retry.ok and [r.operation.name for r in retry.results] == ["add_real_server"]
        assert backend.dump_sync().weight(VIRTUAL, real("10.244.0.1")) == 1

    run(scenario())


def test_an_unbind_waits_until_the_virtual_servers_on_its_address_are_gone() -> None:
    async def scenario() -> None:
        tracker, backend, syncer = await started(web(), web_slice("10.244.0.1"))
        backend.inject_failure(lambda op: isinstance(op, DeleteVirtualServer), errno=EIO)
        tracker.delete_service("default", "web")

        held = await syncer.sync()

        assert {(r.operation.name, r.errno) for r in held.failures} == {
            ("delete_virtual_server", EIO),
            ("unbind_address", 16),  # EBUSY: held back, not sent
        }
        assert backend.dump_sync().is_bound(ip_address("10.96.0.1"))

        retried = await syncer.sync()

        assert retried.ok
        assert [type(r.operation) for r in retried.results][-1] is UnbindAddress
        assert backend.dump_sync() == IPVSState()

    run(scenario())


async def removing_a_connected_endpoint(
    connections: RealServerConnections, clock: Callable[[], float] = time.monotonic
) -> tuple[ChangeTracker, MemoryBackend, Syncer]:
    """web started on 10.244.0.1 and .2 (a 60 s grace period); .2 holds ``connections`` when its endpoint
    leaves the tracker (not synced yet)."""
    tracker, backend, syncer = await started(
        web(), web_slice("10.244.0.1", "10.244.0.2"), drain_clock=DrainClock(grace_period=60), clock=clock
    )
    backend.connection_counts[(VIRTUAL, real("10.244.0.2"))] = connections
    tracker.upsert_slice(web_slice("10.244.0.1", rv="2"))
    return tracker, backend, syncer


def test_a_removed_tcp_endpoint_drains_until_its_connections_end() -> None:
    async def scenario() -> None:
        now = [0.0]
        _, backend, syncer = await removing_a_connected_endpoint(
            RealServerConnections(active=1, inactive=0), clock=lambda: now[0]
        )

        drained = await syncer.sync()
        assert [(r.operation.name, getattr(r.operation, "real", None)) for r in drained.results] == [
            ("update_real_server", drained.results[0].operation.real)  # type: ignore[union-attr]
        ]
        assert backend.dump_sync().weight(VIRTUAL, real("10.244.0.2")) == 0
        assert (await syncer.drain()).results == ()  # a connection is open

        now[0] = 59.0
        assert (await syncer.drain()).results == ()  # still within the grace period
        backend.connection_counts.clear()
        finished = await syncer.drain()  # connections gone

        assert [r.operation.name for r in finished.results] == ["delete_real_server"]
        assert backend.dump_sync().weight(VIRTUAL, real("10.244.0.2")) is None

    run(scenario())


def test_the_grace_period_ends_a_drain_that_never_empties() -> None:
    async def scenario() -> None:
        now = [0.0]
        _, _, syncer = await removing_a_connected_endpoint(
            RealServerConnections(active=3, inactive=9), clock=lambda: now[0]
        )
        await syncer.sync()
        assert (await syncer.drain()).results == ()

        now[0] = 60.0
        finished = await syncer.drain()

        assert [r.operation.name for r in finished.results] == ["delete_real_server"]

    run(scenario())


def test_an_endpoint_that_returns_during_its_drain_gets_its_weight_back() -> None:
    async def scenario() -> None:
        tracker, backend, syncer = await removing_a_connected_endpoint(
            RealServerConnections(active=1, inactive=0)
        )
        await syncer.sync()

        tracker.upsert_slice(web_slice("10.244.0.1", "10.244.0.2", rv="3"))
        restored = await syncer.sync()

        assert [r.operation.name for r in restored.results] == ["update_real_server"]
        assert backend.dump_sync().weight(VIRTUAL, real("10.244.0.2")) == 1
        assert (await syncer.drain()).results == ()

    run(scenario())


def test_a_udp_endpoint_is_deleted_at_once() -> None:
    async def scenario() -> None:
        dns = service("dns", cluster_ips="10.96.0.10", ports=[port("dns", 53, "UDP")])
        dns_slice = endpoint_slice(
            "dns",
            endpoints=[endpoint("10.244.0.1"), endpoint("10.244.0.2")],
            ports=[slice_port("dns", 53, "UDP")],
        )
        tracker = listed_tracker(dns, dns_slice)
        syncer = Syncer(tracker, CTX, MemoryBackend())
        await syncer.start()
        tracker.upsert_slice(
            endpoint_slice(
                "dns",
                endpoints=[endpoint("10.244.0.1")],
                ports=[slice_port("dns", 53, "UDP")],
                resource_version="2",
            )
        )

        report = await syncer.sync()

        assert [r.operation.name for r in report.results] == ["delete_real_server"]

    run(scenario())


def test_the_audit_repairs_what_someone_else_removed() -> None:
    async def scenario() -> None:
        _, backend, syncer = await started(web(), web_slice("10.244.0.1", "10.244.0.2"))
        expected = backend.dump_sync()
        backend.apply_sync([DeleteVirtualServer(VIRTUAL)])  # an operator's ipvsadm -D

        report = await syncer.audit()

        assert report.ok and len(report.results) == 3  # the virtual server and its two real servers
        assert syncer.counters.audit_repairs == 3
        assert backend.dump_sync() == expected
        assert (await syncer.audit()).results == ()

    run(scenario())


class _Unreachable(MemoryBackend):
    """A kernel that cannot be reached at all for a while: apply raises instead of answering."""

    down = True

    async def apply(self, operations: Sequence[Operation]) -> list[OperationResult]:
        if self.down:
            raise BackendError("netlink socket closed")
        return await super().apply(operations)


def test_changes_taken_by_a_sync_that_could_not_reach_the_kernel_are_not_lost() -> None:
    async def scenario() -> None:
        backend = _Unreachable()
        backend.down = False
        tracker, _, syncer = await started(web(), web_slice("10.244.0.1"), backend=backend)
        tracker.upsert_slice(web_slice("10.244.0.1", "10.244.0.2", rv="2"))
        backend.down = True

        with pytest.raises(BackendError):
            await syncer.sync()

        backend.down = False
        report = await syncer.sync()
        assert [r.operation.name for r in report.results] == ["add_real_server"]
        assert backend.dump_sync().weight(VIRTUAL, real("10.244.0.2")) == 1

    run(scenario())


# --- a state mismatch re-reads only the objects concerned ---------------------------------------------------

VIP = ip_address("10.96.0.1")
OTHER_VIRTUAL = VirtualServerKey(L4Protocol.TCP, ip_address("10.96.0.2"), 80)


def other_service() -> list[dict[str, Any]]:
    return [
        service("other", cluster_ips="10.96.0.2", ports=[port("http", 80)]),
        endpoint_slice("other", endpoints=[endpoint("10.244.0.5")], ports=[slice_port()]),
    ]


def _identity(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def move_to(tracker: ChangeTracker, start: list[dict[str, Any]], end: list[dict[str, Any]]) -> None:
    """Upsert every object of ``end`` (those unchanged since ``start`` mark nothing dirty); delete the
    others of ``start``."""
    for obj in end:
        upsert(tracker, obj)
    kept = {_identity(obj) for obj in end}
    for obj in start:
        if _identity(obj) not in kept:
            delete = tracker.delete_service if obj["kind"] == "Service" else tracker.delete_slice
            delete("default", obj["metadata"]["name"])


@pytest.mark.parametrize(
    ("start", "behind_its_back", "end", "refused", "read", "repairs"),
    [
        pytest.param(
            [web(), web_slice("10.244.0.1")],
            [AddRealServer(VIRTUAL, RealServer(ip_address("10.244.0.2"), 8080, 5))],
            [web(), web_slice("10.244.0.1", "10.244.0.2", rv="2")],
            ("add_real_server", EEXIST),
            Read(frozenset({VIRTUAL}), frozenset()),
            ["update_real_server"],  # the weight someone else gave it is set right
            id="real-server-added-behind-its-back-eexist",
        ),
        pytest.param(
            [web(), web_slice("10.244.0.1", "10.244.0.2")],
            [DeleteRealServer(VIRTUAL, real("10.244.0.2"))],
            [web(), web_slice("10.244.0.1", rv="2")],
            ("update_real_server", ENOENT),  # the drain's weight 0 of a real server that is gone
            Read(frozenset({VIRTUAL}), frozenset()),
            [],
            id="real-server-deleted-behind-its-back-enoent",
        ),
        pytest.param(
            [web(), web_slice("10.244.0.1")],
            [DeleteVirtualServer(VIRTUAL)],
            [web(), web_slice("10.244.0.1", "10.244.0.2", rv="2")],
            ("add_real_server", ESRCH),
            Read(frozenset({VIRTUAL}), frozenset()),
            ["add_virtual_server", "add_real_server", "add_real_server"],  # read as absent: added back whole
            id="virtual-server-deleted-behind-its-back-esrch",
        ),
        pytest.param(
            [],
            [BindAddress(VIP)],
            [web(), web_slice("10.244.0.1")],
            ("bind_address", EEXIST),
            Read(frozenset(), frozenset({VIP})),
            [],
            id="address-bound-behind-its-back-eexist",
        ),
        pytest.param(
            [web(), web_slice("10.244.0.1")],
            [UnbindAddress(VIP)],
            [],
            ("unbind_address", EADDRNOTAVAIL),
            Read(frozenset(), frozenset({VIP})),
            [],
            id="address-unbound-behind-its-back-eaddrnotavail",
        ),
    ],
)
def test_a_state_mismatch_reads_only_that_object_and_the_next_sync_converges(
    start: list[dict[str, Any]],
    behind_its_back: list[Operation],
    end: list[dict[str, Any]],
    refused: tuple[str, int],
    read: Read,
    repairs: list[str],
) -> None:
    async def scenario() -> None:
        tracker, backend, syncer = await started(
            *start, *other_service(), drain_clock=DrainClock(grace_period=0)
        )
        assert (backend.dumps, backend.reads) == (1, [])  # start adopts the kernel's state: one full dump
        assert all(result.ok for result in backend.apply_sync(behind_its_back))
        move_to(tracker, start, end)

        mismatched = await syncer.sync()

        assert [(r.operation.name, r.errno) for r in mismatched.failures] == [refused]
        assert backend.dumps == 1  # no second full dump ...
        assert backend.reads == [read]  # ... one read of exactly the object the kernel disagreed about

        repaired = await syncer.sync()
        await syncer.drain()

        assert repaired.ok and [r.operation.name for r in repaired.results] == repairs
        assert backend.dump_sync() == from_scratch(
            [o for o in [*end, *other_service()] if o["kind"] == "Service"],
            [o for o in [*end, *other_service()] if o["kind"] != "Service"],
        )
        assert (await syncer.sync()).results == ()
        assert (backend.dumps, len(backend.reads)) == (1, 1)

    run(scenario())


def test_a_read_holds_only_the_virtual_servers_and_addresses_asked_for() -> None:
    async def scenario() -> None:
        backend = MemoryBackend()
        programmed: list[Operation] = [
            BindAddress(VIP),
            BindAddress(OTHER_VIRTUAL.address),
            AddVirtualServer(VIRTUAL, VirtualServerSpec("sh", 60, frozenset({"flag-2"}))),
            AddRealServer(VIRTUAL, RealServer(ip_address("10.244.0.1"), 8080, 3)),
            AddVirtualServer(OTHER_VIRTUAL, VirtualServerSpec()),
            AddRealServer(OTHER_VIRTUAL, RealServer(ip_address("10.244.0.5"), 8080, 1)),
        ]
        assert all(result.ok for result in backend.apply_sync(programmed))
        # Nothing in memory is foreign: a virtual server the backend does not hold is one it does not own.
        not_owned = VirtualServerKey(L4Protocol.UDP, VIP, 53)
        unbound = ip_address("10.96.0.99")

        state = await backend.read([VIRTUAL, not_owned], [VIP, unbound])

        expected = IPVSState()
        for op in programmed[:1] + programmed[2:4]:
            expected.apply(op)
        assert state == expected
        assert not state.has_virtual(not_owned) and not state.is_bound(unbound)
        assert backend.reads == [Read(frozenset({VIRTUAL, not_owned}), frozenset({VIP, unbound}))]
        assert backend.dumps == 0

    run(scenario())
