"""Health-check node ports: one aiohttp listener per port of core/health_ports.py's table and node-port
address, opened and closed as services come and go and as the addresses move, without a restart.

Each listener answers any path (kube-proxy's behaviour: cloud load balancers probe ``/`` or ``/healthz``)
with the decision of ``core.health_ports.answer``: 200 when this node has ready endpoints of the service, 503
when it has none or while aproxy itself is unhealthy (``healthy()``, the /healthz verdict). It listens where
kube-proxy's do: on every address of the node (``addresses`` None: ``--nodeport-addresses`` unset, or a
``0.0.0.0/0``/``::/0`` among them), otherwise on each node-port address, none when there is none;
``set_addresses`` moves them at run time (the daemon follows the node's addresses). Like the health listener
(server.py) it is built for hostile clients: header timeout, connection cap, malformed requests at DEBUG.

A port that cannot be bound on an address (another process has it, the address went away) is logged and
counted, and tried again at the next change of the table or the addresses; the other ones are served.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

import orjson
from aiohttp import web

from aproxy.core.health_ports import HEADERS, HealthPortTable, answer
from aproxy.core.model import IPAddress, address_sort_key
from aproxy.web.server import (
    HEADER_TIMEOUT,
    MAX_CONNECTIONS,
    BindError,
    RequestErrors,
    listen_bounded,
)

log = logging.getLogger(__name__)

_Listener = tuple[int, str | None]  # (port, address); None: every address, both families


def _hosts(addresses: Iterable[IPAddress] | None) -> tuple[str | None, ...]:
    if addresses is None:
        return (None,)
    return tuple(str(address) for address in sorted(set(addresses), key=address_sort_key))


class HealthCheckListeners:
    """``serve()`` keeps one listener per port of ``table`` and address until cancelled; ``reconcile()`` does
    one pass. Each listener has its own connection cap: a node has a handful of node-port addresses."""

    def __init__(
        self,
        table: HealthPortTable,
        healthy: Callable[[], bool],
        *,
        addresses: Iterable[IPAddress] | None = None,
    ) -> None:
        self._table = table
        self._healthy = healthy
        self._hosts = _hosts(addresses)
        self._runners: dict[_Listener, web.BaseRunner] = {}
        self._changed = asyncio.Event()
        self._request_errors = RequestErrors(log)
        self.bind_failures = 0
        table.on_change = self._changed.set

    @property
    def ports(self) -> frozenset[int]:
        """The ports listened on now (on at least one address)."""
        return frozenset(port for port, _host in self._runners)

    def set_addresses(self, addresses: Iterable[IPAddress] | None) -> None:
        """Listen on ``addresses`` from the next pass on (None: every address; empty: none)."""
        hosts = _hosts(addresses)
        if hosts != self._hosts:
            self._hosts = hosts
            self._changed.set()

    async def serve(self) -> None:
        try:
            while True:
                self._changed.clear()
                await self.reconcile()
                await self._changed.wait()
        finally:
            await self.close()

    async def reconcile(self) -> None:
        """Open the listeners the table and the addresses want and close the others (first: a port moving
        from every address to some, or back, must be free before it is bound again)."""
        wanted = {(port, host) for port in self._table.ports() for host in self._hosts}
        for port, host in sorted(set(self._runners) - wanted, key=_order):
            await self._runners.pop((port, host)).cleanup()
            log.info("health-check node port closed", extra={"port": port, "address": host or "*"})
        for listener in sorted(wanted - set(self._runners), key=_order):
            await self._open(*listener)

    async def close(self) -> None:
        while self._runners:
            _listener, runner = self._runners.popitem()
            await runner.cleanup()

    async def _open(self, port: int, host: str | None) -> None:
        try:
            runner = await listen_bounded(
                lambda request: self._probe(port),
                host,
                port,
                max_connections=MAX_CONNECTIONS,
                header_timeout=HEADER_TIMEOUT,
                logger=self._request_errors,
            )
        except BindError as exc:
            self.bind_failures += 1
            log.error(
                "cannot listen on a health-check node port",
                extra={"port": port, "address": host or "*", "error": exc.reason},
            )
            return
        self._runners[(port, host)] = runner
        log.info("health-check node port open", extra={"port": port, "address": host or "*"})

    async def _probe(self, port: int) -> web.Response:
        wanted = self._table.ports().get(port)
        if wanted is None:  # closing: the service went away a moment ago
            return web.Response(status=503, body=b"{}", headers=HEADERS)
        status, body = answer(wanted, self._healthy())
        return web.Response(status=status, body=orjson.dumps(body), headers=HEADERS)


def _order(listener: _Listener) -> tuple[int, str]:
    port, host = listener
    return port, host or ""
