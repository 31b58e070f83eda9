"""What the source tests' sinks share: the calls a source made, and waiting for the ones a test expects."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class CallLog:
    """Every call as (method, "namespace/name" or kind), in order."""

    calls: list[tuple[str, str]] = field(default_factory=list)
    # Set on every call, so a test can wait for the calls it expects without polling.
    called: asyncio.Event = field(default_factory=asyncio.Event)

    def take(self) -> list[tuple[str, str]]:
        calls, self.calls = self.calls, []
        return calls

    def _record(self, method: str, subject: str) -> None:
        self.calls.append((method, subject))
        self.called.set()

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self.called.clear()
            await self.called.wait()
