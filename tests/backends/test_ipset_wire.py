"""The hand-packed ipset requests must be byte-for-byte what pyroute2's message classes encode.

pyroute2 is the oracle here (its encoder, not a mock of it): if both agree, the kernel reads our batched
messages exactly as it reads pyroute2's. The kernel tier (tests/kernel/test_traffic.py) proves the kernel
accepts them and that hairpin traffic then flows.
"""

from __future__ import annotations

import socket
import struct
from ipaddress import ip_address
from typing import Any

import pytest
from pyroute2.netlink.nfnetlink.ipset import ipset_msg

from aproxy.backends import ipset_wire
from aproxy.backends.nat_rules import LoopBackEntry, set_requests
from aproxy.backends.netlink_wire import NLA_F_NESTED, NLA_F_NET_BYTEORDER, Ack, parse_acks, parse_messages
from aproxy.core.model import IPAddress, L4Protocol

POD4 = ip_address("10.244.1.5")
POD6 = ip_address("fd00:10:244::5")


def _pyroute2_bytes(seq: int, command: int, family: int, attrs: list[Any], *, ack: bool) -> bytes:
    msg = ipset_msg()
    msg["nfgen_family"] = family
    msg["attrs"] = attrs
    msg["header"]["type"] = ipset_wire.message_type(command)
    msg["header"]["flags"] = 1 | (4 if ack else 0)
    msg["header"]["sequence_number"] = seq
    msg.encode()
    return bytes(msg.data)


def _ip(address: IPAddress) -> dict[str, Any]:
    kind = "IPSET_ATTR_IPADDR_IPV4" if address.version == 4 else "IPSET_ATTR_IPADDR_IPV6"
    return {"attrs": [[kind, str(address)]]}


def _member_attrs(member: ipset_wire.Member, version: int) -> list[Any]:
    # The order pyroute2's IPSet.add uses for etype "ip,port,ip" with a PortEntry carrying a protocol.
    data = [
        ["IPSET_ATTR_IP", _ip(member.address)],
        ["IPSET_ATTR_PORT", member.port],
        ["IPSET_ATTR_PROTO", member.protocol],
        ["IPSET_ATTR_IP2", _ip(member.address2)],
    ]
    return [
        ["IPSET_ATTR_PROTOCOL", version],
        ["IPSET_ATTR_SETNAME", member.set_name],
        ["IPSET_ATTR_DATA", {"attrs": data}],
    ]


MEMBERS = [
    pytest.param(
        ipset_wire.Member("APROXY-LOOP-BACK", POD4, socket.IPPROTO_TCP, 8080, POD4),
        socket.AF_INET,
        id="ipv4-tcp",
    ),
    pytest.param(
        ipset_wire.Member("APROXY-LOOP-BACK6", POD6, socket.IPPROTO_UDP, 53, POD6),
        socket.AF_INET6,
        id="ipv6-udp",
    ),
    pytest.param(
        ipset_wire.Member("APROXY-LOOP-BACK", POD4, socket.IPPROTO_SCTP, 65535, POD4),
        socket.AF_INET,
        id="ipv4-sctp-highest-port",
    ),
]


@pytest.mark.parametrize(("member", "family"), MEMBERS)
@pytest.mark.parametrize("command", [ipset_wire.CMD_ADD, ipset_wire.CMD_DEL], ids=["add", "del"])
@pytest.mark.parametrize("version", [7, 6], ids=["protocol-7", "protocol-6"])
@pytest.mark.parametrize("ack", [True, False], ids=["ack", "no-ack"])
def test_member_request_matches_pyroute2_encoding(
    member: ipset_wire.Member, family: int, command: int, version: int, ack: bool
) -> None:
    assert member.family == family
    ours = ipset_wire.pack_request(4242, command, family, ipset_wire.member_attrs(member, version), ack=ack)

    assert ours == _pyroute2_bytes(4242, command, family, _member_attrs(member, version), ack=ack)


def test_data_and_addresses_carry_the_flags_the_kernel_checks() -> None:
    # Without NLA_F_NESTED / NLA_F_NET_BYTEORDER the kernel answers IPSET_ERR_PROTOCOL: pin them explicitly,
    # not only through the oracle.
    member = ipset_wire.Member("S", POD4, socket.IPPROTO_TCP, 80, POD4)
    attrs = ipset_wire.member_attrs(member, 7)
    protocol, setname, data = struct.unpack_from("=HH", attrs, 0), struct.unpack_from("=HH", attrs, 8), 16

    assert protocol == (5, ipset_wire.ATTR_PROTOCOL)
    assert setname == (6, ipset_wire.ATTR_SETNAME)
    assert struct.unpack_from("=H", attrs, data + 2)[0] == ipset_wire.ATTR_DATA | NLA_F_NESTED
    ip_kind, inner_kind = (
        struct.unpack_from("=H", attrs, data + 6)[0],
        struct.unpack_from("=H", attrs, data + 10)[0],
    )
    assert ip_kind == ipset_wire.DATA_IP | NLA_F_NESTED
    assert inner_kind == ipset_wire.IPADDR_IPV4 | NLA_F_NET_BYTEORDER


