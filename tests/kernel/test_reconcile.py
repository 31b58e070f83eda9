"""Reconciling after a state-mismatch answer reads only the virtual servers concerned, on a real kernel.

When the kernel answers ENOENT, ESRCH or EEXIST, the applied state was wrong about one object: the Syncer
re-reads just that object (``IPVSBackend.read``: one get request per owned virtual server, one dump of its
real servers when it exists) instead of dumping every virtual server of the node. Counted with the
backend's ``netlink_dumps_sent`` and ``netlink_gets_sent``; the kernel's final state is read with ipvsadm
(netlab's parser), never through the code under test.

- A real server deleted behind aproxy's back (``ipvsadm -d``), then changed by aproxy: ENOENT, one get and
  one real server dump, and the next sync leaves the kernel exactly as desired.
- A virtual server deleted behind its back (``ipvsadm -D``), then given a real server: ESRCH, one get and no
  dump (it is read as absent), and the next sync adds it back whole.
- ``read`` leaves out a foreign virtual server (not asked about at all), as ``dump`` does, and reads the
  ownership of a NodePort-like one from the record.
- ``IPVSSocket.service`` reads each virtual server as the service dump does, IPv6 and SCTP included.
"""

from __future__ import annotations

import asyncio
import errno
from ipaddress import IPv4Address, ip_address
from pathlib import Path

import pytest

from aproxy.backends.ipvs import IPVSBackend, IPVSSettings
from aproxy.backends.ipvs_socket import IPVSSocket
from aproxy.core.changes import ChangeTracker
from aproxy.core.model import (
    AddRealServer,
    AddVirtualServer,
    BindAddress,
    DeleteRealServer,
    L4Protocol,
    Operation,
    RealServer,
    RealServerKey,
    UpdateRealServer,
    VirtualServerKey,
    VirtualServerSpec,
)
from aproxy.core.state import IPVSState
from tests.core import k8s
from tests.kernel import netlab
from tests.kernel.test_incremental import (
    NODE_IP,
    SERVICE_PORT,
    TARGET_PORT,
    Aproxy,
    cluster_ip,
    endpoint_address,
    failures,
    real,
    real_key,
    running_aproxy,
    service_name,
)
from tests.kernel.test_ipvs_dump import ADOPTED, FOREIGN, TABLE, add_foreign_entries, key_of, table_operations

pytestmark = pytest.mark.kernel

SERVICES = 5
SUBJECT = 2
ENDPOINTS = 3
IPVSADM_PROTOCOL = {L4Protocol.TCP: "-t", L4Protocol.UDP: "-u"}


@pytest.fixture
def settings(tmp_path: Path) -> IPVSSettings:
    return IPVSSettings(state_file=tmp_path / "owned.json")


# --- a small cluster: SERVICES services of one port, ENDPOINTS endpoints each ------------------------------


def endpoints(index: int, count: int = ENDPOINTS) -> list[IPv4Address]:
    return [endpoint_address(index, number) for number in range(count)]


def service_object(index: int, protocol: L4Protocol) -> k8s.Obj:
    ports = [k8s.port("http", SERVICE_PORT, protocol.value, target_port=TARGET_PORT)]
    return k8s.service(service_name(index), cluster_ips=str(cluster_ip(index)), ports=ports)


def slice_object(index: int, addresses: list[IPv4Address], protocol: L4Protocol, rv: str = "1") -> k8s.Obj:
    return k8s.endpoint_slice(
        service_name(index),
        endpoints=[k8s.endpoint(str(address), node="node-a") for address in addresses],
        ports=[k8s.slice_port("http", TARGET_PORT, protocol.value)],
        resource_version=rv,
    )


def cluster(protocol: L4Protocol) -> ChangeTracker:
    tracker = ChangeTracker()
    for index in range(SERVICES):
        tracker.upsert_service(service_object(index, protocol))
        tracker.upsert_slice(slice_object(index, endpoints(index), protocol))
    tracker.mark_listed("services")
    tracker.mark_listed("endpointslices")
    return tracker


def virtual(index: int, protocol: L4Protocol) -> VirtualServerKey:
    return VirtualServerKey(protocol, cluster_ip(index), SERVICE_PORT)


def virtual_text(key: VirtualServerKey) -> str:
    return netlab.endpoint_text(key.address, key.port)


View = dict[VirtualServerKey, tuple[VirtualServerSpec, dict[RealServerKey, int]]]


