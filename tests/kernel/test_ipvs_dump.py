"""The hand-parsed IPVS dumps (ipvs_wire.py, ``IPVSSocket.services``/``dests``) on a real kernel.

One varied table (IPv4 and IPv6; TCP, UDP and SCTP; rr, wlc, lc, mh with mh-port, sh with sh-fallback
and sh-port; persistence; weights 0 to 7; masquerade, route and tunnel forwarding; firewall-mark virtual
servers and a foreign one added with ipvsadm) is read three ways: by the raw dump, by pyroute2's decoder
(what aproxy used before) and by ``ipvsadm -Ln``. All three must agree, and ``IPVSBackend.dump`` must own
exactly what it owned when it read through pyroute2. Connection counts are checked on real traffic with
test_drain's scene.
"""

from __future__ import annotations

import asyncio
import socket
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPVS, IPVSService

from aproxy.backends import ipvs_wire
from aproxy.backends.base import RealServerConnections
from aproxy.backends.ipvs import IPVSBackend, IPVSSettings
from aproxy.backends.ipvs_socket import IPVSSocket
from aproxy.core.model import (
    AddRealServer,
    AddVirtualServer,
    BindAddress,
    IPAddress,
    L4Protocol,
    Operation,
    RealServer,
    RealServerKey,
    VirtualServerKey,
    VirtualServerSpec,
)
from aproxy.core.state import IPVSState
from aproxy.syncer import Syncer
from tests.kernel import netlab
from tests.kernel.netlab import Lab
from tests.kernel.test_drain import (
    CTX,
    SETTLE_TIMEOUT,
    TARGET_PORT,
    VIRTUAL,
    Scene,
    hold_on,
    tracker_with,
    wait_for_counts,
)

pytestmark = pytest.mark.kernel

TCP, UDP, SCTP = L4Protocol.TCP, L4Protocol.UDP, L4Protocol.SCTP
BOUND_V4 = (ip_address("10.96.0.10"), ip_address("10.96.0.11"), ip_address("10.96.0.12"))
BOUND_V6 = ip_address("fd00:10:96::a")
# A NodePort-like virtual server on an address aproxy does not bind: owned through the ownership record.
NODE_PORT = VirtualServerKey(TCP, ip_address("192.0.2.10"), 30080)
FOREIGN = VirtualServerKey(TCP, ip_address("198.51.100.7"), 80)
# Added with ipvsadm on an address aproxy binds: aproxy treats it as its own, as it always did.
ADOPTED = VirtualServerKey(UDP, BOUND_V4[0], 5353)
FORWARD_NAMES = {0: "Masq", 1: "Local", 2: "Tunnel", 3: "Route"}
# About 300 bytes a virtual server (stats included): some 100 KiB, more than the kernel puts in one part.
MANY = 400


def reals(prefix: str, port: int, *weights: int) -> list[RealServer]:
    return [
        RealServer(ip_address(f"{prefix}{number + 1}"), port, weight) for number, weight in enumerate(weights)
    ]


TABLE: dict[VirtualServerKey, tuple[VirtualServerSpec, list[RealServer]]] = {
    VirtualServerKey(TCP, BOUND_V4[0], 80): (VirtualServerSpec("rr"), reals("10.244.1.", 8080, 0, 1, 2, 3)),
    VirtualServerKey(UDP, BOUND_V4[0], 53): (
        VirtualServerSpec("mh", 10800, frozenset({"flag-2"})),
        reals("10.244.2.", 53, 1, 5),
    ),
    VirtualServerKey(SCTP, BOUND_V4[1], 9000): (
        VirtualServerSpec("sh", 0, frozenset({"flag-1", "flag-2"})),
        reals("10.244.3.", 9000, 7),
    ),
    VirtualServerKey(TCP, BOUND_V6, 443): (
        VirtualServerSpec("wlc", 300),
        reals("fd00:10:244::", 8443, 0, 1, 2),
    ),
    VirtualServerKey(UDP, BOUND_V6, 53): (VirtualServerSpec("lc"), reals("fd00:10:244::1:", 53, 1)),
    VirtualServerKey(TCP, BOUND_V4[2], 8080): (VirtualServerSpec("rr"), []),
    NODE_PORT: (VirtualServerSpec("rr"), reals("10.244.4.", 8080, 1)),
}


