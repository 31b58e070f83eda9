"""Health-check node ports: one aiohttp listener per port of core/health_ports.py's table, opened and closed
as services come and go, without a restart.

Each listener answers any path (kube-proxy's behaviour: cloud load balancers probe ``/`` or ``/healthz``)
with the decision of ``core.health_ports.answer``: 200 when this node has ready endpoints of the service, 503
when it has none or while aproxy itself is unhealthy (``healthy()``, the /healthz verdict). It listens on
every address of the node (kube-proxy's default without ``--nodeport-addresses``). Like the health listener
(server.py) it is built for hostile clients: header timeout, connection cap, malformed requests at DEBUG.

A port that cannot be bound (another process has it) is logged and counted, and tried again at the next
change of the table; the other ports are served.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import orjson
from aiohttp import web

from aproxy.core.health_ports import HEADERS, HealthPortTable, answer
from aproxy.web.server import (
    HEADER_TIMEOUT,
    MAX_CONNECTIONS,
    BindError,
    RequestErrors,
    listen_bounded,
)

log = logging.getLogger(__name__)


class HealthCheckListeners:
    """``serve()`` keeps one listener per port of ``table`` until cancelled; ``reconcile()`` does one pass."""

    def __init__(
        self, table: HealthPortTable, healthy: Callable[[], bool], *, host: str | None = None
    ) -> None:
        self._table = table
        self._healthy = healthy
        self._host = host  # None: every address, both families
        self._runners: dict[int, web.BaseRunner] = {}
        self._changed = asyncio.Event()
        self._request_errors = RequestErrors(log)
        self.bind_failures = 0
        table.on_change = self._changed.set

    @property
    def ports(self) -> frozenset[int]:
        """The ports listened on now."""
        return frozenset(self._runners)

    async def serve(self) -> None:
        try:
            while True:
                self._changed.clear()
                await self.reconcile()
                await self._changed.wait()
        finally:
            await self.close()

    async def reconcile(self) -> None:
        """Open the listeners the table wants and close the others."""
        wanted = set(self._table.ports())
        for port in sorted(set(self._runners) - wanted):
            await self._runners.pop(port).cleanup()
            log.info("health-check node port closed", extra={"port": port})
        for port in sorted(wanted - set(self._runners)):
            await self._open(port)

    async def close(self) -> None:
        while self._runners:
            _port, runner = self._runners.popitem()
            await runner.cleanup()

    async def _open(self, port: int) -> None:
        try:
            runner = await listen_bounded(
                lambda request: self._probe(port),
                self._host,
                port,
                max_connections=MAX_CONNECTIONS,
                header_timeout=HEADER_TIMEOUT,
                logger=self._request_errors,
            )
        except BindError as exc:
            self.bind_failures += 1
            log.error("cannot listen on a health-check node port", extra={"port": port, "error": exc.reason})
            return
        self._runners[port] = runner
        log.info("health-check node port open", extra={"port": port})

    async def _probe(self, port: int) -> web.Response:
        wanted = self._table.ports().get(port)
        if wanted is None:  # closing: the service went away a moment ago
            return web.Response(status=503, body=b"{}", headers=HEADERS)
        status, body = answer(wanted, self._healthy())
        return web.Response(status=status, body=orjson.dumps(body), headers=HEADERS)
