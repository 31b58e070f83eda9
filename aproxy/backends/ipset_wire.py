"""The bytes of ipset netlink requests (add and delete one member), packed by hand for batching.

``ipset restore`` sends one message and waits for its acknowledgement per member, after an /etc/protocols
lookup per line, and costs a process start per batch: ~80 ms for one endpoint change. The ipset netlink
protocol is an nfnetlink subsystem, so members go out like IPVS requests (ipvs_wire.py): many messages per
``sendmsg``, each with its own sequence number, an acknowledgement asked only on the last, every error
answered with the sequence number of its request. Tests compare these bytes with pyroute2's encoding.
The netlink header, the attributes and the splitting of replies are netlink_wire.py's.

Layouts (include/uapi/linux/netfilter/ipset/ip_set.h, nfnetlink.h): nlmsghdr, then nfgenmsg (family u8,
version u8, res_id be16), then attributes. The kernel insists on NLA_F_NESTED for the data and address
attributes and NLA_F_NET_BYTEORDER for addresses and ports (it answers IPSET_ERR_PROTOCOL otherwise).

Without NLM_F_EXCL the kernel applies ``-exist`` semantics itself: adding a present member or deleting a
missing one succeeds, which makes every request idempotent (the audit may replay what a sync already did).
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from aproxy.backends.netlink_wire import (
    NLA_F_NESTED,
    NLA_F_NET_BYTEORDER,
    Message,
    attribute,
    pack_message,
    parse_attributes,
    request_flags,
)
from aproxy.core.model import IPAddress

NFNL_SUBSYS_IPSET = 6
NFNETLINK_V0 = 0

CMD_PROTOCOL = 1
CMD_ADD = 9
CMD_DEL = 10

# The protocol versions this module speaks: 7 (kernels since 5.9), 6 as the oldest the kernel accepts.
PROTOCOL_PREFERRED = 7
PROTOCOL_OLDEST = 6

ATTR_PROTOCOL = 1
ATTR_SETNAME = 2
ATTR_DATA = 7
ATTR_PROTOCOL_MIN = 10

DATA_IP = 1
DATA_PORT = 4
DATA_PROTO = 7
DATA_IP2 = 20
DATA_CIDR2 = 21

IPADDR_IPV4 = 1
IPADDR_IPV6 = 2

# The kernel's own error codes (beyond errno), for log messages.
ERRORS: dict[int, str] = {
    4097: "ipset protocol error (malformed request or unsupported protocol version)",
    4098: "set type not supported",
    4099: "too many sets",
    4100: "set is in use",
    4101: "second set does not exist",
    4102: "set type mismatch",
    4103: "element already exists or is missing",
    4106: "address family mismatch",
    4109: "invalid IPv4 address",
    4110: "invalid IPv6 address",
}
ERR_PROTOCOL = 4097
ERR_EXIST = 4103

_NFGENMSG = struct.Struct("=BBH")  # res_id is big-endian, but always 0
_U8 = struct.Struct("=B")
_BE16 = struct.Struct(">H")

MAX_SET_NAME = 31  # IPSET_MAXNAMELEN - 1: the kernel refuses longer names


class ProtocolMismatch(ValueError):
    """The kernel speaks no ipset protocol version this module can write."""


@dataclass(frozen=True, slots=True)
class Member:
    """One set member: what its set's type has of address, protocol (IP protocol number) and port, second
    address or network (``address2``/``cidr2``). ``hash:ip,port,ip`` has all but ``cidr2``; ``hash:ip,port``
    the first three; ``hash:ip,port,net`` adds ``cidr2``; ``hash:ip`` only the address; ``bitmap:port`` only
    the port (None: absent from the request)."""

    set_name: str
    address: IPAddress | None
    protocol: int | None
    port: int | None
    address2: IPAddress | None = None
    cidr2: int | None = None

    @property
    def family(self) -> int:
        # A bitmap:port set has no family: the kernel takes any in the request; IPv4 is as good as another.
        return socket.AF_INET6 if self.address is not None and self.address.version == 6 else socket.AF_INET


def member_text(member: Member) -> str:
    """The member as ``ipset`` prints it: ``address,proto:port,address2[/cidr2]``, parts it lacks left out."""
    parts = [] if member.address is None else [str(member.address)]
    if member.port is not None:
        names = {6: "tcp", 17: "udp", 132: "sctp"}
        port = str(member.port) if member.protocol is None else f"{names.get(member.protocol)}:{member.port}"
        parts.append(port)
    if member.address2 is not None:
        parts.append(str(member.address2) if member.cidr2 is None else f"{member.address2}/{member.cidr2}")
    return ",".join(parts)


def message_type(command: int) -> int:
    return (NFNL_SUBSYS_IPSET << 8) | command


def _address(kind: int, address: IPAddress) -> bytes:
    inner = IPADDR_IPV4 if address.version == 4 else IPADDR_IPV6
    return attribute(kind | NLA_F_NESTED, attribute(inner | NLA_F_NET_BYTEORDER, address.packed))


def member_attrs(member: Member, protocol_version: int) -> bytes:
    """The attributes of an add or delete of ``member``: protocol, set name, then the nested data."""
    parts = []
    if member.address is not None:
        parts.append(_address(DATA_IP, member.address))
    if member.port is not None:
        parts.append(attribute(DATA_PORT | NLA_F_NET_BYTEORDER, _BE16.pack(member.port)))
    if member.protocol is not None:
        parts.append(attribute(DATA_PROTO | NLA_F_NET_BYTEORDER, _U8.pack(member.protocol)))
    if member.address2 is not None:
        parts.append(_address(DATA_IP2, member.address2))
    if member.cidr2 is not None:
        parts.append(attribute(DATA_CIDR2, _U8.pack(member.cidr2)))
    data = b"".join(parts)
    return b"".join(
        (
            attribute(ATTR_PROTOCOL, _U8.pack(protocol_version)),
            attribute(ATTR_SETNAME, member.set_name.encode("ascii") + b"\0"),
            attribute(ATTR_DATA | NLA_F_NESTED, data),
        )
    )


def pack_request(seq: int, command: int, family: int, attributes: bytes, *, ack: bool) -> bytes:
    body = _NFGENMSG.pack(family, NFNETLINK_V0, 0) + attributes
    return pack_message(message_type(command), request_flags(ack=ack), seq, body)


def protocol_request(seq: int) -> bytes:
    """Ask the kernel which protocol versions it speaks (the request itself must carry one)."""
    attributes = attribute(ATTR_PROTOCOL, _U8.pack(PROTOCOL_OLDEST))
    return pack_request(seq, CMD_PROTOCOL, socket.AF_INET, attributes, ack=True)


def parse_protocol_reply(messages: Iterable[Message]) -> tuple[int, int] | None:
    """(newest, oldest) protocol version from the CMD_PROTOCOL reply among ``messages``; None without one."""
    for message in messages:
        if message.kind != message_type(CMD_PROTOCOL):
            continue
        found = parse_attributes(message.payload, _NFGENMSG.size)
        if found.get(ATTR_PROTOCOL):
            newest = found[ATTR_PROTOCOL][0]
            # Kernels before protocol 7 send no minimum: they speak only their own version.
            oldest = found[ATTR_PROTOCOL_MIN][0] if found.get(ATTR_PROTOCOL_MIN) else newest
            return newest, oldest
    return None


def choose_protocol(newest: int, oldest: int) -> int:
    """The version to write: 7 when the kernel takes it, else 6."""
    for version in (PROTOCOL_PREFERRED, PROTOCOL_OLDEST):
        if oldest <= version <= newest:
            return version
    raise ProtocolMismatch(f"kernel speaks ipset protocol {oldest}..{newest}, aproxy writes 6 or 7")


def describe_error(code: int) -> str:
    """A readable message for an errno or an ipset error code."""
    return ERRORS.get(code) or os.strerror(code)
