"""The hand-packed IPVS requests must be byte-for-byte what pyroute2's message classes encode, and the
hand-parsed dump replies must read what pyroute2's decoder reads.

pyroute2 is the oracle here (its encoder and decoder, not a mock of them): if both agree, the kernel reads
our batched messages exactly as it reads pyroute2's. Replies are built here in the kernel's layout
(ip_vs_genl_fill_service / _fill_dest: 16-byte addresses, NLA_F_NESTED on nests, stats nests), with struct,
not with the code under test. The kernel tier then checks both directions against a real kernel.
"""

from __future__ import annotations

import errno
import socket
import struct
from ipaddress import ip_address
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyroute2.netlink.generic.ipvs import ipvsmsg

from aproxy.backends import ipvs_wire, netlink_wire
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


def _pyroute2_bytes(
    seq: int, cmd: int, attrs: list[tuple[str, Any]], *, ack: bool, dump: bool = False
) -> bytes:
    msg = ipvsmsg()
    msg["cmd"] = cmd
    msg["version"] = 1
    msg["attrs"] = attrs
    msg["header"]["type"] = FAMILY_ID
    msg["header"]["flags"] = 1 | (4 if ack else 0) | (0x300 if dump else 0)
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


# --- dump requests ------------------------------------------------------------------------------------------


def test_services_dump_request_matches_pyroute2_encoding() -> None:
    ours = ipvs_wire.services_dump_request(FAMILY_ID, 77)
    assert ours == _pyroute2_bytes(77, 4, [], ack=False, dump=True)


@pytest.mark.parametrize("key", [V4, V6, SCTP], ids=["ipv4-tcp", "ipv6-udp", "ipv4-sctp"])
def test_dests_dump_request_matches_pyroute2_encoding(key: VirtualServerKey) -> None:
    ours = ipvs_wire.dests_dump_request(FAMILY_ID, 78, key)
    expected = _pyroute2_bytes(78, 8, [("IPVS_CMD_ATTR_SERVICE", _nest(_svc_key(key)))], ack=False, dump=True)
    assert ours == expected


# --- the get request of one virtual server (the reconcile's read) -------------------------------------------

GET_KEYS = [
    pytest.param(
        VirtualServerKey(protocol, ip_address(address), port), id=f"{family}-{protocol.value.lower()}"
    )
    for family, address, port in (("ipv4", "10.96.0.10", 53), ("ipv6", "fd00:10:96::a", 65535))
    for protocol in (L4Protocol.TCP, L4Protocol.UDP, L4Protocol.SCTP)
]


@pytest.mark.parametrize("key", GET_KEYS)
def test_service_get_request_matches_pyroute2_encoding(key: VirtualServerKey) -> None:
    ours = ipvs_wire.service_get_request(FAMILY_ID, 79, key)
    expected = _pyroute2_bytes(79, 4, [("IPVS_CMD_ATTR_SERVICE", _nest(_svc_key(key)))], ack=False)
    assert ours == expected


def test_service_get_request_is_not_a_dump() -> None:
    # NLM_F_DUMP would make the kernel ignore the key and send every virtual server.
    _length, _kind, flags, seq, _pid = struct.unpack_from("=IHHII", ipvs_wire.service_get_request(1, 80, V4))
    assert (flags, seq) == (netlink_wire.NLM_F_REQUEST, 80)


# --- dump replies, in the kernel's layout -------------------------------------------------------------------

NLA_F_NESTED = 0x8000
NLM_F_MULTI = 0x2
SEQ = 31


