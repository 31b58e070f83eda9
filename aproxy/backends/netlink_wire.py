"""What every netlink family shares on the wire: the message and attribute headers and flags, packing a
message and an attribute, and splitting a reply into messages, acknowledgements and attributes.

The IPVS (generic netlink), ipset (nfnetlink) and address (rtnetlink) modules build their requests and read
their replies with these; each adds only its own family header and attribute numbers.

Layouts (include/uapi/linux/netlink.h): nlmsghdr (len u32, type u16, flags u16, seq u32, pid u32), the
family's header, then attributes (len u16, type u16, payload, 4-byte aligned). An NLMSG_ERROR (and an
NLMSG_DONE that ends a dump) carries a negative errno (s32) first. Numbers are host order.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

# struct nlmsghdr: length, type, flags, sequence number, port id (host order).
NLMSGHDR: Final = struct.Struct("=IHHII")
# struct nlattr: length, type (host order); the payload follows, padded to 4 bytes.
NLAHDR: Final = struct.Struct("=HH")
# struct nlmsgerr starts with the error: 0 for an acknowledgement, else a negative errno.
_ERRHDR: Final = struct.Struct("=i")

NLM_F_REQUEST: Final = 0x1
NLM_F_ACK: Final = 0x4
NLM_F_DUMP: Final = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLM_F_EXCL: Final = 0x200
NLM_F_CREATE: Final = 0x400

NLMSG_NOOP: Final = 0x1
NLMSG_ERROR: Final = 0x2
NLMSG_DONE: Final = 0x3

NLA_F_NESTED: Final = 0x8000
NLA_F_NET_BYTEORDER: Final = 0x4000
# The two high bits of nla_type are those flags, not part of the type.
NLA_TYPE_MASK: Final = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF


def _aligned(length: int) -> int:
    return (length + 3) & ~3


def attribute(kind: int, payload: bytes) -> bytes:
    """One attribute: its header, ``payload``, and the padding to the next 4-byte boundary."""
    length = NLAHDR.size + len(payload)
    return NLAHDR.pack(length, kind) + payload + b"\0" * (-length % 4)


def pack_message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    """One message: its header (port id 0: the kernel's), then ``body`` (family header and attributes)."""
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def request_flags(*, ack: bool) -> int:
    """A request's flags, asking an acknowledgement only when ``ack`` (in a batch, only the last one asks)."""
    return NLM_F_REQUEST | (NLM_F_ACK if ack else 0)


# --- replies ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ack:
    """One NLMSG_ERROR reply: ``error`` is 0 for an acknowledgement, else a positive errno."""

    seq: int
    error: int


def parse_acks(data: bytes) -> Iterator[Ack]:
    """The acknowledgements and errors in one received buffer; other message types are passed over."""
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, kind, _flags, seq, _pid = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size:
            break  # a corrupt header: nothing after it can be trusted
        if kind == NLMSG_ERROR:
            (error,) = _ERRHDR.unpack_from(data, offset + NLMSGHDR.size)
            yield Ack(seq=seq, error=-error)
        offset += _aligned(length)


class MalformedReply(ValueError):
    """A reply that is not what the kernel sends: truncated, a length that overruns, a missing attribute."""


class NetlinkErrorReply(OSError):
    """The kernel refused a request (NLMSG_ERROR, or a dump that ended with an error): ``errno`` says why."""

    def __init__(self, seq: int, error: int) -> None:
        # A garbled reply can carry -INT_MIN, which os.strerror cannot take (OverflowError, not an OSError).
        reason = os.strerror(error) if error < 2**31 else f"error {error}"
        super().__init__(error, f"{reason} (netlink request {seq})")
        self.seq = seq


@dataclass(frozen=True, slots=True)
class Message:
    """One netlink message of a reply: its header's type, flags and sequence number, and what follows."""

    kind: int
    flags: int
    seq: int
    payload: bytes


def _error_code(message_kind: int, payload: bytes, seq: int) -> int:
    """The positive errno an NLMSG_ERROR or NLMSG_DONE carries (0: success)."""
    if len(payload) < _ERRHDR.size:
        raise MalformedReply(f"netlink message type {message_kind} of request {seq} without its error code")
    error: int = _ERRHDR.unpack_from(payload)[0]
    return -error


def parse_messages(data: bytes, seq: int | None = None) -> Iterator[Message]:
    """The netlink messages of one received buffer, up to and including NLMSG_DONE.

    With ``seq``, only the answers to that request: whatever is left of an earlier request that timed out is
    passed over, its errors too. NLMSG_NOOP is passed over. An NLMSG_ERROR with an error, or an NLMSG_DONE
    that ends a dump with one, raises :class:`NetlinkErrorReply`; an acknowledgement (error 0) is yielded.
    """
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < NLMSGHDR.size:
            raise MalformedReply(f"{end - offset} bytes at offset {offset}: too short for a netlink header")
        length, kind, flags, message_seq, _pid = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > end:
            raise MalformedReply(f"netlink message length {length} at offset {offset} of {end} bytes")
        if seq is None or message_seq == seq:
            payload = data[offset + NLMSGHDR.size : offset + length]
            if kind in (NLMSG_ERROR, NLMSG_DONE):
                error = _error_code(kind, payload, message_seq)
                if error:
                    raise NetlinkErrorReply(message_seq, error)
            if kind != NLMSG_NOOP:
                yield Message(kind, flags, message_seq, payload)
            if kind == NLMSG_DONE:
                return
        offset += _aligned(length)


def parse_attributes(data: bytes, offset: int = 0) -> dict[int, bytes]:
    """One level of attributes from ``offset`` on: type (flags masked off) -> payload; nests stay bytes."""
    attributes: dict[int, bytes] = {}
    end = len(data)
    while offset < end:
        if end - offset < NLAHDR.size:
            raise MalformedReply(f"{end - offset} bytes at offset {offset}: too short for an attribute")
        length, kind = NLAHDR.unpack_from(data, offset)
        if length < NLAHDR.size or offset + length > end:
            raise MalformedReply(f"attribute length {length} at offset {offset} of {end} bytes")
        attributes[kind & NLA_TYPE_MASK] = data[offset + NLAHDR.size : offset + length]
        offset += _aligned(length)
    return attributes
