"""The incremental planner: which operations, in which order, for which change; and that they apply."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import ip_address

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from aproxy.backends.memory import MemoryBackend
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
    ServiceKey,
    ServiceState,
    UnbindAddress,
    UpdateRealServer,
    UpdateVirtualServer,
    VirtualServer,
    VirtualServerKey,
    VirtualServerSpec,
)
from aproxy.core.plan import Conflict, Plan, Planner
from aproxy.core.state import IPVSState

TCP, UDP, SCTP = L4Protocol.TCP, L4Protocol.UDP, L4Protocol.SCTP
A = ServiceKey("default", "a")
B = ServiceKey("default", "b")
VIP1 = ip_address("10.96.0.1")
VIP2 = ip_address("10.96.0.2")
VIP3 = ip_address("10.96.0.3")
VIP6 = ip_address("fd00::10")
EXT = ip_address("203.0.113.7")
ORPHAN = ip_address("10.96.0.99")
RR = VirtualServerSpec()
WRR = VirtualServerSpec(scheduler="wrr")
AFFINITY = VirtualServerSpec(persistence_timeout=10800)
SH_PORT = VirtualServerSpec(scheduler="sh", flags=frozenset({"sh-port"}))


def vkey(address: IPAddress, port: int, protocol: L4Protocol = TCP) -> VirtualServerKey:
    return VirtualServerKey(protocol, address, port)


def ep(n: int, port: int = 8080, weight: int = 1) -> RealServer:
    return RealServer(ip_address(f"10.244.0.{n}"), port, weight)


def vs(
    address: IPAddress,
    port: int,
    reals: Iterable[RealServer] = (),
    protocol: L4Protocol = TCP,
    spec: VirtualServerSpec = RR,
) -> VirtualServer:
    ordered = tuple(sorted(reals, key=lambda real: real.key.sort_key()))
    return VirtualServer(vkey(address, port, protocol), spec, "default/x", ordered)


def svc(key: ServiceKey, *virtuals: VirtualServer, bind: Iterable[IPAddress] = ()) -> ServiceState:
    ordered = tuple(sorted(virtuals, key=lambda virtual: virtual.key.sort_key()))
    return ServiceState(key, ordered, frozenset(bind))


def drained(key: VirtualServerKey, n: int) -> UpdateRealServer:
    return UpdateRealServer(key, ep(n, weight=0))


# --- a node: memory "kernel" plus the planner, driven the way the sync loop drives them ---------------------


@dataclass
class Node:
    backend: MemoryBackend = field(default_factory=MemoryBackend)
    planner: Planner = field(default_factory=Planner)
    last_plan: Plan = field(default_factory=Plan)
    # Services of operations that failed in the last sync.
    failed: set[ServiceKey] = field(default_factory=set)
    # Whether failures were injected (then rejections of dependent operations are expected).
    injected: bool = False


Step = Callable[[Node], list[Operation]]


def sync(*states: ServiceState, gone: Iterable[ServiceKey] = ()) -> Step:
    """Plan the changed services (states given, and ``gone`` ones), apply, record what succeeded."""

    def step(node: Node) -> list[Operation]:
        desired: dict[ServiceKey, ServiceState | None] = {state.service: state for state in states}
        desired.update(dict.fromkeys(gone))
        plan = node.planner.plan(desired)
        results = node.backend.apply_sync(plan.operations)
        for result in results:
            if result.ok:
                node.planner.record(result.operation)
        node.last_plan = plan
        node.failed = plan.services_of(r.operation for r in results if not r.ok)
        return list(plan.operations)

    return step


def replan_failed() -> Step:
    def step(node: Node) -> list[Operation]:
        plan = node.planner.replan(node.failed)
        results = node.backend.apply_sync(plan.operations)
        for result in results:
            if result.ok:
                node.planner.record(result.operation)
        node.failed = plan.services_of(r.operation for r in results if not r.ok)
        return list(plan.operations)

    return step


def fail_next(matches: Callable[[Operation], bool]) -> Step:
    def step(node: Node) -> list[Operation]:
        node.backend.inject_failure(matches)
        node.injected = True
        return []

    return step


def kernel(*operations: Operation) -> Step:
    """Change the kernel behind the planner's back (an interrupted drain, a leftover virtual server)."""

    def step(node: Node) -> list[Operation]:
        assert all(result.ok for result in node.backend.apply_sync(operations))
        return []

    return step


def restart(*states: ServiceState) -> Step:
    """A new process: a planner over the kernel's dump, then one full plan of the whole cluster."""

    def step(node: Node) -> list[Operation]:
        node.planner = Planner(applied=node.backend.dump_sync())
        return apply_plan(node, node.planner.plan_full({state.service: state for state in states}))

    return step


