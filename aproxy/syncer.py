"""The one owner of kernel changes: dirty services -> desired state -> plan -> backend -> applied state.

Both the daemon's sync loop and ``aproxy sync`` drive this class: a one-shot sync is the daemon's code path.

- ``start()``: take the kernel's owned state as applied (a restart changes nothing that is already right),
  plan the whole cluster once, apply.
- ``sync()``: translate only the services the tracker marked dirty (plus those whose last sync failed), plan,
  apply, record what the kernel accepted. The cost grows with the change, not with the cluster.
- ``audit_slice()``: compare the kernel with the applied state and repair drift (someone ran ``ipvsadm -C``),
  one slice of virtual servers at a time (the kernel loop lets due syncs run between slices).
- ``drain_slice()``: delete the drained TCP real servers whose connections are gone or whose grace period is
  over, one slice of virtual servers at a time.
``audit()`` and ``drain()`` run a whole round in one call.

A failed operation leaves the applied state as it was; its service is retried on the next sync. An answer
that says the applied state was wrong (EEXIST, ENOENT, ...) first re-reads the kernel for just that object
(``Backend.read``, not a full dump: one stray EEXIST must not cost a pass over the whole node).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from errno import EBUSY
from typing import Final

from aproxy.backends.base import Backend, LocalEndpointFilter, NatRepair, OperationResult, ServiceSets
from aproxy.core.changes import ChangeTracker
from aproxy.core.datapath import SetDelta, SetEntry, SetMembership, service_entries
from aproxy.core.drain import DrainClock
from aproxy.core.health_ports import HealthCheckPort, HealthPortTable, health_check_port
from aproxy.core.local_endpoints import LocalEndpoints, local_endpoint_addresses
from aproxy.core.model import (
    BindAddress,
    DeleteVirtualServer,
    IPAddress,
    Operation,
    RealServerKey,
    ServiceKey,
    ServiceState,
    UnbindAddress,
    VirtualServerKey,
    operation_to_dict,
    virtual_server_of,
)
from aproxy.core.objects import Severity, Skip
from aproxy.core.plan import Plan, Planner
from aproxy.core.translate import TranslationContext
from aproxy.core.verdicts import HealthView

log = logging.getLogger(__name__)

# Virtual servers one slice of an audit reads the real servers of, and one slice of drain checks reads the
# connections of: one or two netlink requests each, 3.5-7 ms a request in the user-mode Linux guest under
# load (bench/e2e.py's pass timings at 10,000 services: 0.25-0.5 s for an audit slice of 20, 0.19 s on
# average for one of 10; a fraction of that on a real kernel): a slice of 10 is what a due sync may have to
# wait for there.
AUDIT_SLICE: Final = 10
DRAIN_SLICE: Final = 10


class NotStarted(RuntimeError):
    """``sync``/``audit``/``drain`` before ``start``: there is no applied state to plan against yet."""


@dataclass(frozen=True, slots=True)
class SyncReport:
    """What one pass did: every operation's result, and the services that will be retried."""

    kind: str  # "start", "sync", "audit" or "drain"
    results: tuple[OperationResult, ...] = ()
    services: int = 0
    failed_services: frozenset[ServiceKey] = frozenset()

    @property
    def ok(self) -> bool:
        return all(result.ok for result in self.results)

    @property
    def failures(self) -> list[OperationResult]:
        return [result for result in self.results if not result.ok]


@dataclass(slots=True)
class SyncCounters:
    """Running totals for metrics: operations by (name, "ok"|"error"), passes by kind, audit repairs."""

    operations: Counter[tuple[str, str]] = field(default_factory=Counter)
    passes: Counter[str] = field(default_factory=Counter)
    audit_repairs: int = 0
    conflicts: int = 0


def log_skips(skips: Iterable[Skip]) -> None:
    """Each skip is logged once (the tracker hands out each only once) with the object and the reason."""
    for skip in skips:
        log.warning(
            "skipped object" if skip.severity is Severity.ERROR else "ignored part of object",
            extra={"kind": skip.kind, "object": f"{skip.namespace}/{skip.name}", "reason": skip.reason},
        )


