"""The memory backend: the kernel's rejections per operation, the rest still applied, counts, dump."""

from __future__ import annotations

import asyncio
from errno import EADDRNOTAVAIL, EEXIST, EIO, ENOENT, ESRCH
from ipaddress import ip_address

from aproxy.backends.base import Backend, OperationResult
from aproxy.backends.memory import MemoryBackend
from aproxy.core.model import (
    AddRealServer,
    AddVirtualServer,
    BindAddress,
    DeleteRealServer,
    L4Protocol,
    Operation,
    RealServer,
    UnbindAddress,
    UpdateRealServer,
    VirtualServerKey,
    VirtualServerSpec,
)
from aproxy.core.state import IPVSState

VIP = ip_address("10.96.0.10")
WEB = VirtualServerKey(L4Protocol.TCP, VIP, 80)
MISSING = VirtualServerKey(L4Protocol.TCP, VIP, 81)
POD = RealServer(ip_address("10.244.1.5"), 8080)
POD2 = RealServer(ip_address("10.244.1.6"), 8080)
RR = VirtualServerSpec()


def test_rejected_operations_get_their_error_and_later_ones_still_apply() -> None:
    backend = MemoryBackend()
    operations: list[Operation] = [
        BindAddress(VIP),
        AddVirtualServer(WEB, RR),
        AddRealServer(MISSING, POD),  # no such virtual server
        AddVirtualServer(WEB, RR),  # duplicate
        BindAddress(VIP),  # duplicate
        AddRealServer(WEB, POD),
        UpdateRealServer(WEB, POD2),  # no such real server
        UnbindAddress(ip_address("10.96.0.11")),  # not bound
        AddRealServer(WEB, POD2),
    ]
    results = backend.apply_sync(operations)
    assert [r.operation for r in results] == operations
    assert [r.errno for r in results] == [
        None,
        None,
        ESRCH,
        EEXIST,
        EEXIST,
        None,
        ENOENT,
        EADDRNOTAVAIL,
        None,
    ]
    assert [r.ok for r in results] == [r.errno is None for r in results]
    assert all(r.error for r in results if not r.ok)
    expected = IPVSState()
    for op in (
        BindAddress(VIP),
        AddVirtualServer(WEB, RR),
        AddRealServer(WEB, POD),
        AddRealServer(WEB, POD2),
    ):
        expected.apply(op)
    assert backend.dump_sync() == expected
    assert backend.applied == {"bind_address": 1, "add_virtual_server": 1, "add_real_server": 2}
    assert backend.rejected == {
        "add_real_server": 1,
        "add_virtual_server": 1,
        "bind_address": 1,
        "update_real_server": 1,
        "unbind_address": 1,
    }


def test_dump_is_a_copy() -> None:
    backend = MemoryBackend()
    backend.apply_sync([AddVirtualServer(WEB, RR)])
    dumped = backend.dump_sync()
    dumped.apply(AddRealServer(WEB, POD))
    assert backend.dump_sync().real_servers(WEB) == {}


def test_initial_state_is_copied() -> None:
    initial = IPVSState()
    backend = MemoryBackend(initial)
    backend.apply_sync([BindAddress(VIP)])
    assert initial == IPVSState()
    assert backend.dump_sync().is_bound(VIP)


def test_async_protocol_matches_sync_methods() -> None:
    backend: Backend = MemoryBackend()

    async def scenario() -> tuple[list[OperationResult], IPVSState]:
        results = await backend.apply(
            [AddVirtualServer(WEB, RR), AddRealServer(WEB, POD), DeleteRealServer(WEB, POD2.key)]
        )
        return results, await backend.dump()

    results, dumped = asyncio.run(scenario())
    assert [r.ok for r in results] == [True, True, False]
    assert results[2].errno == ENOENT and results[2].state_mismatch
    assert dumped.weight(WEB, POD.key) == 1


def test_injected_failure_hits_the_matching_operation_once_and_leaves_state_unchanged() -> None:
    backend = MemoryBackend()
    backend.inject_failure(lambda op: isinstance(op, AddRealServer), errno=EIO)
    results = backend.apply_sync(
        [
            AddVirtualServer(WEB, RR),
            AddRealServer(WEB, POD),
            AddRealServer(WEB, POD2),
            AddRealServer(WEB, POD),
        ]
    )
    assert [r.errno for r in results] == [None, EIO, None, None]
    assert not results[1].state_mismatch
    assert set(backend.dump_sync().real_servers(WEB)) == {POD.key, POD2.key}
    assert backend.rejected == {"add_real_server": 1}


def test_operation_result_ok() -> None:
    assert OperationResult(BindAddress(VIP)).ok
    failed = OperationResult(BindAddress(VIP), "exists", EEXIST)
    assert not failed.ok and failed.state_mismatch