def audit(*states: ServiceState) -> Step:
    def step(node: Node) -> list[Operation]:
        return apply_plan(node, node.planner.plan_full({state.service: state for state in states}))

    return step


def repair() -> Step:
    """The periodic audit: the planner compares the kernel's dump with its applied state and repairs drift."""

    def step(node: Node) -> list[Operation]:
        return apply_plan(node, node.planner.repair(node.backend.dump_sync()))

    return step


def finish_drains() -> Step:
    def step(node: Node) -> list[Operation]:
        operations: list[Operation] = []
        for virtual, real_key in list(node.planner.draining()):
            operations += node.planner.finish_drain(virtual, real_key)
        results = node.backend.apply_sync(operations)
        for result in results:
            assert result.ok, result.error
            node.planner.record(result.operation)
        return operations

    return step


def apply_plan(node: Node, plan: Plan) -> list[Operation]:
    node.last_plan = plan
    for result in node.backend.apply_sync(plan.operations):
        assert result.ok, result.error
        node.planner.record(result.operation)
    return list(plan.operations)


def run_steps(steps: Sequence[Step]) -> tuple[Node, list[Operation]]:
    node = Node()
    emitted: list[Operation] = []
    for step in steps:
        emitted = step(node)
    return node, emitted


# --- the rules ---------------------------------------------------------------------------------------------

WEB = vkey(VIP1, 80)
DNS = vkey(VIP1, 53, UDP)
web_a = svc(A, vs(VIP1, 80, [ep(1), ep(2)]), bind=[VIP1])