@dataclass(frozen=True, slots=True)
class _Around:
    """What a service's inputs say beyond its virtual servers (one tracker lookup for the three): its
    endpoints on this node (the hairpin set's filter), its health-check node port, its service-set entries."""

    local: frozenset[IPAddress]
    health_port: HealthCheckPort | None
    entries: frozenset[SetEntry]


class Syncer:
    def __init__(
        self,
        tracker: ChangeTracker,
        ctx: TranslationContext,
        backend: Backend,
        drain_clock: DrainClock | None = None,
        clock: Callable[[], float] = time.monotonic,
        health: HealthView | None = None,
        health_ports: HealthPortTable | None = None,
    ) -> None:
        self._tracker = tracker
        # Health verdicts (aproxy/health/): unhealthy backends at weight 0 in every translated service.
        self._health = health
        self._ctx = ctx
        self._backend = backend
        self._drain_clock = drain_clock or DrainClock()
        self._clock = clock
        self._planner: Planner | None = None
        self._retry: set[ServiceKey] = set()
        self.counters = SyncCounters()
        # The service sets around IPVS (source NAT, source ranges, the service-IP filter), when the backend
        # keeps them: they follow the services, not the operations.
        self._sets = backend if isinstance(backend, ServiceSets) else None
        self._nat = backend if isinstance(backend, NatRepair) else None
        # The rounds in progress: what their next slices read (reversed: popped from the end).
        self._audit_begun = False  # the round's first slice (the bound addresses) is done
        self._audit_queue: list[VirtualServerKey] | None = None  # set by its second (the outline)
        self._audit_tail: AsyncIterator[None] | None = None  # the round's last slices, once begun
        self._drain_queue: list[VirtualServerKey] | None = None
        self._membership = SetMembership()
        # The health-check node ports the web side serves (they follow the services and their endpoints).
        self._health_ports = health_ports
        # The addresses of this node's endpoints: the hairpin set's filter (is_local_endpoint).
        self._local = LocalEndpoints()
        if isinstance(backend, LocalEndpointFilter):
            backend.set_local_endpoints(self.is_local_endpoint)

    @property
    def started(self) -> bool:
        return self._planner is not None

    @property
    def context(self) -> TranslationContext:
        """The node the syncer translates for."""
        return self._ctx

    def set_node_addresses(self, addresses: frozenset[IPAddress]) -> bool:
        """NodePorts move to ``addresses`` at the next sync; False when they are the same already. Every
        service is planned again (NodePorts and which external IPs are bound depend on them): O(cluster),
        but an address coming or going is rare."""
        if addresses == self._ctx.node_addresses:
            return False
        self._ctx = dataclasses.replace(self._ctx, node_addresses=addresses)
        self._retry |= self._tracker.services()
        return True

    def is_local_endpoint(self, address: IPAddress) -> bool:
        """Whether ``address`` is an endpoint on this node (its nodeName is this node's) of some service: the
        only real servers a hairpin can reach. Up to date for a pass's services before the backend applies
        its operations, and for every service before the start-up dump."""
        return address in self._local

    @property
    def pending_retries(self) -> frozenset[ServiceKey]:
        return frozenset(self._retry)

    @property
    def planner(self) -> Planner:
        if self._planner is None:
            raise NotStarted("start() has not run")
        return self._planner

    async def start(self) -> SyncReport:
        """Adopt the kernel's owned state, then program the whole cluster (zero operations if unchanged)."""
        around = {key: self._around(key) for key in self._tracker.services()}
        # Before the dump: it resyncs the hairpin set, which holds only local endpoints.
        self._local.reset({key: inputs.local for key, inputs in around.items()})
        self._planner = Planner(applied=await self._backend.dump(), adopt=True)  # the dump is not kept
        self._tracker.take_dirty()
        self._retry.clear()
        # Rounds begun on the old planner start over.
        self._end_audit_round()
        self._drain_queue = None
        desired = desired_all(self._tracker, self._ctx, self._health)
        report = await self._execute("start", self._planner.plan_full(desired), len(desired))
        if self._health_ports is not None:
            wanted = (inputs.health_port for inputs in around.values())
            self._health_ports.reset(port for port in wanted if port is not None)
        if self._sets is not None:
            self._membership.reset({key: inputs.entries for key, inputs in around.items()})
            await self._sets.resync_services(self._membership.entries())
        return report

    async def sync(self) -> SyncReport:
        """Plan and apply the services changed since the last pass, and retry those that failed."""
        planner = self.planner
        keys = self._tracker.take_dirty() | self._retry
        self._retry = set()
        around = {key: self._around(key) for key in keys}
        # Before the backend follows this pass's real servers into the hairpin set.
        for key, inputs in around.items():
            self._local.replace(key, inputs.local)
        desired = {key: self._desired(key) for key in sorted_keys(keys)}
        try:
            report = await self._execute("sync", planner.plan(desired), len(desired))
        except BaseException:
            # The backend could not be reached at all (or the pass was cancelled): the keys taken from the
            # tracker must not be lost; the next pass plans them again.
            self._retry |= keys
            raise
        if self._health_ports is not None:
            for key, inputs in around.items():
                self._health_ports.update(key, inputs.health_port)
        if self._sets is not None:
            added: list[SetEntry] = []
            removed: list[SetEntry] = []
            for key, inputs in around.items():
                delta = self._membership.replace(key, inputs.entries)
                added += delta.added
                removed += delta.removed
            if added or removed:
                await self._sets.update_services(SetDelta(tuple(added), tuple(removed)))
        return report

    @property
    def auditing(self) -> bool:
        """An audit round has begun and has slices left (``audit_slice`` goes on with it)."""
        return self._audit_begun

    @property
    def draining_round(self) -> bool:
        """A round of drain checks has begun and has slices left (``drain_slice`` goes on with it)."""
        return self._drain_queue is not None

    @property
    def audit_step(self) -> str:
        """What the next audit slice does (its cost differs by step): ``addresses`` (a round begins),
        ``outline``, ``real servers`` (a slice of them), or ``surroundings`` (a chain or set command)."""
        if not self._audit_begun:
            return "addresses"
        if self._audit_queue is None:
            return "outline"
        return "real servers" if self._audit_queue else "surroundings"

    def abandon_audit(self) -> None:
        """The kernel could not be read: the round ends here; the next audit starts a new one."""
        self._end_audit_round()

    def abandon_drain(self) -> None:
        """The kernel could not be read: the round ends here; the next drain check starts a new one."""
        self._drain_queue = None

    async def audit(self) -> SyncReport:
        """A whole audit in one call (tests, bench/kernel.py): every slice in a row."""
        return await _whole_round("audit", self.audit_slice, lambda: self.auditing)

    async def audit_slice(self) -> SyncReport:
        """One slice of an audit: repair what differs between the kernel and the applied state.

        A round's first slice reads the addresses bound on the device (one dump) and repairs those bound on
        one side only; the second reads the kernel's outline (its virtual servers with their specs: one
        dump) and repairs those that are missing, extra or changed (at 10,000 services in the guest the two
        dumps took 1.3 s as one slice, longer than a sync period); the next ones each read the real servers of
        ``AUDIT_SLICE`` virtual servers and repair those; the last ones repair the chains and sets around
        IPVS (``NatRepair``: one command a slice) and the service sets. Each slice reads what it compares
        within its own pass, so syncs may run between slices: at 10,000 virtual servers a whole audit holds
        the kernel for seconds, a slice for a fraction of one.
        """
        planner = self.planner
        if not self._audit_begun:
            addresses = planner.address_differences(await self._backend.bound_addresses())
            self._audit_begun = True
            return await self._repair_among((), addresses)
        if self._audit_queue is None:
            outline = await self._backend.outline()
            keys = planner.outline_differences(outline)
            self._audit_queue = sorted(
                (key for key in outline.virtual_keys() if key not in keys), key=VirtualServerKey.sort_key
            )
            self._audit_queue.reverse()  # popped from the end: in key order
            return await self._repair_among(keys, ())
        if self._audit_queue:
            chunk = [self._audit_queue.pop() for _ in range(min(AUDIT_SLICE, len(self._audit_queue)))]
            return await self._repair_among(chunk, ())
        if self._audit_tail is None:
            self._audit_tail = self._repair_surroundings()
        try:
            await anext(self._audit_tail)
        except StopAsyncIteration:
            self._end_audit_round()
            self.counters.passes["audit"] += 1  # a round is one audit
        return SyncReport("audit")

    async def _repair_surroundings(self) -> AsyncIterator[None]:
        """The audit's last slices: the chains and sets that follow IPVS, a command a slice, the hairpin set
        compared with the applied state as it is then; the service sets last."""
        if self._nat is not None:
            async for _ in self._nat.repair_nat_steps(self.planner.applied_view):
                yield
            yield
        if self._sets is not None:
            await self._sets.resync_services(self._membership.entries())

    async def _repair_among(
        self, keys: Collection[VirtualServerKey], addresses: Collection[IPAddress]
    ) -> SyncReport:
        if not keys and not addresses:
            return SyncReport("audit")
        plan = self.planner.repair_among(await self._backend.read(keys, addresses), keys, addresses)
        self.counters.audit_repairs += len(plan)
        if len(plan):
            log.warning("audit found drift", extra={"repairs": len(plan)})
        return await self._execute("audit", plan, 0, count=False)

    async def drain(self) -> SyncReport:
        """A whole round of drain checks in one call (tests): every slice in a row."""
        return await _whole_round("drain", self.drain_slice, lambda: self.draining_round)

    async def drain_slice(self) -> SyncReport:
        """Delete drained TCP real servers with no connections left, or past their grace period.

        A round reads the connection counts of every virtual server that has draining real servers, one
        request each, ``DRAIN_SLICE`` virtual servers per slice (syncs may run between slices: at 100
        endpoint changes a second, 500 virtual servers drain at once).
        """
        planner = self.planner
        now = self._clock()
        by_virtual: dict[VirtualServerKey, list[RealServerKey]] = defaultdict(list)
        for virtual, real in planner.draining():
            by_virtual[virtual].append(real)
        # Every draining real server, each slice: the clock forgets the ones it is not shown.
        self._drain_clock.observe(((v, r) for v, reals in by_virtual.items() for r in reals), now)
        if self._drain_queue is None:
            self._drain_queue = sorted(by_virtual, key=VirtualServerKey.sort_key, reverse=True)
        chunk = [self._drain_queue.pop() for _ in range(min(DRAIN_SLICE, len(self._drain_queue)))]
        if not self._drain_queue:
            self._drain_queue = None
        operations: list[Operation] = []
        for virtual in chunk:
            reals = by_virtual.get(virtual)
            if not reals:
                continue  # no longer draining (restored, deleted) since the round began
            counts = await self._backend.connections(virtual)
            for real in reals:
                conns = counts.get(real)
                if conns is None or self._drain_clock.done(
                    (virtual, real), conns.active, conns.inactive, now
                ):
                    operations.extend(planner.finish_drain(virtual, real))
        results = await self._backend.apply(operations) if operations else []
        self._record(results)
        if self._drain_queue is None:
            self.counters.passes["drain"] += 1  # a round is one drain check
        return SyncReport("drain", tuple(results))

    # --- internals -----------------------------------------------------------------------------------------

    def _end_audit_round(self) -> None:
        """No audit round in progress: the next ``audit_slice`` begins one with the bound addresses."""
        self._audit_begun = False
        self._audit_queue = self._audit_tail = None

    def _around(self, key: ServiceKey) -> _Around:
        service, slices = self._tracker.inputs(key)
        health_port = health_check_port(service, slices, self._ctx.node_name)
        if service is None:  # deleted, or another proxy's: in no set
            return _Around(frozenset(), health_port, frozenset())
        return _Around(
            local_endpoint_addresses(slices, self._ctx.node_name), health_port, service_entries(service)
        )

    def _desired(self, key: ServiceKey) -> ServiceState | None:
        state, _skips_already_reported_at_intake = self._tracker.desired(key, self._ctx)
        if self._health is not None:
            return self._health.apply(key, self._tracker.service(key), state)
        return state

    async def _execute(self, kind: str, plan: Plan, services: int, *, count: bool = True) -> SyncReport:
        log_skips(self._tracker.new_skips())
        if self._health is not None:
            log_fail_open(self._health)
        self._log_conflicts(plan)
        results = await self._apply_with_unbinds_last(plan.operations)
        failures = [result for result in results if not result.ok]
        if any(result.state_mismatch for result in failures):
            await self._reconcile(failures)
        failed_services = frozenset(plan.services_of(result.operation for result in failures))
        self._retry |= failed_services
        for result in failures:
            log.error(
                "kernel refused operation",
                extra={**operation_to_dict(result.operation), "error": result.error},
            )
        if count:
            self.counters.passes[kind] += 1
        return SyncReport(kind, tuple(results), services, failed_services)

    async def _apply_with_unbinds_last(self, operations: Sequence[Operation]) -> list[OperationResult]:
        """Unbind an address only after every virtual server on it is really gone.

        Were an unbind to succeed after a failed delete of a virtual server on that address, the leftover
        virtual server would sit on an unbound address: after a restart it would look foreign and never be
        removed. Such an unbind is held (EBUSY) and its service retried.
        """
        unbinds = [op for op in operations if isinstance(op, UnbindAddress)]
        results = await self._backend.apply([op for op in operations if not isinstance(op, UnbindAddress)])
        self._record(results)
        if not unbinds:
            return results
        blocked = {
            result.operation.key.address
            for result in results
            if not result.ok and isinstance(result.operation, DeleteVirtualServer)
        }
        held = [
            OperationResult(op, "held: a virtual server on this address could not be deleted", EBUSY)
            for op in unbinds
            if op.address in blocked
        ]
        applied = await self._backend.apply([op for op in unbinds if op.address not in blocked])
        self._record(applied)
        return [*results, *applied, *held]

    def _record(self, results: Sequence[OperationResult]) -> None:
        planner = self.planner
        for result in results:
            self.counters.operations[(result.operation.name, "ok" if result.ok else "error")] += 1
            if result.ok:
                planner.record(result.operation)

    async def _reconcile(self, failures: Sequence[OperationResult]) -> None:
        keys: set[VirtualServerKey] = set()
        addresses: set[IPAddress] = set()
        for result in failures:
            if not result.state_mismatch:
                continue
            key = virtual_server_of(result.operation)
            if key is not None:
                keys.add(key)
            elif isinstance(result.operation, BindAddress | UnbindAddress):
                addresses.add(result.operation.address)
        self.planner.reconcile(await self._backend.read(keys, addresses), keys, addresses)

    def _log_conflicts(self, plan: Plan) -> None:
        for conflict in plan.conflicts:
            self.counters.conflicts += 1
            log.warning(
                "virtual server wanted by two services",
                extra={
                    "virtual_server": str(conflict.key),
                    "owner": str(conflict.owner),
                    "skipped": str(conflict.service),
                },
            )


