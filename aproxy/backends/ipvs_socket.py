"""A raw generic-netlink socket for IPVS: its requests sent in batches (netlink_socket.py), its dumps and
single virtual servers read back, all packed and parsed by hand in ipvs_wire.py.

A full dump (start-up, audit) is one service dump, then one destination dump per owned virtual server:
pyroute2's decoding made a 1,000-service dump take seconds. A read of a few virtual servers (reconciling
after EEXIST, ENOENT, ...) is one get request per virtual server, whatever the node holds.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence

from aproxy.backends import ipvs_wire
from aproxy.backends.base import BackendError
from aproxy.backends.netlink_socket import DEFAULT_LIMITS, NETLINK_GENERIC, BatchLimits, NetlinkSocket
from aproxy.backends.netlink_wire import MalformedReply, Message, NetlinkErrorReply, parse_messages
from aproxy.core.model import VirtualServerKey


class IPVSDumpError(BackendError):
    """A dump (or get) reply that could not be parsed: nothing of that reply is used."""


class IPVSSocket(NetlinkSocket):
    """A raw generic-netlink socket that sends IPVS requests in batches and maps acknowledgements back; it
    also reads dumps, and single virtual servers. Open from its creation.
    """

    _dump_error = IPVSDumpError
    _dump_name = "IPVS"

    def __init__(self, family_id: int, limits: BatchLimits = DEFAULT_LIMITS) -> None:
        super().__init__(NETLINK_GENERIC, limits)
        self._family_id = family_id
        self.gets_sent = 0  # requests for one virtual server (not dumps)
        self.open()

    async def send(self, operations: Sequence[ipvs_wire.IPVSOperation]) -> list[int]:
        """Apply the operations in order; return each one's errno (0 = applied)."""
        return await self.send_batches(operations, self._request)

    def _request(self, seq: int, op: ipvs_wire.IPVSOperation, ack: bool) -> bytes:
        command, body = ipvs_wire.request_body(op)
        return ipvs_wire.pack_request(self._family_id, seq, command, body, ack=ack)

    async def set_timeouts(self, timeouts: ipvs_wire.IPVSTimeouts) -> int:
        """``ipvsadm --set``: one IPVS_CMD_SET_CONFIG; its errno (0 = applied)."""

        def encode(seq: int, value: ipvs_wire.IPVSTimeouts, ack: bool) -> bytes:
            return ipvs_wire.set_timeouts_request(self._family_id, seq, value, ack=ack)

        (error,) = await self.send_batches([timeouts], encode)
        return error

    async def services(self) -> list[ipvs_wire.DumpedService]:
        """Every virtual server in the kernel (this network namespace), foreign and firewall-mark ones too."""
        request = ipvs_wire.services_dump_request(self._family_id, seq := next(self._seq))
        messages = await self._dump(request, seq, self._family_id)
        try:
            return [ipvs_wire.decode_service(message) for message in messages]
        except MalformedReply as exc:  # a ValueError: the daemon would not take it for a backend's
            raise IPVSDumpError(f"unreadable IPVS service dump: {exc}") from exc

    async def dests(self, key: VirtualServerKey) -> list[ipvs_wire.DumpedDest]:
        """The real servers of one virtual server; none if it does not exist (the kernel's answer, too)."""
        request = ipvs_wire.dests_dump_request(self._family_id, seq := next(self._seq), key)
        family = socket.AF_INET if key.address.version == 4 else socket.AF_INET6
        messages = await self._dump(request, seq, self._family_id)
        try:
            return [ipvs_wire.decode_dest(message, family) for message in messages]
        except MalformedReply as exc:
            raise IPVSDumpError(f"unreadable IPVS real server dump of {key}: {exc}") from exc

    async def service(self, key: VirtualServerKey) -> ipvs_wire.DumpedService | None:
        """One virtual server, foreign ones too, by its key: one request, one reply. None when the kernel has
        no such virtual server (ESRCH); any other refusal raises ``NetlinkErrorReply`` as a dump's does."""
        request = ipvs_wire.service_get_request(self._family_id, seq := next(self._seq), key)
        try:
            message = await self._get(request, seq)
        except NetlinkErrorReply as exc:
            if exc.errno == errno.ESRCH:
                return None
            raise
        try:
            return ipvs_wire.decode_service(message)
        except MalformedReply as exc:
            raise IPVSDumpError(f"unreadable IPVS service reply: {exc}") from exc

    async def _get(self, request: bytes, seq: int) -> Message:
        """Send one request that is not a dump; return its one reply message.

        The kernel answers with a single message of the family, or an NLMSG_ERROR (raised by parse_messages);
        no NLMSG_DONE follows, so the first message of ours ends the wait. Leftovers of an earlier request
        that timed out carry other sequence numbers and are passed over. The timeout bounds each receive.
        """
        await self._send(request)
        self.gets_sent += 1
        try:
            while True:
                for message in parse_messages(await self._receive(), seq):
                    if message.kind == self._family_id:
                        return message
                    # An acknowledgement or a DONE (neither asked for): the kernel sent no virtual server.
                    raise IPVSDumpError(f"IPVS answered request {seq} with message type {message.kind}")
        except MalformedReply as exc:
            raise IPVSDumpError(f"unreadable IPVS reply: {exc}") from exc
