"""The daemon's HTTP endpoints (aiohttp): health on one address, Prometheus metrics on another.

- healthz address (kube-proxy's default ``0.0.0.0:10256``): ``/healthz``, ``/livez``, ``/readyz``. The first
  two answer kube-proxy's JSON (``lastUpdated``, ``currentTime``, ``nodeEligible``) with 200 or 503; the
  decision is ``aproxy.web.healthz.decide`` (``/healthz`` also fails while the node is not eligible,
  ``/livez`` does not).
- metrics address (``127.0.0.1:10249``): ``/metrics``, the exposition the daemon hands in.

The server knows nothing of the sync loop: it calls two functions the composition root gives it, on the event
loop's thread, so they may read the loop's state without locks.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from aiohttp import web

from aproxy.web.healthz import Health, health_body

log = logging.getLogger(__name__)

JSON = "application/json"
SHUTDOWN_TIMEOUT = 2.0  # seconds for in-flight requests when stopping


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
    """Both sites; ``serve()`` runs until cancelled and always cleans its runners up."""

    def __init__(
        self,
        *,
        healthz_address: ListenAddress,
        metrics_address: ListenAddress,
        health: Callable[[], HealthSnapshot],
        metrics: Callable[[], Exposition],
    ) -> None:
        self._healthz_address = healthz_address
        self._metrics_address = metrics_address
        self._health = health
        self._metrics = metrics
        # The ports actually bound (they differ from the settings when those ask for port 0).
        self.healthz_port: int | None = None
        self.metrics_port: int | None = None
        self.listening = asyncio.Event()

    async def serve(self) -> None:
        started: list[web.AppRunner] = []
        try:
            self.healthz_port = await _start(self._health_app(), self._healthz_address, started)
            self.metrics_port = await _start(self._metrics_app(), self._metrics_address, started)
            log.info(
                "serving health and metrics",
                extra={
                    "healthz": str(ListenAddress(self._healthz_address.host, self.healthz_port)),
                    "metrics": str(ListenAddress(self._metrics_address.host, self.metrics_port)),
                },
            )
            self.listening.set()
            await asyncio.Event().wait()  # until cancelled
        finally:
            self.listening.clear()
            for runner in reversed(started):
                await runner.cleanup()

    # --- apps -----------------------------------------------------------------------------------------------

    def _health_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/readyz", self._readyz)
        return app

    def _metrics_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics_handler)
        return app

    async def _healthz(self, _request: web.Request) -> web.Response:
        snapshot = self._health()
        return _health_response(snapshot, snapshot.health.healthz)

    async def _livez(self, _request: web.Request) -> web.Response:
        snapshot = self._health()
        return _health_response(snapshot, snapshot.health.livez)

    async def _readyz(self, _request: web.Request) -> web.Response:
        ready = self._health().health.ready
        return web.Response(status=200 if ready else 503, text="ok\n" if ready else "not ready\n")

    async def _metrics_handler(self, _request: web.Request) -> web.Response:
        exposition = self._metrics()
        return web.Response(body=exposition.body, headers={"Content-Type": exposition.content_type})


def _health_response(snapshot: HealthSnapshot, ok: bool) -> web.Response:
    health = snapshot.health
    body = orjson.dumps(health_body(snapshot.last_updated, snapshot.current_time, health.node_eligible))
    headers = {"Content-Type": JSON, "X-Content-Type-Options": "nosniff"}
    if not ok:
        headers["X-Aproxy-Reason"] = health.reason
    return web.Response(status=200 if ok else 503, body=body, headers=headers)


async def _start(app: web.Application, address: ListenAddress, started: list[web.AppRunner]) -> int:
    """Listen on ``address``; return the port bound. The runner joins ``started`` once it needs a cleanup."""
    # A short shutdown: probes hold keep-alive connections, and SIGTERM must not wait a minute for them.
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    started.append(runner)
    site = web.TCPSite(runner, address.host, address.port)
    await site.start()
    port: int = runner.addresses[-1][1]
    return port
