"""Incrementality and failure attribution of the IPVS backend on a real kernel.

- One endpoint change costs the same few netlink requests at 100 and at 1,000 programmed services (counted
  with ``IPVSBackend.netlink_messages_sent``: the IPVS write requests sent; reads and address changes are not
  in it), and the kernel shows exactly that change.
- Failures inside a batch: every other operation of the batch is applied, each failing one gets its own
  errno, the results come back in order, also when the operations span several batches; the real servers of
  a virtual server the kernel refused are not sent at all (a foreign one holding the key stays untouched).
- A service the kernel refuses is retried on the next sync, never blocks the other services, and is
  programmed as soon as the obstacle is gone.

Every kernel check reads IPVS with ipvsadm (netlab's parser), never through the code under test.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Protocol

import pytest

from aproxy.backends.base import OperationResult
from aproxy.backends.ipvs import IPVSBackend, IPVSSettings
from aproxy.core.changes import ChangeTracker
from aproxy.core.model import (
    AddRealServer,
    AddVirtualServer,
    DeleteRealServer,
    DeleteVirtualServer,
    L4Protocol,
    Operation,
    RealServer,
    RealServerKey,
    ServiceKey,
    UpdateRealServer,
    UpdateVirtualServer,
    VirtualServerKey,
    VirtualServerSpec,
)
from aproxy.core.translate import TranslationContext
from aproxy.syncer import Syncer, SyncReport
from tests.core import k8s
from tests.kernel import netlab

pytestmark = pytest.mark.kernel

NODE_IP = IPv4Address("192.0.2.10")
CTX = TranslationContext(node_name="node-a", node_addresses=frozenset({NODE_IP}))
SERVICE_PORT = 80
TARGET_PORT = 8080
# Service i: cluster IP FIRST_CLUSTER_IP + i; its endpoints from FIRST_ENDPOINT + i * ENDPOINT_BLOCK on, so
# every service has addresses of its own and room for one more endpoint.
FIRST_CLUSTER_IP = IPv4Address("10.100.0.0")
FIRST_ENDPOINT = IPv4Address("10.150.0.0")
ENDPOINT_BLOCK = 16
ENDPOINTS = 10
# In every cluster of the incrementality test: a ClusterIP service (one virtual server for its port) and a
# NodePort service (two: the cluster IP and the node address).
CLUSTER_IP_SUBJECT = 7
NODE_PORT_SUBJECT = 8
NODE_PORT = 30008


@pytest.fixture
def settings(tmp_path: Path) -> IPVSSettings:
    return IPVSSettings(state_file=tmp_path / "owned.json", batch_messages=512)


# --- aproxy on the node, driven from a synchronous test -----------------------------------------------------


class Aproxy:
    """One Syncer over one IPVSBackend on a private event loop, so the test body stays synchronous.

    netlab's helpers block (processes, sockets); calling them between ``runner.run`` calls keeps them out of
    any coroutine.
    """

    def __init__(self, runner: asyncio.Runner, backend: IPVSBackend, syncer: Syncer) -> None:
        self._runner = runner
        self.backend = backend
        self.syncer = syncer

    def start(self) -> SyncReport:
        return self._runner.run(self.syncer.start())

    def sync(self) -> SyncReport:
        return self._runner.run(self.syncer.sync())

    def drain(self) -> SyncReport:
        return self._runner.run(self.syncer.drain())

    def apply(self, operations: Sequence[Operation]) -> list[OperationResult]:
        return self._runner.run(self.backend.apply(operations))

    @property
    def messages_sent(self) -> int:
        return self.backend.netlink_messages_sent

    @property
    def batches_sent(self) -> int:
        return self.backend.netlink_batches_sent


@contextmanager
def running_aproxy(tracker: ChangeTracker, settings: IPVSSettings) -> Iterator[Aproxy]:
    with asyncio.Runner() as runner:
        # The backend's async context, entered and left across run() calls.
        backend = runner.run(IPVSBackend(settings).__aenter__())
        try:
            yield Aproxy(runner, backend, Syncer(tracker, CTX, backend))
        finally:
            runner.run(backend.__aexit__(None, None, None))


# --- the cluster --------------------------------------------------------------------------------------------


def cluster_ip(index: int) -> IPv4Address:
    return FIRST_CLUSTER_IP + index


def endpoint_address(index: int, number: int) -> IPv4Address:
    return FIRST_ENDPOINT + index * ENDPOINT_BLOCK + number


def service_name(index: int) -> str:
    return f"svc-{index}"


def service_key(index: int) -> ServiceKey:
    return ServiceKey("default", service_name(index))


def service_object(index: int, *, node_port: int | None = None, scheduler: str | None = None) -> k8s.Obj:
    return k8s.service(
        service_name(index),
        type_="NodePort" if node_port is not None else None,
        cluster_ips=str(cluster_ip(index)),
        ports=[k8s.port("http", SERVICE_PORT, target_port=TARGET_PORT, node_port=node_port)],
        scheduler=scheduler,
    )


def slice_object(index: int, addresses: Iterable[IPv4Address]) -> k8s.Obj:
    endpoints = [k8s.endpoint(str(address), node="node-a") for address in addresses]
    return k8s.endpoint_slice(service_name(index), endpoints=endpoints)


def default_endpoints(index: int) -> list[IPv4Address]:
    return [endpoint_address(index, number) for number in range(ENDPOINTS)]


def listed_tracker(services: Iterable[tuple[k8s.Obj, k8s.Obj]]) -> ChangeTracker:
    tracker = ChangeTracker()
    for service, endpoint_slice in services:
        tracker.upsert_service(service)
        tracker.upsert_slice(endpoint_slice)
    tracker.mark_listed("services")
    tracker.mark_listed("endpointslices")
    return tracker


def cluster_of(size: int) -> ChangeTracker:
    """``size`` services with ten endpoints each; NODE_PORT_SUBJECT is a NodePort service."""
    return listed_tracker(
        (
            service_object(index, node_port=NODE_PORT if index == NODE_PORT_SUBJECT else None),
            slice_object(index, default_endpoints(index)),
        )
        for index in range(size)
    )


def cluster_virtual_server(index: int) -> VirtualServerKey:
    return VirtualServerKey(L4Protocol.TCP, cluster_ip(index), SERVICE_PORT)


NODE_VIRTUAL_SERVER = VirtualServerKey(L4Protocol.TCP, NODE_IP, NODE_PORT)
# The virtual servers of each subject's one service port.
SUBJECT_VIRTUAL_SERVERS = {
    CLUSTER_IP_SUBJECT: (cluster_virtual_server(CLUSTER_IP_SUBJECT),),
    NODE_PORT_SUBJECT: (cluster_virtual_server(NODE_PORT_SUBJECT), NODE_VIRTUAL_SERVER),
}
# IPVS requests of one endpoint change (add, weight 0, delete): one per virtual server of the port.
REQUESTS_PER_CHANGE = {CLUSTER_IP_SUBJECT: 1, NODE_PORT_SUBJECT: 2}


def real(address: IPv4Address, weight: int = 1) -> RealServer:
    return RealServer(address, TARGET_PORT, weight)


def real_key(address: IPv4Address) -> RealServerKey:
    return RealServerKey(address, TARGET_PORT)


# --- reading the kernel -------------------------------------------------------------------------------------


def kernel_weights(key: VirtualServerKey) -> dict[RealServerKey, int]:
    """The real servers of one virtual server, as ``ipvsadm -Ln -t ADDRESS:PORT`` shows them."""
    flag = {L4Protocol.TCP: "-t", L4Protocol.UDP: "-u", L4Protocol.SCTP: "--sctp-service"}[key.protocol]
    output = netlab.ipvsadm("-Ln", flag, netlab.endpoint_text(key.address, key.port))
    return netlab.parse_ipvs(output).get(key).weights


def operations(report: SyncReport) -> list[Operation]:
    return [result.operation for result in report.results]


def failures(report: SyncReport) -> list[tuple[Operation, int | None]]:
    return [(result.operation, result.errno) for result in report.failures]


# --- one endpoint change against a programmed cluster -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    report: SyncReport
    messages: int  # IPVS requests the change sent


def change_endpoints(
    aproxy: Aproxy, tracker: ChangeTracker, index: int, addresses: list[IPv4Address]
) -> Change:
    tracker.upsert_slice(slice_object(index, addresses))
    before = aproxy.messages_sent
    report = aproxy.sync()
    return Change(report, aproxy.messages_sent - before)


def drain_now(aproxy: Aproxy) -> Change:
    before = aproxy.messages_sent
    report = aproxy.drain()
    return Change(report, aproxy.messages_sent - before)


@pytest.mark.parametrize(
    "size", [pytest.param(100, id="100-services"), pytest.param(1000, id="1000-services")]
)
def test_one_endpoint_change_sends_one_request_per_virtual_server_at_any_size(
    settings: IPVSSettings, size: int
) -> None:
    tracker = cluster_of(size)
    with running_aproxy(tracker, settings) as aproxy:
        started = aproxy.start()
        assert started.ok and started.services == size, started.failures
        assert len(netlab.read_ipvs()) == size + 1  # the NodePort service has a second virtual server

        for index in (CLUSTER_IP_SUBJECT, NODE_PORT_SUBJECT):
            assert_adding_one_endpoint_is_incremental(aproxy, tracker, index)
        for index in (CLUSTER_IP_SUBJECT, NODE_PORT_SUBJECT):
            assert_removing_one_endpoint_is_incremental(aproxy, tracker, index)


def assert_adding_one_endpoint_is_incremental(aproxy: Aproxy, tracker: ChangeTracker, index: int) -> None:
    virtual_servers = SUBJECT_VIRTUAL_SERVERS[index]
    added = endpoint_address(index, ENDPOINTS)
    endpoints = [*default_endpoints(index), added]

    change = change_endpoints(aproxy, tracker, index, endpoints)

    assert change.report.ok and change.report.services == 1
    assert operations(change.report) == [AddRealServer(key, real(added)) for key in virtual_servers]
    assert change.messages == REQUESTS_PER_CHANGE[index]
    for key in virtual_servers:
        assert kernel_weights(key) == {real_key(address): 1 for address in endpoints}


def assert_removing_one_endpoint_is_incremental(aproxy: Aproxy, tracker: ChangeTracker, index: int) -> None:
    virtual_servers = SUBJECT_VIRTUAL_SERVERS[index]
    removed = endpoint_address(index, 0)
    kept = [endpoint_address(index, number) for number in range(1, ENDPOINTS + 1)]

    change = change_endpoints(aproxy, tracker, index, kept)

    # TCP: weight 0 first (no new connections), one request per virtual server ...
    assert change.report.ok and change.report.services == 1
    assert operations(change.report) == [UpdateRealServer(key, real(removed, 0)) for key in virtual_servers]
    assert change.messages == REQUESTS_PER_CHANGE[index]
    for key in virtual_servers:
        assert kernel_weights(key) == {real_key(removed): 0} | {real_key(address): 1 for address in kept}

    # ... then, with no connection left, the delete: again one request per virtual server.
    drained = drain_now(aproxy)

    assert drained.report.ok
    assert operations(drained.report) == [DeleteRealServer(key, real_key(removed)) for key in virtual_servers]
    assert drained.messages == REQUESTS_PER_CHANGE[index]
    for key in virtual_servers:
        assert kernel_weights(key) == {real_key(address): 1 for address in kept}


# --- failures inside batches --------------------------------------------------------------------------------

BATCH_VIRTUAL_A = VirtualServerKey(L4Protocol.TCP, IPv4Address("10.97.0.1"), 80)
BATCH_VIRTUAL_B = VirtualServerKey(L4Protocol.TCP, IPv4Address("10.97.0.2"), 80)
UNKNOWN_SCHEDULER_VIRTUAL = VirtualServerKey(L4Protocol.TCP, IPv4Address("10.97.0.3"), 80)
FOREIGN_BATCH_VIRTUAL = VirtualServerKey(L4Protocol.TCP, IPv4Address("10.97.0.4"), 80)
MISSING_VIRTUAL = VirtualServerKey(L4Protocol.TCP, IPv4Address("10.97.0.99"), 80)
# Shorter than IP_VS_SCHEDNAME_MAXLEN (16 with its NUL): a longer name is refused as EINVAL instead.
UNKNOWN_SCHEDULER = VirtualServerSpec(scheduler="nosuchsched")
REAL_1 = IPv4Address("10.151.0.1")
REAL_2 = IPv4Address("10.151.0.2")
ABSENT_REAL = IPv4Address("10.151.0.99")
FOREIGN_BATCH_REAL = RealServerKey(IPv4Address("10.151.9.9"), 80)
OK = 0

# Valid operations with failing ones in between, and each one's outcome (0: applied). The kernel says ESRCH
# for a virtual server that does not exist, ENOENT for a real server that does not exist and for a scheduler
# it cannot load, EEXIST for a duplicate. Virtual server adds go out first: a real server of one the kernel
# refused is not sent at all (ECANCELED), or it would land in whatever holds the key (here a foreign one).
MIXED_BATCH: tuple[tuple[Operation, int], ...] = (
    (AddVirtualServer(BATCH_VIRTUAL_A, VirtualServerSpec()), OK),
    (AddRealServer(BATCH_VIRTUAL_A, real(REAL_1)), OK),
    (AddRealServer(MISSING_VIRTUAL, real(REAL_1)), errno.ESRCH),
    (AddVirtualServer(UNKNOWN_SCHEDULER_VIRTUAL, UNKNOWN_SCHEDULER), errno.ENOENT),
    (AddRealServer(BATCH_VIRTUAL_A, real(REAL_2)), OK),
    (AddVirtualServer(FOREIGN_BATCH_VIRTUAL, VirtualServerSpec()), errno.EEXIST),
    (AddRealServer(FOREIGN_BATCH_VIRTUAL, real(REAL_1)), errno.ECANCELED),
    (AddRealServer(BATCH_VIRTUAL_A, real(REAL_1)), errno.EEXIST),
    (DeleteRealServer(BATCH_VIRTUAL_A, real_key(ABSENT_REAL)), errno.ENOENT),
    (AddVirtualServer(BATCH_VIRTUAL_B, VirtualServerSpec("wrr")), OK),
    (AddRealServer(BATCH_VIRTUAL_B, real(REAL_1)), OK),
    (UpdateRealServer(BATCH_VIRTUAL_B, real(ABSENT_REAL, 3)), errno.ENOENT),
    (UpdateRealServer(BATCH_VIRTUAL_B, real(REAL_1, 5)), OK),
    (DeleteVirtualServer(MISSING_VIRTUAL), errno.ESRCH),
    (AddRealServer(BATCH_VIRTUAL_B, real(REAL_2)), OK),
)


def assert_attributed(results: list[OperationResult], expected: Sequence[tuple[Operation, int]]) -> None:
    assert [result.operation for result in results] == [operation for operation, _ in expected]
    assert [(result.errno or OK, result.ok) for result in results] == [
        (code, code == OK) for _, code in expected
    ]
    assert all(result.error for result in results if not result.ok)


@pytest.fixture
def foreign_in_batch() -> None:
    """Someone else's virtual server on a key the mixed batch adds."""
    target = netlab.endpoint_text(FOREIGN_BATCH_VIRTUAL.address, FOREIGN_BATCH_VIRTUAL.port)
    netlab.ipvsadm("-A", "-t", target, "-s", "wlc")
    netlab.ipvsadm("-a", "-t", target, "-r", str(FOREIGN_BATCH_REAL), "-m", "-w", "3")


