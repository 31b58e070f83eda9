"""Graceful termination on a real kernel, with real traffic, driven through the Syncer like the daemon.

Two pods behind one TCP service; a client in its own namespace holds a connection to pod-b while pod-b's
endpoint goes away. pod-b's real server drops to weight 0 (no new connections, the held one goes on) and is
deleted once IPVS counts no connection to it, or once the grace period is over: a connection closed normally
stays in TIME_WAIT, counted as inactive, for two minutes. The drain clock is fake: the tests say which of the
two ended a drain.

Every kernel check reads IPVS with ipvsadm (netlab's parser), never through the code under test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path

import pytest

from aproxy.backends.ipvs import IPVSBackend, IPVSSettings
from aproxy.core.changes import ChangeTracker
from aproxy.core.drain import DrainClock
from aproxy.core.model import (
    DeleteRealServer,
    L4Protocol,
    Operation,
    RealServer,
    RealServerKey,
    UpdateRealServer,
    VirtualServerKey,
)
from aproxy.core.translate import TranslationContext
from aproxy.syncer import Syncer, SyncReport
from tests.core import k8s
from tests.kernel import netlab
from tests.kernel.netlab import SERVICE_ADDRESS, Lab, Namespace

pytestmark = pytest.mark.kernel

CTX = TranslationContext(node_name="node-a", node_addresses=frozenset({ip_address("192.0.2.10")}))
PORT = 80
TARGET_PORT = netlab.ECHO_PORT
VIRTUAL = VirtualServerKey(L4Protocol.TCP, SERVICE_ADDRESS, PORT)
GRACE_PERIOD = 60.0
# rr alternates between the two pods: the second connection at the latest lands on the wanted one.
HOLD_ATTEMPTS = 4
# A reset connection stays in IPVS's CLOSE state for 10 s before its entry (and its count) goes.
RESET_EXPIRY_TIMEOUT = 30.0
# A closed connection reaches TIME_WAIT (inactive) within a round trip; generous for a loaded host.
SETTLE_TIMEOUT = 5.0
TIMEOUT = 2.0


@pytest.fixture
def settings(tmp_path: Path) -> IPVSSettings:
    return IPVSSettings(state_file=tmp_path / "owned.json")


@dataclass(frozen=True, slots=True)
class Scene:
    pod_a: Namespace
    pod_b: Namespace
    client: Namespace


@pytest.fixture
def scene(lab: Lab) -> Scene:
    return Scene(lab.add_pod("pod-a"), lab.add_pod("pod-b"), lab.add_client())


class FakeClock:
    """The Syncer's drain clock: time moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- aproxy on the node, driven from a synchronous test -----------------------------------------------------


class Aproxy:
    """One Syncer over one IPVSBackend on a private event loop, so the test body stays synchronous."""

    def __init__(self, runner: asyncio.Runner, syncer: Syncer, tracker: ChangeTracker) -> None:
        self._runner = runner
        self._syncer = syncer
        self._tracker = tracker

    def start(self) -> SyncReport:
        return self._runner.run(self._syncer.start())

    def sync(self) -> SyncReport:
        return self._runner.run(self._syncer.sync())

    def drain(self) -> SyncReport:
        return self._runner.run(self._syncer.drain())

    def set_endpoints(self, *pods: Namespace) -> SyncReport:
        """The cluster's web endpoints become ``pods``; one sync."""
        self._tracker.upsert_slice(web_slice(*pods))
        return self.sync()


@contextmanager
def running_aproxy(tracker: ChangeTracker, settings: IPVSSettings, clock: FakeClock) -> Iterator[Aproxy]:
    """aproxy from start to stop: leaving the block is a restart's first half (the kernel keeps its state)."""
    with asyncio.Runner() as runner:
        backend = runner.run(IPVSBackend(settings).__aenter__())
        try:
            drain_clock = DrainClock(grace_period=GRACE_PERIOD)
            syncer = Syncer(tracker, CTX, backend, drain_clock=drain_clock, clock=clock)
            yield Aproxy(runner, syncer, tracker)
        finally:
            runner.run(backend.__aexit__(None, None, None))


@contextmanager
def started(scene: Scene, settings: IPVSSettings, clock: FakeClock) -> Iterator[Aproxy]:
    """``running_aproxy`` started on a cluster where both pods are web's endpoints."""
    with running_aproxy(tracker_with(scene.pod_a, scene.pod_b), settings, clock) as aproxy:
        assert aproxy.start().ok
        yield aproxy


