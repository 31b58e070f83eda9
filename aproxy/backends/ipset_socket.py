"""A raw nfnetlink socket that adds and deletes ipset members in batches (see ipset_wire.py).

Modelled on ipvs.BatchSocket: many requests per ``sendmsg``, an acknowledgement asked only on the last, each
error mapped back to its request by sequence number. It runs on whatever loop is running (``sock_sendall`` /
``sock_recv``), uvloop included, which refuses pyroute2's asyncio netlink sockets.

The owner keeps one socket open between syncs (opening one costs five syscalls, each slow in the test guest)
and drops it after a socket error or a timeout, so that a late reply never meets the next batch. The
protocol version the kernel speaks is asked once per process and kept.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Iterator, Sequence
from typing import ClassVar

from aproxy.backends import ipset_wire
from aproxy.backends.ipvs_wire import parse_acks
from aproxy.backends.netlink_socket import NETLINK_NETFILTER, open_netlink_socket

BATCH_MESSAGES = 512
BATCH_BYTES = 128 * 1024
ACK_TIMEOUT = 10.0


class IPSetSocket:
    """Batched ipset member writes: ``open()``, ``await send(...)`` as often as needed, ``close()``.

    Also an async context manager (open on enter, close on exit) for one-off use.
    """

    # The kernel's answer does not change while the process lives: asked by the first socket only.
    protocol_version: ClassVar[int | None] = None

    def __init__(self) -> None:
        self._seq = itertools.count(1)
        # Totals for tests, benchmarks and metrics: incrementality is asserted on these, not on time.
        self.messages_sent = 0
        self.batches_sent = 0
        self._sock: socket.socket | None = None

    async def __aenter__(self) -> IPSetSocket:
        self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        return self._sock is not None

    def open(self) -> None:
        self._sock = open_netlink_socket(NETLINK_NETFILTER)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def send(self, requests: Sequence[tuple[int, ipset_wire.Member]]) -> list[int]:
        """Apply (command, member) requests in order; return each one's error code (0 = applied).

        Codes are errnos or the kernel's ipset codes (ipset_wire.ERRORS). OSError, TimeoutError and
        ipset_wire.ProtocolMismatch when the socket itself fails.
        """
        version = await self._protocol()
        results: list[int] = []
        for chunk in self._chunks(requests, version):
            results.extend(await self._send_chunk(chunk))
        return results

    async def _protocol(self) -> int:
        if IPSetSocket.protocol_version is None:
            seq = next(self._seq)
            replies = await self._exchange(ipset_wire.protocol_request(seq), seq)
            answer = ipset_wire.parse_protocol_reply(replies)
            if answer is None:
                codes = [ack.error for ack in parse_acks(replies) if ack.seq == seq]
                reason = ipset_wire.describe_error(codes[0]) if codes and codes[0] else "no reply"
                raise ipset_wire.ProtocolMismatch(f"kernel did not tell its ipset protocol: {reason}")
            IPSetSocket.protocol_version = ipset_wire.choose_protocol(*answer)
        return IPSetSocket.protocol_version

    def _chunks(
        self, requests: Sequence[tuple[int, ipset_wire.Member]], version: int
    ) -> Iterator[list[tuple[int, int, bytes]]]:
        chunk: list[tuple[int, int, bytes]] = []
        size = 0
        for command, member in requests:
            body = ipset_wire.member_attrs(member, version)
            if chunk and (len(chunk) >= BATCH_MESSAGES or size + len(body) > BATCH_BYTES):
                yield chunk
                chunk, size = [], 0
            chunk.append((command, member.family, body))
            size += len(body) + 20
        if chunk:
            yield chunk

    async def _send_chunk(self, chunk: list[tuple[int, int, bytes]]) -> list[int]:
        seqs = [next(self._seq) for _ in chunk]
        last = len(chunk) - 1
        buffer = b"".join(
            ipset_wire.pack_request(seq, command, family, body, ack=index == last)
            for index, (seq, (command, family, body)) in enumerate(zip(seqs, chunk, strict=True))
        )
        outcome = dict.fromkeys(seqs, 0)
        for ack in parse_acks(await self._exchange(buffer, seqs[last])):
            if ack.seq in outcome:
                outcome[ack.seq] = ack.error
        self.messages_sent += len(chunk)
        self.batches_sent += 1
        return [outcome[seq] for seq in seqs]

    async def _exchange(self, buffer: bytes, last_seq: int) -> bytes:
        """Send ``buffer``; everything received until the acknowledgement (or error) of ``last_seq``."""
        assert self._sock is not None, "IPSetSocket used before open()"
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self._sock, buffer)
        received: list[bytes] = []
        async with asyncio.timeout(ACK_TIMEOUT):
            while True:
                data = await loop.sock_recv(self._sock, 65536)
                received.append(data)
                if any(ack.seq == last_seq for ack in parse_acks(data)):
                    return b"".join(received)
