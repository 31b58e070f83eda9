"""Raw netlink sockets that send requests in batches and read dumps: what the IPVS, address and ipset sockets
share.

pyroute2 sends one request and awaits its acknowledgement before the next. The kernel handles every message
of one ``sendmsg`` in order, so many requests share one buffer here, each with its own sequence number, an
acknowledgement asked only on the last; every refused request still answers with an NLMSG_ERROR carrying its
own sequence number, which maps each error back to its operation at a fraction of the cost. The sockets run
on whatever loop is running (``sock_sendall`` / ``sock_recv``), uvloop included, which refuses pyroute2's
asyncio netlink sockets.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final, TypeVar

from aproxy.backends.base import BackendError
from aproxy.backends.netlink_wire import NLMSG_DONE, MalformedReply, Message, parse_acks, parse_messages

SOL_NETLINK: Final = 270
NETLINK_NETFILTER: Final = 12  # not in typeshed's socket module
NETLINK_GENERIC: Final = 16
NETLINK_CAP_ACK: Final = 10
# Enough for every message of a batch to fail without the kernel dropping an error (ENOBUFS).
SOCKET_BUFFER: Final = 16 * 1024 * 1024
_SO_SNDBUFFORCE: Final = 32
_SO_RCVBUFFORCE: Final = 33
# One receive: the kernel fills at most 32 KiB per part of a dump (netlink_dump), more would be truncated.
RECEIVE_BYTES: Final = 64 * 1024

_Op = TypeVar("_Op")


def open_netlink_socket(protocol: int) -> socket.socket:
    """A non-blocking, bound netlink socket of ``protocol`` with 16 MiB buffers (forced when privileged)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
    try:
        sock.setblocking(False)
        # Errors then carry only the header of the failing request, not its whole payload.
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        for option, forced in ((socket.SO_RCVBUF, _SO_RCVBUFFORCE), (socket.SO_SNDBUF, _SO_SNDBUFFORCE)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, forced, SOCKET_BUFFER)
            except PermissionError:  # without CAP_NET_ADMIN: capped by net.core.{r,w}mem_max
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        sock.bind((0, 0))
    except OSError:
        sock.close()
        raise
    return sock


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """How much one buffer carries (a single larger request still goes alone); how long a receive waits."""

    max_messages: int = 512
    max_bytes: int = 128 * 1024
    ack_timeout: float = 10.0


DEFAULT_LIMITS: Final = BatchLimits()