def test_no_request_asks_for_exclusive_add() -> None:
    # NLM_F_EXCL (0x200) would turn a re-add of a present member into IPSET_ERR_EXIST: writes are replayed.
    member = ipset_wire.Member("S", POD4, socket.IPPROTO_TCP, 80, POD4)
    attrs = ipset_wire.member_attrs(member, 7)
    flags = [
        struct.unpack_from("=H", ipset_wire.pack_request(1, command, member.family, attrs, ack=ack), 6)[0]
        for command in (ipset_wire.CMD_ADD, ipset_wire.CMD_DEL)
        for ack in (True, False)
    ]

    assert flags == [0x5, 0x1, 0x5, 0x1]  # NLM_F_REQUEST, NLM_F_ACK on the last of a batch only


def test_protocol_request_matches_pyroute2_encoding() -> None:
    assert ipset_wire.protocol_request(3) == _pyroute2_bytes(
        3, ipset_wire.CMD_PROTOCOL, socket.AF_INET, [["IPSET_ATTR_PROTOCOL", 6]], ack=True
    )


def _protocol_reply(attrs: list[Any]) -> bytes:
    msg = ipset_msg()
    msg["attrs"] = attrs
    msg["header"]["type"] = ipset_wire.message_type(ipset_wire.CMD_PROTOCOL)
    msg["header"]["sequence_number"] = 3
    msg.encode()
    return bytes(msg.data)


ACK_3 = (
    struct.pack("=IHHII", 36, 2, 0, 3, 0) + struct.pack("=i", 0) + struct.pack("=IHHII", 16, 0x601, 5, 3, 0)
)


@pytest.mark.parametrize(
    ("attrs", "answer", "chosen"),
    [
        pytest.param(
            [["IPSET_ATTR_PROTOCOL", 7], ["IPSET_ATTR_PROTOCOL_MIN", 6]],
            (7, 6),
            7,
            id="kernel-6.1-speaks-6-to-7",
        ),
        pytest.param([["IPSET_ATTR_PROTOCOL", 6]], (6, 6), 6, id="old-kernel-speaks-only-6"),
        pytest.param(
            [["IPSET_ATTR_PROTOCOL", 8], ["IPSET_ATTR_PROTOCOL_MIN", 6]],
            (8, 6),
            7,
            id="newer-kernel-still-takes-7",
        ),
    ],
)
def test_protocol_reply_picks_7_else_6(attrs: list[Any], answer: tuple[int, int], chosen: int) -> None:
    parsed = ipset_wire.parse_protocol_reply(parse_messages(_protocol_reply(attrs) + ACK_3))

    assert parsed == answer
    assert ipset_wire.choose_protocol(*answer) == chosen


def test_protocol_outside_6_to_7_is_refused() -> None:
    with pytest.raises(ipset_wire.ProtocolMismatch):
        ipset_wire.choose_protocol(9, 8)


def test_no_protocol_reply_in_a_bare_ack() -> None:
    assert ipset_wire.parse_protocol_reply(parse_messages(ACK_3)) is None


def test_ipset_errors_map_back_by_sequence_number() -> None:
    # The same NLMSG_ERROR layout as every netlink family: parse_acks reads ipset's codes unchanged.
    def error_message(seq: int, code: int) -> bytes:
        payload = struct.pack("=i", -code) + struct.pack("=IHHII", 16, 0x609, 1, seq, 0)
        return struct.pack("=IHHII", 16 + len(payload), 2, 0, seq, 0) + payload

    data = error_message(5, ipset_wire.ERR_PROTOCOL) + error_message(6, 0)

    assert list(parse_acks(data)) == [Ack(5, ipset_wire.ERR_PROTOCOL), Ack(6, 0)]
    assert "protocol" in ipset_wire.describe_error(ipset_wire.ERR_PROTOCOL)
    assert ipset_wire.describe_error(2) == "No such file or directory"


def test_a_change_sends_removals_first_then_additions_as_wire_members() -> None:
    gone = LoopBackEntry(POD4, L4Protocol.UDP, 53)
    new = LoopBackEntry(POD6, L4Protocol.TCP, 8080)

    requests = [(command, entry.wire()) for command, entry in set_requests([new], [gone])]

    assert requests == [
        (ipset_wire.CMD_DEL, ipset_wire.Member("APROXY-LOOP-BACK", POD4, socket.IPPROTO_UDP, 53, POD4)),
        (ipset_wire.CMD_ADD, ipset_wire.Member("APROXY-LOOP-BACK6", POD6, socket.IPPROTO_TCP, 8080, POD6)),
    ]