RULES = [
    pytest.param(
        [sync(web_a)],
        [BindAddress(VIP1), AddVirtualServer(WEB, RR), AddRealServer(WEB, ep(1)), AddRealServer(WEB, ep(2))],
        id="add-service-binds-adds-virtual-then-reals",
    ),
    pytest.param(
        [sync(svc(A, vs(VIP1, 80), bind=[VIP1]))],
        [BindAddress(VIP1), AddVirtualServer(WEB, RR)],
        id="service-without-endpoints-still-gets-its-virtual-server",
    ),
    pytest.param(
        [sync(svc(A, vs(VIP1, 80, [ep(1)]), vs(VIP1, 53, [ep(1, 53)], UDP), bind=[VIP1])), sync(gone=[A])],
        [DeleteVirtualServer(WEB), DeleteVirtualServer(DNS), UnbindAddress(VIP1)],
        id="remove-service-deletes-virtuals-with-their-reals-then-unbinds",
    ),
    pytest.param(
        [sync(web_a), sync(svc(A, vs(VIP1, 80, [ep(1), ep(2), ep(3)]), bind=[VIP1]))],
        [AddRealServer(WEB, ep(3))],
        id="add-endpoint-adds-one-real-server",
    ),
    pytest.param(
        [sync(web_a), sync(svc(A, vs(VIP1, 80, [ep(1), ep(2, weight=5)]), bind=[VIP1]))],
        [UpdateRealServer(WEB, ep(2, weight=5))],
        id="weight-change-updates-real-server",
    ),
    pytest.param(
        [sync(web_a), sync(svc(A, vs(VIP1, 80, [ep(1)]), bind=[VIP1]))],
        [drained(WEB, 2)],
        id="remove-tcp-endpoint-drains-to-weight-0",
    ),
    pytest.param(
        [sync(web_a), sync(svc(A, vs(VIP1, 80, [ep(1)]), bind=[VIP1])), finish_drains()],
        [DeleteRealServer(WEB, ep(2).key)],
        id="finished-drain-deletes-real-server",
    ),
    pytest.param(
        [
            sync(web_a),
            sync(svc(A, vs(VIP1, 80, [ep(1)]), bind=[VIP1])),
            sync(svc(A, vs(VIP1, 80, [ep(1), ep(3)]), bind=[VIP1])),
        ],
        [AddRealServer(WEB, ep(3))],
        id="drained-real-server-at-weight-0-is-never-re-emitted",
    ),
    pytest.param(
        [sync(web_a), sync(svc(A, vs(VIP1, 80, [ep(1)]), bind=[VIP1])), sync(web_a)],
        [UpdateRealServer(WEB, ep(2))],
        id="drain-restored-when-endpoint-returns",
    ),
    pytest.param(
        [sync(web_a), sync(svc(A, vs(VIP1, 80, [ep(1)]), bind=[VIP1])), sync(web_a), finish_drains()],
        [],
        id="restored-real-server-is-not-deleted-by-finish-drain",
    ),
    pytest.param(
        [
            sync(svc(A, vs(VIP1, 53, [ep(1, 53), ep(2, 53)], UDP), bind=[VIP1])),
            sync(svc(A, vs(VIP1, 53, [ep(1, 53)], UDP), bind=[VIP1])),
        ],
        [DeleteRealServer(DNS, ep(2, 53).key)],
        id="remove-udp-endpoint-deletes-at-once",
    ),
    pytest.param(
        [
            sync(svc(A, vs(VIP1, 9, [ep(1, 9), ep(2, 9)], SCTP), bind=[VIP1])),
            sync(svc(A, vs(VIP1, 9, [ep(1, 9)], SCTP), bind=[VIP1])),
        ],
        [DeleteRealServer(vkey(VIP1, 9, SCTP), ep(2, 9).key)],
        id="remove-sctp-endpoint-deletes-at-once",
    ),
    pytest.param(
        [sync(web_a), sync(svc(A, vs(VIP1, 80, [ep(1), ep(2)], spec=AFFINITY), bind=[VIP1]))],
        [UpdateVirtualServer(WEB, AFFINITY)],
        id="persistence-change-updates-in-place",
    ),
    pytest.param(
        [sync(web_a), sync(svc(A, vs(VIP1, 80, [ep(1), ep(2)], spec=SH_PORT), bind=[VIP1]))],
        [UpdateVirtualServer(WEB, SH_PORT)],
        id="scheduler-and-flags-change-updates-in-place",
    ),
    pytest.param(
        [
            sync(svc(A, vs(VIP1, 80, [ep(1), ep(2)]), vs(VIP1, 53, [ep(1, 53)], UDP), bind=[VIP1])),
            sync(svc(A, vs(VIP1, 53, [ep(1, 53)], UDP), bind=[VIP1])),
        ],
        [DeleteVirtualServer(WEB)],
        id="port-removed-deletes-virtual-server-with-its-reals-no-drain",
    ),
    pytest.param(
        [
            sync(web_a),
            sync(svc(A, vs(VIP1, 80, [ep(1)]), bind=[VIP1])),
            sync(svc(A, vs(VIP1, 443, [ep(1)]), bind=[VIP1])),
            finish_drains(),
        ],
        [],
        id="draining-record-dropped-with-its-virtual-server",
    ),
    pytest.param(
        [sync(web_a), sync(web_a)],
        [],
        id="unchanged-service-emits-nothing",
    ),
    pytest.param(
        [sync(web_a), sync(svc(A, vs(VIP2, 80, [ep(1), ep(2)]), bind=[VIP2]))],
        [
            BindAddress(VIP2),
            AddVirtualServer(vkey(VIP2, 80), RR),
            AddRealServer(vkey(VIP2, 80), ep(1)),
            AddRealServer(vkey(VIP2, 80), ep(2)),
            DeleteVirtualServer(WEB),
            UnbindAddress(VIP1),
        ],
        id="cluster-ip-change-binds-before-adds-and-unbinds-after-deletes",
    ),
    pytest.param(
        [
            sync(
                svc(A, vs(VIP1, 80, [ep(1)]), vs(VIP1, 53, [ep(1, 53)], UDP), bind=[VIP1]),
                svc(B, vs(VIP3, 53, [ep(1, 53), ep(2, 53)], UDP), vs(VIP3, 80, [ep(4)]), bind=[VIP3]),
            ),
            sync(
                svc(A, vs(VIP2, 80, [ep(1)]), bind=[VIP2]),
                svc(
                    B, vs(VIP3, 53, [ep(1, 53), ep(3, 53)], UDP), vs(VIP3, 80, [ep(4)], spec=WRR), bind=[VIP3]
                ),
            ),
        ],
        [
            BindAddress(VIP2),
            AddVirtualServer(vkey(VIP2, 80), RR),
            UpdateVirtualServer(vkey(VIP3, 80), WRR),
            AddRealServer(vkey(VIP2, 80), ep(1)),
            AddRealServer(vkey(VIP3, 53, UDP), ep(3, 53)),
            DeleteRealServer(vkey(VIP3, 53, UDP), ep(2, 53).key),
            DeleteVirtualServer(WEB),
            DeleteVirtualServer(DNS),
            UnbindAddress(VIP1),
        ],
        id="order-binds-virtual-sets-real-sets-real-deletes-virtual-deletes-unbinds",
    ),
    pytest.param(
        [
            sync(svc(A, vs(EXT, 80, [ep(1)]), bind=[EXT])),
            sync(svc(B, vs(EXT, 443, [ep(2)]), bind=[EXT])),
        ],
        [AddVirtualServer(vkey(EXT, 443), RR), AddRealServer(vkey(EXT, 443), ep(2))],
        id="shared-address-already-bound-is-not-bound-again",
    ),
    pytest.param(
        [
            sync(svc(A, vs(EXT, 80, [ep(1)]), bind=[EXT]), svc(B, vs(EXT, 443, [ep(2)]), bind=[EXT])),
            sync(gone=[A]),
        ],
        [DeleteVirtualServer(vkey(EXT, 80))],
        id="shared-address-stays-bound-while-a-claimant-remains",
    ),
    pytest.param(
        [
            sync(svc(A, vs(EXT, 80, [ep(1)]), bind=[EXT]), svc(B, vs(EXT, 443, [ep(2)]), bind=[EXT])),
            sync(gone=[A]),
            sync(gone=[B]),
        ],
        [DeleteVirtualServer(vkey(EXT, 443)), UnbindAddress(EXT)],
        id="shared-address-unbound-when-last-claimant-leaves",
    ),
    pytest.param(
        [
            sync(
                svc(A, vs(VIP6, 80, [RealServer(ip_address("fd00::5"), 80)]), vs(VIP1, 80), bind=[VIP1, VIP6])
            )
        ],
        [
            BindAddress(VIP1),
            BindAddress(VIP6),
            AddVirtualServer(WEB, RR),
            AddVirtualServer(vkey(VIP6, 80), RR),
            AddRealServer(vkey(VIP6, 80), RealServer(ip_address("fd00::5"), 80)),
        ],
        id="dual-stack-ipv4-before-ipv6",
    ),
    pytest.param(
        [
            sync(web_a),
            sync(svc(B, vs(VIP1, 80, [ep(7)], spec=WRR), vs(VIP2, 80, [ep(8)]), bind=[VIP1, VIP2])),
        ],
        [BindAddress(VIP2), AddVirtualServer(vkey(VIP2, 80), RR), AddRealServer(vkey(VIP2, 80), ep(8))],
        id="conflict-current-owner-keeps-the-key-other-gets-no-ops-for-it",
    ),
    pytest.param(
        [
            sync(web_a),
            sync(svc(B, vs(VIP1, 80, [ep(2), ep(7)], spec=WRR), bind=[VIP1])),
            sync(gone=[A]),
        ],
        [
            UpdateVirtualServer(WEB, WRR),
            AddRealServer(WEB, ep(7)),
            drained(WEB, 1),
        ],
        id="conflict-waiting-service-inherits-key-in-place-when-owner-leaves",
    ),
    pytest.param(
        [
            fail_next(lambda op: op == AddRealServer(WEB, ep(2))),
            sync(svc(A, vs(VIP1, 80, [ep(1), ep(2), ep(3)]), bind=[VIP1])),
            replan_failed(),
        ],
        [AddRealServer(WEB, ep(2))],
        id="failed-op-not-recorded-replan-re-emits-only-it",
    ),
    pytest.param(
        [
            fail_next(lambda op: isinstance(op, AddVirtualServer)),
            sync(web_a),
            replan_failed(),
        ],
        [AddVirtualServer(WEB, RR), AddRealServer(WEB, ep(1)), AddRealServer(WEB, ep(2))],
        id="failed-virtual-add-replan-re-emits-it-and-its-rejected-reals",
    ),
    pytest.param(
        [
            sync(web_a),
            fail_next(lambda op: isinstance(op, DeleteVirtualServer)),
            sync(gone=[A]),
            replan_failed(),
        ],
        [DeleteVirtualServer(WEB)],
        id="failed-delete-of-gone-service-re-emitted-by-replan",
    ),
    pytest.param(
        [
            sync(web_a),
            fail_next(lambda op: isinstance(op, UpdateRealServer)),
            sync(svc(A, vs(VIP1, 80, [ep(1)]), bind=[VIP1])),
            replan_failed(),
        ],
        [drained(WEB, 2)],
        id="failed-drain-re-emitted-by-replan",
    ),
    pytest.param(
        [
            sync(web_a),
            fail_next(lambda op: isinstance(op, UnbindAddress)),
            sync(svc(A, vs(VIP2, 80, [ep(1), ep(2)]), bind=[VIP2])),
            replan_failed(),
        ],
        [UnbindAddress(VIP1)],
        id="failed-unbind-re-emitted-by-replan",
    ),
    pytest.param(
        [sync(web_a), restart(web_a)],
        [],
        id="plan-full-on-unchanged-cluster-is-zero-ops",
    ),
    pytest.param(
        [
            sync(web_a),
            kernel(
                BindAddress(ORPHAN),
                AddVirtualServer(vkey(ORPHAN, 80), RR),
                AddRealServer(vkey(ORPHAN, 80), ep(9)),
            ),
            restart(web_a),
        ],
        [DeleteVirtualServer(vkey(ORPHAN, 80)), UnbindAddress(ORPHAN)],
        id="plan-full-deletes-orphan-virtual-server-and-unbinds-its-address",
    ),
    pytest.param(
        [sync(web_a), kernel(drained(WEB, 2)), restart(web_a)],
        [UpdateRealServer(WEB, ep(2))],
        id="plan-full-restores-weight-left-at-0-by-interrupted-drain",
    ),
    pytest.param(
        [
            sync(web_a),
            kernel(drained(WEB, 2)),
            restart(svc(A, vs(VIP1, 80, [ep(1)]), bind=[VIP1])),
            finish_drains(),
        ],
        [DeleteRealServer(WEB, ep(2).key)],
        id="plan-full-adopts-undesired-weight-0-real-server-as-draining",
    ),
    pytest.param(
        [sync(web_a, svc(B, vs(VIP2, 80, [ep(3)]), bind=[VIP2])), audit(web_a)],
        [DeleteVirtualServer(vkey(VIP2, 80)), UnbindAddress(VIP2)],
        id="plan-full-removes-known-service-missing-from-the-cluster",
    ),
    pytest.param(
        [sync(web_a), kernel(DeleteVirtualServer(WEB)), restart(web_a)],
        [AddVirtualServer(WEB, RR), AddRealServer(WEB, ep(1)), AddRealServer(WEB, ep(2))],
        id="plan-full-repairs-drift",
    ),
    pytest.param(
        [sync(web_a), repair()],
        [],
        id="audit-without-drift-is-zero-ops",
    ),
    pytest.param(
        [sync(web_a), kernel(DeleteVirtualServer(WEB), UnbindAddress(VIP1)), repair()],
        [BindAddress(VIP1), AddVirtualServer(WEB, RR), AddRealServer(WEB, ep(1)), AddRealServer(WEB, ep(2))],
        id="audit-repairs-a-cleared-kernel",
    ),
    pytest.param(
        [
            sync(web_a),
            kernel(
                DeleteRealServer(WEB, ep(1).key),
                UpdateVirtualServer(WEB, WRR),
                AddVirtualServer(vkey(VIP1, 8080), RR),
            ),
            repair(),
        ],
        [UpdateVirtualServer(WEB, RR), AddRealServer(WEB, ep(1)), DeleteVirtualServer(vkey(VIP1, 8080))],
        id="audit-repairs-changed-virtual-missing-real-and-deletes-unowned-virtual",
    ),
]


