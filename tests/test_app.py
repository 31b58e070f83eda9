"""The daemon (``aproxy run``) on the host: the memory backend, the file source or a scripted one, real HTTP.

Every wait is bounded (``TIMEOUT`` for a whole scenario, ``STEP`` for one awaited condition) and every
assertion is about behaviour: operations the backend saw, what the endpoints answer, what the metrics say.
Conditions are awaited pass by pass (``KernelLoop.next_pass``), never by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import signal
import socket
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from errno import EIO
from ipaddress import ip_address
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from aproxy import cli
from aproxy.app import EXIT_FAILED, EXIT_OK, Daemon
from aproxy.backends.base import BackendError, RealServerConnections
from aproxy.backends.ipvs import IPVSSettings
from aproxy.backends.memory import MemoryBackend
from aproxy.core.backoff import RetryPolicy
from aproxy.core.model import AddVirtualServer, DeleteVirtualServer, L4Protocol, Operation, RealServerKey
from aproxy.core.model import VirtualServerKey as VSKey
from aproxy.core.state import IPVSState
from aproxy.health.config import HealthCheckSettings
from aproxy.settings import Settings, SettingsError
from aproxy.sources.base import ObjectSink
from aproxy.sources.file import FileSourceSettings
from aproxy.sources.kube.watch import KubernetesSource
from aproxy.startup_gc import STARTUP_GC_THRESHOLD
from aproxy.syncer import Syncer
from aproxy.web.server import ListenAddress
from tests.core.k8s import endpoint, endpoint_slice, port, service, slice_port
from tests.fakeapi import fixtures
from tests.fakeapi.server import FakeApiServer

T = TypeVar("T")
TIMEOUT = 30.0  # seconds for a whole scenario: a bound against hanging, never an assertion
STEP = 10.0  # seconds for one awaited condition
ROOT = Path(__file__).resolve().parents[1]
fake_api = fixtures.fake_api  # the fake Kubernetes API server, as a fixture
EPHEMERAL = ListenAddress("127.0.0.1", 0)
WEB = VSKey(L4Protocol.TCP, ip_address("10.96.0.1"), 80)
API = VSKey(L4Protocol.TCP, ip_address("10.96.0.2"), 80)
FAST_RETRY = RetryPolicy(initial=0.01, cap=0.02, jitter=0)  # retries within a scenario's bounds


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, TIMEOUT))


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "node_name": "node-a",
        "node_ips": (ip_address("192.0.2.10"),),
        "backend": "dry-run",
        "healthz_address": EPHEMERAL,
        "metrics_address": EPHEMERAL,
        # The endpoints are made-up addresses: no health checks (tests send traffic only to loopback).
        "health_checks": HealthCheckSettings(enabled=False),
    }
    return Settings(**{**values, **overrides})


def web_service() -> dict[str, Any]:
    return service("web", cluster_ips="10.96.0.1", ports=[port("http", 80)])


def api_service() -> dict[str, Any]:
    return service("api", cluster_ips="10.96.0.2", ports=[port("http", 80)])


def slice_of(service_name: str, *addresses: str, slice_name: str | None = None) -> dict[str, Any]:
    return endpoint_slice(
        service_name,
        name=slice_name,
        endpoints=[endpoint(address) for address in addresses],
        ports=[slice_port("http", 8080)],
    )


def real(address: str) -> RealServerKey:
    return RealServerKey(ip_address(address), 8080)


class ScriptedSource:
    """A Source the test drives by hand: ``run`` hands the sink over, then waits to be cancelled."""

    def __init__(self) -> None:
        self._sink: ObjectSink | None = None
        self.attached = asyncio.Event()

    async def run(self, sink: ObjectSink) -> None:
        self._sink = sink
        self.attached.set()
        await asyncio.Event().wait()

    async def wait_attached(self) -> None:
        await asyncio.wait_for(self.attached.wait(), STEP)

    @property
    def sink(self) -> ObjectSink:
        assert self._sink is not None, "the daemon has not started the source"
        return self._sink

    def list_all(self, *objects: dict[str, Any]) -> None:
        self.feed(*objects)
        self.sink.mark_listed("services")
        self.sink.mark_listed("endpointslices")

    def feed(self, *objects: dict[str, Any]) -> None:
        for obj in objects:
            if obj["kind"] == "Service":
                self.sink.upsert_service(obj)
            else:
                self.sink.upsert_slice(obj)


class CallLog(MemoryBackend):
    """The memory backend, recording each call (``dump``/``apply``) with the operations applied."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    async def apply(self, operations: Any) -> Any:
        self.calls.append("apply")
        return await super().apply(operations)

    async def dump(self) -> IPVSState:
        self.calls.append("dump")
        return await super().dump()


