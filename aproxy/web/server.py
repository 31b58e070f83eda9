"""The daemon's HTTP endpoints (aiohttp): health on one address, Prometheus metrics on another.

- healthz address (kube-proxy's default ``0.0.0.0:10256``): ``/healthz``, ``/livez``, ``/readyz``. The first
  two answer kube-proxy's JSON (``lastUpdated``, ``currentTime``, ``nodeEligible``) with 200 or 503; the
  decision is ``aproxy.web.healthz.decide`` (``/healthz`` also fails while the node is not eligible,
  ``/livez`` does not).
- metrics address (``127.0.0.1:10249``): ``/metrics``, the exposition the daemon hands in.

The server knows nothing of the sync loop: it calls two functions the composition root gives it, on the event
loop's thread, so they may read the loop's state without locks.

The health address listens on every interface by default, so it is built for hostile clients: a request's
headers must arrive within ``header_timeout`` (an idle keep-alive connection is closed after as long), each
listener holds at most ``max_connections`` connections (a new one closes the oldest, so a flood of slow
clients cannot starve the kubelet's probe or exhaust file descriptors), and a malformed request is one DEBUG
line and a count, not an ERROR with a traceback. ``start()`` binds both addresses or raises ``ListenError``
with one line naming the address, so the daemon can refuse to start before it touches the kernel.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from aproxy.web.healthz import Health, health_body

log = logging.getLogger(__name__)

JSON = "application/json"
SHUTDOWN_TIMEOUT = 2.0  # seconds for in-flight requests when stopping
# Probes and scrapes send their request at once: 5 s is generous for them and short for a slow-loris client.
HEADER_TIMEOUT = 5.0
# Per listener. A kubelet, a Prometheus or two and a cloud load balancer's probes need a handful.
MAX_CONNECTIONS = 128


class ListenError(RuntimeError):
    """An address could not be bound (in use, not on this host, no permission); one line naming it.
    ``listener`` is ``healthz`` or ``metrics``: the daemon names the flag that set the address."""

    def __init__(self, listener: str, address: ListenAddress, reason: str) -> None:
        super().__init__(f"cannot listen on {address} ({listener}): {reason}")
        self.listener = listener
        self.address = address
        self.reason = reason


class ListenAddressError(ValueError):
    """A bind address that is not ``IP:PORT`` (``[IPv6]:PORT`` for IPv6)."""


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """Where a site listens. Port 0 asks the kernel for a free port (the bound one is reported)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> ListenAddress:
        host, sep, port_text = text.rpartition(":")
        if not sep or not port_text.isdigit():
            raise ListenAddressError(f"bind address {text!r}: expected IP:PORT")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            # "::1:80" is itself an IPv6 address: without brackets, where the port starts is a guess.
            raise ListenAddressError(f"bind address {text!r}: write IPv6 addresses as [ADDRESS]:PORT")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ListenAddressError(f"bind address {text!r}: {host!r} is not an IP address") from None
        port = int(port_text)
        if port > 65535:
            raise ListenAddressError(f"bind address {text!r}: port out of range")
        return cls(str(address), port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class HealthSnapshot:
    """What the health endpoints answer now: the verdicts (``health.node_eligible`` included, for the body)
    and the two wall-clock times of the JSON body."""

    health: Health
    last_updated: float | None  # time.time() of the last successful sync
    current_time: float


@dataclass(frozen=True, slots=True)
class Exposition:
    body: bytes
    content_type: str


class WebServer:
    """Both listeners. ``start()`` binds them (``ListenError``), ``serve()`` runs until cancelled (starting
    first if needed) and always closes what it opened."""

    def __init__(
        self,
        *,
        healthz_address: ListenAddress,
        metrics_address: ListenAddress,
        health: Callable[[], HealthSnapshot],
        metrics: Callable[[], Exposition],
        header_timeout: float = HEADER_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._healthz_address = healthz_address
        self._metrics_address = metrics_address
        self._health = health
        self._metrics = metrics
        self._header_timeout = header_timeout
        self._max_connections = max_connections
        self._runners: list[web.BaseRunner] = []
        self._request_errors = RequestErrors(log)
        # The ports actually bound (they differ from the settings when those ask for port 0).
        self.healthz_port: int | None = None
        self.metrics_port: int | None = None
        self.listening = asyncio.Event()

    @property
    def malformed_requests(self) -> int:
        """Requests refused as malformed (bad request line, headers too long, ...), both listeners."""
        return self._request_errors.malformed

    async def start(self) -> None:
        """Bind both addresses; on failure close what was opened and raise ``ListenError``."""
        if self._runners:
            return
        try:
            health_routes = {"/healthz": self._healthz, "/livez": self._livez, "/readyz": self._readyz}
            self.healthz_port = await self._listen("healthz", self._healthz_address, health_routes)
            self.metrics_port = await self._listen(
                "metrics", self._metrics_address, {"/metrics": self._expose}
            )
        except BaseException:
            await self.close()
            raise
        log.info(
            "serving health and metrics",
            extra={
                "healthz": str(ListenAddress(self._healthz_address.host, self.healthz_port)),
                "metrics": str(ListenAddress(self._metrics_address.host, self.metrics_port)),
            },
        )

    async def close(self) -> None:
        self.listening.clear()
        while self._runners:
            await self._runners.pop().cleanup()

    async def serve(self) -> None:
        try:
            await self.start()
            self.listening.set()
            await asyncio.Event().wait()  # until cancelled
        finally:
            await self.close()

    # --- handlers -------------------------------------------------------------------------------------------

    async def _healthz(self) -> web.Response:
        snapshot = self._health()
        return _health_response(snapshot, snapshot.health.healthz)

    async def _livez(self) -> web.Response:
        snapshot = self._health()
        return _health_response(snapshot, snapshot.health.livez)

    async def _readyz(self) -> web.Response:
        ready = self._health().health.ready
        return web.Response(status=200 if ready else 503, text="ok\n" if ready else "not ready\n")

    async def _expose(self) -> web.Response:
        exposition = self._metrics()
        return web.Response(body=exposition.body, headers={"Content-Type": exposition.content_type})

    # --- listening ------------------------------------------------------------------------------------------

    async def _listen(self, name: str, address: ListenAddress, routes: _Routes) -> int:
        """Serve ``routes`` on ``address``; return the port bound."""
        try:
            runner = await listen_bounded(
                _router(routes),
                address.host,
                address.port,
                max_connections=self._max_connections,
                header_timeout=self._header_timeout,
                logger=self._request_errors,
            )
        except BindError as exc:
            raise ListenError(name, address, exc.reason) from exc
        self._runners.append(runner)
        port: int = runner.addresses[-1][1]
        return port


_Routes = Mapping[str, Callable[[], Awaitable[web.Response]]]
_METHODS = frozenset({"GET", "HEAD"})


def _router(routes: _Routes) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    """GET (and HEAD) on a few fixed paths: 404 elsewhere, 405 for other methods."""

    async def route(request: web.BaseRequest) -> web.StreamResponse:
        handler = routes.get(request.path)
        if handler is None:
            return web.Response(status=404, text="404: Not Found")
        if request.method not in _METHODS:
            return web.Response(status=405, text="405: Method Not Allowed", headers={"Allow": "GET, HEAD"})
        return await handler()

    return route


class BindError(OSError):
    """``listen_bounded`` could not bind; ``reason`` is the errno's text."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def listen_bounded(
    handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
    host: str | None,  # None: every address
    port: int,
    *,
    max_connections: int,
    header_timeout: float,
    logger: RequestErrors,
) -> web.ServerRunner:
    """One listener built for hostile clients (see the module docstring): the header timeout, the connection
    cap, malformed requests counted by ``logger``. Returns its runner (clean it up to close); raises
    BindError, with nothing left open, when the address cannot be bound."""
    server = _BoundedServer(
        handler,
        max_connections=max_connections,
        # aiohttp closes a connection that has not sent a whole request this long after it opened or after
        # its last response: the header timeout, and the idle keep-alive timeout.
        keepalive_timeout=header_timeout,
        access_log=None,
        logger=logger,
    )
    # A short shutdown: probes hold keep-alive connections, and SIGTERM must not wait a minute for them.
    runner = web.ServerRunner(server, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        # asyncio's own text repeats the address: the errno's is enough.
        raise BindError(os.strerror(exc.errno) if exc.errno else str(exc)) from exc
    return runner


class _BoundedServer(web.Server):
    """aiohttp's low-level server holding at most ``max_connections``: a new connection closes the oldest
    (a slow client's, in a flood of them), so the newest probe is always served."""

    def __init__(self, handler: Any, *, max_connections: int, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._max_connections = max_connections
        self._open: OrderedDict[RequestHandler, None] = OrderedDict()

    def __call__(self) -> RequestHandler:
        while len(self._open) >= self._max_connections:
            oldest, _ = self._open.popitem(last=False)
            oldest.force_close()
        protocol = super().__call__()
        self._open[protocol] = None
        return protocol

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self._open.pop(handler, None)
        super().connection_lost(handler, exc)


class RequestErrors(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's request logger: a malformed request (which aiohttp logs at ERROR with a traceback) becomes
    one DEBUG line and a count; any other exception is a bug of ours and keeps its traceback."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger, {})
        self.malformed = 0

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            self.malformed += 1
            remote = args[0] if args else "?"
            self.logger.debug(f"malformed request from {remote}: {_one_line(exc_info.message)}")
            return
        self.logger.error(msg, *args, exc_info=exc_info, **kwargs)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return msg, kwargs


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:200]


def _health_response(snapshot: HealthSnapshot, ok: bool) -> web.Response:
    health = snapshot.health
    body = orjson.dumps(health_body(snapshot.last_updated, snapshot.current_time, health.node_eligible))
    headers = {"Content-Type": JSON, "X-Content-Type-Options": "nosniff"}
    if not ok:
        headers["X-Aproxy-Reason"] = health.reason
    return web.Response(status=200 if ok else 503, body=body, headers=headers)
