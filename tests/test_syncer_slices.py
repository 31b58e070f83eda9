"""The audit and the drain checks in slices: what each slice reads, what it repairs, and that syncs between
slices are neither undone nor held for a whole round (the kernel loop runs one slice per pass)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from ipaddress import ip_address
from typing import Any

import pytest

from aproxy import syncer as syncer_module
from aproxy.app import Daemon
from aproxy.backends.base import RealServerConnections
from aproxy.backends.memory import MemoryBackend
from aproxy.core.model import (
    AddRealServer,
    BindAddress,
    DeleteRealServer,
    DeleteVirtualServer,
    IPAddress,
    L4Protocol,
    RealServerKey,
    UnbindAddress,
    VirtualServerKey,
)
from aproxy.core.state import IPVSState
from aproxy.kernel_loop import AUDIT_SHARE
from aproxy.syncer import Syncer
from tests.core.k8s import endpoint, endpoint_slice, port, service, slice_port
from tests.test_app import ScriptedSource, running, settings, synced, until
from tests.test_syncer import CTX, listed_tracker

SERVICES = 8
SLICE = 3


def name(index: int) -> str:
    return f"svc-{index}"


def virtual(index: int) -> VirtualServerKey:
    return VirtualServerKey(L4Protocol.TCP, ip_address(f"10.96.0.{index + 1}"), 80)


def pod(index: int, which: int) -> str:
    return f"10.244.{index}.{which}"


def objects(index: int, *pods: int, rv: str = "1") -> list[dict[str, Any]]:
    return [
        service(name(index), cluster_ips=f"10.96.0.{index + 1}", ports=[port("http", 80)]),
        endpoint_slice(
            name(index),
            endpoints=[endpoint(pod(index, which)) for which in pods],
            ports=[slice_port("http", 8080)],
            resource_version=rv,
        ),
    ]


class Recording(MemoryBackend):
    """The memory kernel, recording which kernel reads each call makes."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, int]] = []

    async def bound_addresses(self) -> frozenset[IPAddress]:
        self.log.append(("addresses", 0))
        return await super().bound_addresses()

    async def outline(self) -> IPVSState:
        self.log.append(("outline", 0))
        return await super().outline()

    async def read(self, keys: Collection[VirtualServerKey], addresses: Collection[IPAddress]) -> IPVSState:
        self.log.append(("read", len(keys)))
        return await super().read(keys, addresses)

    async def connections(self, key: VirtualServerKey) -> Mapping[RealServerKey, RealServerConnections]:
        self.log.append(("connections", 1))
        return await super().connections(key)


@pytest.fixture(autouse=True)
def small_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(syncer_module, "AUDIT_SLICE", SLICE)
    monkeypatch.setattr(syncer_module, "DRAIN_SLICE", SLICE)


async def cluster() -> tuple[Any, Recording, Syncer]:
    tracker = listed_tracker(*(obj for index in range(SERVICES) for obj in objects(index, 1, 2)))
    backend = Recording()
    syncer = Syncer(tracker, CTX, backend)
    await syncer.start()
    backend.log.clear()
    return tracker, backend, syncer


def test_an_audit_reads_addresses_an_outline_then_real_servers_a_slice_at_a_time_and_repairs_each() -> None:
    async def scenario() -> None:
        _, backend, syncer = await cluster()
        expected = backend.dump_sync()
        dumps = backend.dumps
        backend.apply_sync([DeleteVirtualServer(virtual(0))])  # caught by the outline
        backend.apply_sync([DeleteRealServer(virtual(7), RealServerKey(ip_address(pod(7, 2)), 8080))])

        assert not (await syncer.audit_slice()).results  # the bound addresses: none differ
        first = await syncer.audit_slice()
        assert backend.log == [("addresses", 0), ("outline", 0), ("read", 1)]  # just the differing one
        assert [r.operation.name for r in first.results] == ["add_virtual_server", *["add_real_server"] * 2]
        assert syncer.auditing

        repaired = []
        while syncer.auditing:
            repaired += [r.operation.name for r in (await syncer.audit_slice()).results]

        reads = [count for call, count in backend.log[3:]]
        assert reads == [SLICE, SLICE, SERVICES - 1 - 2 * SLICE]  # the 7 others, 3 at a time
        assert repaired == ["add_real_server"]  # virtual(7)'s, in the last slice
        assert backend.dump_sync() == expected
        assert backend.dumps == dumps  # no whole dump
        assert syncer.counters.passes["audit"] == 1  # a round is one audit
        assert syncer.counters.audit_repairs == 4

    asyncio.run(scenario())


