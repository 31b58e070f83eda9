"""Running a command (iptables, ipset, conntrack) without blocking the event loop, bounded in time."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

COMMAND_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        return f"{' '.join(self.argv)} exited {self.returncode}: {self.stderr.strip()}"


async def run_command(*argv: str, stdin: str | None = None) -> CommandResult:
    """Run a command; FileNotFoundError when it is not installed, TimeoutError (the process killed) when it
    takes longer than ``COMMAND_TIMEOUT``."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(COMMAND_TIMEOUT):
            out, err = await process.communicate(stdin.encode() if stdin is not None else None)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None  # communicate() waited for the exit
    return CommandResult(
        tuple(argv), process.returncode, out.decode(errors="replace"), err.decode("utf-8", "replace")
    )


async def succeeds(*argv: str) -> bool:
    """A check: whether the command exits 0 (False as well when it is not installed)."""
    try:
        return (await run_command(*argv)).ok
    except FileNotFoundError:
        return False
