"""What the sync loop needs from a backend: apply operations in order, report each one's fate, dump state."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from errno import EADDRNOTAVAIL, EEXIST, ENOENT, ESRCH
from typing import Protocol

from aproxy.core.model import Operation, RealServerKey, VirtualServerKey
from aproxy.core.state import IPVSState

# The answers that mean "the applied state was wrong about this object", not "the kernel failed": the sync
# loop re-reads the kernel for that object (Planner.reconcile) instead of retrying blindly. ESRCH is what IPVS
# says for a missing virtual server, ENOENT for a missing real server, EADDRNOTAVAIL for an unbound address.
STATE_MISMATCH_ERRNOS: frozenset[int] = frozenset({EEXIST, ENOENT, ESRCH, EADDRNOTAVAIL})


class BackendError(Exception):
    """The backend could not apply or dump at all (device gone, socket closed): no per-operation results."""


@dataclass(frozen=True, slots=True)
class OperationResult:
    """The fate of one operation: ``error`` and ``errno`` are None when the kernel accepted it."""

    operation: Operation
    error: str | None = None
    errno: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def state_mismatch(self) -> bool:
        """The kernel disagreed with the applied state about this object (see STATE_MISMATCH_ERRNOS)."""
        return self.errno in STATE_MISMATCH_ERRNOS


@dataclass(frozen=True, slots=True)
class RealServerConnections:
    """IPVS's connection counts of one real server (what decides when a drain is over)."""

    active: int
    inactive: int


class Backend(Protocol):
    async def apply(self, operations: Sequence[Operation]) -> list[OperationResult]:
        """Apply in order; one result per operation, in the same order. A rejected operation does not stop
        the ones after it. Raises BackendError only when nothing could be attempted."""
        ...

    async def dump(self) -> IPVSState:
        """The state aproxy owns on this node (foreign virtual servers left out)."""
        ...

    async def connections(self, key: VirtualServerKey) -> Mapping[RealServerKey, RealServerConnections]:
        """The connection counts of the real servers of one owned virtual server (empty if it is gone)."""
        ...
