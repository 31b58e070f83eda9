"""A private event loop in its own thread, on which pyroute2's asyncio sockets run for the IPVS backend."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")


class NetlinkThread:
    """A private standard-library event loop in its own thread, for pyroute2's asyncio sockets.

    pyroute2 opens netlink sockets with ``loop.create_datagram_endpoint``, which uvloop refuses for AF_NETLINK
    ("cannot open a UDP handle, invalid family 16"). So pyroute2's objects are created and awaited on this
    loop, and the daemon's uvloop awaits the results. The raw sockets need no such detour: they use
    ``sock_sendall``/``sock_recv``, which every loop supports.
    """

    def __init__(self) -> None:
        self._loop = asyncio.SelectorEventLoop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="aproxy-netlink", daemon=True)
        self._thread.start()

    async def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self._loop))

    async def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.to_thread(self._thread.join)
        self._loop.close()