async def _whole_round(
    kind: str, next_slice: Callable[[], Awaitable[SyncReport]], going_on: Callable[[], bool]
) -> SyncReport:
    """A round of slices run back to back: the first, then more while the round goes on."""
    results = list((await next_slice()).results)
    while going_on():
        results += (await next_slice()).results
    return SyncReport(kind, tuple(results))


def sorted_keys(keys: Iterable[ServiceKey]) -> list[ServiceKey]:
    # A deterministic order: which of two services claiming one key wins must not depend on set order.
    return sorted(keys, key=lambda key: (key.namespace, key.name))


def desired_all(
    tracker: ChangeTracker, ctx: TranslationContext, health: HealthView | None = None
) -> dict[ServiceKey, ServiceState]:
    """Every service's desired state, in a deterministic order; the skips are the tracker's to report.
    With ``health``, the verdicts' weights applied (and the view forgets the services that are gone)."""
    states = {}
    for key in sorted_keys(tracker.services()):
        state, _ = tracker.desired(key, ctx)
        if health is not None:
            state = health.apply(key, tracker.service(key), state)
        if state is not None:
            states[key] = state
    if health is not None:
        health.retain(states)
    return states


def log_fail_open(health: HealthView) -> None:
    """Each fail-open episode is logged when it begins and when it ends (once each)."""
    for change in health.take_fail_open_changes():
        fields = {
            "virtual_server": str(change.virtual),
            "service": str(change.service),
            "real_servers": change.real_servers,
        }
        if change.entered:
            log.warning("every real server unhealthy: failing open, weights kept", extra=fields)
        else:
            log.info("fail-open over: healthy real servers again", extra=fields)
