"""The hand-packed IPVS requests must be byte-for-byte what pyroute2's message classes encode.

pyroute2 is the oracle here (its encoder, not a mock of it): if both agree, the kernel reads our batched
messages exactly as it reads pyroute2's. The kernel tier then proves the kernel accepts them.
"""

from __future__ import annotations

import socket
import struct
from ipaddress import ip_address
from typing import Any

import pytest
from pyroute2.netlink.generic.ipvs import ipvsmsg

from aproxy.backends import ipvs_wire
from aproxy.core.model import (
    AddRealServer,
    AddVirtualServer,
    DeleteRealServer,
    DeleteVirtualServer,
    L4Protocol,
    RealServer,
    RealServerKey,
    UpdateRealServer,
    UpdateVirtualServer,
    VirtualServerKey,
    VirtualServerSpec,
)

FAMILY_ID = 0x1D
V4 = VirtualServerKey(L4Protocol.TCP, ip_address("10.96.0.10"), 53)
V6 = VirtualServerKey(L4Protocol.UDP, ip_address("fd00:10:96::a"), 5353)
SCTP = VirtualServerKey(L4Protocol.SCTP, ip_address("10.96.0.11"), 9000)
AFFINITY = VirtualServerSpec(scheduler="mh", persistence_timeout=10800, flags=frozenset({"flag-2"}))


def _pyroute2_bytes(seq: int, cmd: int, attrs: list[tuple[str, Any]], *, ack: bool) -> bytes:
    msg = ipvsmsg()
    msg["cmd"] = cmd
    msg["version"] = 1
    msg["attrs"] = attrs
    msg["header"]["type"] = FAMILY_ID
    msg["header"]["flags"] = 1 | (4 if ack else 0)
    msg["header"]["sequence_number"] = seq
    msg.encode()
    return bytes(msg.data)


def _svc_key(key: VirtualServerKey) -> list[tuple[str, Any]]:
    family = socket.AF_INET if key.address.version == 4 else socket.AF_INET6
    return [
        ("IPVS_SVC_ATTR_AF", family),
        ("IPVS_SVC_ATTR_PROTOCOL", ipvs_wire.PROTOCOL_NUMBERS[key.protocol]),
        ("IPVS_SVC_ATTR_ADDR", str(key.address)),
        ("IPVS_SVC_ATTR_PORT", key.port),
    ]


def _svc_full(key: VirtualServerKey, spec: VirtualServerSpec, flags: int) -> list[tuple[str, Any]]:
    # pyroute2 declares NETMASK as an IPv4 address; the kernel reads IPv6 prefix lengths as a plain u32.
    netmask = "255.255.255.255" if key.address.version == 4 else "128.0.0.0"
    return [
        *_svc_key(key),
        ("IPVS_SVC_ATTR_SCHED_NAME", spec.scheduler),
        ("IPVS_SVC_ATTR_FLAGS", {"flags": flags, "mask": 0xFFFFFFFF}),
        ("IPVS_SVC_ATTR_TIMEOUT", spec.persistence_timeout),
        ("IPVS_SVC_ATTR_NETMASK", netmask),
    ]


def _dest_key(real: RealServerKey) -> list[tuple[str, Any]]:
    family = socket.AF_INET if real.address.version == 4 else socket.AF_INET6
    return [
        ("IPVS_DEST_ATTR_ADDR", str(real.address)),
        ("IPVS_DEST_ATTR_PORT", real.port),
        ("IPVS_DEST_ATTR_ADDR_FAMILY", family),
    ]


def _dest_full(real: RealServer) -> list[tuple[str, Any]]:
    return [
        *_dest_key(real.key),
        ("IPVS_DEST_ATTR_FWD_METHOD", 0),
        ("IPVS_DEST_ATTR_WEIGHT", real.weight),
        ("IPVS_DEST_ATTR_U_THRESH", 0),
        ("IPVS_DEST_ATTR_L_THRESH", 0),
    ]