@pytest.mark.parametrize(("steps", "expected"), RULES)
def test_plan_rule(steps: list[Step], expected: list[Operation]) -> None:
    node, emitted = run_steps(steps)
    assert emitted == expected
    # Whatever happened before, the applied state is what the kernel holds, and nothing is left to do.
    assert node.planner.applied_state() == node.backend.dump_sync()
    if not node.injected:
        assert node.backend.rejected.total() == 0
    assert list(node.planner.replan(node.planner.services()).operations) == []


# --- details the table does not show ---------------------------------------------------------------------


def test_plan_does_not_change_applied_state_record_does() -> None:
    planner = Planner()
    plan = planner.plan({A: web_a})
    assert planner.applied_state() == IPVSState()
    # Planned but not recorded: planning again emits the same operations.
    assert planner.replan([A]).operations == plan.operations
    for op in plan:
        planner.record(op)
    assert planner.applied_state() == IPVSState.from_services([web_a])
    assert planner.replan([A]).operations == ()


def test_conflict_reported_with_owner_and_cleared_when_inherited() -> None:
    node, _ = run_steps([sync(web_a), sync(svc(B, vs(VIP1, 80, [ep(7)]), bind=[VIP1]))])
    assert node.last_plan.conflicts == (Conflict(B, WEB, A),)
    assert node.planner.owner_of(WEB) == A
    sync(gone=[A])(node)
    assert not node.last_plan.conflicts
    assert node.planner.owner_of(WEB) == B
    assert node.last_plan.services_of(node.last_plan.operations) == {B}
    finish_drains()(node)
    assert node.backend.dump_sync() == IPVSState.from_services([svc(B, vs(VIP1, 80, [ep(7)]), bind=[VIP1])])