@contextlib.asynccontextmanager
async def running(daemon: Daemon, *, handle_signals: bool = False) -> AsyncIterator[asyncio.Task[int]]:
    """The daemon running in a task, its web server listening; stopped (and checked to exit 0) afterwards."""
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop, handle_signals=handle_signals))
    listening = asyncio.create_task(daemon.web.listening.wait())
    async with asyncio.timeout(STEP):
        await asyncio.wait({task, listening}, return_when=asyncio.FIRST_COMPLETED)
    listening.cancel()
    assert not task.done(), f"the daemon ended before listening: {task.result()}"
    try:
        yield task
    finally:
        stop.set()
        async with asyncio.timeout(STEP):
            code = await task
        assert code == EXIT_OK


def daemon_tasks() -> set[asyncio.Task[Any]]:
    """The daemon's tasks still alive (it names them all ``aproxy-*``)."""
    return {task for task in asyncio.all_tasks() if task.get_name().startswith("aproxy-")}


async def until(daemon: Daemon, condition: Callable[[], bool]) -> None:
    """Wait, pass by pass, until ``condition`` holds."""
    async with asyncio.timeout(STEP):
        while not condition():
            await daemon.loop.next_pass()


async def initial_sync(daemon: Daemon) -> None:
    await until(daemon, lambda: daemon.loop.initial_sync_done)


async def synced(daemon: Daemon, source: ScriptedSource, *objects: dict[str, Any]) -> Syncer:
    """Hand ``objects`` over as the complete initial lists; the syncer, once the initial sync is done."""
    await source.wait_attached()
    source.list_all(*objects)
    await initial_sync(daemon)
    assert daemon.loop.syncer is not None
    return daemon.loop.syncer


async def get(port: int | None, path: str) -> tuple[int, bytes]:
    assert port is not None
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, await response.read()


async def metrics(daemon: Daemon) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, body = await get(daemon.web.metrics_port, "/metrics")
    assert status == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def operations_metric(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float],
) -> Counter[tuple[str, str]]:
    found: Counter[tuple[str, str]] = Counter()
    for (name, labels), value in samples.items():
        if name == "aproxy_ipvs_operations_total":
            found[(dict(labels)["op"], dict(labels)["result"])] = int(value)
    return found


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


# --- the initialized gate and the health endpoints ----------------------------------------------------------


def test_nothing_applied_before_both_lists_then_healthy() -> None:
    source, backend = ScriptedSource(), CallLog()
    daemon = Daemon(settings(), source=source, backend=backend)

    async def scenario() -> None:
        async with running(daemon):
            await source.wait_attached()
            source.feed(web_service(), slice_of("web", "10.244.1.5", "10.244.1.6"))
            source.sink.mark_listed("services")  # the slices' list is not complete yet

            # Each request below takes the loop through many iterations: the kernel task had its chance.
            healthz, body = await get(daemon.web.healthz_port, "/healthz")
            assert (healthz, (await get(daemon.web.healthz_port, "/readyz"))[0]) == (503, 503)
            assert (await get(daemon.web.healthz_port, "/livez"))[0] == 200
            assert set(orjson.loads(body)) == {"lastUpdated", "currentTime", "nodeEligible"}
            assert orjson.loads(body)["lastUpdated"] is None
            assert backend.calls == []
            assert operations_metric(await metrics(daemon)) == Counter()

            source.sink.mark_listed("endpointslices")
            await initial_sync(daemon)

            healthz, body = await get(daemon.web.healthz_port, "/healthz")
            assert healthz == 200
            assert (await get(daemon.web.healthz_port, "/readyz"))[0] == 200
            document = orjson.loads(body)
            assert set(document) == {"lastUpdated", "currentTime", "nodeEligible"}
            assert document["nodeEligible"] is True
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", document["lastUpdated"])
            assert backend.calls[0] == "dump"  # the first thing done: adopt the kernel's state
            assert backend.applied == {"bind_address": 1, "add_virtual_server": 1, "add_real_server": 2}

    run(scenario())


