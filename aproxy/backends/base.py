"""What the sync loop needs from a backend: apply operations in order, report each one's fate, read state."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from errno import EADDRNOTAVAIL, EEXIST, ENOENT, ESRCH
from typing import Protocol, runtime_checkable

from aproxy.core.datapath import SetDelta, SetEntry
from aproxy.core.model import IPAddress, Operation, RealServerKey, VirtualServerKey
from aproxy.core.state import IPVSState

# The answers that mean "the applied state was wrong about this object", not "the kernel failed": the sync
# loop re-reads the kernel for that object (Planner.reconcile) instead of retrying blindly. ESRCH is what IPVS
# says for a missing virtual server, ENOENT for a missing real server, EADDRNOTAVAIL for an unbound address.
STATE_MISMATCH_ERRNOS: frozenset[int] = frozenset({EEXIST, ENOENT, ESRCH, EADDRNOTAVAIL})


class BackendError(Exception):
    """The backend could not apply or read at all (device gone, socket closed): no per-operation results."""


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


class DestinationUsage:
    """When each backend address was last seen with connections in a destination dump.

    The health checks' scope ``used`` reads it: the backends that carried this node's connections lately. It
    costs no extra kernel read: the dumps aproxy makes anyway (the audit's, every --audit-period; the drain
    checks') feed it. A TCP connection stays counted (inactive, in IPVS's TIME_WAIT) for two minutes after it
    closed, so a backend used between two audits is seen at the next one.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._seen: dict[IPAddress, float] = {}

    def observe(self, address: IPAddress, connections: RealServerConnections) -> None:
        if connections.active or connections.inactive:
            self._seen[address] = self._clock()

    def used_addresses(self, since: float) -> frozenset[IPAddress]:
        """Addresses seen with connections at or after ``since`` (the clock's time); older ones forgotten."""
        for address in [a for a, seen in self._seen.items() if seen < since]:
            del self._seen[address]
        return frozenset(self._seen)


class Backend(Protocol):
    async def apply(self, operations: Sequence[Operation]) -> list[OperationResult]:
        """Apply in order; one result per operation, in the same order. A rejected operation does not stop
        the ones after it. Raises BackendError only when nothing could be attempted."""
        ...

    async def dump(self) -> IPVSState:
        """The state aproxy owns on this node (foreign virtual servers left out)."""
        ...

    async def bound_addresses(self) -> frozenset[IPAddress]:
        """The addresses bound on aproxy's device now: one address dump (an audit round's first slice)."""
        ...

    async def outline(self) -> IPVSState:
        """The owned virtual servers with their specs, without real servers or addresses: one dump of the
        virtual servers, where ``dump()`` also reads every one's real servers (an audit round's second
        slice; the next ones ``read()`` the real servers a slice at a time)."""
        ...

    async def read(self, keys: Collection[VirtualServerKey], addresses: Collection[IPAddress]) -> IPVSState:
        """The owned state of just these virtual servers (spec, real servers with weights) and these addresses
        (bound or not): what the sync loop reconciles after a state-mismatch answer, at the cost of the
        objects asked for, not of the whole node.

        An unowned or absent virtual server is absent from the result, exactly as ``dump()`` would show it;
        nothing else is read, and no source NAT repair is done (``NatRepair``'s). Raises BackendError only
        when nothing could be read.
        """
        ...

    async def connections(self, key: VirtualServerKey) -> Mapping[RealServerKey, RealServerConnections]:
        """The connection counts of the real servers of one owned virtual server (empty if it is gone)."""
        ...


@runtime_checkable
class NatRepair(Protocol):
    """A backend with source NAT around IPVS (chains, the hairpin and dummy-device sets), which ``dump()``
    repairs at start-up: the audit, which reads the kernel in slices, asks for it at its end."""

    def repair_nat_steps(self, applied: Callable[[], IPVSState]) -> AsyncIterator[None]:
        """Make the chains and the sets that follow IPVS match ``applied()`` (the IPVS state as applied,
        taken when the sets are compared), one step per ``anext``: the caller may run syncs between steps."""
        ...


@runtime_checkable
class LocalEndpointFilter(Protocol):
    """A backend whose hairpin set must hold only this node's endpoints (kube-proxy's KUBE-LOOP-BACK): the
    syncer, which knows them, hands over its ``is_local_endpoint`` when it is built."""

    def set_local_endpoints(self, is_local: Callable[[IPAddress], bool]) -> None: ...


@runtime_checkable
class ServiceSets(Protocol):
    """A backend that also keeps the per-purpose service sets (core/datapath.py): the sync loop hands it each
    pass's change, and the whole membership at start-up and at every audit. Failures are the backend's to
    log; the next audit repairs them."""

    async def update_services(self, delta: SetDelta) -> None: ...

    async def resync_services(self, entries: frozenset[SetEntry]) -> None: ...