def nla(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def u16(value: int) -> bytes:
    return struct.pack("=H", value)


def u32(value: int) -> bytes:
    return struct.pack("=I", value)


def be16(value: int) -> bytes:
    return struct.pack(">H", value)


def kernel_address(text: str) -> bytes:
    """union nf_inet_addr: always 16 bytes, an IPv4 address in the first 4."""
    return ip_address(text).packed.ljust(16, b"\0")


def stats_nests() -> bytes:
    # IPVS_SVC_ATTR_STATS (10) and STATS64 (12): present in every reply, never read by aproxy.
    stats = b"".join(nla(kind, u32(kind * 3)) for kind in range(1, 11))
    stats64 = b"".join(nla(kind, struct.pack("=Q", kind << 40)) for kind in range(1, 11))
    return nla(NLA_F_NESTED | 10, stats) + nla(NLA_F_NESTED | 12, stats64)


def service_attrs(
    family: int,
    protocol: int,
    address: str,
    port: int,
    scheduler: str,
    flags: int,
    timeout: int,
) -> bytes:
    netmask = 0xFFFFFFFF if family == socket.AF_INET else 128
    return b"".join(
        (
            nla(1, u16(family)),
            nla(2, u16(protocol)),
            nla(3, kernel_address(address)),
            nla(4, be16(port)),
            nla(6, scheduler.encode() + b"\0"),
            nla(7, struct.pack("=II", flags, 0xFFFFFFFF)),
            nla(8, u32(timeout)),
            nla(9, u32(netmask)),
            stats_nests(),
        )
    )


def fwmark_service_attrs(family: int, fwmark: int, scheduler: str) -> bytes:
    return b"".join(
        (
            nla(1, u16(family)),
            nla(5, u32(fwmark)),
            nla(6, scheduler.encode() + b"\0"),
            nla(7, struct.pack("=II", 0, 0xFFFFFFFF)),
            nla(8, u32(0)),
            nla(9, u32(0xFFFFFFFF)),
            stats_nests(),
        )
    )


def dest_attrs(
    address: str, port: int, weight: int, active: int, inactive: int, *, family: int | None, forward: int = 0
) -> bytes:
    return b"".join(
        (
            nla(1, kernel_address(address)),
            nla(2, be16(port)),
            nla(3, u32(forward)),
            nla(4, u32(weight)),
            nla(13, b"\0"),  # TUN_TYPE, TUN_PORT, TUN_FLAGS (Linux 5.2+)
            nla(14, be16(0)),
            nla(15, u16(0)),
            nla(5, u32(0)),
            nla(6, u32(0)),
            nla(7, u32(active)),
            nla(8, u32(inactive)),
            nla(9, u32(0)),  # PERSIST_CONNS
            nla(11, u16(family)) if family is not None else b"",
            stats_nests(),
        )
    )


def message(kind: int, payload: bytes, seq: int = SEQ, flags: int = NLM_F_MULTI) -> bytes:
    length = 16 + len(payload)
    return struct.pack("=IHHII", length, kind, flags, seq, 4321) + payload + b"\0" * (-length % 4)


def genl(command: int, nest_kind: int, attributes: bytes) -> bytes:
    return message(FAMILY_ID, struct.pack("=BBH", command, 1, 0) + nla(NLA_F_NESTED | nest_kind, attributes))


def service_message(attributes: bytes, seq: int = SEQ) -> bytes:
    return genl(1, 1, attributes) if seq == SEQ else message(FAMILY_ID, genl(1, 1, attributes)[16:], seq)


def dest_message(attributes: bytes) -> bytes:
    return genl(5, 2, attributes)


def done(seq: int = SEQ, error: int = 0) -> bytes:
    return message(3, struct.pack("=i", -error), seq)


def error(seq: int, code: int) -> bytes:
    # NLMSG_ERROR: the negative errno, then (NETLINK_CAP_ACK) the header of the request it answers.
    return message(2, struct.pack("=i", -code) + struct.pack("=IHHII", 20, FAMILY_ID, 0x301, seq, 0), seq, 0)


def noop() -> bytes:
    return message(1, b"")


def services_of(data: bytes, seq: int | None = SEQ) -> list[ipvs_wire.DumpedService]:
    messages = netlink_wire.parse_messages(data, seq)
    return [ipvs_wire.decode_service(m) for m in messages if m.kind == FAMILY_ID]


def dests_of(data: bytes, service_family: int) -> list[ipvs_wire.DumpedDest]:
    return [
        ipvs_wire.decode_dest(m, service_family)
        for m in netlink_wire.parse_messages(data, SEQ)
        if m.kind == FAMILY_ID
    ]


MH_PORT = service_attrs(socket.AF_INET, socket.IPPROTO_TCP, "10.96.0.10", 53, "mh", 0x1 | 0x10, 10800)
SH_V6 = service_attrs(socket.AF_INET6, socket.IPPROTO_UDP, "fd00:10:96::a", 5353, "sh", 0x8 | 0x10, 0)
SCTP_RR = service_attrs(socket.AF_INET, socket.IPPROTO_SCTP, "10.96.0.11", 9000, "rr", 0, 0)
FWMARK = fwmark_service_attrs(socket.AF_INET, 7, "wlc")


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        pytest.param(
            MH_PORT,
            ipvs_wire.DumpedService(
                socket.IPPROTO_TCP, socket.AF_INET, ip_address("10.96.0.10"), 53, 0, "mh", 0x11, 10800
            ),
            id="ipv4-tcp-mh-port-persistent",
        ),
        pytest.param(
            SH_V6,
            ipvs_wire.DumpedService(
                socket.IPPROTO_UDP, socket.AF_INET6, ip_address("fd00:10:96::a"), 5353, 0, "sh", 0x18, 0
            ),
            id="ipv6-udp-sh-fallback-and-port",
        ),
        pytest.param(
            SCTP_RR,
            ipvs_wire.DumpedService(
                socket.IPPROTO_SCTP, socket.AF_INET, ip_address("10.96.0.11"), 9000, 0, "rr", 0, 0
            ),
            id="ipv4-sctp",
        ),
        pytest.param(
            FWMARK,
            ipvs_wire.DumpedService(0, socket.AF_INET, None, 0, 7, "wlc", 0, 0),
            id="firewall-mark-has-no-protocol-address-or-port",
        ),
    ],
)
def test_decode_service_reads_the_kernel_layout(attributes: bytes, expected: ipvs_wire.DumpedService) -> None:
    assert services_of(service_message(attributes) + done()) == [expected]


