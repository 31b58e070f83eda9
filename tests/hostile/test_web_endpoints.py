"""Hostile HTTP clients against the health and metrics listeners (issue 14): half-sent requests are closed
after the header timeout, a flood of slow connections does not stop /healthz from answering, malformed
requests are one DEBUG line each (no traceback), and a bind failure is one line naming the address."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import pytest

from aproxy.app import EXIT_FAILED, Daemon
from aproxy.backends.base import OperationResult
from aproxy.backends.memory import MemoryBackend
from aproxy.core.model import Operation
from aproxy.core.state import IPVSState
from aproxy.health.config import HealthCheckSettings
from aproxy.settings import Settings
from aproxy.web.healthz import Health
from aproxy.web.server import Exposition, HealthSnapshot, ListenAddress, ListenError, WebServer

LOCAL = ListenAddress("127.0.0.1", 0)
HEALTHY = HealthSnapshot(Health(True, True, True, True, ""), 1.0, 2.0)


def in_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop, bounded in time."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 60))

    return run


def server(
    *, header_timeout: float = 5.0, max_connections: int = 64, healthz: ListenAddress = LOCAL
) -> WebServer:
    return WebServer(
        healthz_address=healthz,
        metrics_address=LOCAL,
        health=lambda: HEALTHY,
        metrics=lambda: Exposition(b"m 1\n", "text/plain"),
        header_timeout=header_timeout,
        max_connections=max_connections,
    )


@contextlib.asynccontextmanager
async def serving(web: WebServer) -> AsyncIterator[int]:
    """The server running; yields the healthz port."""
    task = asyncio.create_task(web.serve())
    try:
        await asyncio.wait_for(web.listening.wait(), 5)
        assert web.healthz_port is not None
        yield web.healthz_port
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def get(port: int, path: str = "/healthz") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


async def half_sent(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finished
    await writer.drain()
    return reader, writer


@in_loop
async def test_a_half_sent_request_is_closed_after_the_header_timeout() -> None:
    async with serving(server(header_timeout=0.3)) as port:
        reader, writer = await half_sent(port)
        # Closed by the server: EOF well before the test's own limit (it was held for over 200 s).
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()


@in_loop
async def test_healthz_answers_while_500_slow_connections_are_open() -> None:
    async with serving(server(max_connections=64)) as port:
        slow = [await half_sent(port) for _ in range(500)]
        try:
            for _ in range(3):
                assert (await get(port)).startswith(b"HTTP/1.1 200 OK")
            # The oldest slow connections made room: at most the cap is held open.
            closed = 0
            for reader, _ in slow:
                with contextlib.suppress(TimeoutError):
                    closed += await asyncio.wait_for(reader.read(), 0.01) == b""
            assert closed >= 500 - 64
        finally:
            for _, writer in slow:
                writer.close()


@in_loop
async def test_malformed_requests_are_debug_lines_without_tracebacks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with serving(server()) as port:
        for _ in range(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.0 400")
            writer.close()
        assert (await get(port)).startswith(b"HTTP/1.1 200 OK")
    web_records = [
        r for r in caplog.records if r.name.startswith("aiohttp") or r.name.startswith("aproxy.web")
    ]
    assert [r for r in web_records if r.levelno >= logging.WARNING] == []
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in web_records)
    assert sum("malformed request" in r.getMessage() for r in web_records) == 20


@in_loop
async def test_unknown_paths_and_methods() -> None:
    async with serving(server()) as port:
        assert (await get(port, "/nope")).startswith(b"HTTP/1.1 404")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 405")
        writer.close()


@in_loop
async def test_a_port_in_use_is_one_line_naming_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = ListenAddress("127.0.0.1", taken.getsockname()[1])
        web = server(healthz=address)
        with pytest.raises(ListenError) as caught:
            await web.start()
        await web.close()
    assert str(caught.value) == f"cannot listen on {address} (healthz): Address already in use"


@in_loop
async def test_an_address_not_on_this_host_is_one_line() -> None:
    address = ListenAddress("192.0.2.77", 10256)
    web = server(healthz=address)
    with pytest.raises(ListenError, match=r"^cannot listen on 192\.0\.2\.77:10256 \(healthz\): .*address"):
        await web.start()
    await web.close()


class CountingKernel(MemoryBackend):
    """A dry-run kernel that counts every call: a daemon that cannot listen must make none."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def apply(self, operations: Sequence[Operation]) -> list[OperationResult]:
        self.calls += 1
        return await super().apply(operations)

    async def dump(self) -> IPVSState:
        self.calls += 1
        return await super().dump()


@pytest.mark.parametrize("listener", ["healthz", "metrics"])
def test_the_daemon_refuses_to_start_on_a_taken_port_before_touching_the_kernel(
    caplog: pytest.LogCaptureFixture, listener: str
) -> None:
    kernel = CountingKernel()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = ListenAddress("127.0.0.1", taken.getsockname()[1])
        settings = Settings(
            node_name="node-a",
            sources=(Path("examples/cluster.yaml"),),
            backend="dry-run",
            healthz_address=address if listener == "healthz" else LOCAL,
            metrics_address=address if listener == "metrics" else LOCAL,
            health_checks=HealthCheckSettings(enabled=False),  # the example's endpoints are not ours
        )
        code = asyncio.run(asyncio.wait_for(Daemon(settings, backend=kernel).run(handle_signals=False), 30))
    assert code == EXIT_FAILED
    assert kernel.calls == 0
    [record] = [r for r in caplog.records if r.getMessage() == "aproxy cannot start"]
    assert record.__dict__["reason"] == f"--{listener}-bind-address {address}: Address already in use"
    assert record.exc_info is None