def test_conflict_between_two_new_services_first_in_the_mapping_wins() -> None:
    planner = Planner()
    plan = planner.plan({B: svc(B, vs(VIP1, 80, [ep(7)])), A: svc(A, vs(VIP1, 80, [ep(1)]))})
    assert planner.owner_of(WEB) == B
    assert plan.conflicts == (Conflict(A, WEB, B),)
    assert plan.operations == (AddVirtualServer(WEB, RR), AddRealServer(WEB, ep(7)))


def test_first_waiting_service_inherits_a_released_key() -> None:
    c = ServiceKey("default", "c")
    node, _ = run_steps(
        [
            sync(web_a),
            sync(svc(B, vs(VIP1, 80, [ep(7)]), bind=[VIP1])),
            sync(svc(c, vs(VIP1, 80, [ep(8)]), bind=[VIP1])),
            sync(gone=[A]),
        ]
    )
    assert node.planner.owner_of(WEB) == B
    sync(gone=[B])(node)
    assert node.planner.owner_of(WEB) == c
    finish_drains()(node)
    assert node.backend.dump_sync() == IPVSState.from_services([svc(c, vs(VIP1, 80, [ep(8)]), bind=[VIP1])])


def test_restored_real_server_is_no_longer_draining() -> None:
    node, _ = run_steps([sync(web_a), sync(svc(A, vs(VIP1, 80, [ep(1)]), bind=[VIP1]))])
    assert node.planner.is_draining(WEB, ep(2).key)
    sync(web_a)(node)
    assert not node.planner.is_draining(WEB, ep(2).key)
    assert list(node.planner.draining()) == []