def _pyroute2_service(data: bytes) -> tuple[Any, ...]:
    msg = ipvsmsg(data)
    msg.decode()
    attrs = msg.get_attr("IPVS_CMD_ATTR_SERVICE")
    return (
        attrs.get_attr("IPVS_SVC_ATTR_PROTOCOL") or 0,
        attrs.get_attr("IPVS_SVC_ATTR_AF"),
        attrs.get_attr("IPVS_SVC_ATTR_ADDR"),
        attrs.get_attr("IPVS_SVC_ATTR_PORT") or 0,
        attrs.get_attr("IPVS_SVC_ATTR_FWMARK") or 0,
        attrs.get_attr("IPVS_SVC_ATTR_SCHED_NAME"),
        attrs.get_attr("IPVS_SVC_ATTR_FLAGS")["flags"],
        attrs.get_attr("IPVS_SVC_ATTR_TIMEOUT"),
    )


@pytest.mark.parametrize(
    "attributes", [MH_PORT, SH_V6, SCTP_RR, FWMARK], ids=["ipv4-mh", "ipv6-sh", "sctp", "fwmark"]
)
def test_decode_service_agrees_with_pyroute2_decoder(attributes: bytes) -> None:
    data = service_message(attributes)
    (ours,) = services_of(data, None)
    address = str(ours.address) if ours.address is not None else None
    fields = (ours.protocol, ours.family, address, ours.port, ours.fwmark, ours.scheduler, ours.flags)
    assert (*fields, ours.timeout) == _pyroute2_service(data)


@pytest.mark.parametrize(
    ("attributes", "service_family", "expected"),
    [
        pytest.param(
            dest_attrs("10.244.1.5", 8053, 3, 2, 7, family=socket.AF_INET),
            socket.AF_INET,
            ipvs_wire.DumpedDest(ip_address("10.244.1.5"), 8053, 3, 2, 7, 0, socket.AF_INET),
            id="ipv4",
        ),
        pytest.param(
            dest_attrs("fd00:10:244::5", 53, 0, 0, 1, family=socket.AF_INET6),
            socket.AF_INET6,
            ipvs_wire.DumpedDest(ip_address("fd00:10:244::5"), 53, 0, 0, 1, 0, socket.AF_INET6),
            id="ipv6-weight-0",
        ),
        pytest.param(
            dest_attrs("10.244.1.6", 80, 1, 0, 0, family=None, forward=3),
            socket.AF_INET,
            ipvs_wire.DumpedDest(ip_address("10.244.1.6"), 80, 1, 0, 0, 3, None),
            id="no-address-family-before-linux-4-reads-the-service-family",
        ),
        pytest.param(
            dest_attrs("10.244.1.7", 80, 2, 0, 0, family=socket.AF_INET, forward=2),
            socket.AF_INET6,
            ipvs_wire.DumpedDest(ip_address("10.244.1.7"), 80, 2, 0, 0, 2, socket.AF_INET),
            id="dest-family-wins-over-the-service-family",
        ),
    ],
)
def test_decode_dest_reads_the_kernel_layout(
    attributes: bytes, service_family: int, expected: ipvs_wire.DumpedDest
) -> None:
    assert dests_of(dest_message(attributes) + done(), service_family) == [expected]