# --- the cluster --------------------------------------------------------------------------------------------


def web_slice(*pods: Namespace) -> k8s.Obj:
    endpoints = [k8s.endpoint(str(pod.address), node="node-a") for pod in pods]
    return k8s.endpoint_slice("web", endpoints=endpoints, ports=[k8s.slice_port("http", TARGET_PORT)])


def tracker_with(*pods: Namespace) -> ChangeTracker:
    tracker = ChangeTracker()
    tracker.upsert_service(
        k8s.service(
            "web", cluster_ips=str(SERVICE_ADDRESS), ports=[k8s.port("http", PORT, target_port=TARGET_PORT)]
        )
    )
    tracker.upsert_slice(web_slice(*pods))
    tracker.mark_listed("services")
    tracker.mark_listed("endpointslices")
    return tracker


def real_key(pod: Namespace) -> RealServerKey:
    return RealServerKey(pod.address, TARGET_PORT)


def operations(report: SyncReport) -> list[Operation]:
    return [result.operation for result in report.results]


# --- traffic and the kernel's view of it --------------------------------------------------------------------


def hold_on(pod: Namespace, client: Namespace) -> netlab.HeldConnection:
    """Open connections through the virtual IP until one lands on ``pod``; close the others."""
    others: list[netlab.HeldConnection] = []
    try:
        for _ in range(HOLD_ATTEMPTS):
            held = netlab.hold(SERVICE_ADDRESS, PORT, netns=client.netns, timeout=TIMEOUT)
            if held.backend == pod.name:
                return held
            others.append(held)
    finally:
        for other in others:
            other.close()
    raise AssertionError(f"no connection landed on {pod.name} in {HOLD_ATTEMPTS} attempts")


def real_entry(pod: Namespace) -> netlab.RealServerEntry:
    return netlab.read_ipvs().get(VIRTUAL).real(pod.address, TARGET_PORT)


def kernel_weights() -> dict[RealServerKey, int]:
    return netlab.read_ipvs().get(VIRTUAL).weights


def wait_for_counts(pod: Namespace, active: int, inactive: int, timeout: float) -> netlab.RealServerEntry:
    def counted() -> netlab.RealServerEntry | None:
        entry = real_entry(pod)
        return entry if (entry.active, entry.inactive) == (active, inactive) else None

    return netlab.wait_until(
        counted, what=f"{pod.name} at {active} active, {inactive} inactive", timeout=timeout, interval=0.5
    )


def fresh_backends(scene: Scene, count: int = 4) -> set[str]:
    replies = netlab.tcp_replies(SERVICE_ADDRESS, PORT, count, netns=scene.client.netns)
    return set(netlab.backends(replies))


def assert_pod_b_deleted(report: SyncReport, scene: Scene) -> None:
    """The drain ended in pod-b's delete, and pod-a is all the kernel has left."""
    assert operations(report) == [DeleteRealServer(VIRTUAL, real_key(scene.pod_b))]
    assert report.ok
    assert kernel_weights() == {real_key(scene.pod_a): 1}


# --- the tests ----------------------------------------------------------------------------------------------


def test_a_removed_endpoint_drains_while_its_connection_lives_and_is_deleted_once_it_is_gone(
    scene: Scene, settings: IPVSSettings
) -> None:
    clock = FakeClock()
    with started(scene, settings, clock) as aproxy, hold_on(scene.pod_b, scene.client) as held:
        removal = aproxy.set_endpoints(scene.pod_a)
        draining = real_entry(scene.pod_b)
        fresh = netlab.tcp_replies(SERVICE_ADDRESS, PORT, 6, netns=scene.client.netns)
        still = held.exchange()
        while_open = aproxy.drain()
        kept = real_entry(scene.pod_b)
        held.reset()
        wait_for_counts(scene.pod_b, active=0, inactive=0, timeout=RESET_EXPIRY_TIMEOUT)
        once_gone = aproxy.drain()  # the fake clock never moved: no connection left ends this drain

    assert operations(removal) == [UpdateRealServer(VIRTUAL, RealServer(scene.pod_b.address, TARGET_PORT, 0))]
    assert removal.ok
    assert (draining.weight, draining.active) == (0, 1)
    assert netlab.backends(fresh) == {scene.pod_a.name: 6}
    assert still == netlab.Reply(scene.pod_b.name, scene.client.address)
    assert while_open.results == ()
    assert (kept.weight, kept.active) == (0, 1)
    assert_pod_b_deleted(once_gone, scene)