def test_garbage_collection_is_rarer_until_the_initial_sync_then_restored() -> None:
    source = ScriptedSource()
    daemon = Daemon(settings(), source=source, backend=CallLog())
    defaults = gc.get_threshold()

    async def scenario() -> None:
        async with running(daemon):
            await source.wait_attached()
            assert gc.get_threshold() == (STARTUP_GC_THRESHOLD, *defaults[1:])
            source.list_all(web_service(), slice_of("web", "10.244.1.5"))
            await initial_sync(daemon)
            assert gc.get_threshold() == defaults

    try:
        run(scenario())
        assert gc.get_threshold() == defaults
    finally:
        gc.set_threshold(*defaults)
        gc.unfreeze()  # the initial sync froze this test's objects: give them back to the collector


def test_thresholds_are_restored_when_the_daemon_stops_before_its_initial_sync() -> None:
    source = ScriptedSource()
    daemon = Daemon(settings(), source=source, backend=CallLog())
    defaults = gc.get_threshold()

    async def scenario() -> None:
        async with running(daemon):
            await source.wait_attached()
            assert gc.get_threshold()[0] == STARTUP_GC_THRESHOLD

    try:
        run(scenario())
        assert gc.get_threshold() == defaults
    finally:
        gc.set_threshold(*defaults)


def test_metrics_after_the_initial_sync(tmp_path: Path) -> None:
    write_manifest(tmp_path / "cluster.yaml", [web_service(), slice_of("web", "10.244.1.5", "10.244.1.6")])
    backend = MemoryBackend()
    daemon = Daemon(settings(sources=(tmp_path,)), backend=backend)

    async def scenario() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        async with running(daemon):
            await initial_sync(daemon)
            return await metrics(daemon)

    samples = run(scenario())
    assert operations_metric(samples) == {
        ("bind_address", "ok"): 1,
        ("add_virtual_server", "ok"): 1,
        ("add_real_server", "ok"): 2,
    }
    assert value(samples, "aproxy_sync_passes_total", kind="start") == 1
    assert value(samples, "kubeproxy_sync_proxy_rules_duration_seconds_count") == 1
    assert value(samples, "kubeproxy_sync_proxy_rules_service_changes_total") == 1
    assert value(samples, "kubeproxy_sync_proxy_rules_endpoint_changes_total") == 1
    assert value(samples, "aproxy_sync_proxy_rules_changes_pending") == 0
    assert value(samples, "kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 0
    assert value(samples, "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds") > 0
    assert value(samples, "aproxy_source_reloads_total") == 1
    assert value(samples, "aproxy_source_reload_errors_total") == 0
    assert value(samples, "aproxy_draining_real_servers") == 0
    assert value(samples, "aproxy_sync_retry_delay_seconds") == 0


# --- file source: an edit is applied incrementally ----------------------------------------------------------


def write_manifest(path: Path, objects: list[dict[str, Any]]) -> None:
    # Atomically, as editors and ConfigMap mounts do (a hidden temporary name the watch ignores).
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(yaml.safe_dump_all(objects))
    os.replace(temporary, path)


def test_manifest_edit_applies_exactly_the_difference(tmp_path: Path) -> None:
    manifest = tmp_path / "cluster.yaml"
    write_manifest(manifest, [web_service(), slice_of("web", "10.244.1.5", "10.244.1.6")])
    backend = MemoryBackend()
    # A short settle period: the loop below saves the edit every second until the watch has seen it.
    fast = FileSourceSettings(settle_period=0.05)
    daemon = Daemon(settings(sources=(tmp_path,), file_source=fast), backend=backend)
    edited = [web_service(), slice_of("web", "10.244.1.5", "10.244.1.6", "10.244.1.7")]

    async def scenario() -> tuple[Counter[str], Counter[tuple[str, str]]]:
        async with running(daemon):
            await initial_sync(daemon)
            initial = Counter(backend.applied)
            # The watch starts some time after the first read, unobservably: save the same edit until a sync
            # shows it. Re-reads of identical content change nothing, so the counts stay exact.
            while backend.applied["add_real_server"] == initial["add_real_server"]:
                write_manifest(manifest, edited)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await until(daemon, lambda: backend.applied != initial)
            return backend.applied - initial, operations_metric(await metrics(daemon))

    extra, from_metrics = run(scenario())
    assert extra == {"add_real_server": 1}
    assert from_metrics == {
        ("bind_address", "ok"): 1,
        ("add_virtual_server", "ok"): 1,
        ("add_real_server", "ok"): 3,
    }
    assert backend.rejected == {}
    assert set(backend.dump_sync().real_servers(WEB)) == {
        real("10.244.1.5"),
        real("10.244.1.6"),
        real("10.244.1.7"),
    }


# --- stopping and failing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "how", [pytest.param("stop-event", id="stop-event"), pytest.param("sigterm", id="sigterm")]
)
def test_stop_ends_run_cleanly_and_keeps_the_rules(tmp_path: Path, how: str) -> None:
    write_manifest(tmp_path / "cluster.yaml", [web_service(), slice_of("web", "10.244.1.5")])
    backend = MemoryBackend()
    daemon = Daemon(settings(sources=(tmp_path,)), backend=backend)
    stop = asyncio.Event()

    async def scenario() -> tuple[int, set[asyncio.Task[Any]], int | None]:
        task = asyncio.create_task(daemon.run(stop, handle_signals=how == "sigterm"))
        await initial_sync(daemon)
        port = daemon.web.healthz_port
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the daemon's loop handler, not the default
        else:
            stop.set()
        async with asyncio.timeout(STEP):
            code = await task
        return code, daemon_tasks(), port

    code, left, port = run(scenario())
    assert code == EXIT_OK
    assert left == set()  # every task of the daemon has ended
    assert backend.applied == {"bind_address": 1, "add_virtual_server": 1, "add_real_server": 1}
    assert backend.rejected == {}
    assert WEB in set(backend.dump_sync().virtual_keys())  # nothing removed on the way out

    async def connect() -> None:
        await get(port, "/healthz")

    with pytest.raises(aiohttp.ClientConnectionError):
        run(connect())  # the health site is closed