def table_operations() -> list[Operation]:
    operations: list[Operation] = [BindAddress(address) for address in (*BOUND_V4, BOUND_V6)]
    for key, (spec, real_servers) in TABLE.items():
        operations.append(AddVirtualServer(key, spec))
        operations.extend(AddRealServer(key, real) for real in real_servers)
    return operations


def add_foreign_entries() -> None:
    """What other programs left: a foreign virtual server, firewall-mark ones, one on a bound address."""
    foreign = f"{FOREIGN.address}:{FOREIGN.port}"
    netlab.ipvsadm("-A", "-t", foreign, "-s", "wlc")
    netlab.ipvsadm("-a", "-t", foreign, "-r", "10.244.9.9:80", "-m", "-w", "3")
    netlab.ipvsadm("-a", "-t", foreign, "-r", "10.244.9.10:80", "-g", "-w", "1")
    netlab.ipvsadm("-a", "-t", foreign, "-r", "10.244.9.11:80", "-i", "-w", "2")
    netlab.ipvsadm("-A", "-f", "7", "-s", "rr")
    netlab.ipvsadm("-a", "-f", "7", "-r", "10.244.9.12", "-g")
    netlab.ipvsadm("-A", "-f", "8", "-6", "-s", "sh", "-b", "sh-port")
    adopted = f"{ADOPTED.address}:{ADOPTED.port}"
    netlab.ipvsadm("-A", "-u", adopted, "-s", "rr", "-p", "60")
    netlab.ipvsadm("-a", "-u", adopted, "-r", "10.244.5.1:5353", "-m", "-w", "4")


@pytest.fixture
def settings(tmp_path: Path) -> IPVSSettings:
    return IPVSSettings(state_file=tmp_path / "owned.json", masquerade=False)


@pytest.fixture
def varied_table(runner: asyncio.Runner, backend: IPVSBackend) -> None:
    results = runner.run(backend.apply(table_operations()))
    assert all(result.ok for result in results), [result for result in results if not result.ok]
    add_foreign_entries()


# --- pyroute2's reading of the same table (its decoder is the reference) ------------------------------------


def _optional_address(value: str | None) -> IPAddress | None:
    return ip_address(value) if value is not None else None


def pyroute2_services() -> list[ipvs_wire.DumpedService]:
    with IPVS() as ipvs:
        messages = list(ipvs.service("dump"))
    services = []
    for message in messages:
        attrs = message.get_attr("IPVS_CMD_ATTR_SERVICE")
        services.append(
            ipvs_wire.DumpedService(
                protocol=attrs.get_attr("IPVS_SVC_ATTR_PROTOCOL") or 0,
                family=attrs.get_attr("IPVS_SVC_ATTR_AF"),
                address=_optional_address(attrs.get_attr("IPVS_SVC_ATTR_ADDR")),
                port=attrs.get_attr("IPVS_SVC_ATTR_PORT") or 0,
                fwmark=attrs.get_attr("IPVS_SVC_ATTR_FWMARK") or 0,
                scheduler=attrs.get_attr("IPVS_SVC_ATTR_SCHED_NAME"),
                flags=attrs.get_attr("IPVS_SVC_ATTR_FLAGS")["flags"],
                timeout=attrs.get_attr("IPVS_SVC_ATTR_TIMEOUT"),
            )
        )
    return services