def test_a_drain_ends_at_the_grace_period_while_a_closed_connection_lingers_in_time_wait(
    scene: Scene, settings: IPVSSettings
) -> None:
    clock = FakeClock()
    with started(scene, settings, clock) as aproxy:
        with hold_on(scene.pod_b, scene.client):
            removal = aproxy.set_endpoints(scene.pod_a)
        lingering = wait_for_counts(scene.pod_b, active=0, inactive=1, timeout=SETTLE_TIMEOUT)
        first_look = aproxy.drain()  # the grace period starts at the first look
        clock.advance(GRACE_PERIOD - 1)
        before_grace = aproxy.drain()
        clock.advance(1)
        at_grace = aproxy.drain()

    assert removal.ok and lingering.weight == 0
    assert first_look.results == () and before_grace.results == ()
    assert_pod_b_deleted(at_grace, scene)


def test_an_endpoint_that_returns_during_its_drain_gets_its_weight_back(
    scene: Scene, settings: IPVSSettings
) -> None:
    clock = FakeClock()
    with started(scene, settings, clock) as aproxy:
        with hold_on(scene.pod_b, scene.client) as held:
            removal = aproxy.set_endpoints(scene.pod_a)
            while_draining = aproxy.drain()
            back = aproxy.set_endpoints(scene.pod_a, scene.pod_b)
            clock.advance(2 * GRACE_PERIOD)
            past_grace = aproxy.drain()
            still = held.exchange()
        fresh = fresh_backends(scene)

    assert removal.ok and while_draining.results == ()
    assert operations(back) == [UpdateRealServer(VIRTUAL, RealServer(scene.pod_b.address, TARGET_PORT, 1))]
    assert back.ok
    assert past_grace.results == ()  # no longer draining: no delete, whatever the clock says
    assert kernel_weights() == {real_key(scene.pod_a): 1, real_key(scene.pod_b): 1}
    assert still.backend == scene.pod_b.name
    assert fresh == {scene.pod_a.name, scene.pod_b.name}


def test_a_restart_during_a_drain_keeps_the_drained_server_at_zero_until_a_drain_deletes_it(
    scene: Scene, settings: IPVSSettings
) -> None:
    clock = FakeClock()
    with ExitStack() as stack:
        with started(scene, settings, FakeClock()) as before_restart:
            held = stack.enter_context(hold_on(scene.pod_b, scene.client))
            assert before_restart.set_endpoints(scene.pod_a).ok
        # The restarted aproxy lists the cluster again: pod-b is gone from it.
        with running_aproxy(tracker_with(scene.pod_a), settings, clock) as after_restart:
            restarted = after_restart.start()
            at_restart = real_entry(scene.pod_b)
            still = held.exchange()
            held.close()
            wait_for_counts(scene.pod_b, active=0, inactive=1, timeout=SETTLE_TIMEOUT)
            first_look = after_restart.drain()
            clock.advance(GRACE_PERIOD)
            at_grace = after_restart.drain()

    assert restarted.results == ()  # not restored (not desired), and nothing else to do
    assert (at_restart.weight, at_restart.active) == (0, 1)
    assert still.backend == scene.pod_b.name
    assert first_look.results == ()
    assert_pod_b_deleted(at_grace, scene)


def test_start_restores_a_desired_real_server_left_at_weight_zero_by_an_interrupted_drain(
    scene: Scene, settings: IPVSSettings
) -> None:
    with started(scene, settings, FakeClock()) as before_restart:
        assert before_restart.set_endpoints(scene.pod_a).ok
    left_behind = kernel_weights()
    # pod-b's endpoint came back while aproxy was down.
    with running_aproxy(tracker_with(scene.pod_a, scene.pod_b), settings, FakeClock()) as after_restart:
        restarted = after_restart.start()
    fresh = fresh_backends(scene)

    assert left_behind == {real_key(scene.pod_a): 1, real_key(scene.pod_b): 0}
    assert operations(restarted) == [
        UpdateRealServer(VIRTUAL, RealServer(scene.pod_b.address, TARGET_PORT, 1))
    ]
    assert restarted.ok
    assert kernel_weights() == {real_key(scene.pod_a): 1, real_key(scene.pod_b): 1}
    assert fresh == {scene.pod_a.name, scene.pod_b.name}