class FailingSource:
    async def run(self, sink: ObjectSink) -> None:
        raise RuntimeError("cannot read the cluster")


class UnreachableKernel(MemoryBackend):
    async def dump(self) -> IPVSState:
        raise RuntimeError("netlink socket closed")


@pytest.mark.parametrize(
    ("source", "backend", "task"),
    [
        pytest.param(FailingSource(), MemoryBackend(), "source", id="source-fails"),
        pytest.param(None, UnreachableKernel(), "kernel", id="kernel-task-fails"),
    ],
)
def test_a_failing_task_ends_run_with_an_error(
    caplog: pytest.LogCaptureFixture, source: Any, backend: MemoryBackend, task: str
) -> None:
    scripted = ScriptedSource()
    daemon = Daemon(settings(), source=source or scripted, backend=backend)

    async def scenario() -> tuple[int, set[asyncio.Task[Any]]]:
        runner = asyncio.create_task(daemon.run(asyncio.Event(), handle_signals=False))
        if source is None:
            await scripted.wait_attached()
            scripted.list_all(web_service())
        async with asyncio.timeout(STEP):
            code = await runner
        return code, daemon_tasks()

    code, left = run(scenario())
    assert code == EXIT_FAILED
    assert left == set()
    assert f"the {task} task failed; stopping" in caplog.messages


class FlakyKernel(MemoryBackend):
    """Cannot be reached at all for the first ``outages`` dumps (BackendError: nothing attempted)."""

    def __init__(self, outages: int) -> None:
        super().__init__()
        self.outages = outages

    async def dump(self) -> IPVSState:
        if self.outages > 0:
            self.outages -= 1
            raise BackendError("device gone")
        return await super().dump()


def test_an_unreachable_kernel_is_retried_not_fatal() -> None:
    source, backend = ScriptedSource(), FlakyKernel(outages=2)
    daemon = Daemon(settings(retry=FAST_RETRY), source=source, backend=backend)

    async def scenario() -> None:
        async with running(daemon):
            await synced(daemon, source, web_service(), slice_of("web", "10.244.1.5"))

    run(scenario())
    assert daemon.stats.failures == {"start": 2}
    assert backend.applied == {"bind_address": 1, "add_virtual_server": 1, "add_real_server": 1}


# --- retries, backoff and /healthz --------------------------------------------------------------------------