def pyroute2_dests(service: ipvs_wire.DumpedService) -> list[ipvs_wire.DumpedDest]:
    selector = IPVSService(addr=str(service.address), port=service.port, protocol=service.protocol)
    with IPVS() as ipvs:
        messages = list(ipvs.dest("dump", service=selector))
    dests = []
    for message in messages:
        attrs = message.get_attr("IPVS_CMD_ATTR_DEST")
        dests.append(
            ipvs_wire.DumpedDest(
                address=ip_address(attrs.get_attr("IPVS_DEST_ATTR_ADDR")),
                port=attrs.get_attr("IPVS_DEST_ATTR_PORT"),
                weight=attrs.get_attr("IPVS_DEST_ATTR_WEIGHT"),
                active_connections=attrs.get_attr("IPVS_DEST_ATTR_ACTIVE_CONNS"),
                inactive_connections=attrs.get_attr("IPVS_DEST_ATTR_INACT_CONNS"),
                forward=attrs.get_attr("IPVS_DEST_ATTR_FWD_METHOD"),
                family=attrs.get_attr("IPVS_DEST_ATTR_ADDR_FAMILY"),
            )
        )
    return dests


def in_order(entries: list[Any]) -> list[Any]:
    return sorted(entries, key=repr)


def key_of(service: ipvs_wire.DumpedService) -> VirtualServerKey:
    assert service.address is not None
    protocol = {number: protocol for protocol, number in ipvs_wire.PROTOCOL_NUMBERS.items()}[service.protocol]
    return VirtualServerKey(protocol, service.address, service.port)


def owned_state_as_pyroute2_reads_it(owned: set[VirtualServerKey], bound: set[IPAddress]) -> IPVSState:
    """What IPVSBackend.dump returned when it read through pyroute2: the same filter, pyroute2's decoding."""
    state = IPVSState()
    for address in bound:
        state.apply(BindAddress(address))
    for service in pyroute2_services():
        if service.fwmark or key_of(service) not in owned:
            continue
        key = key_of(service)
        persistence = service.timeout if service.flags & ipvs_wire.SVC_F_PERSISTENT else 0
        names = frozenset(name for name, bit in ipvs_wire.SCHED_FLAGS.items() if service.flags & bit)
        state.apply(AddVirtualServer(key, VirtualServerSpec(service.scheduler, persistence, names)))
        for dest in pyroute2_dests(service):
            state.apply(AddRealServer(key, RealServer(dest.address, dest.port, dest.weight)))
    return state


# --- the tests ----------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("varied_table")
def test_raw_service_dump_reads_what_pyroute2_decodes(runner: asyncio.Runner, raw_socket: IPVSSocket) -> None:
    raw = runner.run(raw_socket.services())

    assert in_order(raw) == in_order(pyroute2_services())
    assert len(raw) == len(TABLE) + 4  # the foreign, two firewall-mark and the adopted virtual servers
    assert {service.fwmark for service in raw if service.fwmark} == {7, 8}


def test_a_service_dump_over_many_receives_reads_every_virtual_server(
    runner: asyncio.Runner, backend: IPVSBackend, raw_socket: IPVSSocket
) -> None:
    keys = [VirtualServerKey(TCP, ip_address("10.101.0.0") + index, 80) for index in range(MANY)]
    results = runner.run(backend.apply([AddVirtualServer(key, VirtualServerSpec("rr")) for key in keys]))
    assert all(result.ok for result in results)
    receives_before = raw_socket.dump_receives

    raw = runner.run(raw_socket.services())

    assert raw_socket.dump_receives - receives_before > 2  # the kernel sent it in several parts
    assert {key_of(service) for service in raw} == set(keys)
    assert in_order(raw) == in_order(pyroute2_services())


@pytest.mark.usefixtures("varied_table")
def test_raw_dest_dumps_read_what_pyroute2_decodes(runner: asyncio.Runner, raw_socket: IPVSSocket) -> None:
    services = [service for service in runner.run(raw_socket.services()) if not service.fwmark]

    raw = {key_of(service): runner.run(raw_socket.dests(key_of(service))) for service in services}
    decoded = {key_of(service): pyroute2_dests(service) for service in services}

    assert {key: in_order(dests) for key, dests in raw.items()} == {
        key: in_order(dests) for key, dests in decoded.items()
    }
    assert raw[FOREIGN] and {dest.forward for dest in raw[FOREIGN]} == {0, 2, 3}
    ipv6 = next(key for key in raw if key.address == BOUND_V6 and key.port == 443)
    assert {dest.family for dest in raw[ipv6]} == {socket.AF_INET6}