def test_drain_lifecycle_is_reported_by_draining() -> None:
    node, _ = run_steps([sync(web_a), sync(svc(A, vs(VIP1, 80, [ep(1)]), bind=[VIP1]))])
    assert list(node.planner.draining()) == [(WEB, ep(2).key)]
    assert node.planner.finish_drain(WEB, ep(2).key) == [DeleteRealServer(WEB, ep(2).key)]
    apply_all(node, node.planner.finish_drain(WEB, ep(2).key))
    assert list(node.planner.draining()) == []
    assert node.planner.finish_drain(WEB, ep(2).key) == []


def test_finish_drain_waits_until_weight_0_is_applied() -> None:
    node, _ = run_steps(
        [
            sync(web_a),
            fail_next(lambda op: isinstance(op, UpdateRealServer)),
            sync(svc(A, vs(VIP1, 80, [ep(1)]))),
        ]
    )
    assert list(node.planner.draining()) == []
    assert node.planner.finish_drain(WEB, ep(2).key) == []
    assert node.planner.is_draining(WEB, ep(2).key)


def test_origins_name_the_service_of_each_operation() -> None:
    planner = Planner()
    plan = planner.plan({A: web_a, B: svc(B, vs(VIP2, 80, [ep(3)]), bind=[VIP2])})
    assert {op: plan.origins[op] for op in plan} == {
        BindAddress(VIP1): A,
        BindAddress(VIP2): B,
        AddVirtualServer(WEB, RR): A,
        AddVirtualServer(vkey(VIP2, 80), RR): B,
        AddRealServer(WEB, ep(1)): A,
        AddRealServer(WEB, ep(2)): A,
        AddRealServer(vkey(VIP2, 80), ep(3)): B,
    }


def test_planner_copies_the_dump_it_is_given() -> None:
    dump = IPVSState.from_services([web_a])
    planner = Planner(applied=dump)
    planner.record(DeleteVirtualServer(WEB))
    assert dump == IPVSState.from_services([web_a])


def test_reconcile_takes_the_kernel_view_of_a_mismatched_virtual_server() -> None:
    node, _ = run_steps([sync(web_a)])
    # Someone deleted the virtual server: the planner believes it exists and plans nothing for a replan.
    kernel(DeleteVirtualServer(WEB))(node)
    assert node.planner.replan([A]).operations == ()
    node.planner.reconcile(node.backend.dump_sync(), virtual_keys=[WEB], addresses=[VIP1])
    assert node.planner.replan([A]).operations == (
        AddVirtualServer(WEB, RR),
        AddRealServer(WEB, ep(1)),
        AddRealServer(WEB, ep(2)),
    )


# --- operation count: one endpoint change costs the same in a small and a huge cluster ----------------------


def synthetic_service(i: int, endpoints: int = 10) -> ServiceState:
    key = ServiceKey("bench", f"svc-{i}")
    cluster_ip = ip_address(f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}")
    reals = [RealServer(ip_address(f"10.244.{i // 256 % 256}.{j}"), 8080) for j in range(endpoints)]
    virtuals = (vs(cluster_ip, 80, reals), vs(cluster_ip, 53, reals, UDP))
    return svc(key, *virtuals, bind=[cluster_ip])


def planner_for(states: Sequence[ServiceState]) -> Planner:
    planner = Planner(applied=IPVSState.from_services(states))
    assert planner.plan_full({state.service: state for state in states}).operations == ()
    return planner


def one_endpoint_change(state: ServiceState) -> ServiceState:
    """Endpoint 0 goes, a new endpoint arrives, in every virtual server of the service."""
    fresh = RealServer(ip_address("10.250.0.1"), 8080)
    virtuals = tuple(
        replace(v, real_servers=tuple(sorted((*v.real_servers[1:], fresh), key=lambda r: r.key.sort_key())))
        for v in state.virtual_servers
    )
    return replace(state, virtual_servers=virtuals)