def test_failures_inside_a_batch_are_each_attributed_and_the_rest_applied(
    settings: IPVSSettings, foreign_in_batch: None
) -> None:
    operations = [operation for operation, _ in MIXED_BATCH]
    with running_aproxy(ChangeTracker(), settings) as aproxy:
        batches, messages = aproxy.batches_sent, aproxy.messages_sent

        results = aproxy.apply(operations)

        # One batch of virtual server adds, one of everything else; the cancelled operation never sent.
        assert aproxy.batches_sent - batches == 2
        assert aproxy.messages_sent - messages == len(operations) - 1
    assert_attributed(results, MIXED_BATCH)
    table = netlab.read_ipvs()
    assert table.keys() == {BATCH_VIRTUAL_A, BATCH_VIRTUAL_B, FOREIGN_BATCH_VIRTUAL}
    assert table.get(BATCH_VIRTUAL_A).weights == {real_key(REAL_1): 1, real_key(REAL_2): 1}
    assert table.get(BATCH_VIRTUAL_B).spec == VirtualServerSpec("wrr")
    assert table.get(BATCH_VIRTUAL_B).weights == {real_key(REAL_1): 5, real_key(REAL_2): 1}
    foreign = table.get(FOREIGN_BATCH_VIRTUAL)
    assert (foreign.scheduler, foreign.weights) == ("wlc", {FOREIGN_BATCH_REAL: 3})