def test_decode_dest_agrees_with_pyroute2_decoder() -> None:
    data = dest_message(dest_attrs("fd00:10:244::9", 8443, 5, 4, 3, family=socket.AF_INET6))
    (ours,) = dests_of(data + done(), socket.AF_INET6)
    msg = ipvsmsg(data)
    msg.decode()
    attrs = msg.get_attr("IPVS_CMD_ATTR_DEST")
    names = ("ADDR", "PORT", "WEIGHT", "ACTIVE_CONNS", "INACT_CONNS", "FWD_METHOD", "ADDR_FAMILY")
    theirs = tuple(attrs.get_attr(f"IPVS_DEST_ATTR_{name}") for name in names)
    fields = (ours.port, ours.weight, ours.active_connections, ours.inactive_connections, ours.forward)
    assert (str(ours.address), *fields, ours.family) == theirs


# --- the messages of a received buffer ----------------------------------------------------------------------


def test_a_get_reply_is_one_service_message_without_done() -> None:
    # ip_vs_genl_get_cmd: one IPVS_CMD_NEW_SERVICE message, not flagged NLM_F_MULTI, and nothing after it.
    data = message(FAMILY_ID, genl(1, 1, SH_V6)[16:], SEQ, flags=0)

    (reply,) = netlink_wire.parse_messages(data, SEQ)

    assert reply.kind == FAMILY_ID and reply.flags == 0
    assert ipvs_wire.decode_service(reply).address == ip_address("fd00:10:96::a")


def test_a_get_of_a_missing_virtual_server_raises_esrch() -> None:
    with pytest.raises(netlink_wire.NetlinkErrorReply) as caught:
        list(netlink_wire.parse_messages(error(SEQ, errno.ESRCH), SEQ))

    assert caught.value.errno == errno.ESRCH


def test_one_buffer_holds_many_services_and_ends_at_done() -> None:
    data = service_message(MH_PORT) + noop() + service_message(SH_V6) + done() + service_message(SCTP_RR)

    kinds = [m.kind for m in netlink_wire.parse_messages(data, SEQ)]
    services = services_of(data)

    assert kinds == [FAMILY_ID, FAMILY_ID, netlink_wire.NLMSG_DONE]  # NOOP passed over, nothing after DONE
    assert [s.port for s in services] == [53, 5353]


def test_a_dump_split_over_several_buffers_reads_as_one() -> None:
    first = service_message(MH_PORT) + service_message(SH_V6)
    second = service_message(SCTP_RR) + service_message(FWMARK) + done()

    first_part = list(netlink_wire.parse_messages(first, SEQ))
    second_part = list(netlink_wire.parse_messages(second, SEQ))

    assert netlink_wire.NLMSG_DONE not in {m.kind for m in first_part}  # the reader must receive again
    assert second_part[-1].kind == netlink_wire.NLMSG_DONE
    assert [s.port for s in services_of(first) + services_of(second)] == [53, 5353, 9000, 0]


def test_replies_to_other_requests_are_passed_over_even_their_errors() -> None:
    stale = service_message(SCTP_RR, seq=SEQ - 1) + error(SEQ - 1, errno.EBUSY) + done(SEQ - 1)
    data = stale + service_message(MH_PORT) + done()

    assert [s.port for s in services_of(data)] == [53]


def test_an_error_reply_raises_with_its_errno() -> None:
    data = error(SEQ, errno.EBUSY)

    with pytest.raises(netlink_wire.NetlinkErrorReply) as caught:
        list(netlink_wire.parse_messages(data, SEQ))

    assert caught.value.errno == errno.EBUSY and caught.value.seq == SEQ
    assert isinstance(caught.value, OSError)


def test_a_dump_that_ends_with_an_error_raises() -> None:
    data = service_message(MH_PORT) + done(error=errno.EMSGSIZE)

    with pytest.raises(netlink_wire.NetlinkErrorReply) as caught:
        services_of(data)

    assert caught.value.errno == errno.EMSGSIZE


def test_an_acknowledgement_is_yielded_not_raised() -> None:
    (ack,) = netlink_wire.parse_messages(error(SEQ, 0), SEQ)

    assert ack.kind == netlink_wire.NLMSG_ERROR and ack.seq == SEQ