def test_one_endpoint_change_emits_the_same_operations_at_10_and_10000_services() -> None:
    changed = one_endpoint_change(synthetic_service(5))
    plans = []
    for size in (10, 10_000):
        planner = planner_for([synthetic_service(i) for i in range(size)])
        plans.append(planner.plan({changed.service: changed}))
    small, large = plans
    assert list(small.operations) == list(large.operations)
    assert set(large.origins.values()) == {changed.service}
    tcp, udp = (v.key for v in sorted(changed.virtual_servers, key=lambda v: v.key.sort_key()))
    gone = synthetic_service(5).virtual_servers[0].real_servers[0]
    assert len(large.operations) == 4
    assert set(large.operations) == {
        AddRealServer(tcp, RealServer(ip_address("10.250.0.1"), 8080)),
        AddRealServer(udp, RealServer(ip_address("10.250.0.1"), 8080)),
        UpdateRealServer(tcp, replace(gone, weight=0)),
        DeleteRealServer(udp, gone.key),
    }


# --- properties -------------------------------------------------------------------------------------------

SERVICES = [ServiceKey("prop", f"s{i}") for i in range(4)]
SHARED_EXTERNAL = ip_address("203.0.113.1")
PODS = [ip_address(f"10.244.1.{n}") for n in range(1, 5)]
SPECS = [RR, WRR, AFFINITY, SH_PORT]


@st.composite
def real_servers(draw: st.DrawFn) -> tuple[RealServer, ...]:
    chosen = draw(st.sets(st.tuples(st.sampled_from(PODS), st.sampled_from([8080, 8443])), max_size=4))
    weights = draw(st.lists(st.sampled_from([0, 1, 1, 2]), min_size=len(chosen), max_size=len(chosen)))
    reals = [
        RealServer(address, port, weight) for (address, port), weight in zip(chosen, weights, strict=True)
    ]
    return tuple(sorted(reals, key=lambda real: real.key.sort_key()))


@st.composite
def virtual_server(draw: st.DrawFn, addresses: Sequence[IPAddress], ports: Sequence[int]) -> VirtualServer:
    key = VirtualServerKey(
        draw(st.sampled_from(list(L4Protocol))),
        draw(st.sampled_from(addresses)),
        draw(st.sampled_from(ports)),
    )
    return VirtualServer(key, draw(st.sampled_from(SPECS)), "prop/x", draw(real_servers()))


@st.composite
def disjoint_state(draw: st.DrawFn, index: int) -> ServiceState | None:
    """A service whose virtual server keys no other service has (own cluster IP, own external ports)."""
    if draw(st.integers(0, 5)) == 0:
        return None
    cluster_ip = ip_address(f"10.96.0.{index + 1}")
    own = draw(st.lists(virtual_server([cluster_ip], [53, 80, 443]), max_size=3))
    external = draw(
        st.lists(virtual_server([SHARED_EXTERNAL], [1000 * (index + 1) + p for p in (80, 443)]), max_size=2)
    )
    virtuals = {v.key: v for v in (*own, *external)}
    bind = {cluster_ip} | ({SHARED_EXTERNAL} if external else set())
    ordered = tuple(sorted(virtuals.values(), key=lambda v: v.key.sort_key()))
    return ServiceState(SERVICES[index], ordered, frozenset(bind))


@st.composite
def contested_state(draw: st.DrawFn, index: int) -> ServiceState | None:
    """A service over a tiny shared key space: services fight over the same virtual servers."""
    if draw(st.integers(0, 4)) == 0:
        return None
    shared = [VIP1, VIP2]
    virtuals = {v.key: v for v in draw(st.lists(virtual_server(shared, [53, 80]), max_size=3))}
    ordered = tuple(sorted(virtuals.values(), key=lambda v: v.key.sort_key()))
    bind = draw(st.sets(st.sampled_from(shared)))
    return ServiceState(SERVICES[index], ordered, frozenset(bind))


Batch = tuple[list[tuple[int, ServiceState | None]], bool]


def batches(state: Callable[[int], st.SearchStrategy[ServiceState | None]]) -> st.SearchStrategy[list[Batch]]:
    change = st.integers(0, len(SERVICES) - 1).flatmap(lambda i: st.tuples(st.just(i), state(i)))
    batch = st.tuples(st.lists(change, min_size=1, max_size=3), st.booleans())
    return st.lists(batch, min_size=1, max_size=12)


def apply_all(node: Node, operations: Sequence[Operation]) -> None:
    for result in node.backend.apply_sync(operations):
        assert result.ok, result.error
        node.planner.record(result.operation)


def finish_every_drain(node: Node) -> None:
    operations = [op for v, r in list(node.planner.draining()) for op in node.planner.finish_drain(v, r)]
    apply_all(node, operations)