def _nest(attrs: list[tuple[str, Any]]) -> dict[str, Any]:
    return {"attrs": attrs}


REAL4 = RealServer(ip_address("10.244.1.5"), 8053, 1)
REAL6 = RealServer(ip_address("fd00:10:244::5"), 53, 0)

CASES = [
    pytest.param(
        AddVirtualServer(V4, VirtualServerSpec()),
        1,
        [("IPVS_CMD_ATTR_SERVICE", _nest(_svc_full(V4, VirtualServerSpec(), 0)))],
        id="add-virtual-server-ipv4",
    ),
    pytest.param(
        UpdateVirtualServer(V6, AFFINITY),
        2,
        [("IPVS_CMD_ATTR_SERVICE", _nest(_svc_full(V6, AFFINITY, 0x1 | 0x10)))],
        id="set-virtual-server-ipv6-persistent-with-scheduler-flag",
    ),
    pytest.param(
        DeleteVirtualServer(SCTP),
        3,
        [("IPVS_CMD_ATTR_SERVICE", _nest(_svc_key(SCTP)))],
        id="delete-virtual-server-sctp",
    ),
    pytest.param(
        AddRealServer(V4, REAL4),
        5,
        [("IPVS_CMD_ATTR_SERVICE", _nest(_svc_key(V4))), ("IPVS_CMD_ATTR_DEST", _nest(_dest_full(REAL4)))],
        id="add-real-server",
    ),
    pytest.param(
        UpdateRealServer(V6, REAL6),
        6,
        [("IPVS_CMD_ATTR_SERVICE", _nest(_svc_key(V6))), ("IPVS_CMD_ATTR_DEST", _nest(_dest_full(REAL6)))],
        id="set-real-server-weight-0-is-a-drain-not-a-delete",
    ),
    pytest.param(
        DeleteRealServer(V4, REAL4.key),
        7,
        [("IPVS_CMD_ATTR_SERVICE", _nest(_svc_key(V4))), ("IPVS_CMD_ATTR_DEST", _nest(_dest_key(REAL4.key)))],
        id="delete-real-server",
    ),
]


@pytest.mark.parametrize(("op", "command", "attrs"), CASES)
@pytest.mark.parametrize("ack", [True, False], ids=["ack", "no-ack"])
def test_request_matches_pyroute2_encoding(
    op: ipvs_wire.IPVSOperation, command: int, attrs: list[tuple[str, Any]], ack: bool
) -> None:
    cmd, body = ipvs_wire.request_body(op)
    assert cmd == command
    ours = ipvs_wire.pack_request(FAMILY_ID, 4242, cmd, body, ack=ack)
    assert ours == _pyroute2_bytes(4242, command, attrs, ack=ack)


def test_parse_acks_maps_each_error_to_its_sequence_number() -> None:
    def error_message(seq: int, errno: int) -> bytes:
        # NLMSG_ERROR: header, negative errno, then the header of the request it answers.
        payload = struct.pack("=i", -errno) + struct.pack("=IHHII", 16, FAMILY_ID, 1, seq, 0)
        return struct.pack("=IHHII", 16 + len(payload), 2, 0, seq, 0) + payload

    done = struct.pack("=IHHII", 20, 3, 0, 9, 0) + b"\0\0\0\0"
    data = error_message(7, 17) + done + error_message(8, 2) + error_message(9, 0)
    assert list(ipvs_wire.parse_acks(data)) == [
        ipvs_wire.Ack(seq=7, error=17),
        ipvs_wire.Ack(seq=8, error=2),
        ipvs_wire.Ack(seq=9, error=0),
    ]


def test_parse_acks_stops_at_a_corrupt_header() -> None:
    assert list(ipvs_wire.parse_acks(struct.pack("=IHHII", 3, 2, 0, 1, 0) + b"\0" * 8)) == []