def test_a_failing_service_is_retried_with_growing_delay_and_healthz_turns_503() -> None:
    source, backend = ScriptedSource(), MemoryBackend()
    failing = [True]

    def api_add(op: Operation) -> bool:
        return failing[0] and isinstance(op, AddVirtualServer) and op.key == API

    backend.inject_failure(api_add, EIO, times=1_000_000)
    daemon = Daemon(
        settings(min_sync_period=0, sync_period=0.2, retry=RetryPolicy(initial=0.02, cap=0.16, jitter=0)),
        source=source,
        backend=backend,
    )

    async def scenario() -> tuple[list[float], list[int]]:
        async with running(daemon):
            web = (web_service(), slice_of("web", "10.244.1.5"))
            await synced(daemon, source, *web, api_service(), slice_of("api", "10.244.2.5"))
            delays = [daemon.stats.retry_delay]
            async with asyncio.timeout(STEP):
                while len(delays) < 5:
                    await daemon.loop.next_pass()
                    delays.append(daemon.stats.retry_delay)
            statuses: list[int] = []
            async with asyncio.timeout(STEP):
                while not statuses or statuses[-1] != 503:
                    await daemon.loop.next_pass()
                    statuses.append((await get(daemon.web.healthz_port, "/healthz"))[0])
            assert (await get(daemon.web.healthz_port, "/livez"))[0] == 503
            assert (await get(daemon.web.healthz_port, "/readyz"))[0] == 503
            assert value(await metrics(daemon), "aproxy_sync_retry_delay_seconds") == 0.16

            failing[0] = False
            await until(daemon, lambda: daemon.stats.retry_delay == 0)
            statuses.append((await get(daemon.web.healthz_port, "/healthz"))[0])
            assert (await get(daemon.web.healthz_port, "/readyz"))[0] == 200
            return delays, statuses

    delays, statuses = run(scenario())
    assert delays == [0.02, 0.04, 0.08, 0.16, 0.16]  # the retry policy's exponential backoff, capped
    assert statuses[-2:] == [503, 200]
    assert daemon.loop.backoff.failures == 0
    # Only the failing service was retried: web's operations were applied once, api's virtual server was
    # refused on every retry and then added once.
    assert backend.applied == {"bind_address": 2, "add_virtual_server": 2, "add_real_server": 2}
    assert (
        backend.rejected["add_virtual_server"]
        == daemon.stats.failures["start"] + daemon.stats.failures["sync"]
    )
    assert daemon.stats.failures["sync"] >= 4
    assert {WEB, API} <= set(backend.dump_sync().virtual_keys())


# --- audit and drains, between syncs in the one kernel task -------------------------------------------------


def test_audit_repairs_drift() -> None:
    source, backend = ScriptedSource(), MemoryBackend()
    daemon = Daemon(settings(audit_period=0.05), source=source, backend=backend)

    async def scenario() -> tuple[Counter[str], float]:
        async with running(daemon):
            syncer = await synced(daemon, source, web_service(), slice_of("web", "10.244.1.5", "10.244.1.6"))
            counters = syncer.counters
            await until(daemon, lambda: counters.passes["audit"] >= 1)
            assert counters.audit_repairs == 0  # no drift, nothing done
            programmed = backend.dump_sync()
            before = Counter(backend.applied)

            backend.apply_sync([DeleteVirtualServer(WEB)])  # an operator's `ipvsadm -D`
            await until(daemon, lambda: counters.audit_repairs > 0)
            assert backend.dump_sync() == programmed
            return backend.applied - before, value(await metrics(daemon), "aproxy_audit_repairs_total")

    repaired, repairs_metric = run(scenario())
    assert repaired == {"delete_virtual_server": 1, "add_virtual_server": 1, "add_real_server": 2}
    assert repairs_metric == 3  # the deletion above was not aproxy's; the three repairs were


def test_removed_tcp_endpoint_drains_until_its_connections_are_gone() -> None:
    source, backend = ScriptedSource(), MemoryBackend()
    daemon = Daemon(settings(min_sync_period=0, drain_check_period=0.02), source=source, backend=backend)
    backend.connection_counts[(WEB, real("10.244.1.6"))] = RealServerConnections(active=1, inactive=0)

    async def scenario() -> tuple[float, float]:
        async with running(daemon):
            syncer = await synced(daemon, source, web_service(), slice_of("web", "10.244.1.5", "10.244.1.6"))
            passes = syncer.counters.passes

            source.feed(slice_of("web", "10.244.1.5"))
            await until(daemon, lambda: passes["drain"] >= 3)
            assert backend.applied["update_real_server"] == 1  # weight 0: no new connections
            assert backend.applied["delete_real_server"] == 0  # a connection is still open
            draining = value(await metrics(daemon), "aproxy_draining_real_servers")

            del backend.connection_counts[(WEB, real("10.244.1.6"))]  # the client hung up
            await until(daemon, lambda: backend.applied["delete_real_server"] == 1)
            return draining, value(await metrics(daemon), "aproxy_draining_real_servers")

    draining, after = run(scenario())
    assert (draining, after) == (1, 0)
    assert set(backend.dump_sync().real_servers(WEB)) == {real("10.244.1.5")}