BIG_BATCH = 1500
REALS_PER_VIRTUAL = 10
# With batch_messages=512: chunks [0, 512), [512, 1024), [1024, 1500). Failures at both ends of every chunk
# (the last message of a chunk is the one that asks for the acknowledgement) and in the middle of each.
FAILING_POSITIONS = (0, 300, 511, 512, 800, 1023, 1024, 1200, 1499)

Table = dict[VirtualServerKey, dict[RealServerKey, int]]


def big_batch_virtual(number: int) -> VirtualServerKey:
    return VirtualServerKey(L4Protocol.TCP, IPv4Address("10.98.0.0") + number, 80)


def big_batch_real(number: int, member: int) -> IPv4Address:
    return IPv4Address("10.152.0.0") + number * 16 + member


def real_server_adds(count: int) -> tuple[list[AddVirtualServer], list[Operation], Table]:
    """Virtual servers, ``count`` real server adds spread over them, and the table they make together."""
    virtual_adds: list[AddVirtualServer] = []
    real_adds: list[Operation] = []
    table: Table = {}
    for position in range(count):
        number, member = divmod(position, REALS_PER_VIRTUAL)
        key = big_batch_virtual(number)
        if member == 0:
            virtual_adds.append(AddVirtualServer(key, VirtualServerSpec()))
            table[key] = {}
        address = big_batch_real(number, member)
        real_adds.append(AddRealServer(key, real(address)))
        table[key][real_key(address)] = 1
    return virtual_adds, real_adds, table


