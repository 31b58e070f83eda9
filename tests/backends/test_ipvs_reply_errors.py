"""An IPVS reply aproxy cannot read becomes ``IPVSDumpError`` (a ``BackendError``), which the daemon treats as
a failed pass and retries; a bare ValueError would end its kernel task. The replies come from a datagram
socket pair standing in for the netlink peer: only the bytes are under test, no kernel behaviour is
assumed."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from ipaddress import ip_address

import pytest

from aproxy.backends import ipvs_wire, netlink_wire
from aproxy.backends.ipvs_socket import IPVSDumpError, IPVSSocket
from aproxy.backends.netlink_socket import BatchLimits
from aproxy.core.model import L4Protocol, VirtualServerKey

FAMILY_ID = 0x2A
KEY = VirtualServerKey(L4Protocol.TCP, ip_address("10.96.0.10"), 80)


def message(kind: int, seq: int, payload: bytes) -> bytes:
    header = struct.pack("=IHHII", 16 + len(payload), kind, 0, seq, 0)
    return header + payload + b"\0" * (-len(payload) % 4)


def genl(attributes: bytes) -> bytes:
    return struct.pack("=BBH", ipvs_wire.CMD_NEW_SERVICE, ipvs_wire.GENL_VERSION, 0) + attributes


def attribute(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


# A service nest without its address family, and a real-server nest without its address: both are
# well-formed netlink that decode_service / decode_dest refuse.
NO_FAMILY = genl(attribute(ipvs_wire.ATTR_SERVICE, attribute(ipvs_wire.SVC_PORT, b"\0\x50")))
NO_ADDRESS = genl(attribute(ipvs_wire.ATTR_DEST, attribute(ipvs_wire.DEST_PORT, b"\0\x50")))


def answered(reply: Callable[[int], bytes], call: Callable[[IPVSSocket], Awaitable[object]]) -> BaseException:
    """Run ``call`` on a IPVSSocket whose peer answers the first request with ``reply(seq)``."""

    async def scenario() -> BaseException:
        batch = IPVSSocket(FAMILY_ID, BatchLimits(ack_timeout=5.0))
        batch.close()
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        ours.setblocking(False)
        peer.setblocking(False)
        batch._sock = ours  # the netlink peer is replaced by a socket that answers with chosen bytes
        try:
            task = asyncio.create_task(call(batch))
            request = await asyncio.get_running_loop().sock_recv(peer, 65536)
            (seq,) = struct.unpack_from("=I", request, 8)
            peer.send(reply(seq))
            with pytest.raises(Exception) as caught:
                await task
            return caught.value
        finally:
            ours.close()
            peer.close()

    return asyncio.run(scenario())


@pytest.mark.parametrize(
    ("payload", "call"),
    [
        pytest.param(NO_FAMILY, lambda batch: batch.services(), id="service-dump"),
        pytest.param(NO_ADDRESS, lambda batch: batch.dests(KEY), id="real-server-dump"),
    ],
)
def test_an_undecodable_dump_message_is_a_dump_error(
    payload: bytes, call: Callable[[IPVSSocket], Awaitable[object]]
) -> None:
    error = answered(
        lambda seq: message(FAMILY_ID, seq, payload) + message(netlink_wire.NLMSG_DONE, seq, b"\0" * 4), call
    )

    assert isinstance(error, IPVSDumpError)
    assert str(error).startswith("unreadable IPVS")


def test_an_undecodable_get_reply_is_a_dump_error() -> None:
    error = answered(lambda seq: message(FAMILY_ID, seq, NO_FAMILY), lambda batch: batch.service(KEY))

    assert isinstance(error, IPVSDumpError)
