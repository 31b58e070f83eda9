"""The hand-packed address dump request must be byte-for-byte what pyroute2's ``ifaddrmsg`` encodes, the
hand-packed bind and unbind requests what pyroute2's ``IPRoute.addr("add"/"del")`` compiles, and the
hand-parsed RTM_NEWADDR replies must read what pyroute2's decoder reads.

pyroute2 is the oracle (its encoder, its request compiler ``IPBatch`` and its decoder, not a mock of
them). Replies are encoded with pyroute2's ``ifaddrmsg`` in the kernel's attribute order (inet_fill_ifaddr:
ADDRESS, LOCAL, LABEL, FLAGS, CACHEINFO; inet6_fill_ifaddr: ADDRESS, CACHEINFO, FLAGS, PROTO), or with
struct where pyroute2 cannot write what is wanted (a garbled message). The kernel tier
(tests/kernel/test_device_addresses.py) checks a real kernel.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyroute2 import IPBatch
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg

from aproxy.backends import netlink_wire, rtnl_wire
from aproxy.core.model import BindAddress, IPAddress, UnbindAddress

SEQ = 41
NLM_F_MULTI = 0x2
RTM_NEWLINK = 16
AF_MCTP = 45
IFA_F_PERMANENT = 0x80
FOREVER = {"ifa_preferred": 0xFFFFFFFF, "ifa_valid": 0xFFFFFFFF, "cstamp": 123, "tstamp": 456}


# --- the request --------------------------------------------------------------------------------------------


def pyroute2_request(seq: int, family: int, index: int) -> bytes:
    msg = ifaddrmsg()
    msg["family"] = family
    msg["index"] = index
    msg["header"]["type"] = 22
    msg["header"]["flags"] = 0x1 | 0x300  # NLM_F_REQUEST | NLM_F_DUMP
    msg["header"]["sequence_number"] = seq
    msg.encode()
    return bytes(msg.data)


@pytest.mark.parametrize(
    ("family", "index"),
    [
        pytest.param(socket.AF_UNSPEC, 0, id="every-family-every-interface"),
        pytest.param(socket.AF_UNSPEC, 7, id="every-family-one-interface"),
        pytest.param(socket.AF_INET, 0, id="ipv4-every-interface"),
        pytest.param(socket.AF_INET, 3, id="ipv4-one-interface"),
        pytest.param(socket.AF_INET6, 0xFFFF_FFFF, id="ipv6-largest-index"),
    ],
)
def test_address_dump_request_matches_pyroute2_encoding(family: int, index: int) -> None:
    assert rtnl_wire.address_dump_request(SEQ, family, index) == pyroute2_request(SEQ, family, index)


def test_address_dump_request_defaults_to_every_family_and_interface() -> None:
    assert rtnl_wire.address_dump_request(9) == pyroute2_request(9, socket.AF_UNSPEC, 0)


def test_address_dump_request_is_a_dump_with_zero_filters_strict_checking_accepts() -> None:
    request = rtnl_wire.address_dump_request(SEQ, socket.AF_INET6, 12)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", request)
    family, prefixlen, ifa_flags, scope, index = struct.unpack_from("=BBBBI", request, 16)

    assert (length, kind, flags, seq, pid) == (len(request), 22, 0x301, SEQ, 0)
    # Strict checking refuses a dump request with a non-zero prefix length, flags or scope (EINVAL).
    assert (family, prefixlen, ifa_flags, scope, index) == (socket.AF_INET6, 0, 0, 0, 12)


# --- bind and unbind requests ------------------------------------------------------------------------------

NLM_F_ACK = 0x4


@pytest.fixture(scope="module")
def compiler() -> Iterator[IPBatch]:
    """pyroute2's request compiler: ``addr()`` packs the request into a buffer and sends nothing."""
    batch = IPBatch()
    try:
        yield batch
    finally:
        batch.close()


def pyroute2_address_request(
    compiler: IPBatch, op: BindAddress | UnbindAddress, index: int, *, ack: bool
) -> bytes:
    """What ``IPRoute.addr("add"/"del", index=..., address=..., prefixlen=...)`` sends, the way aproxy called
    it before (a host prefix). pyroute2 always asks an acknowledgement: without ``ack`` that bit is cleared,
    the one difference the batch makes."""
    compiler.reset()
    command = "add" if isinstance(op, BindAddress) else "del"
    compiler.addr(command, index=index, address=str(op.address), prefixlen=op.address.max_prefixlen)
    data = bytes(compiler.batch)
    if not ack:
        (flags,) = struct.unpack_from("=H", data, 6)
        data = data[:6] + struct.pack("=H", flags & ~NLM_F_ACK) + data[8:]
    return data