def test_health_check_node_ports_listen_on_the_node_port_addresses() -> None:
    """``--nodeport-addresses primary`` with node IP 127.0.0.1: the health-check node port answers there and
    not on 127.0.0.2 (also local: Linux's loopback is 127/8), as kube-proxy's listens on the selection."""
    source = ScriptedSource()
    ipvs = IPVSSettings(nodeport_addresses=("primary",))
    chosen = settings(backend="ipvs", ipvs=ipvs, node_ips=(ip_address("127.0.0.1"),))
    daemon = Daemon(chosen, source=source, backend=MemoryBackend())
    with socket.socket() as sock:  # a free port, as the API server would allocate one
        sock.bind(("127.0.0.1", 0))
        health_port = sock.getsockname()[1]
    web = service(
        "web",
        type_="LoadBalancer",
        ports=[port("http", 80)],
        external_policy="Local",
        spec_extra={"healthCheckNodePort": health_port},
    )
    local = endpoint_slice(
        "web", endpoints=[endpoint("10.244.1.5", node="node-a")], ports=[slice_port("http", 8080)]
    )

    async def scenario() -> None:
        async with running(daemon):
            await synced(daemon, source, web, local)
            async with asyncio.timeout(STEP):  # the listener opens in its own task, after the sync's pass
                while daemon.health_check.ports != {health_port}:  # noqa: ASYNC110 (a set: no event)
                    await asyncio.sleep(0.01)
            assert (await get(health_port, "/healthz"))[0] == 200
            with socket.socket() as sock:
                assert sock.connect_ex(("127.0.0.2", health_port)) != 0  # refused: not a node-port address

    run(scenario())


# --- the Kubernetes source, against the fake API server -----------------------------------------------------


def test_kubernetes_source_with_node_addresses_from_the_api(fake_api: FakeApiServer, tmp_path: Path) -> None:
    fake_api.create(
        "nodes",
        {
            "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "zone-1"}},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}]},
        },
    )
    fake_api.create("services", service("web", type_="NodePort", ports=[port("http", 80, node_port=30080)]))
    fake_api.create("endpointslices", slice_of("web", "10.244.1.5"))
    fake_api.fail_next(2, 500, verb="get", resource="nodes")  # the node read is retried, not fatal
    kubeconfig = fake_api.write_kubeconfig(tmp_path / "kubeconfig")
    backend = MemoryBackend()
    daemon = Daemon(
        settings(node_ips=(), kubeconfig=kubeconfig, retry=FAST_RETRY),
        backend=backend,
    )
    node_port = VSKey(L4Protocol.TCP, ip_address("192.0.2.10"), 30080)

    async def scenario() -> set[VSKey]:
        async with running(daemon):
            await initial_sync(daemon)
            fake_api.create(
                "endpointslices", slice_of("web", "10.244.1.6", slice_name="web-2")
            )  # a watch event
            await until(daemon, lambda: backend.applied["add_real_server"] == 4)
            return set(backend.dump_sync().virtual_keys())

    keys = fake_api.run(scenario(), timeout=TIMEOUT)
    assert keys == {VSKey(L4Protocol.TCP, ip_address("10.96.0.1"), 80), node_port}
    assert set(backend.dump_sync().real_servers(node_port)) == {real("10.244.1.5"), real("10.244.1.6")}
    assert backend.applied == {"bind_address": 1, "add_virtual_server": 2, "add_real_server": 4}