@pytest.mark.usefixtures("varied_table")
def test_raw_dumps_agree_with_ipvsadm(runner: asyncio.Runner, raw_socket: IPVSSocket) -> None:
    services = runner.run(raw_socket.services())
    table = netlab.read_ipvs()

    raw_view = {}
    for service in services:
        if service.fwmark:
            continue
        key = key_of(service)
        persistence = service.timeout if service.flags & ipvs_wire.SVC_F_PERSISTENT else 0
        names = frozenset(name for name, bit in ipvs_wire.SCHED_FLAGS.items() if service.flags & bit)
        dests = runner.run(raw_socket.dests(key))
        rows = {
            (
                d.address,
                d.port,
                FORWARD_NAMES[d.forward],
                d.weight,
                d.active_connections,
                d.inactive_connections,
            )
            for d in dests
        }
        raw_view[key] = (VirtualServerSpec(service.scheduler, persistence, names), rows)
    ipvsadm_view = {
        entry.key: (
            entry.spec,
            {(r.address, r.port, r.forward, r.weight, r.active, r.inactive) for r in entry.real_servers},
        )
        for entry in table.virtual_servers
    }
    raw_fwmarks = {(service.fwmark, service.scheduler) for service in services if service.fwmark}

    assert raw_view == ipvsadm_view
    assert raw_fwmarks == {(entry.fwmark, entry.scheduler) for entry in table.fwmark_servers}


@pytest.mark.usefixtures("varied_table")
def test_backend_dump_owns_what_it_owned_through_pyroute2(
    runner: asyncio.Runner, backend: IPVSBackend
) -> None:
    dumps_before = backend.netlink_dumps_sent

    state = runner.run(backend.dump())

    owned = {*TABLE, ADOPTED}
    bound = {*BOUND_V4, BOUND_V6}
    assert state == owned_state_as_pyroute2_reads_it(owned, bound)
    assert set(state.virtual_keys()) == owned  # not the foreign one, nor the firewall-mark ones
    for key, (spec, real_servers) in TABLE.items():
        assert state.spec(key) == spec, key
        assert dict(state.real_servers(key)) == {real.key: real.weight for real in real_servers}, key
    # One service dump, then one real server dump per owned virtual server: no more round trips.
    assert backend.netlink_dumps_sent - dumps_before == 1 + len(owned)


@pytest.mark.usefixtures("varied_table")
def test_connections_of_a_virtual_server_that_is_gone_are_empty(
    runner: asyncio.Runner, backend: IPVSBackend
) -> None:
    gone = VirtualServerKey(TCP, BOUND_V4[2], 9999)

    assert runner.run(backend.connections(gone)) == {}
    # The socket still serves the next dump after an empty one.
    assert runner.run(backend.connections(NODE_PORT)) == {
        RealServerKey(ip_address("10.244.4.1"), 8080): RealServerConnections(0, 0)
    }


@pytest.fixture
def scene(lab: Lab) -> Scene:
    return Scene(lab.add_pod("pod-a"), lab.add_pod("pod-b"), lab.add_client())


def test_connections_count_real_traffic_like_ipvsadm(
    runner: asyncio.Runner, backend: IPVSBackend, scene: Scene
) -> None:
    tracker = tracker_with(scene.pod_a, scene.pod_b)
    assert runner.run(Syncer(tracker, CTX, backend).start()).ok
    pod_b = RealServerKey(scene.pod_b.address, TARGET_PORT)

    with hold_on(scene.pod_b, scene.client):
        while_held = runner.run(backend.connections(VIRTUAL))
        ipvsadm_while_held = netlab.read_ipvs().get(VIRTUAL)
    wait_for_counts(scene.pod_b, active=0, inactive=1, timeout=SETTLE_TIMEOUT)
    after_close = runner.run(backend.connections(VIRTUAL))

    assert while_held[pod_b] == RealServerConnections(1, 0)
    assert while_held == {
        real.key: RealServerConnections(real.active, real.inactive)
        for real in ipvsadm_while_held.real_servers
    }
    assert after_close[pod_b] == RealServerConnections(0, 1)
