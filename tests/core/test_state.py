"""IPVSState: the kernel's rules for each operation, from_services, equality and differences."""

from __future__ import annotations

from collections.abc import Callable
from errno import EADDRNOTAVAIL, EEXIST, ENOENT, ESRCH
from ipaddress import ip_address

import pytest

from aproxy.core.model import (
    AddRealServer,
    AddVirtualServer,
    BindAddress,
    DeleteRealServer,
    DeleteVirtualServer,
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
    VirtualServerSpec,
)
from aproxy.core.state import AlreadyExists, IPVSState, NotFound, StateError

VIP = ip_address("10.96.0.10")
WEB = VirtualServerKey(L4Protocol.TCP, VIP, 80)
OTHER = VirtualServerKey(L4Protocol.UDP, VIP, 53)
POD = RealServer(ip_address("10.244.1.5"), 8080)
RR = VirtualServerSpec()
WRR = VirtualServerSpec(scheduler="wrr", persistence_timeout=60)


def state_with(*operations: Operation) -> IPVSState:
    state = IPVSState()
    for op in operations:
        state.apply(op)
    return state


BASE = (BindAddress(VIP), AddVirtualServer(WEB, RR), AddRealServer(WEB, POD))

REJECTED = [
    pytest.param(AddVirtualServer(WEB, RR), AlreadyExists, EEXIST, id="add-existing-virtual-server"),
    pytest.param(UpdateVirtualServer(OTHER, RR), NotFound, ESRCH, id="update-missing-virtual-server"),
    pytest.param(DeleteVirtualServer(OTHER), NotFound, ESRCH, id="delete-missing-virtual-server"),
    pytest.param(AddRealServer(OTHER, POD), NotFound, ESRCH, id="add-real-server-to-missing-virtual-server"),
    pytest.param(AddRealServer(WEB, POD), AlreadyExists, EEXIST, id="add-existing-real-server"),
    pytest.param(
        UpdateRealServer(WEB, RealServer(POD.address, 9999)),
        NotFound,
        ENOENT,
        id="update-missing-real-server",
    ),
    pytest.param(UpdateRealServer(OTHER, POD), NotFound, ESRCH, id="update-real-server-of-missing-virtual"),
    pytest.param(
        DeleteRealServer(WEB, RealServerKey(POD.address, 9999)),
        NotFound,
        ENOENT,
        id="delete-missing-real-server",
    ),
    pytest.param(
        DeleteRealServer(OTHER, POD.key), NotFound, ESRCH, id="delete-real-server-of-missing-virtual"
    ),
    pytest.param(BindAddress(VIP), AlreadyExists, EEXIST, id="bind-bound-address"),
    pytest.param(
        UnbindAddress(ip_address("10.96.0.11")), NotFound, EADDRNOTAVAIL, id="unbind-unbound-address"
    ),
]


@pytest.mark.parametrize(("op", "error", "errno"), REJECTED)
def test_apply_rejects_what_the_kernel_rejects(op: Operation, error: type[StateError], errno: int) -> None:
    state = state_with(*BASE)
    with pytest.raises(error) as caught:
        state.apply(op)
    assert caught.value.errno == errno
    assert state == state_with(*BASE), "a rejected operation changes nothing"


ACCEPTED = [
    pytest.param(UpdateVirtualServer(WEB, WRR), lambda s: s.spec(WEB) == WRR, id="update-spec-in-place"),
    pytest.param(
        UpdateRealServer(WEB, RealServer(POD.address, POD.port, 0)),
        lambda s: s.weight(WEB, POD.key) == 0,
        id="update-weight",
    ),
    pytest.param(
        DeleteRealServer(WEB, POD.key), lambda s: s.real_servers(WEB) == {}, id="delete-real-server"
    ),
    pytest.param(
        DeleteVirtualServer(WEB),
        lambda s: not s.has_virtual(WEB) and s.weight(WEB, POD.key) is None,
        id="delete-virtual-server-takes-its-real-servers",
    ),
    pytest.param(UnbindAddress(VIP), lambda s: not s.is_bound(VIP), id="unbind"),
]


@pytest.mark.parametrize(("op", "check"), ACCEPTED)
def test_apply_changes_state_like_the_kernel(op: Operation, check: Callable[[IPVSState], bool]) -> None:
    state = state_with(*BASE)
    state.apply(op)
    assert check(state)