def kernel_view() -> View:
    """Every virtual server as ``ipvsadm -Ln`` shows it: its spec and its real servers' weights."""
    return {entry.key: (entry.spec, entry.weights) for entry in netlab.read_ipvs().virtual_servers}


def desired_view(protocol: L4Protocol, subject_endpoints: list[IPv4Address]) -> View:
    view: View = {}
    for index in range(SERVICES):
        addresses = subject_endpoints if index == SUBJECT else endpoints(index)
        view[virtual(index, protocol)] = (VirtualServerSpec(), {real_key(a): 1 for a in addresses})
    return view


def reads_sent(aproxy: Aproxy) -> tuple[int, int]:
    """(IPVS dump requests, IPVS get requests) the backend has sent so far."""
    return aproxy.backend.netlink_dumps_sent, aproxy.backend.netlink_gets_sent


def reads_since(aproxy: Aproxy, before: tuple[int, int]) -> tuple[int, int]:
    dumps, gets = reads_sent(aproxy)
    return dumps - before[0], gets - before[1]


# --- the Syncer reconciles one object, not the node ---------------------------------------------------------

GONE = endpoint_address(SUBJECT, 0)


@pytest.mark.parametrize(
    ("protocol", "refused"),
    [
        pytest.param(
            L4Protocol.TCP,
            UpdateRealServer(virtual(SUBJECT, L4Protocol.TCP), real(GONE, 0)),
            id="tcp-drain-of-a-real-server-that-is-gone",
        ),
        pytest.param(
            L4Protocol.UDP,
            DeleteRealServer(virtual(SUBJECT, L4Protocol.UDP), real_key(GONE)),
            id="udp-delete-of-a-real-server-that-is-gone",
        ),
    ],
)
def test_a_real_server_deleted_behind_its_back_is_read_alone_and_the_next_sync_converges(
    settings: IPVSSettings, protocol: L4Protocol, refused: Operation
) -> None:
    key = virtual(SUBJECT, protocol)
    kept = endpoints(SUBJECT)[1:]
    tracker = cluster(protocol)
    with running_aproxy(tracker, settings) as aproxy:
        started = aproxy.start()
        assert started.ok, started.failures
        netlab.ipvsadm("-d", IPVSADM_PROTOCOL[protocol], virtual_text(key), "-r", str(real_key(GONE)))
        before = reads_sent(aproxy)
        tracker.upsert_slice(slice_object(SUBJECT, kept, protocol, rv="2"))

        mismatched = aproxy.sync()

        assert failures(mismatched) == [(refused, errno.ENOENT)]
        # One get of that virtual server and one dump of its real servers; a full dump would have sent a
        # service dump and one real server dump per virtual server (1 + SERVICES dumps).
        assert reads_since(aproxy, before) == (1, 1)

        repaired = aproxy.sync()
        drained = aproxy.drain()

        assert repaired.ok and repaired.services == 1
        assert repaired.results == ()  # the read showed the kernel already as desired
        assert drained.results == ()
        assert reads_since(aproxy, before) == (1, 1)
    assert kernel_view() == desired_view(protocol, kept)


def test_a_virtual_server_deleted_behind_its_back_is_read_as_absent_and_added_back(
    settings: IPVSSettings,
) -> None:
    protocol = L4Protocol.TCP
    key = virtual(SUBJECT, protocol)
    grown = endpoints(SUBJECT, ENDPOINTS + 1)
    tracker = cluster(protocol)
    with running_aproxy(tracker, settings) as aproxy:
        started = aproxy.start()
        assert started.ok, started.failures
        netlab.ipvsadm("-D", IPVSADM_PROTOCOL[protocol], virtual_text(key))
        before = reads_sent(aproxy)
        tracker.upsert_slice(slice_object(SUBJECT, grown, protocol, rv="2"))

        mismatched = aproxy.sync()

        assert failures(mismatched) == [(AddRealServer(key, real(grown[-1])), errno.ESRCH)]
        # One get, answered ESRCH: no real servers to dump.
        assert reads_since(aproxy, before) == (0, 1)

        repaired = aproxy.sync()

        assert repaired.ok, repaired.failures
        assert [result.operation for result in repaired.results] == [
            AddVirtualServer(key, VirtualServerSpec()),
            *(AddRealServer(key, real(address)) for address in grown),
        ]
        assert aproxy.sync().results == ()
    assert kernel_view() == desired_view(protocol, grown)


