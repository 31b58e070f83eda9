"""A backend that keeps the "kernel" in memory: tests, and ``--backend dry-run``.

It rejects what the kernel rejects (through ``IPVSState.apply``), with the kernel's errno, one operation at a
time and without stopping: the same contract as the netlink backend, so sync-loop tests see real failures.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from errno import EIO
from os import strerror

from aproxy.backends.base import OperationResult, RealServerConnections
from aproxy.core.model import IPAddress, Operation, RealServerKey, VirtualServerKey
from aproxy.core.state import IPVSState, StateError


@dataclass(slots=True)
class _InjectedFailure:
    matches: Callable[[Operation], bool]
    errno: int
    remaining: int


@dataclass(frozen=True, slots=True)
class Read:
    """What one ``read`` call asked for."""

    keys: frozenset[VirtualServerKey]
    addresses: frozenset[IPAddress]


class MemoryBackend:
    """Backend on an ``IPVSState``. ``applied`` and ``rejected`` count operations by name (``op.name``);
    ``dumps`` counts ``dump`` calls and ``reads`` records each ``read`` call (the test helpers ``dump_sync``
    and ``apply_sync`` are not counted), so that tests can tell a full dump from a read of a few objects.

    Everything in its state is aproxy's: there is no foreign virtual server in memory.
    """

    def __init__(self, state: IPVSState | None = None) -> None:
        self._state = state.copy() if state is not None else IPVSState()
        self.applied: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.dumps = 0
        self.outlines = 0
        self.reads: list[Read] = []
        self._failures: list[_InjectedFailure] = []
        # Connection counts a test sets to hold a drain open; real servers not listed have none.
        self.connection_counts: dict[tuple[VirtualServerKey, RealServerKey], RealServerConnections] = {}

    async def apply(self, operations: Sequence[Operation]) -> list[OperationResult]:
        return self.apply_sync(operations)

    async def dump(self) -> IPVSState:
        self.dumps += 1
        return self.dump_sync()

    async def bound_addresses(self) -> frozenset[IPAddress]:
        return self._state.addresses()

    async def outline(self) -> IPVSState:
        self.outlines += 1
        state = IPVSState()
        for key in self._state.virtual_keys():
            state.replace_virtual(key, self._state.spec(key), {})
        return state

    async def read(self, keys: Collection[VirtualServerKey], addresses: Collection[IPAddress]) -> IPVSState:
        self.reads.append(Read(frozenset(keys), frozenset(addresses)))
        return self.read_sync(keys, addresses)

    async def connections(self, key: VirtualServerKey) -> Mapping[RealServerKey, RealServerConnections]:
        none = RealServerConnections(0, 0)
        return {real: self.connection_counts.get((key, real), none) for real in self._state.real_servers(key)}

    def apply_sync(self, operations: Sequence[Operation]) -> list[OperationResult]:
        """Apply each operation in order; a rejected one gets its error and the rest go on."""
        return [self._apply_one(op) for op in operations]

    def dump_sync(self) -> IPVSState:
        return self._state.copy()

    def read_sync(self, keys: Iterable[VirtualServerKey], addresses: Iterable[IPAddress]) -> IPVSState:
        """Just these virtual servers (those that exist) and these addresses' bound-ness, as ``dump_sync``
        shows them."""
        state = IPVSState()
        for key in keys:
            spec = self._state.spec(key)
            if spec is not None:
                state.replace_virtual(key, spec, self._state.real_servers(key))
        for address in addresses:
            state.set_bound(address, self._state.is_bound(address))
        return state

    def inject_failure(self, matches: Callable[[Operation], bool], errno: int = EIO, times: int = 1) -> None:
        """Make the next ``times`` operations for which ``matches`` is true fail with ``errno``, unapplied.

        For testing a caller's failure handling; the state is left as a failing kernel would leave it.
        """
        self._failures.append(_InjectedFailure(matches, errno, times))

    def _apply_one(self, op: Operation) -> OperationResult:
        injected = self._take_injected(op)
        if injected is not None:
            self.rejected[op.name] += 1
            return OperationResult(op, f"{op.name}: {strerror(injected)} (injected)", injected)
        try:
            self._state.apply(op)
        except StateError as error:
            self.rejected[op.name] += 1
            return OperationResult(op, str(error), error.errno)
        self.applied[op.name] += 1
        return OperationResult(op)

    def _take_injected(self, op: Operation) -> int | None:
        for failure in self._failures:
            if failure.remaining > 0 and failure.matches(op):
                failure.remaining -= 1
                if failure.remaining == 0:
                    self._failures.remove(failure)
                return failure.errno
        return None