def test_readers() -> None:
    state = state_with(*BASE)
    assert state.has_virtual(WEB) and not state.has_virtual(OTHER)
    assert state.spec(WEB) == RR and state.spec(OTHER) is None
    assert dict(state.real_servers(WEB)) == {POD.key: 1}
    assert state.real_servers(OTHER) == {}
    assert state.weight(WEB, POD.key) == 1
    assert state.is_bound(VIP)
    assert list(state.virtual_keys()) == [WEB]
    assert state.addresses() == frozenset({VIP})
    assert len(state) == 1 and state.real_server_count() == 1


def test_from_services_equals_programming_them_operation_by_operation() -> None:
    web = VirtualServer(WEB, WRR, "default/web:http", (POD,))
    dns = VirtualServer(OTHER, RR, "kube-system/dns:dns")
    states = [
        ServiceState(ServiceKey("default", "web"), (web,), frozenset({VIP})),
        ServiceState(ServiceKey("kube-system", "dns"), (dns,), frozenset({VIP})),
    ]
    expected = state_with(
        BindAddress(VIP), AddVirtualServer(WEB, WRR), AddRealServer(WEB, POD), AddVirtualServer(OTHER, RR)
    )
    assert IPVSState.from_services(states) == expected


def test_from_services_first_claimant_keeps_a_contested_key() -> None:
    first = VirtualServer(WEB, RR, "a/first", (POD,))
    second = VirtualServer(WEB, WRR, "b/second")
    state = IPVSState.from_services(
        [ServiceState(ServiceKey("a", "first"), (first,)), ServiceState(ServiceKey("b", "second"), (second,))]
    )
    assert state.spec(WEB) == RR
    assert dict(state.real_servers(WEB)) == {POD.key: 1}


def test_equality_compares_kernel_content_not_labels_or_order() -> None:
    labelled = IPVSState.from_services(
        [ServiceState(ServiceKey("a", "b"), (VirtualServer(WEB, RR, "a/b", (POD,)),), frozenset({VIP}))]
    )
    assert labelled == state_with(*BASE)
    two_reals = (AddRealServer(WEB, POD), AddRealServer(WEB, RealServer(POD.address, 9000)))
    forward = state_with(AddVirtualServer(WEB, RR), *two_reals)
    backward = state_with(AddVirtualServer(WEB, RR), *reversed(two_reals))
    assert forward == backward
    assert state_with(*BASE) != state_with(*BASE, UpdateRealServer(WEB, RealServer(POD.address, POD.port, 2)))
    assert state_with(*BASE) != state_with(*BASE, UnbindAddress(VIP))
    assert state_with(*BASE) != state_with(*BASE, UpdateVirtualServer(WEB, WRR))


def test_copy_is_independent() -> None:
    original = state_with(*BASE)
    clone = original.copy()
    clone.apply(AddRealServer(WEB, RealServer(POD.address, 9000)))
    clone.apply(UnbindAddress(VIP))
    assert original == state_with(*BASE)
    assert clone != original


def test_assume_makes_the_post_state_true_whatever_the_pre_state() -> None:
    state = IPVSState()
    state.assume(AddRealServer(WEB, POD))
    state.assume(AddVirtualServer(WEB, WRR))
    state.assume(BindAddress(VIP))
    state.assume(BindAddress(VIP))
    state.assume(DeleteVirtualServer(OTHER))
    assert state == state_with(BindAddress(VIP), AddVirtualServer(WEB, WRR), AddRealServer(WEB, POD))
    state.assume(DeleteRealServer(WEB, POD.key))
    state.assume(UnbindAddress(VIP))
    assert state == state_with(AddVirtualServer(WEB, WRR))


def test_replace_virtual_and_set_bound_overwrite() -> None:
    state = state_with(*BASE)
    state.replace_virtual(WEB, WRR, {POD.key: 3})
    state.replace_virtual(OTHER, None)
    state.set_bound(VIP, False)
    assert state == state_with(
        AddVirtualServer(WEB, WRR), AddRealServer(WEB, RealServer(POD.address, POD.port, 3))
    )


def test_differences_names_the_disagreeing_virtual_servers_and_addresses() -> None:
    ours = state_with(*BASE, AddVirtualServer(OTHER, RR))
    theirs = state_with(
        BindAddress(ip_address("10.96.0.11")),
        AddVirtualServer(WEB, RR),
        AddRealServer(WEB, RealServer(POD.address, POD.port, 0)),
        AddVirtualServer(VirtualServerKey(L4Protocol.SCTP, VIP, 9), RR),
    )
    keys, addresses = ours.differences(theirs)
    assert keys == {WEB, OTHER, VirtualServerKey(L4Protocol.SCTP, VIP, 9)}
    assert addresses == {VIP, ip_address("10.96.0.11")}
    assert ours.differences(ours.copy()) == (set(), set())