def without_seq_and_pid(request: bytes) -> bytes:
    """The request with its header's sequence number and port id left out (pyroute2 numbers its own)."""
    return request[:8] + request[16:]


ADDRESS_OPERATIONS = [
    pytest.param(BindAddress(IPv4Address("10.96.0.10")), id="bind-ipv4"),
    pytest.param(UnbindAddress(IPv4Address("10.96.0.10")), id="unbind-ipv4"),
    pytest.param(BindAddress(IPv6Address("fd00:10:96::a")), id="bind-ipv6"),
    pytest.param(UnbindAddress(IPv6Address("fd00:10:96::a")), id="unbind-ipv6"),
    pytest.param(BindAddress(IPv6Address("::ffff:10.96.0.10")), id="bind-ipv4-mapped-ipv6"),
]


@pytest.mark.parametrize("ack", [pytest.param(True, id="ack"), pytest.param(False, id="no-ack")])
@pytest.mark.parametrize("op", ADDRESS_OPERATIONS)
def test_address_request_matches_pyroute2_addr(
    compiler: IPBatch, op: BindAddress | UnbindAddress, ack: bool
) -> None:
    ours = rtnl_wire.address_request(SEQ, op, 7, ack=ack)

    assert without_seq_and_pid(ours) == without_seq_and_pid(
        pyroute2_address_request(compiler, op, 7, ack=ack)
    )
    assert struct.unpack_from("=II", ours, 8) == (SEQ, 0)  # the kernel fills in the sender's port id


ANY_ADDRESS = st.one_of(
    st.builds(IPv4Address, st.integers(min_value=0, max_value=2**32 - 1)),
    st.builds(IPv6Address, st.integers(min_value=0, max_value=2**128 - 1)),
)


@given(ANY_ADDRESS, st.booleans(), st.integers(min_value=0, max_value=2**32 - 1), st.booleans())
def test_any_address_request_matches_pyroute2_addr(
    compiler: IPBatch, address: IPAddress, bind: bool, index: int, ack: bool
) -> None:
    op = BindAddress(address) if bind else UnbindAddress(address)

    ours = rtnl_wire.address_request(SEQ, op, index, ack=ack)

    assert without_seq_and_pid(ours) == without_seq_and_pid(
        pyroute2_address_request(compiler, op, index, ack=ack)
    )


@pytest.mark.parametrize(
    ("op", "kind", "flags", "prefixlen", "attributes"),
    [
        pytest.param(
            BindAddress(IPv4Address("10.96.0.10")),
            rtnl_wire.RTM_NEWADDR,
            0x601,
            32,
            [("IFA_ADDRESS", "10.96.0.10"), ("IFA_LOCAL", "10.96.0.10")],
            id="bind-ipv4-create-exclusive-address-and-local",
        ),
        pytest.param(
            UnbindAddress(IPv4Address("10.96.0.10")),
            rtnl_wire.RTM_DELADDR,
            0x1,
            32,
            [("IFA_ADDRESS", "10.96.0.10"), ("IFA_LOCAL", "10.96.0.10")],
            id="unbind-ipv4-address-and-local",
        ),
        pytest.param(
            BindAddress(IPv6Address("fd00:10:96::a")),
            rtnl_wire.RTM_NEWADDR,
            0x601,
            128,
            [("IFA_ADDRESS", "fd00:10:96::a")],
            id="bind-ipv6-address-alone",
        ),
        pytest.param(
            UnbindAddress(IPv6Address("fd00:10:96::a")),
            rtnl_wire.RTM_DELADDR,
            0x1,
            128,
            [("IFA_ADDRESS", "fd00:10:96::a")],
            id="unbind-ipv6-address-alone",
        ),
    ],
)
def test_address_request_decodes_as_pyroute2_reads_it(
    op: BindAddress | UnbindAddress, kind: int, flags: int, prefixlen: int, attributes: list[tuple[str, str]]
) -> None:
    """What the kernel gets, in pyroute2's own reading: no broadcast, label or lifetimes, scope universe."""
    msg = ifaddrmsg(rtnl_wire.address_request(SEQ, op, 12, ack=False))
    msg.decode()

    assert (msg["header"]["type"], msg["header"]["flags"], msg["header"]["sequence_number"]) == (
        kind,
        flags,
        SEQ,
    )
    assert (msg["family"], msg["prefixlen"], msg["flags"], msg["scope"], msg["index"]) == (
        socket.AF_INET if op.address.version == 4 else socket.AF_INET6,
        prefixlen,
        0,
        0,
        12,
    )
    assert [(name, value) for name, value in msg["attrs"]] == attributes