def _with_service_attribute(attributes: bytes) -> bytes:
    return service_message(attributes) + done()


GARBLED = [
    pytest.param(service_message(MH_PORT)[:10], id="buffer-shorter-than-a-header"),
    pytest.param(service_message(MH_PORT)[:40], id="message-cut-short"),
    pytest.param(
        struct.pack("=IHHII", 8, FAMILY_ID, 2, SEQ, 0) + b"\0" * 8, id="message-length-below-header"
    ),
    pytest.param(message(FAMILY_ID, b"\1\1"), id="no-genl-header"),
    pytest.param(message(FAMILY_ID, struct.pack("=BBH", 1, 1, 0)), id="no-service-nest"),
    pytest.param(message(3, b""), id="done-without-its-error-code"),
    pytest.param(message(2, b"\0\0"), id="error-without-its-error-code"),
    pytest.param(
        message(
            FAMILY_ID,
            struct.pack("=BBH", 1, 1, 0) + struct.pack("=HH", len(MH_PORT) + 44, NLA_F_NESTED | 1) + MH_PORT,
        ),
        id="nest-length-overruns-the-message",
    ),
    pytest.param(
        message(FAMILY_ID, struct.pack("=BBH", 1, 1, 0) + struct.pack("=HH", 2, 1)),
        id="attribute-length-below-its-header",
    ),
    pytest.param(message(FAMILY_ID, struct.pack("=BBH", 1, 1, 0) + b"\1\0"), id="attribute-header-cut"),
    pytest.param(
        _with_service_attribute(MH_PORT.replace(nla(4, be16(53)), b"")), id="port-missing-on-a-non-fwmark"
    ),
    pytest.param(
        _with_service_attribute(MH_PORT.replace(nla(3, kernel_address("10.96.0.10")), nla(3, b"\1\2"))),
        id="address-too-short",
    ),
    pytest.param(
        _with_service_attribute(MH_PORT.replace(nla(1, u16(socket.AF_INET)), nla(1, u16(99)))),
        id="unknown-address-family",
    ),
    pytest.param(
        _with_service_attribute(MH_PORT.replace(nla(1, u16(socket.AF_INET)), nla(1, b"\2"))),
        id="family-attribute-too-short",
    ),
    pytest.param(
        _with_service_attribute(MH_PORT.replace(nla(6, b"mh\0"), nla(6, b"\xffh\0"))),
        id="scheduler-name-not-ascii",
    ),
    pytest.param(
        _with_service_attribute(
            MH_PORT.replace(nla(7, struct.pack("=II", 0x11, 0xFFFFFFFF)), nla(7, u32(0x11)))
        ),
        id="flags-without-mask",
    ),
]


@pytest.mark.parametrize("data", GARBLED)
def test_garbled_replies_raise_malformed_reply(data: bytes) -> None:
    with pytest.raises(netlink_wire.MalformedReply):
        services_of(data, None)


def test_garbled_dest_raises_malformed_reply() -> None:
    attributes = dest_attrs("10.244.1.5", 8053, 3, 2, 7, family=socket.AF_INET).replace(nla(4, u32(3)), b"")

    with pytest.raises(netlink_wire.MalformedReply):
        dests_of(dest_message(attributes) + done(), socket.AF_INET)


VALID_DUMP = service_message(MH_PORT) + service_message(SH_V6) + service_message(FWMARK) + done()


@given(st.integers(min_value=0, max_value=len(VALID_DUMP) - 1))
def test_a_dump_cut_anywhere_reads_its_whole_messages_or_raises_malformed_reply(cut: int) -> None:
    try:
        services = services_of(VALID_DUMP[:cut])
    except netlink_wire.MalformedReply:
        return
    assert services == services_of(VALID_DUMP)[: len(services)]


@given(st.binary(max_size=300), st.integers(min_value=0, max_value=len(VALID_DUMP) - 1))
def test_bytes_garbled_anywhere_never_raise_anything_but_the_reply_errors(noise: bytes, at: int) -> None:
    data = VALID_DUMP[:at] + noise + VALID_DUMP[at + len(noise) :]
    try:
        services = services_of(data, None)
    except (netlink_wire.MalformedReply, netlink_wire.NetlinkErrorReply):
        return
    assert all(service.fwmark or service.address is not None for service in services)
