"""Health-check node port listeners over real HTTP on loopback: opened and closed with the table, kube-proxy's
answers, 503 while aproxy is unhealthy, a port taken by another process logged and the others served."""

from __future__ import annotations

import asyncio
import socket

import orjson
from aiohttp import ClientSession

from aproxy.core.health_ports import HealthCheckPort, HealthPortTable
from aproxy.core.model import ServiceKey
from aproxy.web.health_ports import HealthCheckListeners

WEB, API = ServiceKey("default", "web"), ServiceKey("default", "api")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def probe(port: int, path: str = "/") -> tuple[int, dict[str, str], object]:
    async with ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, dict(response.headers), orjson.loads(await response.read())


def refused(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_listeners_follow_the_table_and_answer_like_kube_proxy() -> None:
    async def scenario() -> None:
        healthy = [True]
        table = HealthPortTable()
        listeners = HealthCheckListeners(table, lambda: healthy[0], host="127.0.0.1")
        web_port, api_port = free_port(), free_port()
        serving = asyncio.create_task(listeners.serve())
        try:
            table.update(WEB, HealthCheckPort(web_port, WEB, 0))
            table.update(API, HealthCheckPort(api_port, API, 2))
            await asyncio.sleep(0.05)
            assert listeners.ports == {web_port, api_port}

            status, headers, body = await probe(web_port, "/healthz")
            assert status == 503
            assert body == {
                "service": {"namespace": "default", "name": "web"},
                "localEndpoints": 0,
                "serviceProxyHealthy": True,
            }
            assert headers["Content-Type"] == "application/json"
            assert headers["X-Content-Type-Options"] == "nosniff"
            assert (await probe(api_port, "/any/path"))[0] == 200

            table.update(WEB, HealthCheckPort(web_port, WEB, 1))  # a local pod became ready
            assert (await probe(web_port))[0] == 200
            healthy[0] = False  # aproxy itself unhealthy: every port says 503
            status, _headers, body = await probe(api_port)
            assert status == 503 and isinstance(body, dict) and body["serviceProxyHealthy"] is False
            healthy[0] = True

            table.update(WEB, None)  # the service went away: its listener closes, the other stays
            await asyncio.sleep(0.05)
            assert listeners.ports == {api_port}
            assert refused(web_port)
            assert (await probe(api_port))[0] == 200
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
        assert refused(api_port)

    asyncio.run(scenario())


def test_a_port_another_process_holds_is_counted_and_the_others_served() -> None:
    async def scenario() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = taken.getsockname()[1]
            table = HealthPortTable()
            listeners = HealthCheckListeners(table, lambda: True, host="127.0.0.1")
            good = free_port()
            table.update(WEB, HealthCheckPort(busy, WEB, 1))
            table.update(API, HealthCheckPort(good, API, 1))
            await listeners.reconcile()
            try:
                assert listeners.ports == {good}
                assert listeners.bind_failures == 1
                assert (await probe(good))[0] == 200
            finally:
                await listeners.close()

    asyncio.run(scenario())