class NetlinkSocket:
    """A raw netlink socket of one protocol that sends requests in batches and reads dumps to their
    NLMSG_DONE. Closed until ``open()``; closed again by ``close()``, after which ``open()`` makes a new one.

    One request (or batch) at a time: callers never overlap (the daemon's kernel task runs one pass after
    another), and replies are told from leftovers of a timed-out request by their sequence number.
    """

    # What an unreadable dump reply raises, and what the error message calls the dump.
    _dump_error: ClassVar[type[BackendError]] = BackendError
    _dump_name: ClassVar[str] = "netlink"

    def __init__(self, protocol: int, limits: BatchLimits) -> None:
        self._protocol = protocol
        self._limits = limits
        self._seq = itertools.count(1)
        # Totals for tests, benchmarks and metrics: incrementality is asserted on these, not on time.
        self.dumps_sent = 0
        self.dump_receives = 0  # receives the dumps took: more than one per dump once a reply is large
        self.dump_messages = 0  # messages of the dumped type received, before any filtering here
        self.messages_sent = 0  # requests sent in batches: one per operation
        self.batches_sent = 0  # buffers of them sent (one sendmsg each)
        self._sock: socket.socket | None = None
        self._dump_unfinished = False

    @property
    def is_open(self) -> bool:
        return self._sock is not None

    def open(self) -> None:
        self._sock = self._open_socket()

    def _open_socket(self) -> socket.socket:
        return open_netlink_socket(self._protocol)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def send_batches(
        self, operations: Sequence[_Op], encode: Callable[[int, _Op, bool], bytes]
    ) -> list[int]:
        """Send the operations in order, as few buffers as the batch limits allow; return each one's error
        code (0 = applied). ``encode(seq, operation, ack)`` packs one request.

        Each buffer asks an acknowledgement of its last request only: the kernel handles a buffer's requests
        in order and answers every refused one (NLMSG_ERROR with its sequence number) whether asked or not,
        so the last one's acknowledgement means every earlier one without an error was applied.
        """
        results: list[int] = []
        for chunk in self._chunks(operations, encode):
            results.extend(await self._send_chunk(chunk, encode))
        return results

    def _chunks(
        self, operations: Sequence[_Op], encode: Callable[[int, _Op, bool], bytes]
    ) -> Iterator[list[tuple[int, _Op, bytes]]]:
        """The operations with their sequence numbers and requests (no acknowledgement asked yet), cut where a
        buffer would pass ``max_messages`` requests or ``max_bytes`` bytes."""
        chunk: list[tuple[int, _Op, bytes]] = []
        size = 0
        for op in operations:
            seq = next(self._seq)
            request = encode(seq, op, False)
            if chunk and (
                len(chunk) >= self._limits.max_messages or size + len(request) > self._limits.max_bytes
            ):
                yield chunk
                chunk, size = [], 0
            chunk.append((seq, op, request))
            size += len(request)
        if chunk:
            yield chunk

    async def _send_chunk(
        self, chunk: list[tuple[int, _Op, bytes]], encode: Callable[[int, _Op, bool], bytes]
    ) -> list[int]:
        last_seq, last_op, _unacknowledged = chunk[-1]
        # The last request packed again, asking the acknowledgement: only the flags differ, not the size.
        buffer = b"".join(request for _seq, _op, request in chunk[:-1]) + encode(last_seq, last_op, True)
        outcome = {seq: 0 for seq, _op, _request in chunk}
        await self._send(buffer)
        self.messages_sent += len(chunk)
        self.batches_sent += 1
        async with asyncio.timeout(self._limits.ack_timeout):
            while True:
                data = await asyncio.get_running_loop().sock_recv(self._opened(), RECEIVE_BYTES)
                for ack in parse_acks(data):
                    if ack.seq in outcome:
                        outcome[ack.seq] = ack.error
                    if ack.seq == last_seq:
                        return list(outcome.values())

    def _opened(self) -> socket.socket:
        assert self._sock is not None, f"{type(self).__name__} used before open()"
        return self._sock

    async def _send(self, request: bytes, *, dump: bool = False) -> None:
        """Send one buffer (a request, or a batch of them).

        A dump left unfinished (timeout, unreadable part, cancellation) would keep running on this socket,
        and the kernel refuses a second dump on it (EBUSY) until the first is read to its end: the next
        request replaces the socket instead (not at once: the event loop may still hold the old one's
        reader). A ``dump`` is unfinished until its reader has seen its NLMSG_DONE.
        """
        if self._dump_unfinished:
            self.close()
            self.open()
        self._dump_unfinished = dump
        await asyncio.get_running_loop().sock_sendall(self._opened(), request)

    async def _receive(self) -> bytes:
        """One receive; TimeoutError when nothing came for ``ack_timeout``."""
        async with asyncio.timeout(self._limits.ack_timeout):
            return await asyncio.get_running_loop().sock_recv(self._opened(), RECEIVE_BYTES)

    async def _dump(self, request: bytes, seq: int, kind: int) -> list[Message]:
        """Send one dump request; gather its messages of type ``kind`` from as many receives as it takes, to
        NLMSG_DONE.

        The timeout bounds each receive (no answer for that long), not the whole dump, whatever its size.
        """
        await self._send(request, dump=True)
        self.dumps_sent += 1
        messages: list[Message] = []
        finished = False
        try:
            while not finished:
                data = await self._receive()
                self.dump_receives += 1
                for message in parse_messages(data, seq):
                    if message.kind == NLMSG_DONE:
                        finished = True
                    elif message.kind == kind:
                        messages.append(message)
        except MalformedReply as exc:
            raise self._dump_error(f"unreadable {self._dump_name} dump reply: {exc}") from exc
        self._dump_unfinished = False
        self.dump_messages += len(messages)
        return messages
