"""Health verdicts in the desired state: unhealthy backends at weight 0, fail open per virtual server.

The health checks (aproxy/health/) judge *check targets*: a backend's address and the TCP port checked (the
real server's own port, or the service's ``aproxy.io/health-check-port``). ``HealthView`` is the seam between
their verdicts and the ordinary sync path:

- ``apply(key, service, state)``: the syncer passes every translated service through it. The view indexes
  which check targets the service's real servers have (target -> services, so that one verdict change marks
  exactly the services that use that backend dirty), and returns the state with every real server whose target
  is unhealthy at weight 0 (no new connections; established ones go on).
- ``set_unhealthy(target, flag)``: a verdict changed; returns the services to mark dirty. The planner then
  emits one ``UpdateRealServer`` per virtual server of those services: an ordinary incremental change.
- Fail open: when every real server of a virtual server is unhealthy, they all keep their weight (a possibly
  broken backend beats a certain refusal), unless ``fail_closed``. Entering and leaving that state are events
  (``take_fail_open_changes``), logged once per episode by the syncer.

Which real servers are checked: TCP ones; UDP and SCTP ones only when their service names a check port; none
of a service annotated ``aproxy.io/health-check: "false"`` (its weights are never changed, even when another
service's checks find the same backend unhealthy). A target that no service uses any more is forgotten: the
same address coming back later starts unknown, like any new endpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aproxy.core.model import (
    L4Protocol,
    RealServer,
    RealServerKey,
    ServiceKey,
    ServiceState,
    VirtualServer,
    VirtualServerKey,
)
from aproxy.core.objects import HealthOverride, ServiceInfo

# What a health check connects to: a backend address and the TCP port checked.
CheckTarget = RealServerKey

_NO_TARGETS: frozenset[CheckTarget] = frozenset()
_NO_KEYS: frozenset[VirtualServerKey] = frozenset()


@dataclass(frozen=True, slots=True)
class FailOpenChange:
    """A virtual server entered (``entered``) or left fail-open: every one of its real servers unhealthy."""

    virtual: VirtualServerKey
    service: ServiceKey
    entered: bool
    real_servers: int


@dataclass(frozen=True, slots=True)
class _ServiceChecks:
    targets: frozenset[CheckTarget]
    interval: float | None  # the service's aproxy.io/health-check-interval; None: the node's


class HealthView:
    """The check targets of the translated services, their verdicts, and the weights they imply."""

    def __init__(self, *, fail_closed: bool = False) -> None:
        self.fail_closed = fail_closed
        self._checks: dict[ServiceKey, _ServiceChecks] = {}
        self._services_of: dict[CheckTarget, set[ServiceKey]] = {}
        self._unhealthy: set[CheckTarget] = set()
        self._failing_open: dict[ServiceKey, frozenset[VirtualServerKey]] = {}
        self._changes: list[FailOpenChange] = []
        # Bumped when the set of targets or an interval changes: the prober re-reads ``targets()`` then.
        self.generation = 0

    # --- the sync side -------------------------------------------------------------------------------------

    def apply(
        self, key: ServiceKey, service: ServiceInfo | None, state: ServiceState | None
    ) -> ServiceState | None:
        """Index the service's check targets and return ``state`` with the verdicts' weights applied."""
        override = service.health if service is not None else None
        self._index(key, state, override)
        if state is None:
            self._set_failing_open(key, {}, ())
            return None
        if not self._unhealthy or (override is not None and not override.enabled):
            self._set_failing_open(key, {}, state.virtual_servers)
            return state
        port = override.port if override is not None else None
        virtuals: list[VirtualServer] = []
        failing_open: dict[VirtualServerKey, int] = {}
        changed = False
        for virtual in state.virtual_servers:
            weighed = self._weigh(virtual, port)
            if weighed is None:
                failing_open[virtual.key] = len(virtual.real_servers)
                weighed = virtual
            changed = changed or weighed is not virtual
            virtuals.append(weighed)
        self._set_failing_open(key, failing_open, state.virtual_servers)
        if not changed:
            return state
        return ServiceState(state.service, tuple(virtuals), state.bind_addresses)

    def retain(self, keys: Iterable[ServiceKey]) -> None:
        """Forget every service but these (a full sync: the others are gone)."""
        keep = set(keys)
        for key in [key for key in self._checks if key not in keep]:
            self.apply(key, None, None)
        for key in [key for key in self._failing_open if key not in keep]:
            self._set_failing_open(key, {}, ())

    def take_fail_open_changes(self) -> list[FailOpenChange]:
        """Fail-open episodes that began or ended since the last call (log each once)."""
        changes, self._changes = self._changes, []
        return changes

    # --- the checker side ----------------------------------------------------------------------------------

    def set_unhealthy(self, target: CheckTarget, unhealthy: bool) -> frozenset[ServiceKey]:
        """Record a verdict; the services whose weights it changes (to mark dirty). A target no service
        uses is ignored (its endpoint went away while it was being checked)."""
        services = self._services_of.get(target)
        if services is None or (target in self._unhealthy) == unhealthy:
            return frozenset()
        if unhealthy:
            self._unhealthy.add(target)
        else:
            self._unhealthy.discard(target)
        return frozenset(services)

    def targets(self, default_interval: float) -> dict[CheckTarget, float]:
        """Every target to check, with its interval: the shortest any of its services asks for."""
        intervals: dict[CheckTarget, float] = {}
        for checks in self._checks.values():
            interval = checks.interval if checks.interval is not None else default_interval
            for target in checks.targets:
                known = intervals.get(target)
                if known is None or interval < known:
                    intervals[target] = interval
        return intervals

    def services_of(self, target: CheckTarget) -> frozenset[ServiceKey]:
        return frozenset(self._services_of.get(target, ()))

    def is_unhealthy(self, target: CheckTarget) -> bool:
        return target in self._unhealthy

    @property
    def unhealthy_count(self) -> int:
        return len(self._unhealthy)

    @property
    def failing_open_count(self) -> int:
        return sum(len(keys) for keys in self._failing_open.values())

    @property
    def unhealthy(self) -> frozenset[CheckTarget]:
        return frozenset(self._unhealthy)

    # --- internals -----------------------------------------------------------------------------------------

    def _weigh(self, virtual: VirtualServer, port: int | None) -> VirtualServer | None:
        """``virtual`` with its unhealthy real servers at weight 0 (itself when none is); None when all are
        and the view fails open."""
        if port is None and virtual.key.protocol is not L4Protocol.TCP:
            return virtual
        unhealthy = self._unhealthy
        reals = virtual.real_servers
        flags = [RealServerKey(r.address, port if port is not None else r.port) in unhealthy for r in reals]
        if not any(flags):
            return virtual
        if all(flags) and not self.fail_closed:
            return None
        weighed = tuple(
            RealServer(real.address, real.port, 0) if sick and real.weight else real
            for real, sick in zip(reals, flags, strict=True)
        )
        return VirtualServer(virtual.key, virtual.spec, virtual.port_name, weighed)

    def _index(self, key: ServiceKey, state: ServiceState | None, override: HealthOverride | None) -> None:
        new = _service_checks(state, override)
        old = self._checks.pop(key, None)
        if new is not None:
            self._checks[key] = new
        old_targets = old.targets if old is not None else _NO_TARGETS
        new_targets = new.targets if new is not None else _NO_TARGETS
        if old_targets == new_targets:
            if (old.interval if old else None) != (new.interval if new else None):
                self.generation += 1
            return
        self.generation += 1
        for target in old_targets - new_targets:
            services = self._services_of[target]
            services.discard(key)
            if not services:
                del self._services_of[target]
                self._unhealthy.discard(target)
        for target in new_targets - old_targets:
            self._services_of.setdefault(target, set()).add(key)

    def _set_failing_open(
        self, key: ServiceKey, now: Mapping[VirtualServerKey, int], virtuals: Iterable[VirtualServer]
    ) -> None:
        before = self._failing_open.get(key, _NO_KEYS)
        if not now and not before:
            return
        sizes = {virtual.key: len(virtual.real_servers) for virtual in virtuals}
        for virtual_key in sorted(before - now.keys(), key=VirtualServerKey.sort_key):
            self._changes.append(FailOpenChange(virtual_key, key, False, sizes.get(virtual_key, 0)))
        for virtual_key in sorted(now.keys() - before, key=VirtualServerKey.sort_key):
            self._changes.append(FailOpenChange(virtual_key, key, True, now[virtual_key]))
        if now:
            self._failing_open[key] = frozenset(now)
        else:
            self._failing_open.pop(key, None)


def _service_checks(state: ServiceState | None, override: HealthOverride | None) -> _ServiceChecks | None:
    if state is None or (override is not None and not override.enabled):
        return None
    port = override.port if override is not None else None
    targets = frozenset(
        RealServerKey(real.address, port if port is not None else real.port)
        for virtual in state.virtual_servers
        if port is not None or virtual.key.protocol is L4Protocol.TCP
        for real in virtual.real_servers
    )
    if not targets:
        return None
    return _ServiceChecks(targets, override.interval if override is not None else None)