def failing_operation(position: int) -> tuple[Operation, int]:
    """A rejected operation for this position: a missing virtual server, a duplicate, or a missing real."""
    first = big_batch_virtual(0)
    kinds: tuple[tuple[Operation, int], ...] = (
        (AddRealServer(MISSING_VIRTUAL, real(REAL_1)), errno.ESRCH),
        (AddRealServer(first, real(big_batch_real(0, 0))), errno.EEXIST),
        (DeleteRealServer(first, real_key(ABSENT_REAL)), errno.ENOENT),
    )
    return kinds[FAILING_POSITIONS.index(position) % len(kinds)]


def test_failures_in_several_batches_are_each_attributed_and_the_rest_applied(tmp_path: Path) -> None:
    settings = IPVSSettings(state_file=tmp_path / "owned.json", batch_messages=512)
    virtual_adds, real_adds, table = real_server_adds(BIG_BATCH - len(FAILING_POSITIONS))
    remaining = iter(real_adds)
    # Position 0 fails with ESRCH, which needs no earlier operation; the duplicates at 300 and later repeat
    # the add at position 1. Only real server operations: they go out in exactly this order.
    expected = [
        failing_operation(position) if position in FAILING_POSITIONS else (next(remaining), OK)
        for position in range(BIG_BATCH)
    ]

    with running_aproxy(ChangeTracker(), settings) as aproxy:
        assert all(result.ok for result in aproxy.apply(virtual_adds))
        batches, messages = aproxy.batches_sent, aproxy.messages_sent

        results = aproxy.apply([operation for operation, _ in expected])

        assert (aproxy.batches_sent - batches, aproxy.messages_sent - messages) == (3, BIG_BATCH)
    assert_attributed(results, expected)
    kernel = netlab.read_ipvs()
    assert {entry.key: entry.weights for entry in kernel.virtual_servers} == table


