"""The IPVS backend on a real kernel, driven through the same Syncer as the daemon and ``aproxy sync``.

Every check reads the kernel with ipvsadm (netlab's parser) or ip, never through the code under test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import threading
from collections.abc import Awaitable, Callable, Iterator
from ipaddress import ip_address
from pathlib import Path
from typing import TypeVar

import pytest

from aproxy import render
from aproxy.backends.ipvs import IPVSBackend, IPVSSettings
from aproxy.cli import tracker_from_manifests
from aproxy.core.changes import ChangeTracker
from aproxy.core.model import L4Protocol, RealServerKey, VirtualServerKey
from aproxy.core.translate import TranslationContext
from aproxy.syncer import Syncer, SyncReport, desired_all
from tests.kernel import netlab

pytestmark = pytest.mark.kernel

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cluster.yaml"
NODE_IP = ip_address("192.0.2.10")
FOREIGN = VirtualServerKey(L4Protocol.TCP, ip_address("198.51.100.7"), 80)

T = TypeVar("T")


def example_tracker() -> ChangeTracker:
    return tracker_from_manifests([EXAMPLE])


CTX = TranslationContext(node_name="node-a", node_addresses=frozenset({NODE_IP}))


@pytest.fixture
def settings(tmp_path: Path) -> IPVSSettings:
    return IPVSSettings(state_file=tmp_path / "owned.json")


def with_syncer(settings: IPVSSettings, tracker: ChangeTracker, body: Callable[[Syncer], Awaitable[T]]) -> T:
    async def main() -> T:
        async with IPVSBackend(settings) as backend:
            return await body(Syncer(tracker, CTX, backend))

    return asyncio.run(main())


async def _start(syncer: Syncer) -> SyncReport:
    return await syncer.start()


@pytest.fixture
def foreign_virtual_server() -> Iterator[None]:
    """Someone else's virtual server (keepalived's, an operator's), on an address aproxy never binds."""
    netlab.ipvsadm("-A", "-t", f"{FOREIGN.address}:{FOREIGN.port}", "-s", "wlc")
    netlab.ipvsadm("-a", "-t", f"{FOREIGN.address}:{FOREIGN.port}", "-r", "10.244.9.9:80", "-m", "-w", "3")
    yield


def assert_kernel_matches_the_plan(tracker: ChangeTracker) -> None:
    view = render.node_view(desired_all(tracker, CTX).values())
    table = netlab.read_ipvs()
    owned = {entry.key: entry for entry in table.virtual_servers if entry.key != FOREIGN}
    assert set(owned) == {vs.key for vs in view.virtual_servers}
    for vs in view.virtual_servers:
        entry = owned[vs.key]
        assert entry.spec == vs.spec, vs.key
        assert entry.weights == {real.key: real.weight for real in vs.real_servers}, vs.key
        assert {real.forward for real in entry.real_servers} <= {"Masq"}
    assert netlab.device_addresses() == frozenset(view.addresses)


def test_example_cluster_is_programmed_exactly_as_planned(settings: IPVSSettings) -> None:
    tracker = example_tracker()

    report = with_syncer(settings, tracker, _start)

    assert report.ok, report.failures
    assert_kernel_matches_the_plan(tracker)


def test_restart_with_an_unchanged_cluster_performs_zero_operations(settings: IPVSSettings) -> None:
    tracker = example_tracker()
    first = with_syncer(settings, tracker, _start)
    assert first.ok and len(first.results) > 0

    second = with_syncer(settings, example_tracker(), _start)

    assert second.results == ()
    assert_kernel_matches_the_plan(tracker)


def test_foreign_virtual_server_is_never_touched(
    settings: IPVSSettings, foreign_virtual_server: None
) -> None:
    tracker = example_tracker()
    with_syncer(settings, tracker, _start)

    async def cleanup(syncer: Syncer) -> None:
        await syncer.start()
        await syncer.audit()
        backend = syncer._backend
        assert isinstance(backend, IPVSBackend)
        await backend.cleanup()

    with_syncer(settings, tracker, cleanup)

    table = netlab.read_ipvs()
    assert table.keys() == {FOREIGN}
    foreign = table.get(FOREIGN)
    assert foreign.scheduler == "wlc"
    assert foreign.weights == {RealServerKey(ip_address("10.244.9.9"), 80): 3}
    assert "kube-ipvs0" not in netlab.run("ip", "-o", "link", "show")


def test_audit_repairs_a_flushed_table(settings: IPVSSettings) -> None:
    tracker = example_tracker()

    async def flush_then_audit(syncer: Syncer) -> SyncReport:
        await syncer.start()
        netlab.ipvsadm("-C")
        assert len(netlab.read_ipvs()) == 0
        return await syncer.audit()

    report = with_syncer(settings, tracker, flush_then_audit)

    assert report.ok and len(report.results) > 0
    assert_kernel_matches_the_plan(tracker)


def test_an_open_that_fails_closes_what_it_opened(settings: IPVSSettings) -> None:
    """The netlink thread and sockets opened before the failure do not outlive it."""
    bad = dataclasses.replace(settings, masquerade=True, cluster_cidrs=("10.244.0.0/33",))
    threads = threading.active_count()
    backend = IPVSBackend(bad)

    with pytest.raises(ValueError, match=re.escape("10.244.0.0/33")):
        asyncio.run(backend.open())

    assert threading.active_count() == threads