def test_the_daemon_renews_a_kubeconfig_token_before_the_old_one_is_refused(
    fake_api: FakeApiServer, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("one\n")  # a trailing newline, as an operator's editor leaves it
    kubeconfig = fake_api.write_kubeconfig(tmp_path / "kubeconfig", user={"tokenFile": str(token)})
    fake_api.require_tokens("one")
    fake_api.create("services", web_service())
    fake_api.create("endpointslices", slice_of("web", "10.244.1.5"))
    backend = MemoryBackend()
    daemon = Daemon(settings(kubeconfig=kubeconfig, credential_renewal_period=0.01), backend=backend)

    async def scenario() -> int:
        async with running(daemon):
            await initial_sync(daemon)
            source = daemon.source
            assert isinstance(source, KubernetesSource)
            token.write_text("two\n")  # rotated
            async with asyncio.timeout(STEP):
                while source.credential_renewals == 0:  # noqa: ASYNC110 (a counter: no event to wait on)
                    await asyncio.sleep(0.01)
            fake_api.require_tokens("two")  # the old token expires
            fake_api.clear_requests()
            fake_api.end_streams()
            fake_api.create("endpointslices", slice_of("web", "10.244.1.6", slice_name="web-2"))
            await until(daemon, lambda: backend.applied["add_real_server"] == 2)
            _, exposition = await get(daemon.web.metrics_port, "/metrics")
            return source.credential_renewals, exposition

    renewals, exposition = fake_api.run(scenario(), timeout=TIMEOUT)
    assert renewals == 1
    assert b"aproxy_source_credential_renewals_total 1.0" in exposition
    assert b"aproxy_source_credential_renewal_failures_total 0.0" in exposition
    assert fake_api.requests and {record.token for record in fake_api.requests} == {"two"}


def test_healthz_fails_while_the_node_is_tainted_for_removal_or_deleted(
    fake_api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake_api.create(
        "nodes",
        {
            "metadata": {"name": "node-a"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}]},
        },
    )
    fake_api.create("services", web_service())
    fake_api.create("endpointslices", slice_of("web", "10.244.1.5"))
    kubeconfig = fake_api.write_kubeconfig(tmp_path / "kubeconfig")
    backend = MemoryBackend()
    daemon = Daemon(settings(node_ips=(), kubeconfig=kubeconfig), backend=backend)

    def edit_node(change: Callable[[dict[str, Any]], None]) -> None:
        node = fake_api.get("nodes", None, "node-a")
        assert node is not None
        change(node)
        fake_api.update("nodes", node)

    def taint_and_move(node: dict[str, Any]) -> None:
        node["spec"] = {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}
        node["status"]["addresses"] = [{"type": "InternalIP", "address": "192.0.2.20"}]

    def untaint(node: dict[str, Any]) -> None:
        node["spec"] = {}

    async def healthz_until(status: int) -> tuple[dict[str, Any], str]:
        """Poll /healthz (the node watch has no hook to await) until it answers ``status``."""
        assert daemon.web.healthz_port is not None
        url = f"http://127.0.0.1:{daemon.web.healthz_port}/healthz"
        async with asyncio.timeout(STEP), aiohttp.ClientSession() as session:
            while True:
                async with session.get(url) as response:
                    if response.status == status:
                        return orjson.loads(await response.read()), response.headers.get(
                            "X-Aproxy-Reason", ""
                        )
                await asyncio.sleep(0.01)

    async def scenario() -> list[tuple[bool, str]]:
        answers = []
        async with running(daemon):
            await initial_sync(daemon)
            programmed = dict(backend.applied)
            body, _ = await healthz_until(200)
            assert body["nodeEligible"] is True
            edit_node(taint_and_move)
            body, reason = await healthz_until(503)
            answers.append((body["nodeEligible"], reason))
            assert (await get(daemon.web.healthz_port, "/livez"))[0] == 200
            assert (await get(daemon.web.healthz_port, "/readyz"))[0] == 200
            edit_node(untaint)
            body, reason = await healthz_until(200)
            answers.append((body["nodeEligible"], reason))
            fake_api.delete("nodes", None, "node-a")
            body, reason = await healthz_until(503)
            answers.append((body["nodeEligible"], reason))
            assert (await get(daemon.web.healthz_port, "/livez"))[0] == 200
            assert backend.applied == programmed  # node changes re-program nothing, addresses included
        return answers

    with caplog.at_level(logging.INFO, logger="aproxy.sources.kube.node"):
        answers = fake_api.run(scenario(), timeout=TIMEOUT)
    assert answers == [
        (False, "node is tainted ToBeDeletedByClusterAutoscaler"),
        (True, ""),
        (False, "node is gone (no Node object)"),
    ]
    transitions = [r.getMessage() for r in caplog.records if "eligible" in r.getMessage()]
    assert transitions == [
        "this node is not eligible: /healthz answers 503",
        "this node is eligible again: /healthz follows the sync loop",
        "this node is not eligible: /healthz answers 503",
    ]
    moved = [r for r in caplog.records if "addresses changed" in r.getMessage()]
    assert [(r.levelno, r.old, r.new) for r in moved] == [(logging.WARNING, "192.0.2.10", "192.0.2.20")]


