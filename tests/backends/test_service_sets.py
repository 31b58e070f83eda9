"""aproxy's service sets: names per family and protocol, creation lines, members on the wire and read back."""

from __future__ import annotations

import socket
from ipaddress import ip_address, ip_network

from aproxy.backends import ipset_wire, service_sets
from aproxy.core.datapath import SetDelta, SetEntry, SetKind
from aproxy.core.model import L4Protocol

TCP, UDP = L4Protocol.TCP, L4Protocol.UDP
LB = ip_address("198.51.100.7")
LB6 = ip_address("fd00:51::7")


def test_names_fit_the_kernels_limit_and_are_distinct() -> None:
    names = [definition.name for definition in service_sets.definitions((4, 6))]

    assert len(names) == len(set(names)) == 2 * 8 + 5
    assert max(map(len, names)) <= ipset_wire.MAX_SET_NAME


def test_sets_are_created_idempotently_with_their_types() -> None:
    lines = service_sets.create_text(service_sets.definitions((4,))).splitlines()

    assert "create APROXY-LOAD-BALANCER-SRC hash:ip,port,net family inet -exist" in lines
    assert "create APROXY-IPVS-IPS hash:ip family inet -exist" in lines
    assert "create APROXY-NODE-PORT-LOCAL-UDP bitmap:port range 0-65535 -exist" in lines
    assert not [line for line in lines if "inet6" in line]


def test_members_on_the_wire_carry_only_what_their_set_type_has() -> None:
    source = SetEntry(SetKind.LOAD_BALANCER_SOURCE, LB, TCP, 443, ip_network("203.0.113.0/24"))
    node_port = SetEntry(SetKind.NODE_PORT, None, UDP, 30053)
    address = SetEntry(SetKind.IPVS_IP, LB6)

    assert service_sets.wire(source) == ipset_wire.Member(
        "APROXY-LOAD-BALANCER-SRC", LB, 6, 443, ip_address("203.0.113.0"), 24
    )
    assert service_sets.wire(node_port) == ipset_wire.Member("APROXY-NODE-PORT-UDP", None, None, 30053)
    assert service_sets.wire(address) == ipset_wire.Member("APROXY-IPVS-IPS6", LB6, None, None)
    assert service_sets.wire(address).family == socket.AF_INET6
    assert ipset_wire.member_text(service_sets.wire(source)) == "198.51.100.7,tcp:443,203.0.113.0/24"


def test_saved_members_parse_back_and_foreign_lines_are_ignored() -> None:
    saved = "\n".join(
        [
            "create APROXY-LOAD-BALANCER-SRC hash:ip,port,net family inet hashsize 1024 maxelem 65536",
            "add APROXY-LOAD-BALANCER-SRC 198.51.100.7,tcp:443,203.0.113.0/24",
            "add APROXY-LOAD-BALANCER-SRC 198.51.100.7,tcp:443,10.1.2.3",
            "add APROXY-LOAD-BALANCER6 fd00:51::7,udp:53",
            "add APROXY-NODE-PORT-TCP 30080",
            "add APROXY-IPVS-IPS 10.96.0.10",
            "add FOREIGN 10.0.0.1",
            "add APROXY-CLUSTER-IP garbage",
        ]
    )

    assert service_sets.parse_saved(saved, service_sets.definitions((4, 6))) == {
        SetEntry(SetKind.LOAD_BALANCER_SOURCE, LB, TCP, 443, ip_network("203.0.113.0/24")),
        SetEntry(SetKind.LOAD_BALANCER_SOURCE, LB, TCP, 443, ip_network("10.1.2.3/32")),
        SetEntry(SetKind.LOAD_BALANCER, LB6, UDP, 53),
        SetEntry(SetKind.NODE_PORT, None, TCP, 30080),
        SetEntry(SetKind.IPVS_IP, ip_address("10.96.0.10")),
    }


def test_requests_remove_first_and_leave_out_families_the_node_lacks() -> None:
    v4 = SetEntry(SetKind.LOAD_BALANCER, LB, TCP, 80)
    v6 = SetEntry(SetKind.LOAD_BALANCER, LB6, TCP, 80)
    port = SetEntry(SetKind.NODE_PORT, None, TCP, 30080)

    requests = service_sets.requests(SetDelta((v4, v6), (port,)), {4})

    assert requests == [
        (ipset_wire.CMD_DEL, service_sets.wire(port)),
        (ipset_wire.CMD_ADD, service_sets.wire(v4)),
    ]