def test_an_address_unbound_behind_aproxys_back_is_found_and_bound_by_the_rounds_first_slice() -> None:
    async def scenario() -> None:
        _, backend, syncer = await cluster()
        backend.apply_sync([UnbindAddress(virtual(4).address)])

        first = await syncer.audit_slice()

        assert backend.log == [("addresses", 0), ("read", 0)]  # that address alone, no virtual server
        assert [r.operation for r in first.results] == [BindAddress(virtual(4).address)]
        assert syncer.audit_step == "outline"

    asyncio.run(scenario())


def test_a_sync_between_two_slices_is_not_undone_by_the_audit() -> None:
    async def scenario() -> None:
        tracker, backend, syncer = await cluster()
        await syncer.audit_slice()  # the bound addresses
        await syncer.audit_slice()  # the outline: every key queued

        # Between two slices a sync deletes svc-7 and adds an endpoint to svc-6 (not read yet).
        tracker.delete_service("default", name(7))
        tracker.upsert_slice(objects(6, 1, 2, 3, rv="2")[1])
        await syncer.sync()
        wanted = backend.dump_sync()

        await syncer.audit()  # the rest of the round

        assert backend.dump_sync() == wanted
        assert syncer.counters.audit_repairs == 0
        assert wanted.real_servers(virtual(6)).keys() == {
            RealServerKey(ip_address(pod(6, which)), 8080) for which in (1, 2, 3)
        }
        assert not wanted.has_virtual(virtual(7))

    asyncio.run(scenario())


def test_a_round_of_drain_checks_reads_a_slice_of_virtual_servers_at_a_time() -> None:
    async def scenario() -> None:
        tracker, backend, syncer = await cluster()
        for index in range(SERVICES):  # every service loses pod 2: it drains (TCP, weight 0)
            tracker.upsert_slice(objects(index, 1, rv="2")[1])
        await syncer.sync()
        assert sum(1 for _ in syncer.planner.draining()) == SERVICES
        # svc-0 keeps a connection; the others have none.
        backend.connection_counts[(virtual(0), RealServerKey(ip_address(pod(0, 2)), 8080))] = (
            RealServerConnections(active=1, inactive=0)
        )
        backend.log.clear()

        first = await syncer.drain_slice()
        assert backend.log == [("connections", 1)] * SLICE
        assert syncer.draining_round
        # Before the next slice, svc-5's pod comes back: no longer draining, so not read.
        tracker.upsert_slice(objects(5, 1, 2, rv="3")[1])
        await syncer.sync()
        deleted = [r.operation for r in first.results]
        while syncer.draining_round:
            deleted += [r.operation for r in (await syncer.drain_slice()).results]

        assert len(backend.log) == SERVICES - 1
        assert {op.virtual for op in deleted if isinstance(op, DeleteRealServer)} == {
            virtual(index) for index in range(1, SERVICES) if index != 5
        }
        assert [key for key, _ in syncer.planner.draining()] == [virtual(0)]  # its connection is open
        assert syncer.counters.passes["drain"] == 1

    asyncio.run(scenario())


class FeedingDuringAudit(Recording):
    """Records ``apply`` too; at the audit's first real-server slice, hands the source a change."""

    def __init__(self, change: Any) -> None:
        super().__init__()
        self.change = change

    async def apply(self, operations: Any) -> Any:
        self.log.append(("apply", len(operations)))
        return await super().apply(operations)

    async def read(self, keys: Collection[VirtualServerKey], addresses: Collection[IPAddress]) -> IPVSState:
        if ("outline", 0) in self.log and self.change is not None:
            change, self.change = self.change, None
            change()
        return await super().read(keys, addresses)


def one_audit_round(source: ScriptedSource, backend: MemoryBackend) -> None:
    """The daemon on ``backend``, the cluster listed, until its first audit round has ended."""
    daemon = Daemon(settings(audit_period=0.05, min_sync_period=0), source=source, backend=backend)

    async def scenario() -> None:
        async with running(daemon):
            syncer = await synced(daemon, source, *(obj for i in range(SERVICES) for obj in objects(i, 1, 2)))
            await until(daemon, lambda: syncer.counters.passes["audit"] >= 1)

    asyncio.run(scenario())