def drive(node: Node, history: list[Batch]) -> dict[ServiceKey, ServiceState]:
    final: dict[ServiceKey, ServiceState] = {}
    for changes, finish in history:
        desired = {SERVICES[i]: state for i, state in changes}
        apply_all(node, node.planner.plan(desired).operations)
        for key, state in desired.items():
            if state is None:
                final.pop(key, None)
            else:
                final[key] = state
        if finish:
            finish_every_drain(node)
        assert node.backend.dump_sync() == node.planner.applied_state()
    finish_every_drain(node)
    return final


def assert_settled(node: Node, final: Mapping[ServiceKey, ServiceState], contested: bool = False) -> None:
    assert node.backend.dump_sync() == node.planner.applied_state()
    assert node.backend.rejected.total() == 0
    assert node.planner.replan(SERVICES).operations == ()
    assert node.planner.plan_full(final).operations == ()
    if not contested:
        # A restart (fresh planner over the dump) changes nothing. With contested keys it may not: a fresh
        # planner gives a key to the first claimant in the mapping, not to whoever held it before.
        assert Planner(applied=node.backend.dump_sync()).plan_full(final).operations == ()


PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(batches(disjoint_state))
def test_incremental_plans_reach_the_from_scratch_state(history: list[Batch]) -> None:
    node = Node()
    final = drive(node, history)
    assert node.backend.dump_sync() == IPVSState.from_services(final.values())
    assert_settled(node, final)


@PROPERTY_SETTINGS
@given(batches(contested_state))
def test_contested_keys_each_programmed_as_their_owner_wants(history: list[Batch]) -> None:
    node = Node()
    final = drive(node, history)
    owners = {
        key: node.planner.owner_of(key)
        for state in final.values()
        for key in (v.key for v in state.virtual_servers)
    }
    expected = [
        ServiceState(owner, tuple(v for v in final[owner].virtual_servers if v.key == key))
        for key, owner in owners.items()
        if owner is not None
    ]
    bound = frozenset(a for state in final.values() for a in state.bind_addresses)
    want = IPVSState.from_services([*expected, ServiceState(ServiceKey("x", "y"), (), bound)])
    assert node.backend.dump_sync() == want
    # Every wanted key has an owner that wants it; a service that does not own a key it wants is in conflict.
    for key, owner in owners.items():
        assert owner is not None
        assert any(v.key == key for v in final[owner].virtual_servers)
    assert_settled(node, final, contested=True)


@PROPERTY_SETTINGS
@given(batches(disjoint_state), st.lists(st.integers(0, 40), max_size=8))
def test_failed_operations_are_re_emitted_until_the_kernel_matches(
    history: list[Batch], failures: list[int]
) -> None:
    node = Node()
    final: dict[ServiceKey, ServiceState] = {}
    counter = iter(range(10**6))
    doomed = set(failures)
    active = [True]
    node.backend.inject_failure(lambda _op: active[0] and next(counter) in doomed, times=max(len(doomed), 1))
    pending: set[ServiceKey] = set()
    for changes, _finish in history:
        desired = {SERVICES[i]: state for i, state in changes}
        final.update({k: s for k, s in desired.items() if s is not None})
        for key in [k for k, s in desired.items() if s is None]:
            final.pop(key, None)
        plan = node.planner.plan(desired)
        results = node.backend.apply_sync(plan.operations)
        for result in results:
            if result.ok:
                node.planner.record(result.operation)
        pending |= plan.services_of(r.operation for r in results if not r.ok)
        assert node.backend.dump_sync() == node.planner.applied_state()
    event("some operations failed" if pending else "no operation failed")
    # Retry only the services that failed: with no more injected failures one round must be enough (the
    # second checks that it was).
    active[0] = False
    for _ in range(2):
        plan = node.planner.replan(pending)
        results = node.backend.apply_sync(plan.operations)
        for result in results:
            if result.ok:
                node.planner.record(result.operation)
        pending = plan.services_of(r.operation for r in results if not r.ok)
    assert pending == set()
    finish_every_drain(node)
    assert node.backend.dump_sync() == IPVSState.from_services(final.values())
    assert node.backend.dump_sync() == node.planner.applied_state()
    assert node.planner.replan(SERVICES).operations == ()


def test_a_planner_copies_the_state_it_is_given_unless_it_adopts_it() -> None:
    dump = IPVSState()
    dump.apply(BindAddress(ip_address("10.96.0.1")))

    copied, adopted = Planner(applied=dump), Planner(applied=dump, adopt=True)

    assert copied.applied_view() is not dump and copied.applied_view() == dump
    assert adopted.applied_view() is dump  # the start-up's dump, handed over: no second copy at the peak