# --- a refused service is retried and blocks nothing --------------------------------------------------------

OTHER = 1
BLOCKED = 2
GROWING = 3
BLOCKED_ENDPOINTS = (IPv4Address("10.244.200.5"), IPv4Address("10.244.200.6"))


class Obstacle(Protocol):
    """Something on the node that makes the kernel refuse the blocked service, until it is removed."""

    def blocked_service(self) -> k8s.Obj: ...

    def refusals(self) -> list[tuple[Operation, int | None]]: ...

    def install(self) -> None: ...

    def remove(self) -> None: ...


class BroadcastRoute:
    """A broadcast route over the blocked service's endpoints: IPVS refuses such real servers (EINVAL)."""

    NETWORK = "10.244.200.0/24"

    def __init__(self) -> None:
        self._installed = False

    def blocked_service(self) -> k8s.Obj:
        return service_object(BLOCKED)

    def refusals(self) -> list[tuple[Operation, int | None]]:
        key = cluster_virtual_server(BLOCKED)
        return [(AddRealServer(key, real(address)), errno.EINVAL) for address in BLOCKED_ENDPOINTS]

    def install(self) -> None:
        netlab.run("ip", "route", "add", "broadcast", self.NETWORK, "dev", "eth0", "table", "local")
        self._installed = True

    def remove(self) -> None:
        if self._installed:
            netlab.run("ip", "route", "del", "broadcast", self.NETWORK, "dev", "eth0", "table", "local")
            self._installed = False