@pytest.mark.parametrize("op", ADDRESS_OPERATIONS)
def test_only_the_ack_flag_differs_when_an_acknowledgement_is_asked(op: BindAddress | UnbindAddress) -> None:
    """A batch packs its last request again to ask the acknowledgement: same size, same bytes but one bit."""
    asked, not_asked = (rtnl_wire.address_request(SEQ, op, 3, ack=ack) for ack in (True, False))

    assert len(asked) == len(not_asked) == struct.unpack_from("=I", asked)[0]
    assert struct.unpack_from("=H", asked, 6)[0] == struct.unpack_from("=H", not_asked, 6)[0] | NLM_F_ACK
    assert asked[:6] + asked[8:] == not_asked[:6] + not_asked[8:]


# --- the replies, encoded by pyroute2 in the kernel's layout ------------------------------------------------


def pyroute2_message(
    family: int, prefixlen: int, index: int, attrs: list[tuple[str, Any]], *, kind: int = 20, seq: int = SEQ
) -> bytes:
    msg = ifaddrmsg()
    msg["family"] = family
    msg["prefixlen"] = prefixlen
    msg["flags"] = IFA_F_PERMANENT
    msg["scope"] = 0
    msg["index"] = index
    msg["attrs"] = attrs
    msg["header"]["type"] = kind
    msg["header"]["flags"] = NLM_F_MULTI
    msg["header"]["sequence_number"] = seq
    msg["header"]["pid"] = 4321
    msg.encode()
    return bytes(msg.data)


def ipv4_message(address: str, index: int, *, local: str | None = None, label: str = "kube-ipvs0") -> bytes:
    """inet_fill_ifaddr's order; IFA_LOCAL is the address itself unless a peer's is given in IFA_ADDRESS."""
    attrs: list[tuple[str, Any]] = [
        ("IFA_ADDRESS", address),
        ("IFA_LOCAL", local or address),
        ("IFA_LABEL", label),
        ("IFA_FLAGS", IFA_F_PERMANENT),
        ("IFA_CACHEINFO", FOREVER),
    ]
    return pyroute2_message(socket.AF_INET, 32, index, attrs)


def ipv6_message(address: str, index: int, prefixlen: int = 128) -> bytes:
    """inet6_fill_ifaddr without a peer: IFA_ADDRESS alone carries the address."""
    attrs: list[tuple[str, Any]] = [
        ("IFA_ADDRESS", address),
        ("IFA_CACHEINFO", FOREVER),
        ("IFA_FLAGS", IFA_F_PERMANENT),
        ("IFA_PROTO", 0),
    ]
    return pyroute2_message(socket.AF_INET6, prefixlen, index, attrs)


def nlmsg(kind: int, payload: bytes, seq: int = SEQ, flags: int = NLM_F_MULTI) -> bytes:
    length = 16 + len(payload)
    return struct.pack("=IHHII", length, kind, flags, seq, 4321) + payload + b"\0" * (-length % 4)


