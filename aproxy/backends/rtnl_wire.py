"""rtnetlink addresses by hand: the dump request packed, its RTM_NEWADDR replies parsed, and the requests
that bind and unbind one address packed.

Every cluster IP is bound on aproxy's dummy device, so listing the device's addresses (start-up, every
audit, every reconcile's read) reads one message per service. pyroute2 decodes each of them, every
attribute, through its generic message classes: at 1,000 services that made the targeted re-read of one
virtual server cost ten times what it costs at 100. Here only the ``ifaddrmsg`` header and the one address
attribute are read; the rest (label, flags, cache info) is skipped unread. Tests compare the request with
pyroute2's encoding and the decoding with pyroute2's decoder.

Binding and unbinding are packed here too, so that the backend sends them in batches on the socket that
reads the addresses (many requests per ``sendmsg``, like its IPVS requests) instead of one pyroute2 request
and one acknowledgement each: every cluster IP is one address to bind.

The messages of a reply are split with netlink_wire's helpers (``parse_messages``, ``parse_attributes``),
which every netlink family shares.

Layouts (include/uapi/linux/netlink.h, if_addr.h): nlmsghdr (len u32, type u16, flags u16, seq u32, pid u32),
struct ifaddrmsg (family u8, prefixlen u8, flags u8, scope u8, index u32), then attributes (len u16,
type u16, payload, 4-byte aligned). Numbers are host order; addresses are 4 or 16 bytes, network order.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from aproxy.backends.netlink_wire import (
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    MalformedReply,
    Message,
    attribute,
    pack_message,
    parse_attributes,
    request_flags,
)
from aproxy.core.model import BindAddress, IPAddress, UnbindAddress

RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22

IFA_ADDRESS = 1
IFA_LOCAL = 2

_IFADDRMSG = struct.Struct("=BBBBI")
_ADDRESS_BYTES = {socket.AF_INET: 4, socket.AF_INET6: 16}


@dataclass(frozen=True, slots=True)
class DumpedAddress:
    """One address of an address dump: the interface it is bound on, its family and prefix length."""

    index: int
    family: int
    prefixlen: int
    address: IPAddress


def address_dump_request(seq: int, family: int = socket.AF_UNSPEC, index: int = 0) -> bytes:
    """RTM_GETADDR as a dump: the addresses of ``family`` (AF_UNSPEC: every family) on interface ``index``.

    The kernel honours ``index`` only on a socket with NETLINK_GET_STRICT_CHK set (Linux 4.20+; it then
    also refuses a non-zero prefixlen, flags or scope, hence zeros); without it every interface's addresses
    come back, so readers filter on ``DumpedAddress.index`` as well.
    """
    return pack_message(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, _IFADDRMSG.pack(family, 0, 0, 0, index))


def address_request(seq: int, op: BindAddress | UnbindAddress, index: int, *, ack: bool) -> bytes:
    """RTM_NEWADDR (bind) or RTM_DELADDR (unbind) of one host address (/32, /128) on interface ``index``:
    what pyroute2 sends for ``IPRoute.addr("add"/"del", index=index, address=..., prefixlen=...)``.

    A bind asks NLM_F_CREATE|NLM_F_EXCL (pyroute2's "add"), so an address already bound is refused with
    EEXIST rather than updated in place; an unbind of an address not bound is refused with EADDRNOTAVAIL.
    NLM_F_ACK only when ``ack``: in a batch only the last request asks, and the kernel answers every refused
    one regardless. The attributes are pyroute2's (and iproute2's): IPv4 sends IFA_LOCAL, the interface's
    own address, as well as IFA_ADDRESS (the peer on a point-to-point link, here the same address); IPv6
    sends IFA_ADDRESS alone. No broadcast, label or lifetimes: a host address has no broadcast, and the
    kernel's defaults (the device's name, forever) are what pyroute2 gets too.
    Scope 0 is RT_SCOPE_UNIVERSE, flags 0 the kernel's default (a permanent address).
    """
    address = op.address
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    attributes = attribute(IFA_ADDRESS, address.packed)
    if family == socket.AF_INET:
        attributes += attribute(IFA_LOCAL, address.packed)
    if isinstance(op, BindAddress):
        kind, flags = RTM_NEWADDR, request_flags(ack=ack) | NLM_F_CREATE | NLM_F_EXCL
    else:
        kind, flags = RTM_DELADDR, request_flags(ack=ack)
    body = _IFADDRMSG.pack(family, address.max_prefixlen, 0, 0, index) + attributes
    return pack_message(kind, flags, seq, body)


def decode_address(message: Message) -> DumpedAddress | None:
    """The address of an RTM_NEWADDR message; None for any other message type, or an address family that is
    not IP (an AF_UNSPEC dump also asks MCTP, for one, when its module is loaded).

    IFA_LOCAL is the interface's own address and is preferred (as the kernel and iproute2 do): on a
    point-to-point link IPv4's IFA_ADDRESS is the peer's. IPv6 sends IFA_ADDRESS alone unless there is a peer.
    """
    if message.kind != RTM_NEWADDR:
        return None
    if len(message.payload) < _IFADDRMSG.size:
        raise MalformedReply(
            f"address message of request {message.seq}: {len(message.payload)} bytes, "
            f"too short for struct ifaddrmsg ({_IFADDRMSG.size})"
        )
    family, prefixlen, _flags, _scope, index = _IFADDRMSG.unpack_from(message.payload)
    size = _ADDRESS_BYTES.get(family)
    if size is None:
        return None
    attributes = parse_attributes(message.payload, _IFADDRMSG.size)
    payload = attributes.get(IFA_LOCAL, attributes.get(IFA_ADDRESS))
    if payload is None:
        raise MalformedReply(f"address message of request {message.seq} without IFA_LOCAL or IFA_ADDRESS")
    if len(payload) != size:
        raise MalformedReply(
            f"address message of request {message.seq}: a {len(payload)}-byte address in family {family}"
        )
    address: IPAddress = IPv4Address(payload) if family == socket.AF_INET else IPv6Address(payload)
    return DumpedAddress(index=index, family=family, prefixlen=prefixlen, address=address)