class MissingScheduler:
    """The blocked service's scheduler module unloaded and not loadable: IPVS refuses the virtual server
    (ENOENT), and its real servers are not even sent (ECANCELED)."""

    MODULE = "ip_vs_sed"
    MODPROBE_SYSCTL = "kernel/modprobe"

    def __init__(self) -> None:
        self._modprobe: str | None = None

    def blocked_service(self) -> k8s.Obj:
        return service_object(BLOCKED, scheduler="sed")

    def refusals(self) -> list[tuple[Operation, int | None]]:
        key = cluster_virtual_server(BLOCKED)
        return [
            (AddVirtualServer(key, VirtualServerSpec("sed")), errno.ENOENT),
            *((AddRealServer(key, real(address)), errno.ECANCELED) for address in BLOCKED_ENDPOINTS),
        ]

    def install(self) -> None:
        self._modprobe = netlab.read_sysctl(self.MODPROBE_SYSCTL)
        netlab.run("modprobe", "-r", self.MODULE)
        # The kernel would load the module on demand; a loader that always fails keeps it out.
        netlab.write_sysctl(self.MODPROBE_SYSCTL, "/bin/false")

    def remove(self) -> None:
        if self._modprobe is not None:
            netlab.write_sysctl(self.MODPROBE_SYSCTL, self._modprobe)
            self._modprobe = None
            netlab.run("modprobe", self.MODULE)  # as the guest booted: later tests expect it loaded


@pytest.fixture(
    params=[
        pytest.param(BroadcastRoute, id="real-server-refused-einval"),
        pytest.param(MissingScheduler, id="scheduler-missing-enoent"),
    ]
)
def obstacle(request: pytest.FixtureRequest) -> Iterator[Obstacle]:
    created: Obstacle = request.param()
    created.install()
    try:
        yield created
    finally:
        created.remove()


def three_services(blocked: k8s.Obj) -> ChangeTracker:
    return listed_tracker(
        [
            (service_object(OTHER), slice_object(OTHER, default_endpoints(OTHER)[:2])),
            (blocked, slice_object(BLOCKED, BLOCKED_ENDPOINTS)),
            (service_object(GROWING), slice_object(GROWING, default_endpoints(GROWING)[:2])),
        ]
    )


def test_a_refused_service_is_retried_every_sync_and_never_blocks_the_others(
    settings: IPVSSettings, obstacle: Obstacle
) -> None:
    tracker = three_services(obstacle.blocked_service())
    blocked_key = cluster_virtual_server(BLOCKED)
    with running_aproxy(tracker, settings) as aproxy:
        first = aproxy.start()

        assert first.failed_services == {service_key(BLOCKED)}
        assert failures(first) == obstacle.refusals()
        for index in (OTHER, GROWING):
            assert kernel_weights(cluster_virtual_server(index)) == {
                real_key(address): 1 for address in default_endpoints(index)[:2]
            }

        # The next pass retries the refused service together with a change to another one: the change is
        # applied in that same pass.
        grown = default_endpoints(GROWING)[:3]
        second = change_endpoints(aproxy, tracker, GROWING, grown).report

        assert second.services == 2
        assert second.failed_services == {service_key(BLOCKED)}
        assert failures(second) == obstacle.refusals()
        assert [result.operation for result in second.results if result.ok] == [
            AddRealServer(cluster_virtual_server(GROWING), real(grown[2]))
        ]
        assert kernel_weights(cluster_virtual_server(GROWING)) == {real_key(address): 1 for address in grown}
        assert aproxy.syncer.pending_retries == {service_key(BLOCKED)}

        obstacle.remove()
        third = aproxy.sync()

        assert third.ok and third.services == 1 and third.failed_services == frozenset()
        assert kernel_weights(blocked_key) == {real_key(address): 1 for address in BLOCKED_ENDPOINTS}
        assert aproxy.sync().results == ()


