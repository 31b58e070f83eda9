"""How tests get a running fake API server, without pytest-asyncio.

Two ways:

- the `fake_api` pytest fixture: a started `FakeApiServer` on its own event loop (an `asyncio.Runner` that
  lives as long as the test). The test drives it with `fake_api.run(coro)`, which runs the coroutine on that
  loop with a timeout, as often as it likes; the handle's methods may be called between runs too:

      from tests.fakeapi.fixtures import fake_api  # noqa: F401

      def test_initial_sync(fake_api: FakeApiServer) -> None:
          fake_api.create("services", service("default", "web"))

          async def scenario() -> None:
              async with fake_api.api_client() as client:
                  ...

          fake_api.run(scenario())

- `async with FakeApiServer(...) as api:` inside any coroutine, run with `run(coro)` from here (a timeout
  included, so a hung stream fails the test instead of hanging it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from tests.fakeapi.server import DEFAULT_RUN_TIMEOUT, FakeApiServer

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = DEFAULT_RUN_TIMEOUT) -> T:
    """asyncio.run with a deadline: the coroutine is cancelled and TimeoutError raised after `timeout` s."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


@pytest.fixture
def fake_api() -> Iterator[FakeApiServer]:
    """A started fake API server with its own event loop; stopped (all streams ended) after the test."""
    with asyncio.Runner() as runner:
        server = FakeApiServer(runner=runner)
        runner.run(server.start())
        try:
            yield server
        finally:
            runner.run(server.stop())