def nla(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def ifaddr(family: int, prefixlen: int, index: int) -> bytes:
    return struct.pack("=BBBBI", family, prefixlen, IFA_F_PERMANENT, 0, index)


def done(seq: int = SEQ) -> bytes:
    return nlmsg(3, struct.pack("=i", 0), seq)


def decoded(data: bytes) -> list[rtnl_wire.DumpedAddress | None]:
    return [rtnl_wire.decode_address(message) for message in netlink_wire.parse_messages(data, SEQ)]


def addresses_of(data: bytes) -> list[rtnl_wire.DumpedAddress]:
    return [address for address in decoded(data) if address is not None]


def one(data: bytes) -> rtnl_wire.DumpedAddress | None:
    (message,) = netlink_wire.parse_messages(data, SEQ)
    return rtnl_wire.decode_address(message)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(
            ipv4_message("10.96.0.10", 7),
            rtnl_wire.DumpedAddress(7, socket.AF_INET, 32, IPv4Address("10.96.0.10")),
            id="ipv4-local-and-address-agree",
        ),
        pytest.param(
            ipv4_message("10.1.0.2", 9, local="10.1.0.1"),
            rtnl_wire.DumpedAddress(9, socket.AF_INET, 32, IPv4Address("10.1.0.1")),
            id="ipv4-point-to-point-reads-local-not-the-peer",
        ),
        pytest.param(
            pyroute2_message(socket.AF_INET, 24, 4, [("IFA_ADDRESS", "192.0.2.1")]),
            rtnl_wire.DumpedAddress(4, socket.AF_INET, 24, IPv4Address("192.0.2.1")),
            id="ipv4-address-alone",
        ),
        pytest.param(
            ipv6_message("fd00:10:96::a", 7),
            rtnl_wire.DumpedAddress(7, socket.AF_INET6, 128, IPv6Address("fd00:10:96::a")),
            id="ipv6-address-alone",
        ),
        pytest.param(
            pyroute2_message(socket.AF_INET6, 128, 5, [("IFA_ADDRESS", "fd00::2"), ("IFA_LOCAL", "fd00::1")]),
            rtnl_wire.DumpedAddress(5, socket.AF_INET6, 128, IPv6Address("fd00::1")),
            id="ipv6-with-a-peer-reads-local",
        ),
        pytest.param(
            ipv6_message("fe80::1", 2, prefixlen=64),
            rtnl_wire.DumpedAddress(2, socket.AF_INET6, 64, IPv6Address("fe80::1")),
            id="ipv6-link-local",
        ),
    ],
)
def test_decode_address_reads_the_kernel_layout(data: bytes, expected: rtnl_wire.DumpedAddress) -> None:
    assert one(data) == expected


def pyroute2_decoding(data: bytes) -> tuple[int, int, int, IPAddress]:
    msg = ifaddrmsg(data)
    msg.decode()
    text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
    return msg["index"], msg["family"], msg["prefixlen"], ip_address(text)


def as_tuple(address: rtnl_wire.DumpedAddress | None) -> tuple[int, int, int, IPAddress]:
    assert address is not None
    return address.index, address.family, address.prefixlen, address.address


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(ipv4_message("10.96.0.10", 7), id="ipv4"),
        pytest.param(ipv4_message("10.1.0.2", 9, local="10.1.0.1"), id="ipv4-peer"),
        pytest.param(ipv6_message("fd00:10:96::a", 7), id="ipv6"),
    ],
)
def test_decode_address_agrees_with_pyroute2_decoder(data: bytes) -> None:
    assert as_tuple(one(data)) == pyroute2_decoding(data)


IPV4 = st.builds(IPv4Address, st.integers(min_value=0, max_value=2**32 - 1))
IPV6 = st.builds(IPv6Address, st.integers(min_value=0, max_value=2**128 - 1))
INDEXES = st.integers(min_value=1, max_value=2**32 - 1)


@given(st.one_of(IPV4, IPV6), INDEXES, st.integers(min_value=0, max_value=128), st.booleans())
def test_any_address_decodes_as_pyroute2_decodes_it(
    address: IPAddress, index: int, prefixlen: int, with_local: bool
) -> None:
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    attrs: list[tuple[str, Any]] = [("IFA_ADDRESS", str(address))]
    if with_local:
        attrs.append(("IFA_LOCAL", str(address)))
    data = pyroute2_message(family, min(prefixlen, address.max_prefixlen), index, attrs)

    ours = one(data)

    assert as_tuple(ours) == pyroute2_decoding(data)
    assert ours is not None and ours.address == address and ours.index == index


# --- a dump's buffer ----------------------------------------------------------------------------------------


def test_a_dump_reads_every_family_and_keeps_each_index_for_the_reader_to_filter() -> None:
    data = (
        ipv4_message("10.96.0.10", 7)
        + ipv4_message("172.30.0.2", 2, label="eth0")
        + ipv6_message("fd00:10:96::a", 7)
        + done()
    )

    assert [(a.index, a.address) for a in addresses_of(data)] == [
        (7, ip_address("10.96.0.10")),
        (2, ip_address("172.30.0.2")),
        (7, ip_address("fd00:10:96::a")),
    ]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(nlmsg(RTM_NEWLINK, b"\0" * 16), id="a-link-message"),
        pytest.param(done(), id="the-done-message"),
        pytest.param(nlmsg(2, struct.pack("=i", 0) + b"\0" * 16, flags=0), id="an-acknowledgement"),
        pytest.param(
            nlmsg(rtnl_wire.RTM_NEWADDR, ifaddr(AF_MCTP, 0, 7) + nla(rtnl_wire.IFA_LOCAL, b"\x08")),
            id="an-mctp-address-is-not-ip",
        ),
    ],
)
def test_messages_that_carry_no_ip_address_are_passed_over(data: bytes) -> None:
    assert one(data) is None