def test_the_kernel_loop_syncs_a_change_between_two_audit_slices() -> None:
    source = ScriptedSource()
    backend = FeedingDuringAudit(lambda: source.feed(objects(3, 1, 2, 3, rv="2")[1]))
    one_audit_round(source, backend)
    round_ = backend.log[backend.log.index(("outline", 0)) :]
    reads = [index for index, (call, _) in enumerate(round_) if call == "read"]
    synced_at = round_.index(("apply", 1))  # the change: one real server added
    # The change came during the first real-server slice; the sync ran right after it, before the round's
    # next slice: not after the whole round.
    assert reads[0] < synced_at < reads[1]
    assert len(reads) == -(-SERVICES // SLICE)


class NatKeeping(Recording):
    """A backend with source NAT whose repair takes three steps; records what each step saw."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[str] = []

    async def repair_nat_steps(self, applied: Callable[[], IPVSState]) -> AsyncIterator[None]:
        for command in ("ipset restore", "iptables-restore"):
            self.steps.append(command)
            yield
        state = applied()  # the sets are compared with the state as applied now, not at the round's start
        self.steps.append(f"resync {state.real_server_count()} real servers")


def test_the_nat_repair_is_one_command_a_slice_against_the_state_of_its_last_step() -> None:
    async def scenario() -> None:
        tracker = listed_tracker(*objects(0, 1, 2))
        backend = NatKeeping()
        syncer = Syncer(tracker, CTX, backend)
        await syncer.start()
        backend.steps.clear()

        await syncer.audit_slice()  # the bound addresses
        await syncer.audit_slice()  # the outline
        await syncer.audit_slice()  # the one slice of real servers
        await syncer.audit_slice()
        assert backend.steps == ["ipset restore"]
        tracker.upsert_slice(objects(0, 1, 2, 3, rv="2")[1])
        await syncer.sync()  # between two steps of the repair
        await syncer.audit_slice()
        assert backend.steps == ["ipset restore", "iptables-restore"]
        assert syncer.auditing
        await syncer.audit_slice()
        assert backend.steps[-1] == "resync 3 real servers"
        while syncer.auditing:
            await syncer.audit_slice()
        assert syncer.counters.passes["audit"] == 1

    asyncio.run(scenario())


class SlowReads(Recording):
    """Every read of real servers takes 20 ms (a slow kernel); records when each began."""

    def __init__(self) -> None:
        super().__init__()
        self.began: list[float] = []

    async def read(self, keys: Collection[VirtualServerKey], addresses: Collection[IPAddress]) -> IPVSState:
        self.began.append(asyncio.get_running_loop().time())
        await asyncio.sleep(0.02)
        return await super().read(keys, addresses)


def test_audit_slices_are_spaced_so_a_round_takes_at_most_its_share_of_the_loop() -> None:
    backend = SlowReads()
    one_audit_round(ScriptedSource(), backend)
    gaps = [later - earlier for earlier, later in zip(backend.began, backend.began[1:], strict=False)]
    assert len(gaps) >= 2
    # Each slice (>= 20 ms) is followed by a rest of (1 - share) / share times its duration.
    assert min(gaps) >= 0.02 / AUDIT_SHARE - 0.005


class SlowConnectionReads(Recording):
    """Every connection-count read takes 100 ms (a drain slice of three: 300 ms); records when each apply
    that adds a real server began (a sync's)."""

    def __init__(self) -> None:
        super().__init__()
        self.adds: list[float] = []

    async def connections(self, key: VirtualServerKey) -> Mapping[RealServerKey, RealServerConnections]:
        await asyncio.sleep(0.1)
        return await super().connections(key)

    async def apply(self, operations: Any) -> Any:
        if any(isinstance(op, AddRealServer) for op in operations):
            self.adds.append(asyncio.get_running_loop().time())
        return await super().apply(operations)


def test_a_drain_slice_does_not_start_when_it_would_hold_up_a_due_sync() -> None:
    services, period = 12, 0.4
    source, backend = ScriptedSource(), SlowConnectionReads()
    daemon = Daemon(
        settings(min_sync_period=period, drain_check_period=0.01, audit_period=3600),
        source=source,
        backend=backend,
    )
    for index in range(services):  # pod 2 of every service keeps a connection: it drains for ever
        backend.connection_counts[(virtual(index), RealServerKey(ip_address(pod(index, 2)), 8080))] = (
            RealServerConnections(active=1, inactive=0)
        )

    async def scenario() -> None:
        async with running(daemon):
            syncer = await synced(daemon, source, *(obj for i in range(services) for obj in objects(i, 1, 2)))
            source.feed(*(objects(index, 1, rv="2")[1] for index in range(services)))
            await until(daemon, lambda: syncer.counters.passes["drain"] >= 1)  # rounds of 300 ms slices
            backend.adds.clear()
            # A change every 20 ms for 3 s: a sync is due every period, while drain slices keep coming.
            for step in range(150):
                source.feed(objects(0, 1, *range(10, 11 + step), rv=str(3 + step))[1])
                await asyncio.sleep(0.02)

    asyncio.run(scenario())
    gaps = [later - earlier for earlier, later in zip(backend.adds, backend.adds[1:], strict=False)]
    assert len(gaps) >= 4
    # Each sync starts when due (the period after the last one began), not after a slice that was started
    # just before: that would make a gap of up to period + 300 ms.
    assert max(gaps) < period + 0.1, gaps
