"""The backend under test opened on an event loop, for kernel tests whose bodies are synchronous."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from aproxy.backends.ipvs import IPVSBackend, IPVSSettings


@contextlib.contextmanager
def opened_backend(runner: asyncio.Runner, settings: IPVSSettings) -> Iterator[IPVSBackend]:
    """An IPVSBackend opened with ``settings`` on ``runner``'s loop, closed when the block ends."""
    opened = runner.run(IPVSBackend(settings).__aenter__())
    try:
        yield opened
    finally:
        runner.run(opened.__aexit__(None, None, None))