FOREIGN_NODE_PORT = 30080
FOREIGN_VIRTUAL = VirtualServerKey(L4Protocol.TCP, NODE_IP, FOREIGN_NODE_PORT)
FOREIGN_REAL = RealServerKey(IPv4Address("10.244.9.9"), 80)


@pytest.fixture
def foreign_on_node_port() -> None:
    """keepalived's (or an operator's) virtual server on the node address and port a NodePort wants."""
    target = netlab.endpoint_text(NODE_IP, FOREIGN_NODE_PORT)
    netlab.ipvsadm("-A", "-t", target, "-s", "wlc")
    netlab.ipvsadm("-a", "-t", target, "-r", str(FOREIGN_REAL), "-m", "-w", "3")


def node_port_cluster() -> ChangeTracker:
    return listed_tracker(
        [
            (service_object(OTHER), slice_object(OTHER, default_endpoints(OTHER)[:2])),
            (
                service_object(BLOCKED, node_port=FOREIGN_NODE_PORT),
                slice_object(BLOCKED, default_endpoints(BLOCKED)[:2]),
            ),
        ]
    )


def test_a_foreign_virtual_server_on_a_node_port_blocks_only_that_service_until_it_is_gone(
    settings: IPVSSettings, foreign_on_node_port: None
) -> None:
    wanted = {real_key(address): 1 for address in default_endpoints(BLOCKED)[:2]}
    with running_aproxy(node_port_cluster(), settings) as aproxy:
        first = aproxy.start()
        second = aproxy.sync()
        netlab.ipvsadm("-D", "-t", netlab.endpoint_text(NODE_IP, FOREIGN_NODE_PORT))  # the operator's move
        third = aproxy.sync()

    for refused in (first, second):
        assert refused.failed_services == {service_key(BLOCKED)}
        assert (AddVirtualServer(FOREIGN_VIRTUAL, VirtualServerSpec()), errno.EEXIST) in failures(refused)
        assert {virtual_of(operation) for operation, _ in failures(refused)} == {FOREIGN_VIRTUAL}
    assert second.services == 1
    assert third.ok and third.failed_services == frozenset()
    table = netlab.read_ipvs()
    assert table.get(FOREIGN_VIRTUAL).spec == VirtualServerSpec()
    assert table.get(FOREIGN_VIRTUAL).weights == wanted
    assert table.get(cluster_virtual_server(BLOCKED)).weights == wanted
    assert table.get(cluster_virtual_server(OTHER)).weights == {
        real_key(address): 1 for address in default_endpoints(OTHER)[:2]
    }


def test_a_foreign_virtual_server_on_a_node_port_is_never_changed(
    settings: IPVSSettings, foreign_on_node_port: None
) -> None:
    with running_aproxy(node_port_cluster(), settings) as aproxy:
        aproxy.start()

    foreign = netlab.read_ipvs().get(FOREIGN_VIRTUAL)
    assert (foreign.scheduler, foreign.weights) == ("wlc", {FOREIGN_REAL: 3})


def virtual_of(operation: Operation) -> VirtualServerKey:
    match operation:
        case AddVirtualServer(key=key) | UpdateVirtualServer(key=key) | DeleteVirtualServer(key=key):
            return key
        case AddRealServer(virtual=key) | UpdateRealServer(virtual=key) | DeleteRealServer(virtual=key):
            return key
    raise AssertionError(f"not an IPVS operation: {operation}")
