"""A raw nfnetlink socket that adds and deletes ipset members in batches (packed in ipset_wire.py).

The batching is netlink_socket.py's, as for IPVS requests: many requests per ``sendmsg``, an acknowledgement
asked only on the last, each error mapped back to its request by sequence number.

The owner keeps one socket open between syncs (opening one costs five syscalls, each slow in the test guest)
and drops it after a socket error or a timeout, so that a late reply never meets the next batch. The
protocol version the kernel speaks is asked once per process and kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from aproxy.backends import ipset_wire
from aproxy.backends.netlink_socket import DEFAULT_LIMITS, NETLINK_NETFILTER, BatchLimits, NetlinkSocket
from aproxy.backends.netlink_wire import (
    NLMSG_ERROR,
    MalformedReply,
    Message,
    NetlinkErrorReply,
    parse_messages,
)

_Request = tuple[int, ipset_wire.Member]


class IPSetSocket(NetlinkSocket):
    """Batched ipset member writes: ``open()``, ``await send(...)`` as often as needed, ``close()``.

    Also an async context manager (open on enter, close on exit) for one-off use.
    """

    # The kernel's answer does not change while the process lives: asked by the first socket only.
    protocol_version: ClassVar[int | None] = None

    def __init__(self, limits: BatchLimits = DEFAULT_LIMITS) -> None:
        super().__init__(NETLINK_NETFILTER, limits)

    async def __aenter__(self) -> IPSetSocket:
        self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def send(self, requests: Sequence[_Request]) -> list[int]:
        """Apply (command, member) requests in order; return each one's error code (0 = applied).

        Codes are errnos or the kernel's ipset codes (ipset_wire.ERRORS). OSError, TimeoutError and
        ipset_wire.ProtocolMismatch when the socket itself fails.
        """
        version = await self._version()

        def encode(seq: int, request: _Request, ack: bool) -> bytes:
            command, member = request
            attributes = ipset_wire.member_attrs(member, version)
            return ipset_wire.pack_request(seq, command, member.family, attributes, ack=ack)

        return await self.send_batches(requests, encode)

    async def _version(self) -> int:
        if IPSetSocket.protocol_version is None:
            seq = next(self._seq)
            try:
                replies = await self._acknowledged(ipset_wire.protocol_request(seq), seq)
                answer = ipset_wire.parse_protocol_reply(replies)
            except NetlinkErrorReply as exc:
                reason = ipset_wire.describe_error(exc.errno) if exc.errno else "no reply"
                raise ipset_wire.ProtocolMismatch(
                    f"kernel did not tell its ipset protocol: {reason}"
                ) from exc
            except MalformedReply as exc:
                raise ipset_wire.ProtocolMismatch(f"unreadable ipset protocol reply: {exc}") from exc
            if answer is None:
                raise ipset_wire.ProtocolMismatch("kernel did not tell its ipset protocol: no reply")
            IPSetSocket.protocol_version = ipset_wire.choose_protocol(*answer)
        return IPSetSocket.protocol_version

    async def _acknowledged(self, request: bytes, seq: int) -> list[Message]:
        """Send one request that asks an acknowledgement; its reply messages up to that acknowledgement
        (NetlinkErrorReply in its place when the kernel refuses). The timeout bounds each receive."""
        await self._send(request)
        replies: list[Message] = []
        while not replies or replies[-1].kind != NLMSG_ERROR:
            replies += parse_messages(await self._receive(), seq)
        return replies
