"""Health-check node port listeners over real HTTP on loopback: opened and closed with the table, kube-proxy's
answers, 503 while aproxy is unhealthy, a port taken by another process logged and the others served; on the
node-port addresses they are given (127.0.0.1 and 127.0.0.2: both on Linux's loopback), moved at run time."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from ipaddress import ip_address

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


LOOPBACK, OTHER = ip_address("127.0.0.1"), ip_address("127.0.0.2")
STEP = 5.0


async def probe(port: int, path: str = "/", host: str = "127.0.0.1") -> tuple[int, dict[str, str], object]:
    async with ClientSession() as session, session.get(f"http://{host}:{port}{path}") as response:
        return response.status, dict(response.headers), orjson.loads(await response.read())


def refused(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) != 0


async def reconciled(condition: Callable[[], bool]) -> None:
    """Until the serving task has reconciled a change (``condition`` holds), at most STEP seconds: a fixed
    sleep would race the binds on a loaded machine."""
    async with asyncio.timeout(STEP):
        while not condition():  # noqa: ASYNC110 (the condition is the kernel's answer to a connect)
            await asyncio.sleep(0.01)


def test_listeners_follow_the_table_and_answer_like_kube_proxy() -> None:
    async def scenario() -> None:
        healthy = [True]
        table = HealthPortTable()
        listeners = HealthCheckListeners(table, lambda: healthy[0], addresses=[LOOPBACK])
        web_port, api_port = free_port(), free_port()
        serving = asyncio.create_task(listeners.serve())
        try:
            table.update(WEB, HealthCheckPort(web_port, WEB, 0))
            table.update(API, HealthCheckPort(api_port, API, 2))
            await reconciled(lambda: listeners.ports == {web_port, api_port})
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
            await reconciled(lambda: listeners.ports == {api_port})
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
            listeners = HealthCheckListeners(table, lambda: True, addresses=[LOOPBACK])
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


def test_listeners_bind_only_the_addresses_given_and_move_with_them() -> None:
    async def scenario() -> None:
        table = HealthPortTable()
        listeners = HealthCheckListeners(table, lambda: True, addresses=[LOOPBACK])
        port = free_port()
        serving = asyncio.create_task(listeners.serve())
        try:
            table.update(WEB, HealthCheckPort(port, WEB, 1))
            await reconciled(lambda: not refused(port, "127.0.0.1"))
            assert (await probe(port, host="127.0.0.1"))[0] == 200
            assert refused(port, "127.0.0.2")  # a local address that is not a node-port address

            listeners.set_addresses([OTHER])  # the node-port addresses changed: the listener moves
            await reconciled(lambda: refused(port, "127.0.0.1") and not refused(port, "127.0.0.2"))
            assert refused(port, "127.0.0.1")
            assert (await probe(port, host="127.0.0.2"))[0] == 200
            assert listeners.ports == {port}

            listeners.set_addresses([])  # no node-port address at all: nowhere, as kube-proxy
            await reconciled(lambda: refused(port, "127.0.0.1") and refused(port, "127.0.0.2"))
            assert refused(port, "127.0.0.1") and refused(port, "127.0.0.2")
            assert listeners.ports == set()

            listeners.set_addresses(None)  # every address again
            await reconciled(lambda: not refused(port, "127.0.0.1") and not refused(port, "127.0.0.2"))
            assert (await probe(port, host="127.0.0.1"))[0] == 200
            assert (await probe(port, host="127.0.0.2"))[0] == 200
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
        assert refused(port, "127.0.0.1") and refused(port, "127.0.0.2")

    asyncio.run(scenario())


def test_without_addresses_every_address_answers() -> None:
    async def scenario() -> None:
        table = HealthPortTable()
        listeners = HealthCheckListeners(table, lambda: True)
        port = free_port()
        table.update(WEB, HealthCheckPort(port, WEB, 0))
        await listeners.reconcile()
        try:
            assert (await probe(port, host="127.0.0.1"))[0] == 503
            assert (await probe(port, host="127.0.0.2"))[0] == 503
        finally:
            await listeners.close()

    asyncio.run(scenario())


def test_an_address_that_cannot_be_bound_is_counted_and_the_others_served() -> None:
    async def scenario() -> None:
        table = HealthPortTable()
        gone = ip_address("192.0.2.1")  # TEST-NET-1: on no interface (an address removed a moment ago)
        listeners = HealthCheckListeners(table, lambda: True, addresses=[LOOPBACK, gone])
        port = free_port()
        table.update(WEB, HealthCheckPort(port, WEB, 1))
        await listeners.reconcile()
        try:
            assert listeners.bind_failures == 1
            assert listeners.ports == {port}
            assert (await probe(port))[0] == 200
            await listeners.reconcile()  # tried again at the next pass, still failing, still counted
            assert listeners.bind_failures == 2
        finally:
            await listeners.close()
        assert refused(port)

    asyncio.run(scenario())
