"""The incremental planner: desired state of the changed services -> the kernel operations they need.

The planner keeps two things apart:

- the *desired* side, per service: the last ``ServiceState`` given to ``plan()``, which virtual server keys it
  owns (or waits for, when another service owns them) and which addresses it claims. ``plan()`` updates it.
- the *applied* side: an ``IPVSState`` of what the kernel holds. Only ``record()`` changes it, once the
  backend says an operation succeeded.

A plan is the difference between the two, computed only for what the changed services touch: the virtual
server keys they wanted before or want now, and their addresses. So one endpoint change costs the size of its
service, whatever the size of the cluster, and an operation that failed is simply still a difference: a
``replan()`` of its service emits it again, and nothing else.

Ownership of a virtual server key is exclusive: the first service to claim it owns it; a second claimant waits
(reported in ``Plan.conflicts``, no operations) and inherits the key, inline in the same plan, when the owner
lets go. The heir's virtual server is then diffed against what the kernel holds, so a handover is an in-place
update, never a delete followed by an add. Addresses are shared: bound while any service claims one.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from aproxy.core.model import (
    AddRealServer,
    AddVirtualServer,
    BindAddress,
    DeleteRealServer,
    DeleteVirtualServer,
    IPAddress,
    L4Protocol,
    Operation,
    RealServer,
    RealServerKey,
    ServiceKey,
    ServiceState,
    UnbindAddress,
    UpdateRealServer,
    UpdateVirtualServer,
    VirtualServer,
    VirtualServerKey,
    address_sort_key,
)
from aproxy.core.state import IPVSState


@dataclass(frozen=True, slots=True)
class Conflict:
    """``service`` wants virtual server ``key``, ``owner`` has it: ``service`` gets no operations for it."""

    service: ServiceKey
    key: VirtualServerKey
    owner: ServiceKey


@dataclass(frozen=True, slots=True)
class Plan:
    """Operations in a safe order, the conflicts found, and which service each operation is for.

    ``origins`` maps an operation to the service it is for (its virtual server's owner, the service that
    released it, or the service whose claim bound or unbound an address); orphans that only ``plan_full``
    removes have none. A sync loop uses it to re-mark the services of failed operations dirty.
    """

    operations: tuple[Operation, ...] = ()
    conflicts: tuple[Conflict, ...] = ()
    origins: Mapping[Operation, ServiceKey] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.operations)

    def __iter__(self) -> Iterator[Operation]:
        return iter(self.operations)

    def services_of(self, operations: Iterable[Operation]) -> set[ServiceKey]:
        """The services the given operations (typically the failed ones) belong to."""
        return {self.origins[op] for op in operations if op in self.origins}


# Phases of a plan, in the order they are emitted: binds before the virtual servers on the address are added,
# a virtual server before its real servers, real servers deleted before their virtual server, and an address
# unbound only after the virtual servers on it are gone.
_BIND, _VIRTUAL_SET, _REAL_SET, _REAL_DELETE, _VIRTUAL_DELETE, _UNBIND = range(6)


class _PlanBuilder:
    __slots__ = ("_origins", "_phases")

    def __init__(self) -> None:
        self._phases: tuple[list[Operation], ...] = tuple([] for _ in range(6))
        self._origins: dict[Operation, ServiceKey] = {}

    def emit(self, phase: int, op: Operation, origin: ServiceKey | None) -> None:
        self._phases[phase].append(op)
        if origin is not None:
            self._origins[op] = origin

    def build(self, conflicts: list[Conflict]) -> Plan:
        operations = tuple(op for phase in self._phases for op in phase)
        return Plan(operations, tuple(conflicts), self._origins)


_T = TypeVar("_T", bound=Hashable)


class _Releases(Generic[_T]):
    """Items (virtual server keys, addresses) a service let go of while the kernel still had them.

    The service stays responsible for their removal until it is recorded, so that ``replan()`` of that
    service re-emits a failed delete or unbind even though the service no longer mentions the item.
    """

    __slots__ = ("_by_item", "_by_service")

    def __init__(self) -> None:
        self._by_item: dict[_T, ServiceKey] = {}
        self._by_service: dict[ServiceKey, set[_T]] = {}

    def add(self, service: ServiceKey, item: _T) -> None:
        self.drop(item)
        self._by_item[item] = service
        self._by_service.setdefault(service, set()).add(item)

    def drop(self, item: _T) -> None:
        service = self._by_item.pop(item, None)
        if service is not None:
            items = self._by_service[service]
            items.discard(item)
            if not items:
                del self._by_service[service]

    def of(self, service: ServiceKey) -> frozenset[_T]:
        return frozenset(self._by_service.get(service, ()))

    def service(self, item: _T) -> ServiceKey | None:
        return self._by_item.get(item)


class Planner:
    """Incremental planner over the applied state of this node (see the module docstring).

    Driving it from a sync loop::

        plan = planner.plan({key: translate(key) for key in dirty})   # None for a deleted service
        results = await backend.apply(plan.operations)
        for result in results:
            if result.ok:
                planner.record(result.operation)
        failed = plan.services_of(r.operation for r in results if not r.ok)
        # later (after a backoff): planner.replan(failed) emits exactly what is still missing.
        # An EEXIST/ENOENT/ESRCH answer means the applied state was wrong about that object: read the kernel
        # and planner.reconcile(kernel, keys, addresses) before the replan, or it fails the same way again.

    Start-up: ``Planner(applied=await backend.dump()).plan_full(all_services)``. Audit:
    ``planner.repair(await backend.dump())``. Drains: for each of ``draining()`` whose connections are gone
    (or whose grace period is over), apply ``finish_drain(...)`` and ``record()`` the results.
    """

    __slots__ = (
        "_address_releases",
        "_applied",
        "_claimants",
        "_desired",
        "_draining",
        "_key_releases",
        "_owner",
        "_waiting",
        "_wanted",
    )

    def __init__(self, applied: IPVSState | None = None, *, adopt: bool = False) -> None:
        # A copy: the caller's dump must not change under the planner, nor the planner's under the caller;
        # unless the caller hands the dump over (``adopt``): at 10,000 virtual servers a copy is 110,000
        # entries more at the peak of the start-up (bench/e2e.py's peak RSS).
        if applied is None:
            applied = IPVSState()
        self._applied = applied if adopt else applied.copy()
        self._desired: dict[ServiceKey, ServiceState] = {}
        self._wanted: dict[ServiceKey, dict[VirtualServerKey, VirtualServer]] = {}
        self._owner: dict[VirtualServerKey, ServiceKey] = {}
        # Services waiting for a key another service owns, in arrival order (the first one inherits it).
        self._waiting: dict[VirtualServerKey, dict[ServiceKey, None]] = {}
        # Claimants per address, insertion-ordered for a deterministic attribution.
        self._claimants: dict[IPAddress, dict[ServiceKey, None]] = {}
        self._key_releases: _Releases[VirtualServerKey] = _Releases()
        self._address_releases: _Releases[IPAddress] = _Releases()
        # TCP real servers on their way out: weight 0 (or about to be), deleted by finish_drain().
        self._draining: dict[VirtualServerKey, dict[RealServerKey, None]] = {}

    # --- planning ------------------------------------------------------------------------------------------

    def plan(self, desired: Mapping[ServiceKey, ServiceState | None]) -> Plan:
        """Operations for the changed services only (``None``: the service is gone).

        Does not change the applied state: ``record()`` does. Two services in one call that both claim a free
        key: the first in ``desired``'s order gets it.
        """
        return self._plan(desired, full=False)

    def replan(self, services: Iterable[ServiceKey]) -> Plan:
        """Plan these services again with their last desired state: what failed before is emitted again."""
        return self._plan({service: self._desired.get(service) for service in services}, full=False)

    def plan_full(self, desired_all: Mapping[ServiceKey, ServiceState]) -> Plan:
        """Every service (start-up after a kernel dump, the audit), plus removal of all that no one claims.

        Services known from earlier plans but absent from ``desired_all`` are gone. Every applied virtual
        server that no service owns is deleted and every bound address that no service claims is unbound:
        give the planner only state aproxy owns (the backend's dump filters foreign virtual servers).
        """
        gone = sorted(self._desired.keys() - desired_all.keys(), key=lambda s: (s.namespace, s.name))
        desired: dict[ServiceKey, ServiceState | None] = dict.fromkeys(gone)
        desired.update(desired_all)
        return self._plan(desired, full=True)

    def repair(self, kernel: IPVSState) -> Plan:
        """The audit: take the kernel's word where it differs from the applied state, and plan the repairs.

        Cheaper than ``plan_full`` (a comparison, then a diff of only the differing virtual servers and
        addresses): a virtual server someone deleted is added back, a real server someone removed is re-added,
        one nobody owns is deleted, an address someone unbound is bound again. ``kernel`` must hold only what
        aproxy owns, like the dump given to ``Planner(applied=...)``.
        """
        keys, addresses = self._applied.differences(kernel)
        return self._repair(kernel, keys, addresses)

    def outline_differences(self, outline: IPVSState) -> set[VirtualServerKey]:
        """The keys where the kernel's outline (``Backend.outline``) disagrees with the applied state: the
        audit's outline slice reads and repairs them."""
        return self._applied.outline_differences(outline)

    def address_differences(self, bound: AbstractSet[IPAddress]) -> set[IPAddress]:
        """The addresses bound in the kernel (``bound``) or in the applied state only: the audit's first
        slice reads and repairs them."""
        return self._applied.address_differences(bound)

    def repair_among(
        self, kernel: IPVSState, keys: Collection[VirtualServerKey], addresses: Collection[IPAddress]
    ) -> Plan:
        """``repair`` for a slice of the audit: ``kernel`` was read for just these keys and addresses
        (``Backend.read``), and only they are compared and repaired."""
        differing, unbound = self._applied.differences_among(kernel, keys, addresses)
        return self._repair(kernel, differing, unbound)

    def _repair(self, kernel: IPVSState, keys: set[VirtualServerKey], addresses: set[IPAddress]) -> Plan:
        self.reconcile(kernel, keys, addresses)
        builder = _PlanBuilder()
        for key in sorted(keys, key=VirtualServerKey.sort_key):
            self._diff_virtual(key, None, builder)
        for address in sorted(addresses, key=address_sort_key):
            self._diff_address(address, None, builder)
        return builder.build([])

    def _plan(self, desired: Mapping[ServiceKey, ServiceState | None], full: bool) -> Plan:
        # Each touched key or address remembers the first service whose change touched it (attribution).
        keys: dict[VirtualServerKey, ServiceKey | None] = {}
        addresses: dict[IPAddress, ServiceKey | None] = {}
        for service, state in desired.items():
            self._update_service(service, state, keys, addresses)
        if full:
            for key in self._applied.virtual_keys():
                keys.setdefault(key, None)
            for address in self._applied.addresses():
                addresses.setdefault(address, None)
        builder = _PlanBuilder()
        for key in sorted(keys, key=VirtualServerKey.sort_key):
            self._diff_virtual(key, keys[key], builder)
        for address in sorted(addresses, key=address_sort_key):
            self._diff_address(address, addresses[address], builder)
        return builder.build(self._conflicts(desired))

    def _conflicts(self, desired: Iterable[ServiceKey]) -> list[Conflict]:
        conflicts = []
        for service in desired:
            for key in self._wanted.get(service, ()):
                owner = self._owner[key]
                if owner != service:
                    conflicts.append(Conflict(service, key, owner))
        return conflicts

    # --- desired side --------------------------------------------------------------------------------------

    def _update_service(
        self,
        service: ServiceKey,
        state: ServiceState | None,
        keys: dict[VirtualServerKey, ServiceKey | None],
        addresses: dict[IPAddress, ServiceKey | None],
    ) -> None:
        old_wanted = self._wanted.pop(service, {})
        old_state = self._desired.pop(service, None)
        new_wanted: dict[VirtualServerKey, VirtualServer] = {}
        if state is not None:
            new_wanted = {virtual.key: virtual for virtual in state.virtual_servers}
            self._desired[service] = state
            self._wanted[service] = new_wanted
        for key in old_wanted.keys() - new_wanted.keys():
            self._release_key(service, key)
        for key in new_wanted:
            self._claim_key(service, key)
        for key in (*old_wanted, *new_wanted, *self._key_releases.of(service)):
            keys.setdefault(key, service)

        old_addresses = old_state.bind_addresses if old_state is not None else frozenset()
        new_addresses = state.bind_addresses if state is not None else frozenset()
        for address in old_addresses - new_addresses:
            self._unclaim_address(service, address)
        for address in new_addresses - old_addresses:
            self._claimants.setdefault(address, {})[service] = None
            self._address_releases.drop(address)
        for address in (*old_addresses, *new_addresses, *self._address_releases.of(service)):
            addresses.setdefault(address, service)

    def _claim_key(self, service: ServiceKey, key: VirtualServerKey) -> None:
        owner = self._owner.get(key)
        if owner is None:
            self._owner[key] = service
            # Whoever released it need not delete it any more: the new owner reshapes it in place.
            self._key_releases.drop(key)
        elif owner != service:
            self._waiting.setdefault(key, {})[service] = None

    def _release_key(self, service: ServiceKey, key: VirtualServerKey) -> None:
        if self._owner.get(key) != service:
            self._stop_waiting(service, key)
            return
        del self._owner[key]
        waiters = self._waiting.get(key)
        if waiters:
            heir = next(iter(waiters))
            self._stop_waiting(heir, key)
            self._owner[key] = heir
        elif self._applied.has_virtual(key):
            self._key_releases.add(service, key)

    def _stop_waiting(self, service: ServiceKey, key: VirtualServerKey) -> None:
        waiters = self._waiting.get(key)
        if waiters is not None:
            waiters.pop(service, None)
            if not waiters:
                del self._waiting[key]

    def _unclaim_address(self, service: ServiceKey, address: IPAddress) -> None:
        claimants = self._claimants.get(address)
        if claimants is None:
            return
        claimants.pop(service, None)
        if not claimants:
            del self._claimants[address]
            if self._applied.is_bound(address):
                self._address_releases.add(service, address)

    # --- diffing desired against applied -------------------------------------------------------------------

    def _diff_virtual(self, key: VirtualServerKey, toucher: ServiceKey | None, builder: _PlanBuilder) -> None:
        owner = self._owner.get(key)
        applied_spec = self._applied.spec(key)
        if owner is None:
            if applied_spec is None:
                self._key_releases.drop(key)
            else:
                # No drain: the kernel drops the virtual server with its real servers.
                self._draining.pop(key, None)
                origin = self._key_releases.service(key) or toucher
                builder.emit(_VIRTUAL_DELETE, DeleteVirtualServer(key), origin)
            return
        target = self._wanted[owner][key]
        if applied_spec is None:
            self._draining.pop(key, None)
            builder.emit(_VIRTUAL_SET, AddVirtualServer(key, target.spec), owner)
            for real in _unique(target.real_servers):
                builder.emit(_REAL_SET, AddRealServer(key, real), owner)
            return
        if applied_spec != target.spec:
            builder.emit(_VIRTUAL_SET, UpdateVirtualServer(key, target.spec), owner)
        self._diff_reals(key, target, owner, builder)

    def _diff_reals(
        self, key: VirtualServerKey, target: VirtualServer, owner: ServiceKey, builder: _PlanBuilder
    ) -> None:
        # Hot path of an endpoint change: hashing an address is the main cost, so each wanted key is hashed
        # twice (set, applied lookup) and the applied side is scanned only when it holds unwanted keys.
        applied = self._applied.real_servers(key)
        draining = self._draining.get(key)
        wanted: set[RealServerKey] = set()
        present = 0
        for real in target.real_servers:
            real_key = real.key
            size = len(wanted)
            wanted.add(real_key)
            if len(wanted) == size:
                continue  # a repeated key (the model forbids it): the first one counts, as in from_services
            if draining:
                # A returning endpoint stops draining and gets its weight back.
                draining.pop(real_key, None)
            weight = applied.get(real_key)
            if weight is None:
                builder.emit(_REAL_SET, AddRealServer(key, real), owner)
                continue
            present += 1
            if weight != real.weight:
                builder.emit(_REAL_SET, UpdateRealServer(key, real), owner)
        if len(applied) > present:
            self._remove_unwanted(key, applied, wanted, owner, builder)
        draining = self._draining.get(key)
        if draining is not None:
            for real_key in [k for k in draining if k not in applied]:
                del draining[real_key]
            if not draining:
                del self._draining[key]

    def _remove_unwanted(
        self,
        key: VirtualServerKey,
        applied: Mapping[RealServerKey, int],
        wanted: set[RealServerKey],
        owner: ServiceKey,
        builder: _PlanBuilder,
    ) -> None:
        unwanted = sorted((k for k in applied if k not in wanted), key=RealServerKey.sort_key)
        if key.protocol is not L4Protocol.TCP:
            for real_key in unwanted:
                builder.emit(_REAL_DELETE, DeleteRealServer(key, real_key), owner)
            return
        draining = self._draining.setdefault(key, {})
        for real_key in unwanted:
            if applied[real_key] != 0:
                drain = RealServer(real_key.address, real_key.port, 0)
                builder.emit(_REAL_SET, UpdateRealServer(key, drain), owner)
            # Already at 0 (drained before, or left so by an interrupted drain): just wait for finish_drain.
            draining[real_key] = None

    def _diff_address(self, address: IPAddress, toucher: ServiceKey | None, builder: _PlanBuilder) -> None:
        claimants = self._claimants.get(address)
        bound = self._applied.is_bound(address)
        if claimants:
            if not bound:
                claimant = toucher if toucher in claimants else next(iter(claimants))
                builder.emit(_BIND, BindAddress(address), claimant)
        elif bound:
            releaser = self._address_releases.service(address) or toucher
            builder.emit(_UNBIND, UnbindAddress(address), releaser)
        else:
            self._address_releases.drop(address)

    # --- applied side --------------------------------------------------------------------------------------

    def record(self, op: Operation) -> None:
        """The backend applied ``op``: the applied state now reflects it.

        Lenient by design: the kernel said yes, so the applied state takes the operation's result even if it
        disagreed before (it then was wrong), rather than raising in the sync loop.
        """
        self._applied.assume(op)
        match op:
            case DeleteVirtualServer(key=key):
                self._draining.pop(key, None)
                self._key_releases.drop(key)
            case DeleteRealServer(virtual=key, real=real_key):
                self._forget_drain(key, real_key)
            case UnbindAddress(address=address):
                self._address_releases.drop(address)
            case _:
                pass

    def reconcile(
        self,
        kernel: IPVSState,
        virtual_keys: Iterable[VirtualServerKey] = (),
        addresses: Iterable[IPAddress] = (),
    ) -> None:
        """Overwrite the applied state of these keys and addresses with what the kernel was read to hold.

        For an EEXIST / ENOENT / ESRCH answer: the applied state was wrong about these; after reconciling, a
        ``replan()`` of their services emits what the kernel really lacks.
        """
        for key in virtual_keys:
            self._applied.replace_virtual(key, kernel.spec(key), kernel.real_servers(key))
        for address in addresses:
            self._applied.set_bound(address, kernel.is_bound(address))

    # --- graceful termination ------------------------------------------------------------------------------

    def draining(self) -> Iterator[tuple[VirtualServerKey, RealServerKey]]:
        """The TCP real servers drained to weight 0 (applied) that wait for ``finish_drain``."""
        for key, reals in self._draining.items():
            for real_key in reals:
                if self._applied.weight(key, real_key) == 0:
                    yield key, real_key

    def finish_drain(self, virtual: VirtualServerKey, real_key: RealServerKey) -> list[Operation]:
        """The delete that ends a drain; empty if the real server no longer drains (restored, or VS gone).

        The caller decides when (no connections left, or the grace period is over), applies the operation
        and ``record()``s it like any other.
        """
        reals = self._draining.get(virtual)
        if reals is None or real_key not in reals:
            return []
        weight = self._applied.weight(virtual, real_key)
        if weight is None:
            self._forget_drain(virtual, real_key)
            return []
        if weight != 0:
            # The weight-0 update has not been applied yet: never delete a server still taking connections.
            return []
        return [DeleteRealServer(virtual, real_key)]

    def _forget_drain(self, virtual: VirtualServerKey, real_key: RealServerKey) -> None:
        reals = self._draining.get(virtual)
        if reals is not None:
            reals.pop(real_key, None)
            if not reals:
                del self._draining[virtual]

    # --- reading -------------------------------------------------------------------------------------------

    def applied_state(self) -> IPVSState:
        """A copy of the applied state (O(size of the state))."""
        return self._applied.copy()

    def applied_view(self) -> IPVSState:
        """The applied state itself, to read at once and not keep (no copy: at 10,000 virtual servers a copy
        is 110,000 entries, tens of MB for a moment)."""
        return self._applied

    def owner_of(self, key: VirtualServerKey) -> ServiceKey | None:
        return self._owner.get(key)

    def is_draining(self, virtual: VirtualServerKey, real_key: RealServerKey) -> bool:
        return real_key in self._draining.get(virtual, {})

    def services(self) -> Iterator[ServiceKey]:
        return iter(self._desired)


def _unique(reals: Iterable[RealServer]) -> Iterator[RealServer]:
    """Each real server key once (the first), so a malformed desired state never yields a rejected add."""
    seen: set[RealServerKey] = set()
    for real in reals:
        if real.key not in seen:
            seen.add(real.key)
            yield real