# --- IPVSBackend.read and IPVSSocket.service ----------------------------------------------------------------

BOUND = ip_address("10.96.5.1")
UNBOUND = ip_address("10.96.5.2")
OWNED = VirtualServerKey(L4Protocol.TCP, BOUND, 80)
OWNED_SPEC = VirtualServerSpec("sh", 60, frozenset({"flag-2"}))
OWNED_REALS = (RealServer(ip_address("10.244.7.1"), 8080, 3), RealServer(ip_address("10.244.7.2"), 8080, 0))
ABSENT = VirtualServerKey(L4Protocol.UDP, BOUND, 53)  # on a bound address, but not in the kernel
RECORDED = VirtualServerKey(L4Protocol.TCP, NODE_IP, 30090)  # owned through the ownership record
RECORDED_REAL = RealServer(ip_address("10.244.7.3"), 8080, 1)
FOREIGN_HERE = VirtualServerKey(L4Protocol.TCP, ip_address("198.51.100.8"), 80)


def test_read_leaves_out_a_foreign_virtual_server_and_asks_only_about_owned_ones(
    runner: asyncio.Runner, backend: IPVSBackend
) -> None:
    programmed: list[Operation] = [
        BindAddress(BOUND),
        AddVirtualServer(OWNED, OWNED_SPEC),
        *(AddRealServer(OWNED, real_server) for real_server in OWNED_REALS),
        AddVirtualServer(RECORDED, VirtualServerSpec()),
        AddRealServer(RECORDED, RECORDED_REAL),
    ]
    results = runner.run(backend.apply(programmed))
    assert all(result.ok for result in results), [result for result in results if not result.ok]
    # Someone else's, on an address aproxy neither binds nor recorded.
    netlab.ipvsadm("-A", "-t", virtual_text(FOREIGN_HERE), "-s", "wlc")
    netlab.ipvsadm("-a", "-t", virtual_text(FOREIGN_HERE), "-r", "10.244.9.9:80", "-m", "-w", "3")
    asked = [FOREIGN_HERE, OWNED, ABSENT, RECORDED]
    dumps, gets = backend.netlink_dumps_sent, backend.netlink_gets_sent

    state = runner.run(backend.read(asked, [BOUND, UNBOUND]))

    expected = IPVSState()
    for operation in programmed:
        expected.apply(operation)
    assert state == expected  # the foreign and the absent one left out, the unbound address unbound
    assert not state.has_virtual(FOREIGN_HERE) and not state.is_bound(UNBOUND)
    # One get per owned key (OWNED, ABSENT, RECORDED; the foreign one is not asked about), one real server
    # dump per one that exists (OWNED, RECORDED).
    assert (backend.netlink_dumps_sent - dumps, backend.netlink_gets_sent - gets) == (2, 3)
    full = runner.run(backend.dump())
    for key in asked:
        assert (state.spec(key), dict(state.real_servers(key))) == (
            full.spec(key),
            dict(full.real_servers(key)),
        ), key
    assert netlab.read_ipvs().get(FOREIGN_HERE).weights == {RealServerKey(ip_address("10.244.9.9"), 80): 3}


def test_a_get_reads_each_virtual_server_as_the_service_dump_does(
    runner: asyncio.Runner, backend: IPVSBackend, raw_socket: IPVSSocket
) -> None:
    results = runner.run(backend.apply(table_operations()))
    assert all(result.ok for result in results), [result for result in results if not result.ok]
    add_foreign_entries()
    dumped = runner.run(raw_socket.services())
    by_key = [service for service in dumped if not service.fwmark]
    gets = raw_socket.gets_sent

    got = [runner.run(raw_socket.service(key_of(service))) for service in by_key]

    assert got == by_key  # IPv4 and IPv6; TCP, UDP and SCTP; persistence and scheduler flags
    assert {key_of(service) for service in by_key} == {*TABLE, FOREIGN, ADOPTED}  # foreign ones too
    assert raw_socket.gets_sent - gets == len(by_key)
    absent = VirtualServerKey(L4Protocol.SCTP, ip_address("fd00:10:96::a"), 9999)
    assert runner.run(raw_socket.service(absent)) is None  # ESRCH
    # The refusal leaves the socket serving: a dump right after reads the same table.
    assert sorted(map(repr, runner.run(raw_socket.services()))) == sorted(map(repr, dumped))