# --- settings and the command line --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("30", 30.0, id="plain-seconds"),
        pytest.param("0.5", 0.5, id="fraction"),
        pytest.param("500ms", 0.5, id="milliseconds"),
        pytest.param("15m", 900.0, id="minutes"),
        pytest.param("1m30s", 90.0, id="go-compound"),
        pytest.param("1h", 3600.0, id="hours"),
    ],
)
def test_duration_flags(text: str, seconds: float) -> None:
    args = cli.build_parser().parse_args(["run", "--source", "x", "--node-name", "n", "--sync-period", text])
    assert args.sync_period == seconds


@pytest.mark.parametrize("text", ["", "-1", "5 s", "1x", "nan", "s"])
def test_bad_duration_is_a_usage_error(text: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["run", "--node-name", "n", "--audit-period", text])
    assert exit_info.value.code == 2


def test_run_flags_and_defaults() -> None:
    args = cli.build_parser().parse_args(
        ["run", "--kubeconfig", "k.yaml", "--node-name", "n", "--metrics-bind-address", "[::1]:9100"]
    )
    assert args.source == []
    assert args.kubeconfig == Path("k.yaml")
    assert args.metrics_bind_address == ListenAddress("::1", 9100)
    assert args.healthz_bind_address == ListenAddress("0.0.0.0", 10256)
    assert (args.min_sync_period, args.sync_period, args.audit_period) == (1.0, 30.0, 60.0)
    assert (args.drain_check_period, args.drain_grace_period) == (5.0, 900.0)
    assert args.backend == "ipvs"


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"sources": (Path("x"),), "kubeconfig": Path("k")}, id="two-sources"),
        pytest.param({"sync_period": 0.5, "min_sync_period": 1.0}, id="sync-period-below-minimum"),
        pytest.param({"audit_period": 0}, id="audit-period-zero"),
        pytest.param({"node_name": ""}, id="no-node-name"),
        pytest.param({"retry": RetryPolicy(initial=2, cap=1)}, id="retry-cap-below-initial"),
        pytest.param({"default_scheduler": "fastest"}, id="unknown-scheduler"),
    ],
)
def test_inconsistent_settings_are_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(SettingsError):
        settings(**overrides)


def test_run_with_two_sources_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["run", "--source", "x.yaml", "--kubeconfig", "k.yaml", "--node-name", "n"])
    assert code == 2
    assert "not both" in capsys.readouterr().err


# --- the real command ---------------------------------------------------------------------------------------


def test_aproxy_run_command_serves_then_exits_0_on_sigterm() -> None:
    command = [
        sys.executable,
        "-m",
        "aproxy.cli",
        "run",
        "--source",
        str(ROOT / "examples" / "cluster.yaml"),
        "--node-name",
        "node-a",
        "--node-ip",
        "192.0.2.10",
        "--backend",
        "dry-run",
        "--healthz-bind-address",
        "127.0.0.1:0",
        "--metrics-bind-address",
        "127.0.0.1:0",
        "--no-health-checks",  # the example's endpoints are not hosts of this test
    ]

    async def scenario() -> tuple[int, int, int, list[str]]:
        process = await asyncio.create_subprocess_exec(*command, cwd=ROOT, stderr=asyncio.subprocess.PIPE)
        assert process.stderr is not None
        lines: list[str] = []
        try:
            async with asyncio.timeout(STEP):
                while not all(any(event in line for line in lines) for event in ("initial sync", "serving")):
                    line = (await process.stderr.readline()).decode()
                    assert line, f"aproxy run ended early: {lines}"
                    lines.append(line)
            serving = next(line for line in lines if "serving health and metrics" in line)
            healthz_port = int(re.search(r"healthz=127\.0\.0\.1:(\d+)", serving).group(1))  # type: ignore[union-attr]
            status, _ = await get(healthz_port, "/healthz")
            ready, _ = await get(healthz_port, "/readyz")
        finally:
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(STEP):
                rest = await process.stderr.read()
                code = await process.wait()
        return status, ready, code, [*lines, *rest.decode().splitlines()]

    status, ready, code, lines = run(scenario())
    assert (status, ready) == (200, 200)
    assert code == 0, lines
    assert any("signal=SIGTERM" in line for line in lines)
