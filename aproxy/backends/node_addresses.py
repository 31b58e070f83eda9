"""The node's local addresses, and a wait for them to change (rtnetlink address events).

``local_addresses`` dumps every interface's IPv4 and IPv6 addresses over a raw rtnetlink socket (one dump,
rtnl_wire.py's requests and replies), leaving out the dummy device's. ``AddressEvents`` is a second socket
subscribed to the kernel's address groups (RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR): ``changed()`` returns
when an address was added or removed anywhere; the caller then dumps again (an event names one address,
but a dump is the truth, and events can be lost when the socket's buffer overflows).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

from aproxy.backends import rtnl_wire
from aproxy.backends.netlink_socket import DEFAULT_LIMITS, NetlinkSocket
from aproxy.core.model import IPAddress
from aproxy.core.node_addresses import NodePortAddresses

log = logging.getLogger(__name__)

RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
_RECEIVE = 64 * 1024


class _AddressDump(NetlinkSocket):
    _dump_name = "address"

    def __init__(self) -> None:
        super().__init__(socket.NETLINK_ROUTE, DEFAULT_LIMITS)

    async def all_addresses(self) -> list[rtnl_wire.DumpedAddress]:
        request = rtnl_wire.address_dump_request(seq := next(self._seq))
        messages = await self._dump(request, seq, rtnl_wire.RTM_NEWADDR)
        return [found for found in map(rtnl_wire.decode_address, messages) if found is not None]


async def local_addresses(exclude_device: str) -> frozenset[IPAddress]:
    """Every address bound on this node's interfaces except ``exclude_device``'s (one dump)."""
    try:
        excluded = socket.if_nametoindex(exclude_device)
    except OSError:  # no such device (yet): nothing to leave out
        excluded = -1
    dump = _AddressDump()
    dump.open()
    try:
        return frozenset(found.address for found in await dump.all_addresses() if found.index != excluded)
    finally:
        dump.close()


class AddressEvents:
    """``async with AddressEvents() as events: await events.changed()``: returns at an address change."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None

    async def __aenter__(self) -> AddressEvents:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self._sock.setblocking(False)
        self._sock.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def changed(self) -> None:
        """Wait for an address event, then drain whatever else is queued (one dump answers them all)."""
        assert self._sock is not None, "AddressEvents used outside its context"
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_recv(self._sock, _RECEIVE)
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:  # ENOBUFS: events were lost, which is a change too
                raise
        while True:
            try:
                self._sock.recv(_RECEIVE)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise


class NodePortAddressFollower:
    """The NodePort addresses of this node now (``current``), and as they change (``follow``)."""

    def __init__(self, choice: NodePortAddresses, device: str, primary: frozenset[IPAddress]) -> None:
        self._choice = choice
        self._device = device
        self._primary = primary

    @property
    def every_address(self) -> bool:
        """The choice is kube-proxy's "match all" (core/node_addresses.py)."""
        return self._choice.every_address

    async def current(self) -> frozenset[IPAddress]:
        if self._choice.primary:
            return self._primary  # no dump: the primary addresses do not follow the interfaces
        return self._choice.select(await local_addresses(self._device), self._primary)

    async def follow(self, on_change: Callable[[frozenset[IPAddress]], None]) -> None:
        """Call ``on_change`` with the new addresses after every address event that changed them (never
        returns; nothing to follow for ``primary``)."""
        if self._choice.primary:
            return
        last = await self.current()
        async with AddressEvents() as events:
            while True:
                await events.changed()
                now = await self.current()
                if now != last:
                    log.info(
                        "node port addresses changed", extra={"addresses": ",".join(sorted(map(str, now)))}
                    )
                    last = now
                    on_change(now)
