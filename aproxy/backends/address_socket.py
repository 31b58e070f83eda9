"""A raw rtnetlink socket for the addresses of one interface (aproxy's dummy device): bound and unbound in
batches, listed with one address dump (the messages are packed and parsed in rtnl_wire.py).

Every cluster IP is one address on the device. One pyroute2 request and acknowledgement each made binding
1,000 of them take forty times as long as the 11,000 IPVS operations beside them, and pyroute2's decoding of
the listed addresses made even the read of one virtual server grow with the cluster.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Sequence
from typing import Final, TypeAlias

from aproxy.backends import rtnl_wire
from aproxy.backends.base import BackendError
from aproxy.backends.netlink_socket import DEFAULT_LIMITS, SOL_NETLINK, BatchLimits, NetlinkSocket
from aproxy.backends.netlink_wire import MalformedReply, NetlinkErrorReply
from aproxy.core.model import BindAddress, UnbindAddress

AddressOperation: TypeAlias = BindAddress | UnbindAddress

# Linux 4.20+: the kernel checks a dump request's header strictly and honours its filters (ifa_index).
NETLINK_GET_STRICT_CHK: Final = 12


class AddressDumpError(BackendError):
    """An address dump reply that could not be parsed: nothing of that reply is used."""


class AddressSocket(NetlinkSocket):
    """A raw rtnetlink socket that binds and unbinds addresses on one interface in batches, and lists the
    addresses bound there: one address dump a call. Open from its creation.

    With NETLINK_GET_STRICT_CHK the kernel sends only that interface's addresses; an older kernel ignores the
    index and sends every interface's, so the index is checked here too. Strict checking concerns dump and
    get requests only: address adds and deletes are parsed as before it.
    """

    _dump_error = AddressDumpError
    _dump_name = "address"

    def __init__(self, limits: BatchLimits = DEFAULT_LIMITS) -> None:
        super().__init__(socket.NETLINK_ROUTE, limits)
        self.open()

    def _open_socket(self) -> socket.socket:
        sock = super()._open_socket()
        # Before Linux 4.20 (ENOPROTOOPT) the kernel filters nothing; addresses() checks the index anyway.
        with contextlib.suppress(OSError):
            sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
        return sock

    async def send(self, operations: Sequence[AddressOperation], index: int) -> list[int]:
        """Bind and unbind on interface ``index`` in order; return each operation's errno (0 = applied):
        EEXIST for an address already bound, EADDRNOTAVAIL for one not bound, ENODEV without the interface.
        """

        def encode(seq: int, op: AddressOperation, ack: bool) -> bytes:
            return rtnl_wire.address_request(seq, op, index, ack=ack)

        return await self.send_batches(operations, encode)

    async def addresses(self, index: int) -> list[rtnl_wire.DumpedAddress]:
        """The IPv4 and IPv6 addresses bound on interface ``index``; none when there is no such interface
        (strict checking answers ENODEV where an unfiltered dump would just hold none of its addresses)."""
        request = rtnl_wire.address_dump_request(seq := next(self._seq), index=index)
        try:
            messages = await self._dump(request, seq, rtnl_wire.RTM_NEWADDR)
        except NetlinkErrorReply as exc:
            if exc.errno == errno.ENODEV:
                return []
            raise
        try:
            decoded = [rtnl_wire.decode_address(message) for message in messages]
        except MalformedReply as exc:
            raise AddressDumpError(f"unreadable address dump reply: {exc}") from exc
        return [address for address in decoded if address is not None and address.index == index]