def test_messages_of_another_request_are_not_read() -> None:
    stale = ipv4_message("10.96.0.99", 7)
    stale = stale[:8] + struct.pack("=I", SEQ - 1) + stale[12:]

    assert addresses_of(stale + ipv4_message("10.96.0.10", 7) + done()) == [
        rtnl_wire.DumpedAddress(7, socket.AF_INET, 32, IPv4Address("10.96.0.10"))
    ]


# --- malformed replies --------------------------------------------------------------------------------------

V4_ATTRS = nla(rtnl_wire.IFA_ADDRESS, bytes([10, 96, 0, 10])) + nla(
    rtnl_wire.IFA_LOCAL, bytes([10, 96, 0, 10])
)

GARBLED = [
    pytest.param(ipv4_message("10.96.0.10", 7)[:12], "too short for a netlink header", id="buffer-cut"),
    pytest.param(ipv4_message("10.96.0.10", 7)[:40], "netlink message length", id="message-cut"),
    pytest.param(nlmsg(rtnl_wire.RTM_NEWADDR, b"\2\x20\x80\0"), "struct ifaddrmsg", id="ifaddrmsg-cut"),
    pytest.param(
        nlmsg(
            rtnl_wire.RTM_NEWADDR,
            ifaddr(socket.AF_INET, 32, 7) + struct.pack("=HH", 40, rtnl_wire.IFA_LOCAL) + b"\0" * 4,
        ),
        "attribute length 40",
        id="attribute-overruns-the-message",
    ),
    pytest.param(
        nlmsg(rtnl_wire.RTM_NEWADDR, ifaddr(socket.AF_INET, 32, 7) + struct.pack("=HH", 2, 1)),
        "attribute length 2",
        id="attribute-length-below-its-header",
    ),
    pytest.param(
        nlmsg(rtnl_wire.RTM_NEWADDR, ifaddr(socket.AF_INET, 32, 7) + V4_ATTRS + b"\1\0"),
        "too short for an attribute",
        id="attribute-header-cut",
    ),
    pytest.param(
        nlmsg(rtnl_wire.RTM_NEWADDR, ifaddr(socket.AF_INET, 32, 7) + nla(3, b"eth0\0")),
        "without IFA_LOCAL or IFA_ADDRESS",
        id="no-address-attribute",
    ),
    pytest.param(
        nlmsg(rtnl_wire.RTM_NEWADDR, ifaddr(socket.AF_INET, 32, 7) + nla(rtnl_wire.IFA_LOCAL, b"\0" * 16)),
        "16-byte address in family 2",
        id="ipv4-family-with-an-ipv6-sized-address",
    ),
    pytest.param(
        nlmsg(rtnl_wire.RTM_NEWADDR, ifaddr(socket.AF_INET6, 128, 7) + nla(rtnl_wire.IFA_ADDRESS, b"\0" * 4)),
        "4-byte address in family 10",
        id="ipv6-family-with-an-ipv4-sized-address",
    ),
]


@pytest.mark.parametrize(("data", "reason"), GARBLED)
def test_garbled_replies_raise_malformed_reply(data: bytes, reason: str) -> None:
    with pytest.raises(netlink_wire.MalformedReply, match=reason):
        decoded(data)


VALID_DUMP = (
    ipv4_message("10.96.0.10", 7)
    + ipv6_message("fd00:10:96::a", 7)
    + ipv4_message("10.1.0.2", 9, local="10.1.0.1")
    + done()
)


@given(st.integers(min_value=0, max_value=len(VALID_DUMP) - 1))
def test_a_dump_cut_anywhere_reads_its_whole_messages_or_raises_malformed_reply(cut: int) -> None:
    try:
        found = addresses_of(VALID_DUMP[:cut])
    except netlink_wire.MalformedReply:
        return
    assert found == addresses_of(VALID_DUMP)[: len(found)]


@given(st.binary(max_size=200), st.integers(min_value=0, max_value=len(VALID_DUMP) - 1))
def test_bytes_garbled_anywhere_never_raise_anything_but_the_reply_errors(noise: bytes, at: int) -> None:
    data = VALID_DUMP[:at] + noise + VALID_DUMP[at + len(noise) :]
    try:
        found = addresses_of(data)
    except (netlink_wire.MalformedReply, netlink_wire.NetlinkErrorReply):
        return
    assert all(address.family in (socket.AF_INET, socket.AF_INET6) for address in found)
